"""SDXL text in the cache (`cache.text=embeddings|tokens`): bytes per cached sample, and what encoding token
ids in the training process costs per step.

    PYTHONPATH=. python tools/benchmark_sdxl_text.py [--samples 512] [--steps 5] [--rounds 3] [--real-towers]

(a) Bytes: records written by the cache's own RecordWriter at SDXL's shapes (1024² bucket: KL-f8 moments
    8x128x128 in bf16; text: the real tokens x 2048 fp16 + pooled 1280 fp16, LAION-like token counts) vs the
    same records holding token ids only.
(b) Step time, tiny scale: the tiny SDXL recipe (conditioner=sdxl_tiny, tiny U-Net, synthetic shards) trained
    from both caches on this CPU (forward + backward + AdamW; rounds alternate the order; medians).
(c) Real towers (--real-towers): CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 text forward per sample on this CPU
    (random weights), and its FLOPs against one SDXL U-Net training step per image (`dry_run`).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchmark_data import caption_lengths  # noqa: E402

from ldmscale.config import compose  # noqa: E402
from ldmscale.data.cache_format import CachedRecord, RecordWriter  # noqa: E402

TINY = ["conditioner=sdxl_tiny", "model.context_dim=80", "model.adm_in_channels=88"]


def bytes_per_sample(num_samples: int) -> dict[str, float]:
    """Mean tar bytes per record in each mode, and the text part alone."""
    rng = np.random.default_rng(0)
    lengths = caption_lengths(num_samples, rng)
    moments = torch.randn(8, 128, 128)
    out: dict[str, float] = {"ids_json": 0.0}
    for mode in ("embeddings", "tokens", "none"):
        buffer = io.BytesIO()
        writer = RecordWriter(buffer)  # type: ignore[arg-type]
        for i, n in enumerate(lengths):
            meta = {"caption": "x" * int(n * 4), "original_size": [1200, 900], "crop_top_left": [0, 37],
                    "bucket": [1024, 1024], "flipped": False}
            record = CachedRecord(f"{i:09d}", moments, meta=meta, text_length=int(n))
            if mode == "embeddings":
                record.text_tokens, record.text_pooled = torch.randn(int(n), 2048), torch.randn(1280)
            elif mode == "tokens":
                record.meta["text_ids"] = [49406] + rng.integers(300, 49000, int(n) - 2).tolist() + [49407]
                out["ids_json"] += len(json.dumps(record.meta["text_ids"], separators=(",", ":"))) / num_samples
            writer.write(record, 0, "bf16", "fp16")
        writer.close()
        out[mode] = len(buffer.getvalue()) / num_samples
    out["padded_77x2048_fp16"] = 77 * 2048 * 2 + 1280 * 2
    out["mean_tokens"] = float(lengths.mean())
    return out


def step_times(steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per training step of the tiny SDXL recipe from an embeddings and a tokens cache."""
    from ldmscale.data.cache import run_cache_job
    from ldmscale.data.loader import build_loader
    from ldmscale.data.synthetic import write_shards
    from ldmscale.diffusion.objective import DiffusionObjective
    from ldmscale.models import build_denoiser

    tmp = Path(tempfile.mkdtemp(prefix="sdxl_text_"))
    write_shards(tmp / "raw", 64, resolution=32, shard_size=64, progress=False)
    runs = {}
    for mode in ("embeddings", "tokens"):
        cfg = compose([*TINY, "cache.batch_size=16", "cache.progress=false", "cache.device=cpu",
                       f"cache.text={mode}", f"cache.input={tmp}/raw/shapes-000000.tar", f"cache.output={tmp / mode}",
                       f"data.train_shards=[{tmp / mode}]", "data.micro_batch_size=16", "data.global_batch_size=16"])
        run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache)
        torch.manual_seed(0)
        denoiser = build_denoiser(cfg.model, cfg.conditioner)
        optimizer = torch.optim.AdamW(denoiser.parameters(), lr=1e-4)
        loader = build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=0, rank=0, world_size=1)
        batches = [b for _, b in zip(range(4), loader)]
        runs[mode] = (cfg, denoiser, optimizer, DiffusionObjective(cfg.diffusion), batches)

    def run(mode: str, count: int) -> float:
        cfg, denoiser, optimizer, objective, batches = runs[mode]
        conditioning, generator = denoiser.conditioning, torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for i in range(count):
            batch = batches[i % len(batches)]
            cond = {k: batch[k] for k in conditioning.cond_keys if k in batch}
            cond = conditioning.drop(conditioning.prepare(cond), cfg.conditioner.ucg_rate, generator)
            objective.loss(denoiser, batch["latents"], cond, generator=generator).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / count

    for mode in runs:
        run(mode, 1)  # warm-up (builds the towers in the tokens run)
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for r in range(rounds):
        for mode in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            times[mode].append(run(mode, steps))
    return {mode: statistics.median(values) for mode, values in times.items()}


def real_towers(batch: int) -> dict[str, float]:
    """CPU seconds per sample of SDXL's two text towers (random weights) and FLOPs vs the U-Net step."""
    from ldmscale.conditioning import kind_for
    from ldmscale.models import count_flops
    from ldmscale.train import dry_run

    cfg = compose(["+experiment=t2i_1024"])
    towers = kind_for(cfg.conditioner).build_frozen("cpu")
    ids = towers.tokenize(["a photograph of an astronaut riding a horse on the moon"] * batch)
    towers.encode_ids(ids[:1])  # warm-up
    start = time.perf_counter()
    towers.encode_ids(ids)
    seconds = (time.perf_counter() - start) / batch
    flops = sum(count_flops(t.tower, ids[:1]) for t in (towers.first, towers.second))
    report = dry_run(compose(["+experiment=t2i_1024", "dry_run=true"]), world_size=8)
    return {"seconds_per_sample": seconds, "tower_gflop_per_sample": flops / 1e9,
            "unet_train_gflop_per_image": 3 * report["flops_per_image"] / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--real-towers", action="store_true")
    parser.add_argument("--tower-batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    sizes = bytes_per_sample(args.samples)
    text_e, text_t = sizes["embeddings"] - sizes["none"], sizes["tokens"] - sizes["none"]
    print(f"(a) bytes/sample at 1024², {sizes['mean_tokens']:.1f} tokens on average (latent+meta alone "
          f"{sizes['none']:,.0f} B):")
    print(f"    embeddings {sizes['embeddings']:,.0f} B (text {text_e:,.0f} B; padded 77x2048 would be "
          f"{sizes['padded_77x2048_fp16']:,.0f} B)")
    print(f"    tokens     {sizes['tokens']:,.0f} B (text {text_t:,.0f} B in the tar, {sizes['ids_json']:.0f} B of JSON "
          f"ids; tar pads members to 512 B): whole record x{sizes['embeddings'] / sizes['tokens']:.2f} smaller")
    times = step_times(args.steps, args.rounds)
    print(f"(b) tiny SDXL recipe on CPU, batch 16: embeddings {times['embeddings'] * 1e3:.1f} ms/step, tokens "
          f"{times['tokens'] * 1e3:.1f} ms/step (x{times['tokens'] / times['embeddings']:.2f})")
    if args.real_towers:
        real = real_towers(args.tower_batch)
        print(f"(c) real towers (ViT-L/14 + ViT-bigG/14 text) on this CPU: {real['seconds_per_sample']:.2f} s/sample; "
              f"{real['tower_gflop_per_sample']:.0f} GFLOP/sample = "
              f"{100 * real['tower_gflop_per_sample'] / real['unet_train_gflop_per_image']:.2f}% of the SDXL "
              f"U-Net's {real['unet_train_gflop_per_image']:,.0f} GFLOP train step per image")


if __name__ == "__main__":
    main()
