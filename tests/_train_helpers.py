"""Cached synthetic shards for the training tests (raw shapes shards → real tiny encoders → cache)."""

from __future__ import annotations

from pathlib import Path

from ldmscale.config import compose
from ldmscale.data.cache import run_cache_job
from ldmscale.data.synthetic import make_sample, write_shard


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
