"""Raw image shards → pixel batches for stage 1 (autoencoder training), with an exact resume position.

Random access by design: each sample's byte span is indexed once (ldmscale.data.shards.index_samples,
webdataset's key rule) and read back through webdataset, so an epoch is a seeded
permutation of sample indices, each rank takes every world_size-th one, and the position is just
(epoch, batches consumed). Resume therefore costs nothing and is exact at any world size that divides
the data. Meant for the modest image sets stage 1 trains on; streaming shards are ldmscale.data.shards.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmscale.data.shards import IMAGE_EXTS, expand_urls, index_samples, samples_from_bytes


@dataclass(frozen=True)
class _Entry:
    shard: int
    key: str
    offset: int  # the sample's byte span in its shard (all its members)
    size: int


def raw_shard_paths(urls: Sequence[str]) -> list[str]:
    """Local raw shards named by URL patterns (ldmscale.data.shards.expand_urls), each checked to exist."""
    paths = expand_urls(list(urls))
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"raw shard {path!r} (from {list(urls)}) does not exist")
    if not paths:
        raise FileNotFoundError(f"no raw shards match {list(urls)}")
    return paths


def index_shards(paths: Sequence[str]) -> list[_Entry]:
    """One entry per sample (webdataset's key rule) that has an image; samples without one are skipped."""
    entries: list[_Entry] = []
    for shard, path in enumerate(paths):
        for span in index_samples(path):
            if any(ext in IMAGE_EXTS for ext in span.exts):
                entries.append(_Entry(shard, span.key, span.offset, span.size))
    return entries


def load_pixels(payload: bytes, resolution: int, name: str = "") -> torch.Tensor:
    """Encoded image → [3, resolution, resolution] float32 in [-1, 1] (resize the short side, centre crop)."""
    try:
        image = Image.open(io.BytesIO(payload)).convert("RGB")
    except Exception as err:
        raise ValueError(f"cannot decode image {name!r}: {err}") from err
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class PixelShardDataset(torch.utils.data.Dataset):
    """Indexed raw shards: `dataset[i]` is sample i's pixels [3, R, R] in [-1, 1]."""

    def __init__(self, urls: Sequence[str], resolution: int) -> None:
        self.paths = raw_shard_paths(urls)
        self.entries = index_shards(self.paths)
        if not self.entries:
            raise ValueError(f"no images (.{'/.'.join(IMAGE_EXTS)}) in raw shards {self.paths[:3]}...")
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> torch.Tensor:
        entry = self.entries[index]
        path = self.paths[entry.shard]
        with open(path, "rb") as f:
            f.seek(entry.offset)
            sample = samples_from_bytes(f.read(entry.size), path)[0]
        payload = next(sample[ext] for ext in IMAGE_EXTS if ext in sample)
        return load_pixels(payload, self.resolution, f"{path}:{entry.key}")


class PixelLoader:
    """Endless, resumable batches {"pixels": [B,3,R,R]} for one rank; an epoch is a seeded permutation."""

    def __init__(self, dataset: PixelShardDataset, micro_batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, random_flip: bool = False) -> None:
        self.dataset, self.batch_size = dataset, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.random_flip = num_workers, random_flip
        self.batches_per_epoch = len(dataset) // (micro_batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(dataset)} images cannot fill one global batch of "
                             f"{micro_batch_size} x {world_size} ranks")
        self.epoch, self.position = 0, 0  # position: batches of this epoch already handed out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            # The same samples in the same epoch order: the global position carries over.
            seen = state["position"] * state["world_size"]
            self.epoch, self.position = state["epoch"], seen // self.world_size
        else:
            self.epoch, self.position = state["epoch"], state["position"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def _epoch_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        usable = self.batches_per_epoch * self.batch_size * self.world_size
        mine = order[:usable][self.rank::self.world_size]
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the current epoch; then the next epoch is set, and a new iter() starts it (the
        trainer counts epochs by that end, as with the cached loader)."""
        batches = self._epoch_batches()[self.position:]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                             persistent_workers=False)
        for indices, pixels in zip(batches, loader):
            if self.random_flip:
                # A flip decided by (seed, sample index, epoch), so it survives resume.
                flips = torch.tensor([hash((self.seed, self.epoch, i)) % 2 for i in indices], dtype=torch.bool)
                pixels = torch.where(flips[:, None, None, None], pixels.flip(-1), pixels)
            self.position += 1
            yield {"pixels": pixels}
        self.set_epoch(self.epoch + 1)

    def endless(self) -> Iterator[dict[str, torch.Tensor]]:
        """Epoch after epoch, for loops without a trainer (tools/stage1_quality.py)."""
        while True:
            yield from self


def build_pixel_loader(data_cfg, *, seed: int, rank: int = 0, world_size: int = 1,
                       urls: Sequence[str] | None = None) -> PixelLoader:
    """Stage-1 loader from a `DataConfig` (train_shards = raw shards, resolution, micro_batch_size)."""
    urls = list(urls if urls is not None else data_cfg.train_shards)
    if not urls:
        raise ValueError("data.train_shards is empty: stage 1 needs raw image shards "
                         "(tools/make_synthetic_shards.py writes some)")
    dataset = PixelShardDataset(urls, data_cfg.resolution)
    return PixelLoader(dataset, data_cfg.micro_batch_size, seed=seed, rank=rank, world_size=world_size,
                       num_workers=data_cfg.num_workers, random_flip=data_cfg.random_flip)
