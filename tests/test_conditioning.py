"""Conditioning kinds: the registry (a kind added from this file alone trains and samples end to end) and
SDXL's conditioning (two text towers, size/crop micro-conditioning, token-id caching, weight layouts)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmscale.conditioning import KINDS, Conditioning, Derived, kind_for, register
from ldmscale.config import compose
from ldmscale.data.cache import build_encoders, run_cache_job
from ldmscale.data.loader import CacheMismatchError, build_loader
from ldmscale.data.synthetic import write_shard
from ldmscale.models import build_denoiser
from ldmscale.models.conditioners import (
    SDXLTextEncoder,
    hf_text_state_from_open_clip,
    size_embedding,
)
from ldmscale.models.unet import timestep_embedding
from tests._data_helpers import cached_records
from tests.test_training_dist import ROOT, dist_env

CONF = ROOT / "conf" / "conditioner"
SDXL_TINY = ["conditioner=sdxl_tiny", "model.context_dim=80", "model.adm_in_channels=88"]


# ---------------------------------------------------------------------------- the registry
def test_every_kind_has_a_config_and_every_config_names_a_kind():
    from omegaconf import OmegaConf

    named = {OmegaConf.load(f).kind for f in CONF.glob("*.yaml")}
    assert named <= set(KINDS), named - set(KINDS)
    assert set(KINDS) - {"toy_brightness"} <= named  # (the toy kind below registers itself at test time)


class ToyBrightness(Conditioning):
    """A kind defined here only: the image's mean brightness (derived by the cache) as an 8-d vector y."""

    cond_keys = ("brightness",)
    sampling_inputs = ("brightness",)
    cli_flags = (("--brightness", dict(nargs="+", type=float, help="toy: target mean brightness")),)
    calls: Counter = Counter()

    @property
    def guidable(self) -> bool:
        return True

    def cache_spec(self, frozen, cache_cfg):
        return {"toy": {"derived": "mean brightness"}}

    def check_cache(self, manifest):
        return [] if manifest.get("toy") else ["the cache holds no toy brightness"]

    def derive(self, pixels, keys, captions, frozen, autoencoder, spec, seed):
        return [Derived(meta={"brightness": float(p.mean())}) for p in pixels]

    def collate(self, records, latents, to_latents):
        return {"brightness": torch.tensor([r.meta["brightness"] for r in records])}

    def null(self, cond):
        self.calls["null"] += 1
        return {"brightness": torch.full_like(cond["brightness"], -2.0)}

    def configure_unet(self, model_cfg, kwargs):
        kwargs.update(context_dim=None, num_classes=None, adm_in_channels=8)
        return {}

    def denoiser_inputs(self, denoiser, x_t, cond):
        self.calls["forward"] += 1
        return x_t, None, None, size_embedding(cond["brightness"][:, None].float() * 100, 8)

    def example_cond(self, model_cfg, batch, latent_hw, image_hw, device):
        return {"brightness": torch.zeros(batch, device=device)}

    def sampling_cond(self, inputs, ctx):
        return {"brightness": torch.as_tensor(inputs["brightness"], dtype=torch.float32)[ctx.rows].to(ctx.device)}

    def cli_inputs(self, args, height, width):
        return {"brightness": args.brightness}


def test_a_kind_registered_from_a_test_file_trains_and_samples(tmp_path, monkeypatch):
    """cache → loader → trainer (ZeRO over gloo, one process) → sample CLI, with no edit under ldmscale/."""
    from ldmscale.sample import main as sample_main
    from ldmscale.train import run

    register("toy_brightness", ToyBrightness)
    try:
        raw = tmp_path / "raw"
        raw.mkdir()
        from ldmscale.data.synthetic import make_sample

        write_shard(raw / "shapes-000000.tar", (make_sample(0, i, 32) for i in range(16)))
        cfg = compose(["conditioner.kind=toy_brightness", "cache.batch_size=8", "cache.progress=false",
                       "cache.device=cpu", f"cache.input={raw}/shapes-000000.tar", f"cache.output={tmp_path / 'cache'}",
                       f"data.train_shards=[{tmp_path / 'cache'}]", "data.micro_batch_size=8",
                       "data.global_batch_size=8", "trainer.max_steps=3", "trainer.log_every_steps=1",
                       "trainer.sample_every_steps=0", "checkpoint.every_steps=3", "logger.wandb_mode=disabled",
                       "logger.progress_bar=false", f"run_dir={tmp_path / 'run'}", "optim.lr=1e-3"])
        manifest = run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache)
        assert manifest["toy"] == {"derived": "mean brightness"}
        batch = next(iter(build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=0, rank=0, world_size=1)))
        assert batch["brightness"].shape == (8,) and (batch["brightness"].abs() <= 1).all()

        saved = dict(os.environ)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            run(cfg)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if "loss" in r]
        assert len(losses) == 3 and all(np.isfinite(losses))
        assert ToyBrightness.calls["forward"] >= 3  # the trainer's denoiser asked the toy kind for its inputs

        out = sample_main(["--checkpoint", str(tmp_path / "run"), "--brightness", "-0.5", "0.5", "--steps", "2",
                           "--guidance", "2.0", "--out", str(tmp_path / "samples"), "--no-progress",
                           "--device", "cpu"])
        settings = json.loads((out / "settings.json").read_text())
        assert settings["cond_kind"] == "toy_brightness" and settings["num_images"] == 2
        assert ToyBrightness.calls["null"] >= 1  # guidance used the toy kind's null input
        assert len(list((out / "images").glob("*.png"))) == 2
    finally:
        KINDS.pop("toy_brightness", None)


# ---------------------------------------------------------------------------- SDXL: towers and layouts
@pytest.fixture(scope="module")
def tiny_sdxl() -> SDXLTextEncoder:
    cfg = compose(SDXL_TINY).conditioner
    return kind_for(cfg).build_frozen("cpu")


def test_sdxl_tokens_are_both_penultimate_layers_concatenated_and_pooled_is_bigg(tiny_sdxl):
    ids = tiny_sdxl.tokenize(["a red circle", "two blue squares on the left"])
    out = tiny_sdxl.encode_ids(ids)
    assert out.tokens.shape == (2, 77, 32 + 48) and out.pooled.shape == (2, 40)
    assert out.lengths.tolist() == [5, 8]  # SOT + words + EOT
    for tower, part in ((tiny_sdxl.first, out.tokens[..., :32]), (tiny_sdxl.second, out.tokens[..., 32:])):
        # reference: open_clip's blocks run by hand, stopping before the last one; no final LayerNorm
        t = tower.tower
        x = t.token_embedding(ids) + t.positional_embedding
        for block in t.transformer.resblocks[:-1]:
            x = block(x, attn_mask=t.attn_mask)
        torch.testing.assert_close(part, x)
    torch.testing.assert_close(out.pooled, tiny_sdxl.second.tower(ids))  # open_clip's own pooled projection
    # the CLIP-L-like tower is QuickGELU, as OpenAI's CLIP
    assert type(tiny_sdxl.first.tower.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def _towers_state(encoder: SDXLTextEncoder) -> tuple[dict, dict]:
    return ({k: v + 0.01 for k, v in encoder.first.tower.state_dict().items() if k != "attn_mask"},
            {k: v - 0.01 for k, v in encoder.second.tower.state_dict().items() if k != "attn_mask"})


def test_sdxl_towers_and_unet_load_from_the_sgm_single_file_and_the_diffusers_folder(tiny_sdxl, tmp_path):
    from safetensors.torch import load_file, save_file

    from ldmscale.models.interop import save_unet

    cfg = compose(SDXL_TINY)
    torch.manual_seed(1)
    unet = build_denoiser(cfg.model, cfg.conditioner).unet
    save_unet(unet, tmp_path / "unet_ldm.safetensors", format="ldm")
    save_unet(unet, tmp_path / "pipe" / "unet", format="diffusers")
    first, second = _towers_state(tiny_sdxl)
    # sgm: embedder 0 is transformers' CLIPTextModel (HF names), embedder 1 an open_clip model (its names)
    sgm = {f"conditioner.embedders.0.transformer.{k}": v for k, v in hf_text_state_from_open_clip(first).items()}
    sgm.update({f"conditioner.embedders.1.model.{k}": v for k, v in second.items()})
    sgm["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    sgm.update(load_file(str(tmp_path / "unet_ldm.safetensors")))  # model.diffusion_model.*
    save_file({k: v.contiguous() for k, v in sgm.items()}, str(tmp_path / "sd_xl.safetensors"))
    # diffusers: text_encoder/ (CLIPTextModel) and text_encoder_2/ (CLIPTextModelWithProjection), HF names
    for sub, state in (("text_encoder", first), ("text_encoder_2", second)):
        (tmp_path / "pipe" / sub).mkdir()
        hf = hf_text_state_from_open_clip(state)
        hf["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "pipe" / sub / "model.safetensors"))

    ids = tiny_sdxl.tokenize(["a green triangle at the top"])
    base = tiny_sdxl.encode_ids(ids)
    for weights in (tmp_path / "sd_xl.safetensors", tmp_path / "pipe"):
        cond_cfg = dataclasses.replace(cfg.conditioner, text_weights=str(weights))
        loaded = kind_for(cond_cfg).build_frozen("cpu")
        for ours, want in ((loaded.first.tower, first), (loaded.second.tower, second)):
            state = ours.state_dict()
            assert all(torch.equal(state[k], v) for k, v in want.items())
        out = loaded.encode_ids(ids)
        assert not torch.allclose(out.tokens, base.tokens)  # other weights, other tokens
        assert loaded.fingerprint() != tiny_sdxl.fingerprint()
        # the U-Net from the same file / folder (model.weights), vector input included (label_emb)
        denoiser = build_denoiser(dataclasses.replace(cfg.model, weights=str(weights)), cond_cfg)
        assert all(torch.equal(v, unet.state_dict()[k]) for k, v in denoiser.unet.state_dict().items())


def test_sdxl_micro_conditioning_vector_is_pooled_then_size_crop_target_embeddings():
    cfg = compose(SDXL_TINY)
    torch.manual_seed(0)
    conditioning = kind_for(cfg.conditioner)
    cond = {"pooled": torch.randn(2, 40), "original_size": torch.tensor([[600, 800], [32, 48]]),
            "crop_top_left": torch.tensor([[10, 0], [0, 3]]), "target_size": torch.tensor([[32, 48], [32, 48]])}
    vector = conditioning.vector(cond)
    assert vector.shape == (2, 40 + 6 * 8)
    # sgm ConcatTimestepEmbedderND: each number its own 8-d (here; 256-d in SDXL) cos|sin embedding, in order
    numbers = torch.cat([cond["original_size"], cond["crop_top_left"], cond["target_size"]], dim=1)  # [2,6]
    expected = torch.cat([cond["pooled"]] + [timestep_embedding(numbers[:, i], 8) for i in range(6)], dim=1)
    torch.testing.assert_close(vector, expected)


def test_sdxl_drops_each_tower_on_its_own_and_never_the_sizes():
    cfg = compose([*SDXL_TINY, "conditioner.ucg_rate=0.5", "conditioner.ucg_rate_2=0.5"]).conditioner
    conditioning = kind_for(cfg)
    n = 4000
    cond = {"context": torch.ones(n, 5, 80), "context_mask": torch.zeros(n, 5, dtype=torch.bool),
            "pooled": torch.ones(n, 40), "original_size": torch.full((n, 2), 64)}
    cond["context_mask"][:, :2] = True
    out = conditioning.drop(cond, cfg.ucg_rate, torch.Generator().manual_seed(0))
    first_dropped = (out["context"][:, :, :32] == 0).all(dim=(1, 2))
    second_dropped = (out["context"][:, :, 32:] == 0).all(dim=(1, 2))
    assert torch.equal(second_dropped, (out["pooled"] == 0).all(dim=1))  # bigG's pooled goes with its tokens
    both = (first_dropped & second_dropped).float().mean().item()
    assert abs(first_dropped.float().mean().item() - 0.5) < 0.04 and abs(both - 0.25) < 0.04  # independent
    assert torch.equal(out["context_mask"].all(dim=1), first_dropped & second_dropped)  # all-zero: attend all
    assert torch.equal(out["original_size"], cond["original_size"])
    null = conditioning.null(cond)
    assert (null["context"] == 0).all() and (null["pooled"] == 0).all() and "original_size" not in null


def test_t2i_1024_real_widths_on_meta_conditioner_to_unet():
    cfg = compose(["+experiment=t2i_1024"])
    assert cfg.conditioner.kind == "sdxl" and cfg.model.context_dim == 2048 and cfg.model.adm_in_channels == 2816
    conditioning = kind_for(cfg.conditioner)
    with torch.device("meta"):
        towers = conditioning.build_frozen("meta")
        denoiser = build_denoiser(cfg.model, cfg.conditioner)
    assert towers.widths == (768, 1280) and towers.pooled_dim == 1280
    assert sum(p.numel() for p in towers.first.parameters()) > 120e6  # CLIP ViT-L/14 text (123M)
    assert sum(p.numel() for p in towers.second.parameters()) > 690e6  # OpenCLIP ViT-bigG/14 text (695M)
    ids = towers.tokenize(["a photo of a cat"]).to("meta")
    encoding = towers.encode_ids(ids)
    assert encoding.tokens.shape == (1, 77, 2048) and encoding.pooled.shape == (1, 1280)
    sizes = torch.tensor([[1024, 1024]], device="meta")
    cond = {"context": encoding.tokens, "pooled": encoding.pooled, "original_size": sizes,
            "crop_top_left": torch.zeros_like(sizes), "target_size": sizes}
    assert conditioning.vector(cond).shape == (1, 2816)
    out = denoiser(torch.zeros(1, 4, 128, 96, device="meta"), torch.zeros(1, device="meta"), cond)
    assert out.shape == (1, 4, 128, 96)
    with pytest.raises(ValueError, match="model.adm_in_channels=2048 but conditioner.kind='sdxl' gives a 2816"):
        build_denoiser(compose(["+experiment=t2i_1024", "model.adm_in_channels=2048"]).model, cfg.conditioner)


# ---------------------------------------------------------------------------- SDXL: the cache
def _gradient_image(height: int, width: int, seed: int) -> Image.Image:
    """Known content: every column and row distinct, so another crop gives other pixels."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    array = np.stack([xs * 255 // width, ys * 255 // height, rng.integers(0, 256, (height, width))], -1)
    return Image.fromarray(array.astype(np.uint8))


def _write_raw(folder: Path, sizes: list[tuple[int, int]]) -> None:
    folder.mkdir(parents=True)
    samples = []
    for i, (h, w) in enumerate(sizes):
        buffer = io.BytesIO()
        _gradient_image(h, w, i).save(buffer, format="PNG")
        samples.append({"__key__": f"{i:09d}".encode(), "png": buffer.getvalue(),
                        "txt": f"a gradient number {i}".encode(), "json": json.dumps({"index": i}).encode()})
    write_shard(folder / "raw-000000.tar", samples)


def _sdxl_cache(tmp_path: Path, text: str, sizes: list[tuple[int, int]]):
    raw = tmp_path / "raw"
    if not raw.exists():
        _write_raw(raw, sizes)
    cfg = compose([*SDXL_TINY, "data.buckets=[[32,32],[32,48],[48,32]]", "data.random_crop=true",
                   "data.min_size=16", "cache.batch_size=4", "cache.progress=false", "cache.device=cpu",
                   "cache.latent_dtype=fp32", f"cache.text={text}", f"cache.input={raw}/raw-000000.tar",
                   f"cache.output={tmp_path / text}", f"data.train_shards=[{tmp_path / text}]",
                   "data.micro_batch_size=2", "data.global_batch_size=2"])
    manifest = run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache)
    return cfg, manifest


def test_sdxl_cache_stores_the_crop_it_applied_and_the_loader_hands_it_on(tmp_path):
    # No resize needed (one side already fits its bucket), so the crop is a plain slice of the original.
    sizes = [(32, 60), (32, 60), (32, 60), (70, 32), (70, 32), (32, 32)]
    cfg, manifest = _sdxl_cache(tmp_path, "embeddings", sizes)
    assert manifest["text"]["mode"] == "embeddings"
    encoders = build_encoders(cfg.autoencoder, cfg.conditioner, "cpu")
    records = cached_records(tmp_path / "embeddings")
    assert len(records) == len(sizes)
    lefts_and_tops = set()
    for record in records:
        h, w = sizes[int(record.key)]
        bh, bw = record.meta["bucket"]
        top, left = record.meta["crop_top_left"]
        assert record.meta["original_size"] == [h, w]
        assert 0 <= top <= h - bh and 0 <= left <= w - bw
        lefts_and_tops.add((top, left))
        original = torch.from_numpy(np.array(_gradient_image(h, w, int(record.key)))).permute(2, 0, 1)
        crop = original[:, top:top + bh, left:left + bw].float()[None] / 127.5 - 1
        with torch.no_grad():
            expected = encoders.autoencoder.encode_moments(crop)[0]
        torch.testing.assert_close(record.moments, expected, atol=1e-4, rtol=1e-4)  # exactly this crop
    assert len(lefts_and_tops) > 2  # random crops really moved
    loader = build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=0, rank=0, world_size=1)
    by_key = {r.key: r for r in records}
    seen = 0
    for batch in loader:
        for i, key in enumerate(batch["keys"]):
            assert batch["original_size"][i].tolist() == by_key[key].meta["original_size"]
            assert batch["crop_top_left"][i].tolist() == by_key[key].meta["crop_top_left"]
            assert batch["target_size"][i].tolist() == list(batch["bucket"])
            seen += 1
        assert batch["context"].shape[-1] == 80 and batch["pooled"].shape == (2, 40)
    assert seen >= 4


def test_sdxl_token_ids_cache_encodes_to_the_same_batch_in_training(tmp_path):
    sizes = [(32, 48)] * 4
    cfg_e, manifest_e = _sdxl_cache(tmp_path, "embeddings", sizes)
    cfg_t, manifest_t = _sdxl_cache(tmp_path, "tokens", sizes)
    assert manifest_t["text"]["mode"] == "tokens"
    bytes_e = manifest_e["totals"]["bytes"] / manifest_e["totals"]["written"]
    bytes_t = manifest_t["totals"]["bytes"] / manifest_t["totals"]["written"]
    assert bytes_t < bytes_e
    records = {r.key: r for r in cached_records(tmp_path / "tokens")}
    assert all(r.text_tokens is None and r.meta["text_ids"][0] == 49406 for r in records.values())  # SOT ...
    batch_e = next(iter(build_loader(cfg_e.data, cfg_e.conditioner, cfg_e.autoencoder, seed=0, rank=0, world_size=1)))
    batch_t = next(iter(build_loader(cfg_t.data, cfg_t.conditioner, cfg_t.autoencoder, seed=0, rank=0, world_size=1)))
    assert batch_e["keys"] == batch_t["keys"] and "context" not in batch_t
    conditioning = kind_for(cfg_t.conditioner)
    encoded = conditioning.prepare({k: batch_t[k] for k in conditioning.cond_keys if k in batch_t})
    assert "text_ids" not in encoded
    torch.testing.assert_close(encoded["context_mask"], batch_e["context_mask"])
    torch.testing.assert_close(encoded["context"], batch_e["context"], atol=2e-3, rtol=2e-3)  # cache: fp16
    torch.testing.assert_close(encoded["pooled"], batch_e["pooled"], atol=2e-3, rtol=2e-3)
    other = dataclasses.replace(cfg_t.conditioner, text_model_2="ldmscale-tiny-text")  # another tower 2
    with pytest.raises(CacheMismatchError, match="conditioner.text_model_2: cache 'ldmscale-tiny-bigg'"):
        build_loader(cfg_t.data, other, cfg_t.autoencoder, seed=0, rank=0, world_size=1)


# ---------------------------------------------------------------------------- SDXL: tiny end to end
@pytest.mark.slow
def test_tiny_sdxl_trains_under_two_rank_zero2_and_samples_at_a_non_square_bucket(tmp_path):
    """The t2i_1024 recipe in small: tiny towers of both families, tiny U-Net, three aspect buckets."""
    sizes = [(32, 48)] * 8 + [(48, 32)] * 8 + [(40, 40)] * 8
    cfg, manifest = _sdxl_cache(tmp_path, "tokens", sizes)
    assert manifest["totals"]["bucket_counts"] == [8, 8, 8]
    run_dir = tmp_path / "run"
    overrides = [*SDXL_TINY, "stage=diffusion", "data.buckets=[[32,32],[32,48],[48,32]]",
                 f"data.train_shards=[{tmp_path / 'tokens'}]", "data.micro_batch_size=2", "data.global_batch_size=4",
                 "trainer.max_steps=4", "trainer.log_every_steps=1", "trainer.sample_every_steps=4",
                 "trainer.sample_steps=2", "checkpoint.every_steps=4", "deepspeed.zero_stage=2",
                 f"run_dir={run_dir}", "logger.wandb_mode=disabled", "logger.progress_bar=false"]
    from ldmscale.distributed.env import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "ldmscale.train", *overrides]
    proc = subprocess.run(cmd, env=dist_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert (run_dir / "samples" / "step_00000004.png").is_file()
    cmd = [sys.executable, "-m", "ldmscale.sample", "--checkpoint", str(run_dir), "--prompt", "a gradient",
           "--height", "32", "--width", "48", "--original-size", "600", "800", "--crop-top-left", "0", "12",
           "--steps", "2", "--out", str(tmp_path / "samples"), "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, env=dist_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    settings = json.loads((tmp_path / "samples" / "settings.json").read_text())
    assert settings["cond_kind"] == "sdxl" and settings["original_size"] == [600, 800]
    assert settings["crop_top_left"] == [0, 12] and settings["latent_size"] == [8, 12]
    assert Image.open(tmp_path / "samples" / "images" / "000000.png").size == (48, 32)
