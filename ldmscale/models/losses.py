"""Stage-1 losses (LDM §3, taming-transformers): reconstruction + LPIPS + PatchGAN with adaptive weight.

Single-device code: the autoencoder Task (ldmscale/stage1.py) calls these and owns the optimisers.

The discriminator's normalisation defaults to GroupNorm, not taming's ActNorm/BatchNorm: BatchNorm's
running statistics are per-rank buffers that DeepSpeed neither averages nor partitions (ranks drift
apart, and ZeRO-3 checkpoints only keep rank 0's), and its batch statistics differ between the real
and the fake half. GroupNorm has no buffers, behaves the same at any micro-batch size, and keeps the
discriminator a pure function of its parameters, so resume stays bit-exact. `norm="batch"` and
`norm="none"` remain available.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------- LPIPS
# The input normalisation the LPIPS linear heads were trained with (lpips.pretrained_networks).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# VGG16 `features` indices ending each slice: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG_SLICE_ENDS = (4, 9, 16, 23, 30)
_VGG_CHANNELS = (64, 128, 256, 512, 512)


class LPIPSWeightsError(FileNotFoundError):
    """An LPIPS weight file is missing or does not match the network."""


def _load_state(path: str | Path, what: str, config_key: str) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise LPIPSWeightsError(
            f"{what} weights not found at {str(path)!r} ({config_key}); LPIPS needs local weight files "
            "(nothing is downloaded). Give the path, or set ae_loss.perceptual_weight=0 to train without LPIPS."
        )
    from ldmscale.runs import read_weights

    return read_weights(path, what=config_key)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018): VGG16 features, unit-normalised, 1x1 linear heads.

    `vgg_weights` is a torchvision `vgg16` state dict (only `features.*` is used); `lin_weights` is the
    `lpips` package's head file (`lin0.model.1.weight` ... `lin4.model.1.weight`, e.g. lpips/weights/
    v0.1/vgg.pth). The network is frozen and kept in eval mode.
    """

    def __init__(self, vgg_weights: str | Path, lin_weights: str | Path) -> None:
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features
        vgg_state = _load_state(vgg_weights, "VGG16 (torchvision)", "ae_loss.lpips_vgg_weights")
        feature_state = {k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")}
        try:
            features.load_state_dict(feature_state)
        except RuntimeError as err:
            raise LPIPSWeightsError(f"{vgg_weights}: not a torchvision vgg16 state dict: {err}") from None
        starts = (0,) + _VGG_SLICE_ENDS[:-1]
        self.slices = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in zip(starts, _VGG_SLICE_ENDS))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _VGG_CHANNELS)
        lin_state = _load_state(lin_weights, "LPIPS linear-head", "ae_loss.lpips_lin_weights")
        for i, lin in enumerate(self.lins):
            # lpips stores the conv after a Dropout (`lin{i}.model.1.weight`); accept `.model.0.` too.
            key = next((k for k in (f"lin{i}.model.1.weight", f"lin{i}.model.0.weight", f"lin{i}.weight")
                        if k in lin_state), None)
            if key is None:
                raise LPIPSWeightsError(f"{lin_weights}: no key lin{i}.model.1.weight; keys: {sorted(lin_state)[:8]}")
            if lin_state[key].shape != lin.weight.shape:
                raise LPIPSWeightsError(f"{lin_weights}: {key} has shape {tuple(lin_state[key].shape)}, "
                                        f"expected {tuple(lin.weight.shape)}")
            lin.weight.data.copy_(lin_state[key])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:  # frozen: never leaves eval mode
        return super().train(False)

    def forward(self, pixels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample distance [B, 1, 1, 1] between images in [-1, 1]."""
        a = (pixels - self.shift) / self.scale
        b = (target - self.shift) / self.scale
        total = None
        for block, lin in zip(self.slices, self.lins):
            a, b = block(a), block(b)
            diff = (_unit_normalise(a) - _unit_normalise(b)) ** 2  # [B, C, h, w]
            term = lin(diff).mean(dim=(2, 3), keepdim=True)  # [B, 1, 1, 1]
            total = term if total is None else total + term
        return total


def _unit_normalise(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


# ------------------------------------------------------------------------------------ discriminator
def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"ae_loss.disc_norm={norm!r} must be 'group', 'batch' or 'none'")


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming): one real/fake logit per ~70x70 receptive-field patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, num_layers: int = 3, norm: str = "group") -> None:
        super().__init__()
        use_bias = norm == "none"  # a following norm's shift makes a conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=use_bias),
                       _norm_layer(norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.main(pixels)  # [B, 1, h', w'] logits


def _init_weights(module: nn.Module) -> None:
    # DCGAN init, as taming's weights_init.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adv_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's adversarial term: -E[D(x̂)] for hinge (as LDM), softplus(-D(x̂)) for vanilla."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "vanilla":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"ae_loss.disc_loss={kind!r} must be one of {list(D_LOSSES)}")


def adopt_weight(weight: float, step: int, start_step: int) -> float:
    """The discriminator's weight: 0 before `start_step`, `weight` from then on."""
    return weight if step >= start_step else 0.0


def adaptive_weight_from_grads(nll_grads: torch.Tensor, g_grads: torch.Tensor, disc_weight: float = 1.0,
                               max_weight: float = 1e4) -> torch.Tensor:
    """LDM's λ = ‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), clamped to [0, max_weight], detached, times disc_weight.

    L is the decoder's last layer; balancing there keeps the adversarial gradient on the scale of the
    reconstruction gradient (Esser et al. 2021, eq. 7).
    """
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach() * disc_weight


def adaptive_disc_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                         disc_weight: float = 1.0, max_weight: float = 1e4) -> torch.Tensor:
    """`adaptive_weight_from_grads` with the gradients taken by autograd (both graphs are retained)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return adaptive_weight_from_grads(nll_grads, g_grads, disc_weight, max_weight)


def conv_weight_grad(conv: nn.Conv2d, inputs: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """∂loss/∂conv.weight from the layer's input and ∂loss/∂output (what autograd would compute).

    Lets the adaptive weight be taken from gradients at the decoder's output alone, without an
    autograd pass through a DeepSpeed engine's graph (which only `engine.backward` may run).
    """
    shape = tuple(getattr(conv.weight, "ds_shape", conv.weight.shape))  # ZeRO-3 partitions the tensor
    return torch.nn.grad.conv2d_weight(inputs, shape, grad_output, stride=conv.stride, padding=conv.padding,
                                       dilation=conv.dilation, groups=conv.groups)


# ----------------------------------------------------------------------------------- the full loss
@dataclass
class LossOutput:
    """The generator's (or discriminator's) loss and the logged parts (detached)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]
    terms: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # undetached parts of `loss`


class AutoencoderLoss(nn.Module):
    """LPIPSWithDiscriminator / VQLPIPSWithDiscriminator of LDM, for KL and VQ autoencoders."""

    def __init__(self, cfg, kind: str = "kl") -> None:
        super().__init__()
        self.cfg = cfg
        self.kind = kind
        if cfg.rec_loss not in ("l1", "l2"):
            raise ValueError(f"ae_loss.rec_loss={cfg.rec_loss!r} must be 'l1' or 'l2'")
        if cfg.disc_loss not in D_LOSSES:
            raise ValueError(f"ae_loss.disc_loss={cfg.disc_loss!r} must be one of {list(D_LOSSES)}")
        # Not a registered submodule: frozen, never checkpointed, kept out of the trained engine's state
        # (the owner moves it to the device with `.perceptual.to(device)`).
        perceptual: Optional[LPIPS] = None
        if cfg.perceptual_weight > 0:
            if not cfg.lpips_vgg_weights or not cfg.lpips_lin_weights:
                missing = "ae_loss.lpips_vgg_weights" if not cfg.lpips_vgg_weights else "ae_loss.lpips_lin_weights"
                raise LPIPSWeightsError(
                    f"{missing} is not set: LPIPS needs a local torchvision vgg16 state dict and the lpips "
                    "linear-head file (nothing is downloaded). Set both, or ae_loss.perceptual_weight=0."
                )
            perceptual = LPIPS(cfg.lpips_vgg_weights, cfg.lpips_lin_weights)
        object.__setattr__(self, "perceptual", perceptual)
        # The KL log-variance weighting of LDM's NLL (a learned scalar; 0 = plain L1/L2 at init).
        # Shape [1], not []: DeepSpeed broadcasts parameters as byte views, which 0-d tensors cannot take.
        self.logvar = nn.Parameter(torch.full((1,), float(cfg.logvar_init)), requires_grad=cfg.learn_logvar)

    def reconstruction(self, pixels: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-pixel reconstruction + perceptual loss [B, C, H, W]."""
        if self.cfg.rec_loss == "l1":
            rec = (pixels - recon).abs()
        else:
            rec = (pixels - recon) ** 2
        if self.perceptual is not None:
            rec = rec + self.cfg.perceptual_weight * self.perceptual(recon.float(), pixels.float())
        return rec

    def generator_loss(self, pixels: torch.Tensor, recon: torch.Tensor, reg_loss: torch.Tensor,
                       logits_fake: Optional[torch.Tensor], step: int,
                       last_layer: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
                       ) -> LossOutput:
        """Eq. of LDM's LPIPSWithDiscriminator (optimizer_idx=0).

        reg_loss: per-sample KL [B] (KL) or the scalar codebook+commitment loss (VQ).
        logits_fake: D(recon) with D frozen, or None while the discriminator is off.
        last_layer: the decoder's last weight (λ by autograd), or a function (nll, g) -> λ.
        loss = nll + reg + λ·disc_factor·g; `terms` holds nll, reg and (once on) g and adv_scale = λ·disc_factor.
        """
        cfg = self.cfg
        rec = self.reconstruction(pixels, recon)
        if self.kind == "kl":
            nll = rec / torch.exp(self.logvar) + self.logvar
            nll_loss = nll.sum() / nll.shape[0]  # per-sample sum, as LDM (weights balance at this scale)
            if cfg.sum_over_pixels:
                reg = reg_loss.sum() / reg_loss.shape[0]
            else:
                nll_loss = nll.mean()
                reg = reg_loss.sum() / reg_loss.shape[0] / rec[0].numel()
            reg_weighted = cfg.kl_weight * reg
        else:
            nll_loss = rec.mean()
            reg = reg_loss.mean()
            reg_weighted = cfg.codebook_weight * reg
        disc_factor = adopt_weight(cfg.disc_factor, step, cfg.disc_start)
        logs = {"rec_loss": rec.detach().mean(), "nll_loss": nll_loss.detach(), "reg_loss": reg.detach(),
                "logvar": self.logvar.detach()[0]}
        loss = nll_loss + reg_weighted
        terms = {"nll": nll_loss, "reg": reg_weighted}
        if logits_fake is not None and disc_factor > 0:
            g_loss = generator_adv_loss(logits_fake, cfg.disc_loss)
            if cfg.adaptive_weight and last_layer is not None and torch.is_grad_enabled():
                if callable(last_layer) and not isinstance(last_layer, torch.Tensor):
                    d_weight = last_layer(nll_loss, g_loss)
                else:
                    d_weight = adaptive_disc_weight(nll_loss, g_loss, last_layer, cfg.disc_weight)
            else:
                d_weight = torch.tensor(cfg.disc_weight, device=loss.device)
            loss = loss + d_weight * disc_factor * g_loss
            terms.update(g=g_loss, adv_scale=(d_weight * disc_factor).detach())
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        logs["loss"] = loss.detach()
        return LossOutput(loss, logs, terms)

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, step: int) -> LossOutput:
        """LDM's optimizer_idx=1: the D loss on real pixels and detached reconstructions."""
        disc_factor = adopt_weight(self.cfg.disc_factor, step, self.cfg.disc_start)
        d_loss = disc_factor * D_LOSSES[self.cfg.disc_loss](logits_real, logits_fake)
        return LossOutput(d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                                   "logits_fake": logits_fake.detach().mean()})


def build_discriminator(cfg) -> NLayerDiscriminator:
    """The PatchGAN from `AutoencoderLossConfig` (ae_loss.disc_*)."""
    return NLayerDiscriminator(cfg.disc_in_channels, cfg.disc_ndf, cfg.disc_num_layers, cfg.disc_norm)
