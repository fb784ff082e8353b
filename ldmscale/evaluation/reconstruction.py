"""Reconstruction metrics: PSNR, SSIM, VQ codebook usage/perplexity, image grids as PNG.

Pure tensor functions on pixels in [-1, 1] (data range 2); callers reduce across ranks themselves.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

DATA_RANGE = 2.0  # pixels live in [-1, 1]


def psnr(pixels: torch.Tensor, recon: torch.Tensor, data_range: float = DATA_RANGE,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB [B]; reconstructions are clamped to the valid range, as when saved as images.
    With mask [B,1,H,W] (1 = counted) only the masked pixels count (inpainting's masked-region PSNR)."""
    recon = recon.float().clamp(-data_range / 2, data_range / 2)
    se = (pixels.float() - recon).pow(2)
    if mask is None:
        mse = se.flatten(1).mean(dim=1)
    else:
        mse = (se * mask).flatten(1).sum(1) / (mask.flatten(1).sum(1) * pixels.shape[1]).clamp_min(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # [size, size], sums to 1


def ssim(pixels: torch.Tensor, recon: torch.Tensor, data_range: float = DATA_RANGE,
         window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM [B] (Wang et al. 2004): 11x11 Gaussian window (σ=1.5), 'valid' positions only,
    population (co)variances, averaged over channels and positions (as skimage with gaussian_weights)."""
    x, y = pixels.double(), recon.double().clamp(-data_range / 2, data_range / 2)
    channels = x.shape[1]
    window = gaussian_window(window_size, sigma).to(x.device)
    window = window.expand(channels, 1, window_size, window_size).contiguous()

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)  # depthwise, valid

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).float()


def codebook_stats_tensors(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Usage (fraction of codes hit at least once) and perplexity exp(H(p)) of VQ code indices, as 0-dim
    tensors on their device: no host sync (bincount would read the largest index back to size its output)."""
    flat = indices.flatten().long()
    counts = torch.zeros(codebook_size, dtype=torch.float64, device=flat.device)
    return _codebook_stats(counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64)))


def _codebook_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    probs = counts / counts.sum().clamp_min(1)
    entropy = -torch.special.xlogy(probs, probs).sum()  # 0·log 0 = 0, without a data-dependent mask
    return {"codebook_usage": (counts > 0).double().mean(), "codebook_perplexity": entropy.exp()}


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """`codebook_stats_tensors` as numbers."""
    return {k: float(v) for k, v in codebook_stats_tensors(indices, codebook_size).items()}


def codebook_stats_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """As `codebook_stats`, from per-code hit counts (which sum across ranks)."""
    return {k: float(v) for k, v in _codebook_stats(counts.double()).items()}


def make_grid(rows: list[torch.Tensor], padding: int = 2) -> torch.Tensor:
    """Stack image rows ([N,3,H,W] each, in [-1,1]) into one uint8 [H', W', 3] grid (rows top to bottom)."""
    from torchvision.utils import make_grid as tv_make_grid

    n = rows[0].shape[0]
    images = torch.cat([r.detach().float().cpu().clamp(-1, 1) for r in rows])
    grid = tv_make_grid((images + 1) / 2, nrow=n, padding=padding, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0)


def save_grid(rows: list[torch.Tensor], path: str | Path) -> Path:
    """Write the grid as PNG atomically (a temporary name, then rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(make_grid(rows).numpy()).save(tmp, format="PNG")
    tmp.replace(path)
    return path
