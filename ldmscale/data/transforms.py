"""Image transforms for the encoders: aspect buckets, resize, centre/random crop, flip, box remapping.

Each transformed sample records its original size and crop box (SDXL-style micro-conditioning
needs them, and they make a cached sample traceable back to its source pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

Bucket = tuple[int, int]  # (height, width) in pixels


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[Bucket]:
    """Equal-area (h, w) shapes around resolution², sides multiples of `step`, aspect within 1/max..max.

    For each height h (a multiple of step) the width is the largest multiple of step with
    h*w <= resolution² (NovelAI/SDXL bucketing), so every bucket has at most the target area and
    is as close to it as the grid allows. Sorted from tallest to widest.
    """
    if resolution % step:
        raise ValueError(f"resolution={resolution} must be a multiple of bucket_step={step}")
    if max_aspect < 1:
        raise ValueError(f"max_bucket_aspect={max_aspect} must be >= 1")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for h in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        w = (area // h) // step * step
        if w >= step and max(h, w) / min(h, w) <= max_aspect + 1e-9:
            buckets.add((h, w))
            buckets.add((w, h))
    return sorted(buckets, key=lambda b: b[0] / b[1], reverse=True)


def resolve_buckets(data_cfg: Any) -> list[Bucket]:
    """The bucket list of a DataConfig: explicit `buckets`, else generated, else the square."""
    if data_cfg.buckets:
        buckets = [tuple(int(v) for v in b) for b in data_cfg.buckets]
        for i, b in enumerate(buckets):
            if len(b) != 2 or min(b) <= 0:
                raise ValueError(f"data.buckets[{i}]={list(b)} must be [height, width] > 0")
        return buckets  # type: ignore[return-value]
    if data_cfg.aspect_buckets:
        return make_buckets(data_cfg.resolution, data_cfg.bucket_step, data_cfg.max_bucket_aspect)
    return [(data_cfg.resolution, data_cfg.resolution)]


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket nearest in log-aspect ratio (ties: the first in the list)."""
    target = math.log(height / width)
    errors = [abs(math.log(h / w) - target) for h, w in buckets]
    return int(np.argmin(errors))


@dataclass(frozen=True)
class CropInfo:
    """Where a transformed image came from (original pixel coordinates)."""

    original_size: tuple[int, int]  # (h, w) before any resize
    crop_box: tuple[int, int, int, int]  # (top, left, bottom, right) in original pixels
    crop_top_left: tuple[int, int]  # (top, left) in the resized image (SDXL's crop_coords_top_left)
    bucket: Bucket
    flipped: bool


def resize_crop(image: Any, bucket: Bucket, *, random_crop: bool = False, flip: bool = False,
                rng: Optional[np.random.Generator] = None) -> tuple[torch.Tensor, CropInfo]:
    """Resize so the image covers the bucket, crop to it, maybe flip; returns pixels [3,h,w] in [-1, 1]."""
    from PIL import Image

    bh, bw = bucket
    width, height = image.size
    scale = max(bh / height, bw / width)
    new_h, new_w = max(bh, round(height * scale)), max(bw, round(width * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if random_crop:
        rng = rng if rng is not None else np.random.default_rng()
        top, left = int(rng.integers(0, new_h - bh + 1)), int(rng.integers(0, new_w - bw + 1))
    else:
        top, left = (new_h - bh) // 2, (new_w - bw) // 2
    image = image.crop((left, top, left + bw, top + bh))
    flipped = bool(flip and (rng if rng is not None else np.random.default_rng()).random() < 0.5)
    array = np.array(image, dtype=np.uint8)  # a writable copy for torch.from_numpy
    if flipped:
        array = array[:, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    inv = 1.0 / scale
    box = (round(top * inv), round(left * inv), min(height, round((top + bh) * inv)),
           min(width, round((left + bw) * inv)))
    return pixels, CropInfo((height, width), box, (top, left), bucket, flipped)


def transform_boxes(boxes: Sequence[Sequence[float]], box_classes: Sequence[int],
                    crop: CropInfo) -> tuple[list[list[float]], list[int]]:
    """Map [x0, y0, x1, y1] boxes (fractions of the original image) into the crop; drop empty ones."""
    height, width = crop.original_size
    top, left, bottom, right = crop.crop_box
    out, classes = [], []
    for (x0, y0, x1, y1), cls in zip(boxes, box_classes):
        nx0 = (x0 * width - left) / (right - left)
        nx1 = (x1 * width - left) / (right - left)
        ny0 = (y0 * height - top) / (bottom - top)
        ny1 = (y1 * height - top) / (bottom - top)
        nx0, nx1, ny0, ny1 = (min(1.0, max(0.0, v)) for v in (nx0, nx1, ny0, ny1))
        if nx1 - nx0 <= 1e-6 or ny1 - ny0 <= 1e-6:
            continue
        if crop.flipped:
            nx0, nx1 = 1.0 - nx1, 1.0 - nx0
        out.append([nx0, ny0, nx1, ny1])
        classes.append(int(cls))
    return out, classes
