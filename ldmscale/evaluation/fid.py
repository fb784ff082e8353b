"""FID: pytorch-fid's Inception network (the TF-ported pt_inception-2015-12-05), feature statistics that
merge across batches and ranks, their .npz files (pytorch-fid's format), and the Fréchet distance.

The network is pytorch-fid's own `InceptionV3` (pool3, 2048-d) so our numbers are the published FIDs'
network, not torchvision's ImageNet Inception. Its weights come from a local file or pytorch-fid's own
cache file (torch hub's checkpoints folder); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

FEATURE_DIM = 2048
# pytorch_fid.inception.FID_WEIGHTS_URL's file name: where pytorch-fid itself caches the weights.
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


def package_cache_file() -> Path:
    """Where pytorch-fid keeps its weights once fetched ($TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def resolve_inception_weights(weights: Optional[str | Path], key: str = "eval.inception_weights") -> Optional[Path]:
    """The weights file FID uses: `weights` if set (it must exist), else pytorch-fid's cache file if present,
    else None (FID is skipped)."""
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{key}={str(weights)!r}: no such file (pytorch-fid's "
                                    f"{FID_WEIGHTS_FILE}, .pth or .safetensors); unset it to skip FID")
        return path
    cached = package_cache_file()
    return cached if cached.is_file() else None


@contextlib.contextmanager
def _state_for_pytorch_fid(state: dict[str, torch.Tensor]) -> Iterator[None]:
    """pytorch-fid's constructor always fetches its weights by URL (and unpickles them, weights_only=False);
    hand it the state dict we read weights-only from a local file instead, so its own code builds the net."""
    from pytorch_fid import inception

    fetch = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        yield
    finally:
        inception.load_state_dict_from_url = fetch


def build_pytorch_fid_inception(state: dict[str, torch.Tensor]) -> nn.Module:
    """pytorch_fid.inception.InceptionV3 (pool3 block, bilinear resize to 299, [0,1] input) with `state`."""
    from pytorch_fid.inception import InceptionV3

    with _state_for_pytorch_fid(state):
        return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]]).eval()


def quantize(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1] on the 8-bit grid: what pytorch-fid reads back from saved PNGs."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round() / 255


class InceptionFeatures(nn.Module):
    """FID features [B, 2048] (float64) of pixels in [-1, 1], from pytorch-fid's network and a local file.

    Images are quantized to 8 bits (as saved PNGs), then pytorch-fid resizes them to 299x299 bilinearly
    (F.interpolate, align_corners=False, no antialiasing) and scales them to [-1, 1].
    """

    def __init__(self, weights: str | Path, key: str = "eval.inception_weights"):
        super().__init__()
        from ldmscale.runs import read_weights

        path = resolve_inception_weights(weights, key)
        assert path is not None
        self.weights_path = path
        self.net = build_pytorch_fid_inception(read_weights(path, what=key)).requires_grad_(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # frozen: batch norm in inference mode always

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(pixels).all():
            raise ValueError("FID: the images contain NaN/inf (a diverged model or sampler?)")
        return self.net(quantize(pixels.to(self.device)))[0].flatten(1).double()  # [B, 2048]


def random_inception_weights(seed: int = 0, calibration_images: int = 8) -> dict[str, torch.Tensor]:
    """Random weights for pytorch-fid's network, FOR TESTS AND TIMING ONLY (the numbers mean nothing).

    Batch-norm statistics are calibrated on random images, so features neither vanish nor explode
    through the 90-odd layers as with raw initialisation."""
    from torchvision.models import inception_v3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # the FID blocks have torchvision's parameters (only their forward differs): same state dict keys
        state = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False).state_dict()
        net = build_pytorch_fid_inception(state)
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration pass
        net.train()
        with torch.no_grad():
            net(torch.rand(calibration_images, 3, 299, 299))
    # InceptionV3 regroups torchvision's modules into `blocks` in the same order: map the names back
    names = [name for name in state if not name.startswith("fc.")]
    calibrated = net.state_dict()
    if len(names) != len(calibrated):
        raise RuntimeError("pytorch-fid's InceptionV3 no longer mirrors torchvision's module order")
    out = dict(state)
    for name, (block_name, tensor) in zip(names, calibrated.items()):
        assert name.rsplit(".", 1)[-1] == block_name.rsplit(".", 1)[-1] and state[name].shape == tensor.shape
        out[name] = tensor.clone()
    return out


# ---------------------------------------------------------------------------- statistics
class FeatureStats:
    """Running sums of features (count, Σf, Σffᵀ) in float64: mergeable across batches and ranks."""

    def __init__(self, dim: int = FEATURE_DIM):
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

    def all_reduce(self) -> FeatureStats:
        """Sum over ranks (collective; a no-op without a process group). Sums in float64, so any split of
        the images over ranks gives the same statistics up to rounding."""
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            for t in self.tensors:
                tdist.all_reduce(t)
        return self

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.count
        if n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {int(n)}")
        mean = self.sum / n
        cov = (self.outer - n * torch.outer(mean, mean)) / (n - 1)  # unbiased, as numpy.cov
        return mean, cov


def save_stats(path: str | Path, mean: torch.Tensor, cov: torch.Tensor, num_images: int) -> Path:
    """pytorch-fid's .npz (`mu`, `sigma`), which `python -m pytorch_fid REF.npz IMAGES/` also reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".tmp"), "wb") as f:
        np.savez(f, mu=mean.double().numpy(), sigma=cov.double().numpy(), num_images=np.int64(num_images))
    path.with_name(path.name + ".tmp").replace(path)
    return path


def load_stats(path: str | Path, key: str = "eval.reference_stats") -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) from a pytorch-fid .npz (ours from tools/fid_stats.py, or pytorch-fid's --save-stats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file (make one with tools/fid_stats.py)")
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise KeyError(f"{key}={str(path)!r} has {sorted(data.files)}, not pytorch-fid's 'mu' and 'sigma'")
        return torch.from_numpy(data["mu"]).double(), torch.from_numpy(data["sigma"]).double()


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix. LAPACK's eigh can fail to converge on the heavily repeated
    zero eigenvalues of a covariance of few images; the SVD of a PSD matrix is the same decomposition."""
    sym = (matrix + matrix.T) / 2
    try:
        vals, vecs = torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        vecs, vals, _ = torch.linalg.svd(sym)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), with tr((Σ1Σ2)^½) = Σ√σ(Σ1^½ Σ2 Σ1^½) (a PSD matrix: its
    singular values are its eigenvalues).

    The same quantity as pytorch-fid's `calculate_frechet_distance` (scipy's sqrtm of Σ1Σ2), through
    symmetric decompositions in float64: stable when Σ is singular (fewer images than 2048)."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(t).double() for t in (mu1, mu2, cov1, cov2))
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.svdvals((middle + middle.T) / 2).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt)
