"""Image-derived conditioning for the concat tasks: the low-res input (super-resolution) and the mask plus
masked-image latent (inpainting).

Both are made where the image is encoded, by the cache job (or the online loader, which shares its code),
so training needs no encoder: the cache stores `low_res` [3,H/f,W/f] in pixels, or `inpaint_mask`
[1,h,w] at latent resolution plus `masked_moments` [M,h,w], the autoencoder's moments of the masked image.
Sampling (`ldmscale.inference`) builds the same inputs from a user's image with the same functions. Which
kind needs which is decided in `ldmscale.conditioning`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Inpainting masks: one axis-aligned box per image, each side spanning this fraction of the image. Boxes
# are drawn on the latent grid, so the pixel mask and its latent-resolution copy mark the same region.
MASK_SIDE = (0.25, 0.75)


def sr_spec(factor: int) -> dict[str, Any]:
    """What the cache derives for super-resolution (part of the cache fingerprint)."""
    return {"kind": "sr", "factor": int(factor), "downsample": "bicubic-antialias"}


def inpaint_spec() -> dict[str, Any]:
    """What the cache derives for inpainting (part of the cache fingerprint)."""
    return {"kind": "inpaint", "mask": "box", "side": list(MASK_SIDE)}


def low_res_of(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] → the SR input [B,3,H/f,W/f]: antialiased bicubic downsampling, as LDM-SR's
    bicubic degradation (sides must be multiples of `factor`)."""
    height, width = pixels.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"image {height}x{width} is not divisible by conditioner.sr_factor={factor}")
    small = F.interpolate(pixels.float(), size=(height // factor, width // factor), mode="bicubic",
                          antialias=True, align_corners=False)
    return small.clamp(-1, 1)


def box_mask(rng: np.random.Generator, height: int, width: int, grid: int) -> torch.Tensor:
    """A [1,H,W] float mask (1 = to generate): one random box aligned to `grid` pixels (the latent grid)."""
    rows, cols = height // grid, width // grid
    lo, hi = MASK_SIDE
    h = int(rng.integers(max(1, round(lo * rows)), max(1, round(hi * rows)) + 1))
    w = int(rng.integers(max(1, round(lo * cols)), max(1, round(hi * cols)) + 1))
    top, left = int(rng.integers(0, rows - h + 1)), int(rng.integers(0, cols - w + 1))
    mask = torch.zeros(1, height, width)
    mask[:, top * grid:(top + h) * grid, left * grid:(left + w) * grid] = 1.0
    return mask


def sample_mask(seed: int, key: str, height: int, width: int, grid: int) -> torch.Tensor:
    """The training mask of sample `key`: fixed per (seed, key), so a re-cache and the online path agree."""
    return box_mask(np.random.default_rng([seed, zlib.crc32(key.encode()), 11]), height, width, grid)


def _low_res(pixels: torch.Tensor, keys: Sequence[str], spec: dict[str, Any], autoencoder: Any,
             seed: int) -> list[dict[str, torch.Tensor]]:
    return [{"low_res": t} for t in low_res_of(pixels, spec["factor"]).cpu()]


def _masked(pixels: torch.Tensor, keys: Sequence[str], spec: dict[str, Any], autoencoder: Any,
            seed: int) -> list[dict[str, torch.Tensor]]:
    grid = autoencoder.downsample_factor
    height, width = pixels.shape[-2:]
    masks = torch.stack([sample_mask(seed, key, height, width, grid) for key in keys]).to(pixels.device)
    moments = autoencoder.encode_moments(pixels * (1 - masks)).float().cpu()
    latent_masks = F.interpolate(masks, size=moments.shape[-2:], mode="nearest").cpu()
    return [{"inpaint_mask": m, "masked_moments": mm} for m, mm in zip(latent_masks, moments)]


DERIVE = {"sr": _low_res, "inpaint": _masked}


def derive(pixels: torch.Tensor, keys: Sequence[str], spec: dict[str, Any] | None, autoencoder: Any,
           seed: int) -> list[dict[str, torch.Tensor]]:
    """Per sample, the tensors the cache stores for `spec` ({} each without one). pixels: [B,3,H,W]."""
    if spec is None:
        return [{} for _ in keys]
    return DERIVE[spec["kind"]](pixels, keys, spec, autoencoder, seed)
