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


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    var1, var2 = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    expected = float((mu1 - mu2).pow(2).sum() + (var1 + var2 - 2 * (var1 * var2).sqrt()).sum())
    got = evaluation.frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2))
    assert got == pytest.approx(expected, rel=1e-9)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)  # a full covariance: distance to itself is 0
    assert evaluation.frechet_distance(mu1, cov, mu1, cov) == pytest.approx(0.0, abs=1e-8)
    assert evaluation.frechet_distance(mu1, cov, mu2, torch.diag(var2)) == pytest.approx(
        evaluation.frechet_distance(mu2, torch.diag(var2), mu1, cov), rel=1e-8)


def test_feature_stats_merge_across_batches_like_numpy_cov():
    features = torch.randn(50, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    stats = evaluation.FeatureStats(dim=5)
    stats.update(features[:20])
    stats.update(features[20:])  # two batches (or two ranks after an all-reduce of .tensors)
    mean, cov = stats.mean_cov()
    torch.testing.assert_close(mean, features.mean(0))
    torch.testing.assert_close(cov, torch.from_numpy(np.cov(features.numpy(), rowvar=False)))
