"""Aspect buckets, nearest-aspect assignment, resize/crop/flip and box remapping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from ldmscale.data.transforms import make_buckets, nearest_bucket, resize_crop, transform_boxes


def test_buckets_equal_area_multiples_of_64():
    buckets = make_buckets(512, step=64, max_aspect=2.0)
    assert (512, 512) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert h * w <= 512 * 512
        assert h * w >= 512 * 512 * 0.85  # as close to the target area as the 64-grid allows
        assert max(h, w) / min(h, w) <= 2.0
    assert (h, w) in buckets and all((w, h) in buckets for h, w in buckets)  # symmetric
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios, reverse=True)
    with pytest.raises(ValueError, match="multiple of bucket_step"):
        make_buckets(500, step=64)


@pytest.mark.parametrize("size", [(100, 300), (300, 100), (250, 260), (512, 1024), (1000, 333), (64, 64)])
def test_nearest_bucket_is_nearest_in_log_aspect(size):
    buckets = make_buckets(256, step=32, max_aspect=4.0)
    h, w = size
    chosen = buckets[nearest_bucket(h, w, buckets)]
    best = min(abs(math.log(bh / bw) - math.log(h / w)) for bh, bw in buckets)
    assert abs(math.log(chosen[0] / chosen[1]) - math.log(h / w)) == pytest.approx(best)
    assert nearest_bucket(64, 64, buckets) == buckets.index((256, 256))


def test_resize_crop_records_original_size_and_box():
    image = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3)))  # 100h x 200w
    pixels, crop = resize_crop(image, (32, 32))
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert crop.original_size == (100, 200)
    assert crop.crop_box == (0, 50, 100, 150)  # centre square of the original
    assert crop.crop_top_left == (0, 16)
    rng = np.random.default_rng(0)
    _, rand = resize_crop(image, (32, 32), random_crop=True, rng=rng)
    top, left, bottom, right = rand.crop_box
    assert bottom - top == 100 and right - left == 100 and 0 <= left <= 100


def test_flip_and_boxes_follow_the_crop():
    image = Image.new("RGB", (200, 100))
    _, crop = resize_crop(image, (32, 32))  # keeps x in [50, 150)
    boxes, classes = transform_boxes([[0.25, 0.0, 0.5, 0.5], [0.0, 0.0, 0.1, 0.1]], [3, 4], crop)
    assert classes == [3]  # the second box lies outside the crop
    assert boxes[0] == pytest.approx([0.0, 0.0, 0.5, 0.5])
    flipped = type(crop)(crop.original_size, crop.crop_box, crop.crop_top_left, crop.bucket, True)
    assert transform_boxes([[0.25, 0.0, 0.5, 0.5]], [3], flipped)[0][0] == pytest.approx([0.5, 0.0, 1.0, 0.5])
