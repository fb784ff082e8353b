"""Shared helpers for the data tests: tiny configs, real tiny encoders, hand-made bad shards."""

from __future__ import annotations

import functools
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from ldmscale.config import Config, compose
from ldmscale.data.cache import Encoders, build_encoders


@functools.lru_cache(maxsize=1)
def base_config() -> Config:
    return compose(["cache.batch_size=8", "cache.progress=false", "cache.device=cpu"])


def config(**data) -> Config:
    cfg = compose(["cache.batch_size=8", "cache.progress=false", "cache.device=cpu"])
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


@functools.lru_cache(maxsize=1)
def encoders() -> Encoders:
    cfg = base_config()
    return build_encoders(cfg.autoencoder, cfg.conditioner, "cpu")


def png(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """samples: [{"__key__": "k", "png": ..., "txt": ...}] written in order (one member per ext)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, payload in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def good(key: str, width: int = 32, height: int = 32, caption: str = "a red square", **meta) -> dict[str, bytes]:
    sample = {"__key__": key, "png": png(width, height), "txt": caption.encode()}
    if meta:
        sample["json"] = json.dumps(meta).encode()
    return sample


def cached_synthetic(root: Path, num_samples: int, shard_size: int) -> Path:
    """`num_samples` synthetic samples in shards of `shard_size`, cached by the real job into root/cache."""
    from ldmscale.data.cache import run_cache_job
    from ldmscale.data.synthetic import write_shards

    write_shards(root / "raw", num_samples, resolution=32, shard_size=shard_size, progress=False)
    cfg = config()
    cfg.cache.input, cfg.cache.output = str(root / "raw"), str(root / "cache")
    run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache, encoders=encoders())
    return root / "cache"


def cached_records(folder: Path) -> list:
    """Every cached record of a cache folder, read straight from the tars by plain webdataset."""
    import webdataset as wds

    from ldmscale.data.cache_format import decode_sample

    records = []
    for shard in sorted(Path(folder).glob("*.tar")):
        records += [decode_sample(s) for s in wds.WebDataset(str(shard), shardshuffle=False)]
    return records
