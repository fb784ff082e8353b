"""Evaluation: reconstruction metrics (PSNR, SSIM, codebook), FID with pytorch-fid's Inception, CLIP score."""

from ldmscale.evaluation.fid import (
    FeatureStats,
    InceptionFeatures,
    frechet_distance,
    load_stats,
    resolve_inception_weights,
    save_stats,
)
from ldmscale.evaluation.reconstruction import (
    DATA_RANGE,
    codebook_stats,
    codebook_stats_from_counts,
    codebook_stats_tensors,
    gaussian_window,
    make_grid,
    psnr,
    save_grid,
    ssim,
)

__all__ = ["DATA_RANGE", "FeatureStats", "InceptionFeatures", "codebook_stats", "codebook_stats_from_counts",
           "codebook_stats_tensors", "frechet_distance", "gaussian_window", "load_stats", "make_grid", "psnr",
           "resolve_inception_weights", "save_grid", "save_stats", "ssim"]
