"""Stage-1 autoencoders of the LDM paper: KL-regularised (diagonal Gaussian) and VQ (vector quantised).

Module and parameter names follow the original LDM/SD code (`first_stage_model.*`) so that LDM
checkpoints load with an identity key map; `interop/autoencoder_format.py` maps diffusers names onto these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ldmscale.config import AutoencoderConfig


def Normalize(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(num_groups, channels), num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, with a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (LDM's mid-block attention)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B,1,HW,C]
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with LDM's asymmetric (0,1,0,1) padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


ATTN_TYPES = ("vanilla", "none")  # LDM's ddconfig.attn_type: "none" (vq-f4-noattn) has no attention at all


def _attn(channels: int, attn_type: str) -> nn.Module:
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"autoencoder attn_type={attn_type!r} is not one of {list(ATTN_TYPES)}")
    return AttnBlock(channels) if attn_type == "vanilla" else nn.Identity()


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, attn_type: str = "vanilla"):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = _attn(channels, attn_type)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """pixels [B,C,H,W] → z [B, z_channels (x2 if double_z), H/f, W/f]."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True, dropout: float = 0.0,
                 attn_type: str = "vanilla"):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level()
            block_in, block_out = ch * in_mult[i], ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(_attn(block_in, attn_type))
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z [B, z_channels, h, w] → pixels [B, out_ch, h*f, w*f]."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int, dropout: float = 0.0,
                 attn_type: str = "vanilla"):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _Mid(block_in, dropout, attn_type)
        up = []
        for i in reversed(range(self.num_resolutions)):
            level = _Level()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(_attn(block_in, attn_type))
            if i != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            up.insert(0, level)  # stored by level so checkpoint keys match LDM's `up.{i}`
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))) from moments = mean ‖ logvar along channels."""

    def __init__(self, moments: torch.Tensor, deterministic: bool = False):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)  # as in LDM: keeps exp() finite
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Optional[DiagonalGaussian] = None) -> torch.Tensor:
        """KL divergence to N(0, I) (or to `other`), summed over C,H,W → [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device)
        log2pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log2pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))


def scale_latents(latents: torch.Tensor, scale_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """Latents of the autoencoder → the unit-variance space the U-Net is trained in."""
    return (latents - shift_factor) * scale_factor


def unscale_latents(z: torch.Tensor, scale_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """Inverse of `scale_latents` (before `decode`)."""
    return z / scale_factor + shift_factor


@torch.no_grad()
def estimate_scale_factor(latents: torch.Tensor) -> float:
    """1/std of the latents (Rombach et al. 2022, sec. 4.3.2; SD's 0.18215 came from this)."""
    return float(1.0 / latents.detach().float().flatten().std())


@torch.no_grad()
def estimate_scale_and_shift(latents: torch.Tensor) -> tuple[float, float]:
    """(scale, shift) such that `scale_latents` gives zero mean and unit variance."""
    flat = latents.detach().float().flatten()
    return float(1.0 / flat.std()), float(flat.mean())


class _LatentScaling:
    scale_factor: float
    shift_factor: float

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return scale_latents(latents, self.scale_factor, self.shift_factor)

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return unscale_latents(z, self.scale_factor, self.shift_factor)


def _coder_kwargs(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, dropout, attn_type):
    return dict(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
                resolution=resolution, z_channels=z_channels, dropout=dropout, attn_type=attn_type)


class AutoencoderKL(_LatentScaling, nn.Module):
    """KL-regularised autoencoder (LDM-KL-f; the SD VAE is f8 with 4 latent channels)."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (), in_channels: int = 3, out_ch: int = 3, resolution: int = 256,
                 z_channels: int = 4, embed_dim: int = 4, double_z: bool = True, dropout: float = 0.0,
                 scale_factor: float = 1.0, shift_factor: float = 0.0, bicubic_skip: bool = False,
                 attn_type: str = "vanilla"):
        super().__init__()
        if not double_z:
            raise ValueError("AutoencoderKL needs double_z=True (the encoder predicts mean and logvar)")
        if bicubic_skip and (embed_dim < in_channels or in_channels != out_ch):
            raise ValueError(f"bicubic_skip needs embed_dim >= in_channels = out_ch (got {embed_dim}, "
                             f"{in_channels}, {out_ch})")
        kw = _coder_kwargs(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, dropout, attn_type)
        self.encoder = Encoder(in_channels=in_channels, double_z=True, **kw)
        self.decoder = Decoder(out_ch=out_ch, **kw)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.latent_channels = embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.scale_factor, self.shift_factor = float(scale_factor), float(shift_factor)
        self.config = dict(kind="kl", ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), in_channels=in_channels, out_ch=out_ch,
                           resolution=resolution, z_channels=z_channels, embed_dim=embed_dim, double_z=True,
                           dropout=dropout, scale_factor=self.scale_factor, shift_factor=self.shift_factor,
                           attn_type=attn_type)
        # Residual learning around a fixed resampler (as VDSR around bicubic SR): the first latent channels
        # are the antialiased bicubic downsample plus what the encoder adds, and the decoder adds its output
        # to their bicubic upsample. Zero-initialised ends make the untrained model exactly bicubic down-up
        # (with a near-deterministic posterior), so training only has to learn what bicubic misses: on a
        # CPU this reaches useful natural-image quality in minutes, where a plain KL-f4 needs hours.
        self.bicubic_skip = bool(bicubic_skip)
        if self.bicubic_skip:
            self.config["bicubic_skip"] = True
            for conv in (self.quant_conv, self.decoder.conv_out):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
            with torch.no_grad():
                self.quant_conv.bias[embed_dim:] = -10.0  # log-variance: posterior std e^-5 at the start

    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [-1,1] → moments [B, 2*embed_dim, h, w] (mean ‖ logvar)."""
        moments = self.quant_conv(self.encoder(pixels))
        if not self.bicubic_skip:
            return moments
        f = self.downsample_factor
        low = F.interpolate(pixels, size=(pixels.shape[-2] // f, pixels.shape[-1] // f), mode="bicubic",
                            antialias=True, align_corners=False)
        anchor = F.pad(low.to(moments.dtype), (0, 0, 0, 0, 0, moments.shape[1] - low.shape[1]))
        return moments + anchor

    def encode(self, pixels: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_moments(pixels))

    def latent_from_moments(self, moments: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return DiagonalGaussian(moments).sample(generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.post_quant_conv(latents))
        if self.bicubic_skip:
            image = latents[:, :out.shape[1]]
            out = out + F.interpolate(image, scale_factor=self.downsample_factor, mode="bicubic", align_corners=False)
        return out

    def forward(self, pixels: torch.Tensor, sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(pixels)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


@dataclass
class VQOutput:
    """What `VQModel.forward` returns."""

    reconstruction: torch.Tensor
    qloss: torch.Tensor  # codebook + β·commitment loss (scalar)
    indices: torch.Tensor  # [B, h, w] codebook indices
    perplexity: torch.Tensor  # exp(entropy of the code histogram in the batch)
    codebook_usage: torch.Tensor  # fraction of codes used in the batch


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser with the straight-through estimator (van den Oord et al. 2017).

    codebook="plain" learns the codes directly (LDM). codebook="linear" (SimVQ, Zhu et al. 2024) learns a
    linear map of a frozen random basis instead, so each step moves the whole codebook towards the
    encoder rather than only the codes that won: a small codebook trained from scratch otherwise
    collapses (ae_vq_f4 with plain codes: ~10% of 256 in use). `fold()` gives the plain form for export.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, codebook: str = "plain"):
        super().__init__()
        if codebook not in ("plain", "linear"):
            raise ValueError(f"codebook={codebook!r} is not one of ['plain', 'linear']")
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.codebook_proj: Optional[nn.Linear] = None
        if codebook == "plain":
            self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)
        else:
            nn.init.normal_(self.embedding.weight, std=embed_dim**-0.5)
            self.embedding.weight.requires_grad_(False)
            self.codebook_proj = nn.Linear(embed_dim, embed_dim, bias=False)

    def codebook(self) -> torch.Tensor:
        """The codes [n_embed, embed_dim]."""
        weight = self.embedding.weight
        return weight if self.codebook_proj is None else self.codebook_proj(weight)

    @torch.no_grad()
    def fold(self) -> VectorQuantizer:
        """Linear → plain with the same codes, in place (inference needs only the codebook)."""
        if self.codebook_proj is not None:
            self.embedding.weight.copy_(self.codebook())
            self.embedding.weight.requires_grad_(True)
            self.codebook_proj = None
        return self

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,C,h,w] → nearest code indices [B,h,w]. Distances in fp32: in bf16 (8 mantissa bits) the
        expanded |z|² - 2z·c + |c|² loses the small differences between near codes."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim).float()
        codebook = self.codebook().float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None]
        return dist.argmin(1).reshape(z.shape[0], z.shape[2], z.shape[3])

    def codes_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = self.lookup(z)
        z_q = self.codes_to_latents(indices)
        # codebook term pulls codes to encoder outputs; β-weighted commitment term keeps encoder near codes
        qloss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()  # straight-through: gradient of z_q w.r.t. z is the identity
        counts = torch.bincount(indices.flatten(), minlength=self.n_embed).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        usage = (counts > 0).float().mean()
        return z_q, qloss, indices, perplexity, usage


class VQModel(_LatentScaling, nn.Module):
    """Vector-quantised autoencoder (LDM-VQ-f)."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (), in_channels: int = 3, out_ch: int = 3, resolution: int = 256,
                 z_channels: int = 3, embed_dim: int = 3, n_embed: int = 8192, beta: float = 0.25,
                 codebook: str = "plain", dropout: float = 0.0, scale_factor: float = 1.0,
                 shift_factor: float = 0.0, attn_type: str = "vanilla"):
        super().__init__()
        kw = _coder_kwargs(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, dropout, attn_type)
        self.encoder = Encoder(in_channels=in_channels, double_z=False, **kw)
        self.decoder = Decoder(out_ch=out_ch, **kw)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta, codebook)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.latent_channels = embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.scale_factor, self.shift_factor = float(scale_factor), float(shift_factor)
        self.config = dict(kind="vq", ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), in_channels=in_channels, out_ch=out_ch,
                           resolution=resolution, z_channels=z_channels, embed_dim=embed_dim, n_embed=n_embed,
                           beta=beta, codebook=codebook, double_z=False, dropout=dropout,
                           scale_factor=self.scale_factor, shift_factor=self.shift_factor, attn_type=attn_type)

    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels → the pre-quantisation latent [B, embed_dim, h, w] (LDM trains stage 2 on it)."""
        return self.quant_conv(self.encoder(pixels))

    def latent_from_moments(self, moments: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return moments

    def decode(self, latents: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        if not force_not_quantize:
            latents, *_ = self.quantize(latents)
        return self.decoder(self.post_quant_conv(latents))

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantize.codes_to_latents(indices), force_not_quantize=True)

    def forward(self, pixels: torch.Tensor) -> VQOutput:
        z_q, qloss, indices, perplexity, usage = self.quantize(self.encode_moments(pixels))
        return VQOutput(self.decode(z_q, force_not_quantize=True), qloss, indices, perplexity, usage)

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def fold(self) -> VQModel:
        """In place: a linear codebook becomes the plain one it computes (what every LDM loader reads)."""
        self.quantize.fold()
        self.config["codebook"] = "plain"
        return self


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL | VQModel:
    """Build from an `AutoencoderConfig`; `cfg.weights` (a file or folder) loads trained weights."""
    from ldmscale.latent_scale import decide

    scale = decide(cfg)  # the configured scale, else the weights' own (config.to_object has decided already)
    common = dict(ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                  attn_resolutions=list(cfg.attn_resolutions), in_channels=cfg.in_channels, out_ch=cfg.out_ch,
                  resolution=cfg.resolution, z_channels=cfg.z_channels, embed_dim=cfg.embed_dim,
                  dropout=cfg.dropout, scale_factor=scale.scale_factor, shift_factor=scale.shift_factor,
                  attn_type=cfg.attn_type)
    if cfg.kind == "kl":
        model: AutoencoderKL | VQModel = AutoencoderKL(double_z=cfg.double_z, bicubic_skip=cfg.bicubic_skip, **common)
    elif cfg.kind == "vq":
        model = VQModel(n_embed=cfg.n_embed, beta=cfg.beta, codebook=cfg.codebook, **common)
    else:
        raise ValueError(f"autoencoder.kind={cfg.kind!r} is not one of ['kl', 'vq']")
    if cfg.weights:
        from ldmscale.models.interop import load_autoencoder_weights

        load_autoencoder_weights(model, cfg.weights)
    return model
