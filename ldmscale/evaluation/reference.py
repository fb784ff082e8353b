"""FID reference statistics of a raw shard set, streamed: rank r reads shards r, r+W, ... (memory and start-up
grow with shards, never with samples), and the feature sums all-reduce."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ldmscale.data.pixels import IMAGE_EXTS, load_pixels
from ldmscale.data.shards import SkipCounter, expand_urls, iter_tar_samples, split_by_node
from ldmscale.evaluation.fid import FeatureStats, InceptionFeatures


def iter_shard_pixels(urls: Sequence[str], resolution: int, rank: int = 0,
                      world_size: int = 1) -> Iterator[torch.Tensor]:
    """Pixels [3, R, R] in [-1, 1] of every image in this rank's shards (short side resized, centre crop:
    the stage-1 loader's preprocessing, so the reference matches what the models were trained to make)."""
    skips = SkipCounter()
    for url in split_by_node(expand_urls(urls), rank, world_size):
        for sample in iter_tar_samples(url, skips):
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is not None:
                yield load_pixels(sample[ext], resolution, f"{url}:{sample['__key__']}")
    if skips.total:
        raise RuntimeError(f"unreadable shards while computing FID statistics: {skips.as_dict()} "
                           f"(e.g. {skips.examples})")


def reference_statistics(urls: Sequence[str], resolution: int, inception: InceptionFeatures, *,
                         batch_size: int = 50, rank: int = 0, world_size: int = 1) -> FeatureStats:
    """Collective: Inception feature statistics of all images in `urls`, summed over ranks."""
    stats = FeatureStats()
    batch: list[torch.Tensor] = []
    for pixels in iter_shard_pixels(urls, resolution, rank, world_size):
        batch.append(pixels)
        if len(batch) == batch_size:
            stats.update(inception(torch.stack(batch)))
            batch = []
    if batch:
        stats.update(inception(torch.stack(batch)))
    return stats.all_reduce()
