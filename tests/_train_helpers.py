"""Cached synthetic shards for the training tests (raw shapes shards → real tiny encoders → cache)."""

from __future__ import annotations

from pathlib import Path

import torch

from ldmscale.config import compose
from ldmscale.data.cache import run_cache_job
from ldmscale.data.synthetic import make_sample, write_shard
from ldmscale.ema import PartitionedEMA


def make_cached_shards(root: Path, num_shards: int = 2, per_shard: int = 32) -> Path:
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        write_shard(raw / f"shapes-{s:06d}.tar",
                    (make_sample(0, i, 32) for i in range(s * per_shard, (s + 1) * per_shard)))
    cfg = compose(["cache.batch_size=16", "cache.progress=false", "cache.device=cpu", "cache.num_workers=1"])
    cfg.cache.input = f"{raw}/shapes-{{000000..{num_shards - 1:06d}}}.tar"
    cfg.cache.output = str(root / "cache")
    run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache)
    return root / "cache"


def ema_that_differs(denoiser: torch.nn.Module) -> PartitionedEMA:
    """An EMA of `denoiser` taken before its weights moved by 0.01: what a grid/eval of the EMA must use."""
    ema = PartitionedEMA(denoiser, decay=0.5)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(0.01)
    ema.update(step=1)  # the EMA now differs from the live weights
    return ema
