"""The online path: raw shards → decode/transform (dataloader workers) → encoders in this process → batches.

Same batch format as the cached loader, for small data and for measuring what the cache buys.
Shards are shuffled per (seed, epoch) and split round-robin over ranks then workers; with
`data.samples_per_epoch` every rank yields exactly samples_per_epoch // (micro_batch × world)
batches (its shards are cycled if needed), so uneven shards cannot hang DDP. Resume replays the
epoch up to the saved position (it re-reads; exact for the same num_workers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch

from ldmscale.config import CacheConfig
from ldmscale.data.cache import CacheSpec, _encode_batch, _Pending, build_encoders, resolve_device
from ldmscale.data.loader import batch_seed, collate_records
from ldmscale.data.shards import SkipCounter, expand_urls, iter_decoded, split_by_node, split_by_worker
from ldmscale.data.transforms import nearest_bucket, resize_crop, transform_boxes


class _Transformed(torch.utils.data.IterableDataset):
    def __init__(self, urls: list[str], spec: CacheSpec, seed: int, epoch: int, cycle: bool):
        super().__init__()
        self.urls, self.spec, self.seed, self.epoch, self.cycle = urls, spec, seed, epoch, cycle

    def __iter__(self) -> Iterator[tuple[int, _Pending]]:
        urls = split_by_worker(self.urls)
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, self.epoch, 5, worker])
        skips = SkipCounter()
        while urls:
            for sample in iter_decoded(urls, self.spec.rules, skips):
                bucket = nearest_bucket(sample.image.height, sample.image.width, self.spec.buckets)
                pixels, crop = resize_crop(sample.image, self.spec.buckets[bucket], random_crop=self.spec.random_crop,
                                           flip=self.spec.random_flip, rng=rng)
                boxes, classes = transform_boxes(sample.boxes, sample.box_classes, crop)
                meta = {"caption": sample.caption, "class_id": sample.class_id, "boxes": boxes,
                        "box_classes": classes, "original_size": list(crop.original_size),
                        "crop_box": list(crop.crop_box), "crop_top_left": list(crop.crop_top_left),
                        "bucket": list(crop.bucket), "flipped": crop.flipped}
                yield bucket, _Pending(pixels, sample.caption, meta, sample.key)
            if not self.cycle:
                break


class OnlineLoader:
    """Iterable of training batches encoded on the fly; same interface as the cached Loader."""

    def __init__(self, data_cfg: Any, cond_cfg: Any, ae_cfg: Any, *, seed: int, rank: int, world_size: int,
                 encoders: Optional[Any] = None):
        from ldmscale.latent_scale import decide

        self.data_cfg, self.cond_cfg, self.ae_cfg = data_cfg, cond_cfg, ae_cfg
        self.scale = decide(ae_cfg, data_cfg)  # already in ae_cfg when it came from config.to_object
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.urls = expand_urls(list(data_cfg.train_shards))
        if not self.urls:
            raise ValueError("data.train_shards is empty: give raw shard URLs for data.kind=online")
        if world_size > 1 and data_cfg.samples_per_epoch <= 0:
            raise ValueError("data.kind=online with several ranks needs data.samples_per_epoch > 0 "
                             "(equal batch counts per rank; uneven shards would hang DDP)")
        if len(self.urls) < world_size:
            raise ValueError(f"{len(self.urls)} raw shards cannot feed world_size={world_size} ranks")
        self.encoders = encoders or build_encoders(ae_cfg, cond_cfg, resolve_device("auto"))
        self.spec = CacheSpec.build(data_cfg, cond_cfg, ae_cfg, CacheConfig(batch_size=data_cfg.micro_batch_size,
                                    latent_dtype="fp32", text_dtype="fp32"), self.encoders, seed)
        self.epoch, self.position = 0, 0

    def batches_in_epoch(self) -> Optional[int]:
        n = self.data_cfg.samples_per_epoch // (self.data_cfg.micro_batch_size * self.world_size)
        return n if self.data_cfg.samples_per_epoch > 0 else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("world_size") != self.world_size or state.get("seed") != self.seed:
            raise ValueError("online loader state comes from another seed/world_size; cannot resume exactly")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        d = self.data_cfg
        limit = self.batches_in_epoch()
        order = np.random.default_rng([self.seed, self.epoch, 4]).permutation(len(self.urls))
        urls = split_by_node([self.urls[i] for i in order], self.rank, self.world_size)
        dataset = _Transformed(urls, self.spec, self.seed * 1000 + self.rank, self.epoch, cycle=limit is not None)
        samples: Any = dataset if d.num_workers == 0 else torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=min(d.num_workers, len(urls)))
        rng = np.random.default_rng([self.seed, self.epoch, 6, self.rank])
        buffer: list[tuple[int, _Pending]] = []
        pending: dict[int, list[_Pending]] = {}
        produced = 0

        def ready() -> Iterator[dict[str, Any]]:
            nonlocal produced
            for bucket, items in list(pending.items()):
                if len(items) >= d.micro_batch_size:
                    pending[bucket] = items[d.micro_batch_size:]
                    if produced >= self.position:  # resume: batches before the saved position are skipped
                        yield self._collate(items[: d.micro_batch_size], produced)
                    produced += 1

        def draw() -> tuple[int, _Pending]:
            return buffer.pop(int(rng.integers(len(buffer))))

        for item in samples:
            buffer.append(item)
            if len(buffer) < max(1, d.shuffle_buffer):
                continue
            bucket, pend = draw()
            pending.setdefault(bucket, []).append(pend)
            for batch in ready():
                self.position += 1
                yield batch
            if limit is not None and produced >= limit:
                break
        while buffer and (limit is None or produced < limit):
            bucket, pend = draw()
            pending.setdefault(bucket, []).append(pend)
            for batch in ready():
                self.position += 1
                yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def _collate(self, items: list[_Pending], position: int) -> dict[str, Any]:
        records, _ = _encode_batch(items, self.encoders, self.spec)
        generator = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, position * self.world_size + self.rank))
        return collate_records(records, kind=self.ae_cfg.kind, conditioning=self.spec.conditioning,
                               scale_factor=self.scale.scale_factor, shift_factor=self.scale.shift_factor,
                               generator=generator)
