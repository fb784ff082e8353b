"""The stage-1 Task end to end on tiny data: training with the GAN on, bit-exact resume, export/hand-off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmscale.data.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_shards(root / "train", 64, resolution=16, shard_size=32, progress=False)
    write_shards(root / "val", 16, resolution=16, shard_size=16, start_index=10**6, progress=False)
    return root


def tiny_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "+experiment=ae_demo", f"run_dir={run_dir}", "logger.progress_bar=false",
        f"data.train_shards=['{shards}/train/shapes-{{000000..000001}}.tar']", "data.resolution=16",
        "data.micro_batch_size=4", "data.global_batch_size=4",
        f"ae_loss.eval_shards=['{shards}/val/shapes-000000.tar']", "ae_loss.num_eval_samples=8",
        "ae_loss.estimate_scale_samples=8", "ae_loss.num_grid_samples=4",
        "autoencoder.ch=32", "autoencoder.ch_mult=[1,2]", "ae_loss.disc_ndf=8", "ae_loss.disc_num_layers=2",
        "ae_loss.disc_start=2", "ae_loss.kl_weight=1e-3", "trainer.log_every_steps=1",
        "checkpoint.every_steps=100", "logger.wandb_mode=disabled", *extra,
    ]


def run_stage1(overrides: list[str], world_size: int = 1) -> subprocess.CompletedProcess:
    """Train in a fresh process (as the CLI does); torchrun for several ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if world_size == 1:
        cmd = [sys.executable, "-m", "ldmscale.train", *overrides]
    else:
        from ldmscale.distributed.env import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
               f"--master_port={free_port()}", "-m", "ldmscale.train", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_gan_resume_bit_exact_and_export(shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_stage1(tiny_overrides(shards, straight, "trainer.max_steps=4"))
    run_stage1(tiny_overrides(shards, resumed, "trainer.max_steps=2"))
    run_stage1(tiny_overrides(shards, resumed, "trainer.max_steps=4"))

    steps_a = {r["step"]: r for r in read_metrics(straight) if "loss" in r}
    steps_b = {r["step"]: r for r in read_metrics(resumed) if "loss" in r}
    assert sorted(steps_a) == [1, 2, 3, 4]
    # The discriminator is on from optimizer step 2 (ae_loss.disc_start=2): the G term and D loss are logged.
    assert "g_loss" not in steps_a[2] and "g_loss" in steps_a[3] and "d_loss" in steps_a[4]
    for step in (3, 4):
        for key in ("loss", "d_loss", "d_weight", "rec_loss"):
            assert steps_a[step][key] == steps_b[step][key], (step, key)
    weights_a = load_file(straight / "autoencoder" / "model.safetensors")
    weights_b = load_file(resumed / "autoencoder" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

    # Hand-off: the run dir loads as an autoencoder, with its latent scale stored.
    from ldmscale.stage1 import load_autoencoder_from_run

    model = load_autoencoder_from_run(straight)
    scale = json.loads((straight / "latent_scale.json").read_text())["scale_factor"]
    assert model.scale_factor == pytest.approx(scale) and 0.05 < scale < 50
    # The diffusers folder decodes like ours (diffusers is the reference implementation).
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    reference = DiffusersAutoencoderKL.from_pretrained(straight / "autoencoder_diffusers").eval()
    assert reference.config.scaling_factor == pytest.approx(scale)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = model.latent_from_moments(model.encode_moments(pixels))
    assert latents.shape == (2, 4, 8, 8) and model.decode(latents).shape == pixels.shape
    with torch.no_grad():
        assert torch.allclose(reference.decode(latents).sample, model.decode(latents), atol=1e-4)
    # What the cache job and U-Net training do with `autoencoder.weights=<stage-1 run dir>`.
    import dataclasses

    from ldmscale.config import compose
    from ldmscale.models import build_autoencoder

    ae_cfg = compose(tiny_overrides(shards, straight)).autoencoder
    built = build_autoencoder(dataclasses.replace(ae_cfg, weights=str(straight)))
    assert all(torch.equal(built.state_dict()[k], model.state_dict()[k]) for k in model.state_dict())
    assert (straight / "samples" / "recon_final.png").is_file()
    final = [r for r in read_metrics(straight) if "eval/psnr" in r][-1]
    assert final["eval/psnr"] > 5 and -1 <= final["eval/ssim"] <= 1  # 4 steps: barely trained


@pytest.mark.slow
def test_two_rank_zero2_vq(shards, tmp_path):
    run_dir = tmp_path / "zero2"
    run_stage1(tiny_overrides(shards, run_dir, "trainer.max_steps=3", "deepspeed.zero_stage=2",
                              "deepspeed.gradient_clipping=1.0", "data.global_batch_size=8",
                              "autoencoder.kind=vq", "autoencoder.n_embed=32", "autoencoder.double_z=false",
                              "autoencoder.codebook=linear"),  # a frozen basis among ZeRO-2's partitions
               world_size=2)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert "d_loss" in records[2]
    final = [r for r in records if "eval/psnr" in r][-1]
    assert 0 < final["eval/codebook_usage"] <= 1 and final["eval/codebook_perplexity"] >= 1
    meta = json.loads((run_dir / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == {"discriminator": 2, "generator": 2}
    from ldmscale.stage1 import load_autoencoder_from_run

    exported = load_autoencoder_from_run(run_dir)
    assert exported.quantize.n_embed == 32 and exported.config["codebook"] == "plain"  # folded on export
    # the ZeRO-2 checkpoint holds the frozen basis and the learned map; the export holds their product
    from ldmscale.checkpoint import load_run_weights

    state, _ = load_run_weights(run_dir, ema=False, engine="generator")
    basis, proj = state["autoencoder.quantize.embedding.weight"], state["autoencoder.quantize.codebook_proj.weight"]
    torch.testing.assert_close(exported.quantize.codebook(), basis @ proj.t())


def test_rfid_is_logged_when_inception_weights_are_given(shards, tmp_path, fid_inception_weights):
    weights = fid_inception_weights  # random weights: the metric's plumbing, not its calibration
    run_dir = tmp_path / "rfid"
    run_stage1(tiny_overrides(shards, run_dir, "trainer.max_steps=2", "trainer.sample_every_steps=2",
                              f"eval.inception_weights={weights}"))
    evals = [r for r in read_metrics(run_dir) if "eval/psnr" in r]
    assert evals and all(r["eval/rfid"] > 0 for r in evals)  # an untrained decoder is far from the data
