"""Reconstruction metrics for stage 1: PSNR, SSIM, VQ codebook usage/perplexity, image grids as PNG.

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


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage (fraction of codes hit at least once) and perplexity exp(H(p)) of VQ code indices."""
    counts = torch.bincount(indices.flatten().long(), minlength=codebook_size).double()
    return codebook_stats_from_counts(counts)


def codebook_stats_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """As `codebook_stats`, from per-code hit counts (which sum across ranks)."""
    counts = counts.double()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).double().mean()), "codebook_perplexity": float(entropy.exp())}


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


# ---------------------------------------------------------------------------- rFID
class InceptionFeatures(torch.nn.Module):
    """torchvision Inception-v3 pool features (2048-d) for FID, from a local state dict (nothing downloaded).

    Published FIDs use the TF-ported "pt_inception-2015-12-05" network of pytorch-fid, whose blocks differ
    slightly; with torchvision's ImageNet weights the numbers rank models the same but are not comparable
    with papers' FIDs.
    """

    def __init__(self, weights: str | Path):
        super().__init__()
        from torchvision.models import inception_v3

        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"ae_loss.inception_weights={str(weights)!r}: no such file (a torchvision "
                                    "inception_v3 state dict, .pth or .safetensors); unset it to skip rFID")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        net.load_state_dict(state)
        net.fc = torch.nn.Identity()
        net.AuxLogits = None  # type: ignore[assignment]
        net.aux_logits = False
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # frozen: batch norm in inference mode always

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [-1,1] → [B,2048] float64 (resized to 299², ImageNet-normalised)."""
        x = (pixels.float().clamp(-1, 1) + 1) / 2
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std).double()


class FeatureStats:
    """Running sums of features (count, Σf, Σffᵀ): mergeable across batches and ranks (all-reduce `.tensors`)."""

    def __init__(self, dim: int = 2048):
        self.count = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().double().cpu()
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.count, self.sum, self.outer]

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.count
        mean = self.sum / n
        cov = (self.outer - n * torch.outer(mean, mean)) / (n - 1).clamp_min(1)  # unbiased, as numpy.cov
        return mean, cov


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), with tr((Σ1Σ2)^½) = Σ√λ(Σ1^½ Σ2 Σ1^½) (symmetric, no scipy)."""
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    vals, vecs = torch.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt)
