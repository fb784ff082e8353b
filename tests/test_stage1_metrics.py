"""Reconstruction metrics: PSNR, SSIM against a direct per-window computation, codebook stats, grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldmscale import evaluation


def _reference_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 2.0) -> float:
    """SSIM by its definition, one 11x11 window at a time (float64), averaged over channels and windows."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                a, b = x[c, i:i + 11, j:j + 11], y[c, i:i + 11, j:j + 11]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 18, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 16, 18, generator=g)).clamp(-1, 1)
    got = evaluation.ssim(x, y)
    for b in range(2):
        assert got[b].item() == pytest.approx(_reference_ssim(x[b].double().numpy(), y[b].double().numpy()), abs=1e-6)
    assert torch.allclose(evaluation.ssim(x, x), torch.ones(2))
    assert torch.all(got < 1)


def test_psnr():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full((2, 3, 4, 4), 0.1)
    assert evaluation.psnr(x, y)[0].item() == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-5)
    # Reconstructions outside [-1, 1] are clamped first, as when they are saved.
    assert evaluation.psnr(torch.ones(1, 3, 2, 2), torch.full((1, 3, 2, 2), 5.0)).item() > 100


def test_codebook_stats():
    stats = evaluation.codebook_stats(torch.tensor([[0, 1], [1, 0]]), codebook_size=8)
    assert stats["codebook_usage"] == 0.25
    assert stats["codebook_perplexity"] == pytest.approx(2.0)
    uniform = evaluation.codebook_stats(torch.arange(16), 16)
    assert uniform == {"codebook_usage": 1.0, "codebook_perplexity": pytest.approx(16.0)}


def test_grid_png(tmp_path):
    rows = [torch.full((3, 3, 8, 8), -1.0), torch.ones(3, 3, 8, 8)]
    path = evaluation.save_grid(rows, tmp_path / "grid.png")
    image = np.asarray(Image.open(path))
    assert image.shape == (2 * 8 + 3 * 2, 3 * 8 + 4 * 2, 3)
    assert image[2 + 4, 2 + 4].tolist() == [0, 0, 0]  # first row black
    assert image[2 + 8 + 2 + 4, 2 + 4].tolist() == [255, 255, 255]  # second row white
