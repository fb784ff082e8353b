"""Data-path benchmarks: (a) cached loader samples/s per worker, (b) cache-job overhead over a bare
encoder loop, (c) bytes per cached sample vs padded 77×1024 fp16 text, (d) the local cache job's
throughput with 1 and 2 worker processes (cache.num_workers).

    PYTHONPATH=. python tools/benchmark_data.py [--samples 2048] [--job-samples 64] [--pool-shards 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldmscale.config import AutoencoderConfig, ConditionerConfig, DataConfig  # noqa: E402
from ldmscale.data.cache_format import (  # noqa: E402,E501
    MANIFEST,
    CachedRecord,
    RecordWriter,
    ShardResult,
    build_manifest,
)


def caption_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """LAION-like token counts incl. SOT/EOT: lognormal around ~15, clipped to [3, 77]."""
    return np.clip(np.round(rng.lognormal(np.log(15.0), 0.55, n)), 3, 77).astype(int)


def write_fake_cache(folder: Path, num_samples: int, shard_size: int, ae_cfg, cond_cfg, data_cfg) -> int:
    """A cache with SD-sized records (KL 4x32x32 moments, 1024-wide text) and a valid manifest."""
    from ldmscale.data.cache import autoencoder_config_fingerprint, latent_layout, text_config_fingerprint

    rng = np.random.default_rng(0)
    lengths = caption_lengths(num_samples, rng)
    layout = latent_layout(ae_cfg)
    spec = {"encoders": {"autoencoder": {"config": autoencoder_config_fingerprint(ae_cfg), "weights_sha256": "bench",
                                         "weights_file_sha256": None, "dtype": "float32"},
                         "text": {"config": text_config_fingerprint(cond_cfg), "fingerprint": "bench",
                                  "weights_file_sha256": None, "width": 1024}},
            "resolution": 256, "buckets": [[256, 256]], "latent": dict(layout, dtype="bf16"),
            "text": {"mode": "embeddings", "config": text_config_fingerprint(cond_cfg), "context_length": 77,
                     "width": 1024, "dtype": "fp16"}, "transform": {}}
    results, total = [], 0
    folder.mkdir(parents=True, exist_ok=True)
    for shard, lo in enumerate(range(0, num_samples, shard_size)):
        name = f"bench-{shard:06d}.tar"
        with open(folder / name, "wb") as f:
            writer = RecordWriter(f)
            for i in range(lo, min(lo + shard_size, num_samples)):
                meta = {"caption": "x" * int(lengths[i] * 4), "class_id": -1, "boxes": [], "box_classes": [],
                        "original_size": [512, 384], "crop_box": [0, 64, 512, 448], "crop_top_left": [0, 42],
                        "bucket": [256, 256], "flipped": False, "source": f"s3://laion/{shard:05d}.tar:{i:09d}"}
                writer.write(CachedRecord(f"{i:09d}", torch.randn(8, 32, 32), torch.randn(int(lengths[i]), 1024),
                                          torch.randn(1024), int(lengths[i]), meta), 0, "bf16", "fp16")
            index, span = writer.close()
        size = (folder / name).stat().st_size
        total += size
        results.append(ShardResult(name, name, True, len(index), len(index), bucket_counts=[len(index)], spec=spec,
                                   bytes=size, index_span=span))
    (folder / MANIFEST).write_text(json.dumps(build_manifest(results)))
    return total


def bench_loader(folder: Path, ae_cfg, cond_cfg, data_cfg, batches: int) -> float:
    from ldmscale.data.loader import build_loader

    data_cfg = dataclasses.replace(data_cfg, train_shards=[str(folder)], num_workers=0)
    loader = build_loader(data_cfg, cond_cfg, ae_cfg, seed=0, rank=0, world_size=1)
    it = iter(loader)
    next(it)  # warm-up: plan + file handles
    start, n = time.perf_counter(), 0
    for _ in range(min(batches, len(loader) - 1)):
        n += next(it)["latents"].shape[0]
    return n / (time.perf_counter() - start)


def bench_job(tmp: Path, num_samples: int, resolution: int) -> tuple[float, float]:
    """(cache_shard samples/s, bare encoder loop samples/s) on the same images and batches."""
    from ldmscale.config import CacheConfig
    from ldmscale.data.cache import CacheSpec, build_encoders, cache_shard
    from ldmscale.data.shards import SkipCounter, iter_decoded
    from ldmscale.data.synthetic import write_shards

    ae_cfg = AutoencoderConfig(ch=64, ch_mult=[1, 2, 4, 4], num_res_blocks=2)
    cond_cfg = ConditionerConfig()
    data_cfg = DataConfig(resolution=resolution)
    cache_cfg = CacheConfig(batch_size=16, progress=False)
    write_shards(tmp / "raw", num_samples, resolution=resolution, shard_size=num_samples, progress=False)
    url = str(tmp / "raw" / "shapes-000000.tar")
    encoders = build_encoders(ae_cfg, cond_cfg, "cpu")
    spec = CacheSpec.build(data_cfg, cond_cfg, ae_cfg, cache_cfg, encoders)
    from ldmscale.data.transforms import resize_crop

    samples = list(iter_decoded([url], spec.rules, SkipCounter()))
    pixels = [resize_crop(s.image, spec.buckets[0])[0] for s in samples]
    captions = [s.caption for s in samples]
    with torch.inference_mode():  # warm-up
        encoders.autoencoder.encode_moments(torch.stack(pixels[:16]))
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, num_samples, 16):
            encoders.autoencoder.encode_moments(torch.stack(pixels[lo: lo + 16]))
            encoders.text_encoder.encode(captions[lo: lo + 16])
    bare = num_samples / (time.perf_counter() - start)
    start = time.perf_counter()
    cache_shard(url, tmp / "cache", encoders, spec)
    job = num_samples / (time.perf_counter() - start)
    return job, bare


def bench_pool(tmp: Path, num_shards: int, per_shard: int, workers: int) -> float:
    """run_cache_job samples/s with `workers` processes (a fresh output folder, same raw shards)."""
    from ldmscale.config import compose
    from ldmscale.data.cache import run_cache_job
    from ldmscale.data.synthetic import write_shards

    raw = tmp / "pool-raw"
    if not raw.exists():
        write_shards(raw, num_shards * per_shard, resolution=32, shard_size=per_shard, progress=False)
    cfg = compose(["cache.progress=false", "cache.device=cpu", f"cache.num_workers={workers}", "cache.batch_size=16",
                   f"cache.input={raw}", f"cache.output={tmp}/pool-{workers}"])
    start = time.perf_counter()
    manifest = run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache, seed=cfg.seed)
    return manifest["totals"]["written"] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048, help="cached samples for (a) and (c)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--job-samples", type=int, default=64, help="raw samples for (b)")
    parser.add_argument("--job-resolution", type=int, default=128)
    parser.add_argument("--pool-shards", type=int, default=8, help="(d): shards of 64 samples; 0 skips (d)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ae_cfg = AutoencoderConfig(ch=128, ch_mult=[1, 2, 4, 4], embed_dim=4, z_channels=4)  # SD-VAE layout: f8, 4 ch
    cond_cfg = ConditionerConfig(context_length=77)
    data_cfg = DataConfig(resolution=256, micro_batch_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cache"
        total = write_fake_cache(folder, args.samples, 512, ae_cfg, cond_cfg, data_cfg)
        per_sample = total / args.samples
        padded = 77 * 1024 * 2
        rate = bench_loader(folder, ae_cfg, cond_cfg, data_cfg, args.batches)
        print(f"(a) cached loader, 1 worker (1 thread): {rate:,.0f} samples/s "
              f"(4x32x32 KL latents + 77x1024 text; goal >= 2,000)")
        print(f"(c) bytes per cached sample: {per_sample:,.0f} B vs padded 77x1024 fp16 text {padded:,} B "
              f"= {per_sample / padded:.3f} (goal <= 0.333)")
        job, bare = bench_job(Path(tmp), args.job_samples, args.job_resolution)
        print(f"(b) cache job {job:.1f} samples/s vs bare encoder loop {bare:.1f} samples/s: overhead "
              f"{bare / job - 1:+.1%} (goal <= 10%; CPU, {args.job_resolution}px, tiny text tower)")
        if args.pool_shards:
            one, two = (bench_pool(Path(tmp), args.pool_shards, 64, w) for w in (1, 2))
            print(f"(d) local cache job, demo encoders at 32 px: 1 worker {one:.1f} samples/s, 2 workers "
                  f"{two:.1f} samples/s ({two / one:.2f}x; {os.cpu_count()} cores, whole job incl. start-up)")


if __name__ == "__main__":
    main()
