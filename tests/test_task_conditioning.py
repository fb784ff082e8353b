"""SR / inpainting inputs derived by the cache job, the batches they become, and the per-task demo scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldmscale.config import compose
from ldmscale.data import synthetic
from ldmscale.data.cache import build_encoders, run_cache_job
from ldmscale.data.conditioning import MASK_SIDE, box_mask, derive, low_res_of, sample_mask
from ldmscale.data.loader import CacheMismatchError, build_loader, collate_records, sample_latents
from ldmscale.demo_tasks import mean_fill
from ldmscale.evaluation import psnr
from tests._data_helpers import cached_records


def _cache(tmp_path, kind: str, *extra: str):
    synthetic.write_shards(tmp_path / "raw", 24, resolution=32, shard_size=12, progress=False)
    cfg = compose([f"conditioner={kind}", "cache.batch_size=8", "cache.progress=false", "cache.device=cpu",
                   "data.micro_batch_size=8", "data.global_batch_size=8", *extra])
    cfg.cache.input, cfg.cache.output = str(tmp_path / "raw"), str(tmp_path / f"cache_{kind}")
    manifest = run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache)
    cfg.data.train_shards = [cfg.cache.output]
    return cfg, manifest


def _pixels(indices) -> torch.Tensor:
    arrays = np.stack([np.asarray(synthetic.render(synthetic.draw_spec(0, i), 32)) for i in indices])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_low_res_is_antialiased_bicubic_downsampling():
    pixels = _pixels(range(4))
    small = low_res_of(pixels, 4)
    assert small.shape == (4, 3, 8, 8)
    reference = F.interpolate(pixels, size=(8, 8), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(small, reference)
    flat = torch.full((1, 3, 32, 32), 0.3)  # a flat image stays flat
    torch.testing.assert_close(low_res_of(flat, 4), torch.full((1, 3, 8, 8), 0.3))
    with pytest.raises(ValueError, match="sr_factor=3"):
        low_res_of(pixels, 3)


def test_box_masks_sit_on_the_latent_grid_with_the_configured_sides():
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = box_mask(rng, 32, 32, grid=4)[0]
        rows, cols = np.nonzero(mask.numpy())
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert mask.sum() == (bottom - top) * (right - left)  # one solid box
        assert top % 4 == 0 and bottom % 4 == 0 and left % 4 == 0 and right % 4 == 0
        for side in (bottom - top, right - left):
            assert MASK_SIDE[0] * 32 - 4 <= side <= MASK_SIDE[1] * 32
    assert torch.equal(sample_mask(0, "k1", 32, 32, 4), sample_mask(0, "k1", 32, 32, 4))  # fixed per key
    assert any(not torch.equal(sample_mask(0, "k1", 32, 32, 4), sample_mask(0, f"k{i}", 32, 32, 4))
               for i in range(2, 6))


def test_sr_cache_stores_the_low_res_image_and_batches_concat_it(tmp_path):
    cfg, manifest = _cache(tmp_path, "sr")
    assert manifest["concat"] == {"kind": "sr", "factor": 4, "downsample": "bicubic-antialias"}
    batch = next(iter(build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=0, rank=0, world_size=1)))
    assert batch["concat"].shape == (8, 3, 8, 8) and batch["latents"].shape == (8, 4, 8, 8)
    indices = [int(k) for k in batch["keys"]]  # synthetic keys are the sample indices
    expected = low_res_of(_pixels(indices), 4)  # the latent is 8x8 too: the upsampling is the identity
    torch.testing.assert_close(batch["concat"], expected, atol=2e-2, rtol=0)  # stored in bf16


def test_inpaint_cache_stores_mask_and_masked_image_latents(tmp_path):
    cfg, manifest = _cache(tmp_path, "inpaint")
    assert manifest["concat"]["kind"] == "inpaint"
    records = cached_records(tmp_path / "cache_inpaint")[:8]
    keys = [r.key for r in records]
    # Stored: the key's fixed mask at latent resolution, and the moments of exactly the masked image.
    encoders = build_encoders(cfg.autoencoder, cfg.conditioner, "cpu")
    with torch.no_grad():
        derived = derive(_pixels([int(k) for k in keys]), keys, manifest["concat"], encoders.autoencoder, seed=0)
    for record, ref, key in zip(records, derived, keys):
        mask = F.interpolate(sample_mask(0, key, 32, 32, 4)[None], size=(8, 8), mode="nearest")[0]
        torch.testing.assert_close(record.extras["inpaint_mask"].float(), mask)
        torch.testing.assert_close(record.extras["masked_moments"].float(), ref["masked_moments"], atol=3e-2, rtol=2e-2)
        assert not torch.allclose(record.extras["masked_moments"].float(), record.moments.float(), atol=1e-2)
    # Batched: concat = mask ‖ a latent sampled from the masked moments, scaled like the latents.
    generator = torch.Generator().manual_seed(3)
    batch = collate_records(records, kind="kl", cond_kind="inpaint", context_length=77, max_boxes=1,
                            scale_factor=0.5, shift_factor=0.1, generator=generator)
    generator = torch.Generator().manual_seed(3)
    latents = sample_latents(torch.stack([r.moments for r in records]).float(), "kl", generator)
    masked = sample_latents(torch.stack([r.extras["masked_moments"] for r in records]).float(), "kl", generator)
    torch.testing.assert_close(batch["latents"], (latents - 0.1) * 0.5)
    assert batch["concat"].shape == (8, 1 + 4, 8, 8)
    torch.testing.assert_close(batch["concat"][:, 1:], (masked - 0.1) * 0.5)
    torch.testing.assert_close(batch["concat"][:, :1], torch.stack([r.extras["inpaint_mask"] for r in records]).float())
    loader_batch = next(iter(build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=0, rank=0, world_size=1)))
    assert loader_batch["concat"].shape == (8, 5, 8, 8)


def test_a_cache_without_the_derived_inputs_is_refused_for_sr(tmp_path):
    cfg, _ = _cache(tmp_path, "none")
    sr = compose(["conditioner=sr", "data.micro_batch_size=8", "data.global_batch_size=8"])
    with pytest.raises(CacheMismatchError, match="conditioner.kind=sr needs derived inputs"):
        build_loader(cfg.data, sr.conditioner, cfg.autoencoder, seed=0, rank=0, world_size=1)


def test_masked_psnr_and_mean_fill_against_hand_computed_values():
    target = torch.zeros(1, 3, 4, 4)
    target[..., :2, :] = 0.5  # top half 0.5, bottom half 0
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:, :] = 1  # the bottom half is to be filled
    filled = mean_fill(target, mask)
    torch.testing.assert_close(filled[..., 2:, :], torch.full((1, 3, 2, 4), 0.5))  # visible mean = 0.5
    torch.testing.assert_close(filled[..., :2, :], target[..., :2, :])
    # masked MSE = 0.25 → PSNR = 10 log10(4 / 0.25) = 12.04 dB; the visible half does not count
    assert psnr(target, filled, mask=mask).item() == pytest.approx(10 * np.log10(16), abs=1e-4)
    assert psnr(target, target, mask=mask).item() > 100
    assert psnr(target, filled).item() == pytest.approx(10 * np.log10(4 / 0.125), abs=1e-4)


def test_task_scores_are_perfect_on_renders_and_at_chance_on_noise():
    specs = [synthetic.draw_spec(0, 10**8 + i) for i in range(60)]
    renders = [np.asarray(synthetic.render(s, 32)) for s in specs]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in specs]
    blank = [np.full((32, 32, 3), 220, np.uint8) for _ in specs]
    assert synthetic.score_unconditional(renders)["clean_single_shape"] == 1.0
    assert synthetic.score_unconditional(noise)["clean_single_shape"] == 0.0
    assert synthetic.score_unconditional(blank)["clean_single_shape"] == 0.0
    apart = [(a, b) for a, b in zip(range(59), range(1, 60)) if synthetic.box_iou(specs[a].bbox, specs[b].bbox) == 0]
    two = [np.where(synthetic.foreground_mask(renders[b])[..., None], renders[b], renders[a]) for a, b in apart]
    assert len(two) > 10 and synthetic.score_unconditional(two)["clean_single_shape"] == 0.0
    classes = [s.class_id for s in specs]
    assert synthetic.score_classes(renders, classes)["class"] >= 0.95
    assert synthetic.score_classes(renders, classes[1:] + classes[:1])["class"] < 0.3
    boxes = [s.bbox for s in specs]
    assert synthetic.score_layout(renders, boxes, classes)["iou_at_least_0.5"] == 1.0
    flipped = [(1 - b[2], 1 - b[3], 1 - b[0], 1 - b[1]) for b in boxes]  # the opposite corner
    assert synthetic.score_layout(renders, flipped, classes)["iou_at_least_0.5"] == 0.0


def test_layout_raster_is_the_box_coverage_at_latent_resolution():
    from ldmscale.models.conditioners import rasterize_boxes

    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 0.375]]])
    only_first = rasterize_boxes(boxes, torch.tensor([[1, -1]]), (4, 4))[0, 0]  # class -1: padding
    assert torch.equal(only_first, torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    both = rasterize_boxes(boxes, torch.tensor([[1, 2]]), (4, 4))[0, 0]
    assert torch.equal(both[1], torch.tensor([1.0, 1, 0.5, 0.5]))  # half of row 1 covered by the second box
    assert rasterize_boxes(boxes, torch.full((1, 2), -1), (4, 4)).abs().sum() == 0  # CFG's null layout
