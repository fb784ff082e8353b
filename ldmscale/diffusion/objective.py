"""The stage-2 training loss: sample timesteps and noise, noise the latents, call the network, weight."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from ldmscale.config import DiffusionConfig
from ldmscale.diffusion.schedules import PREDICTION_TYPES, Schedule

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
WEIGHTINGS = ("uniform", "min_snr")

Denoiser = Callable[[Tensor, Tensor, dict[str, Any]], Tensor]


def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 9 and Table 1), per prediction type.

    The per-sample loss on the network's own target is weighted so that, expressed as an x0-loss, the
    weight is min(SNR, gamma):  eps: min(SNR, g) / SNR;  v: min(SNR, g) / (SNR + 1);  x0: min(SNR, g).
    For eps at SNR = 0 (zero-terminal-SNR schedules) the limit, 1, is used instead of 0/0.
    """
    snr = snr.float()
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "eps":
        return torch.where(snr < gamma, torch.ones_like(snr), gamma / snr)
    if prediction_type == "v":
        return clipped / (snr + 1)
    if prediction_type == "x0":
        return clipped
    raise ValueError(f"prediction_type={prediction_type!r} is not one of {list(PREDICTION_TYPES)}")


class DiffusionObjective:
    """Denoising loss of one diffusion process; the network is passed in, never owned."""

    def __init__(self, cfg: DiffusionConfig, schedule: Optional[Schedule] = None):
        for key, value, choices in (
            ("diffusion.prediction_type", cfg.prediction_type, PREDICTION_TYPES),
            ("diffusion.timestep_sampling", cfg.timestep_sampling, TIMESTEP_SAMPLINGS),
            ("diffusion.weighting", cfg.weighting, WEIGHTINGS),
        ):
            if value not in choices:
                raise ValueError(f"{key}={value!r} is not one of {list(choices)}")
        if cfg.weighting == "min_snr" and cfg.min_snr_gamma <= 0:
            raise ValueError(f"diffusion.min_snr_gamma={cfg.min_snr_gamma} must be > 0")
        if cfg.schedule.zero_terminal_snr and cfg.prediction_type == "eps":
            # At SNR 0 the input carries no signal, so eps cannot give x0 (Lin et al. 2023, sec. 3.2).
            raise ValueError("diffusion.schedule.zero_terminal_snr=true needs diffusion.prediction_type "
                             "'v' or 'x0', not 'eps'")
        if cfg.timestep_sampling == "logit_normal" and cfg.logit_std <= 0:
            raise ValueError(f"diffusion.logit_std={cfg.logit_std} must be > 0")
        self.cfg = cfg
        self.schedule = schedule if schedule is not None else Schedule.from_config(cfg.schedule)
        self.prediction_type = cfg.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def sample_timesteps(self, batch_size: int, device: torch.device,
                         generator: Optional[torch.Generator] = None) -> Tensor:
        """Training timesteps [B] long: uniform on [0, T), or logit-normal (SD3, Esser et al. 2024)."""
        T = self.num_train_timesteps
        if self.cfg.timestep_sampling == "uniform":
            return torch.randint(0, T, (batch_size,), device=device, generator=generator)
        normal = torch.randn(batch_size, device=device, generator=generator)
        u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * normal)  # (0, 1), t=0 is clean
        return (u * T).long().clamp(0, T - 1)

    def sample_noise(self, latents: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Gaussian noise, plus per-channel offset noise (Guttenberg 2023) when diffusion.offset_noise > 0."""
        noise = torch.randn(latents.shape, device=latents.device, dtype=torch.float32, generator=generator)
        if self.cfg.offset_noise > 0:
            offset = torch.randn((*latents.shape[:2], *([1] * (latents.ndim - 2))), device=latents.device,
                                 dtype=torch.float32, generator=generator)
            noise = noise + self.cfg.offset_noise * offset
        return noise

    def weights(self, t: Tensor) -> Tensor:
        """Per-sample loss weights [B] float32."""
        if self.cfg.weighting == "uniform":
            return torch.ones(t.shape, device=t.device, dtype=torch.float32)
        snr = self.schedule.snr.to(t.device)[t]
        return min_snr_weights(snr, self.cfg.min_snr_gamma, self.prediction_type)

    def loss(self, denoiser: Denoiser, latents: Tensor, cond: Optional[dict[str, Any]] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
        """Per-sample weighted MSE [B] float32; `denoiser(x_t, t, cond)` runs under the caller's autocast."""
        return self.loss_terms(denoiser, latents, cond, generator)["loss"]

    def loss_terms(self, denoiser: Denoiser, latents: Tensor, cond: Optional[dict[str, Any]] = None,
                   generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """loss [B] plus what produced it (t, unweighted mse) for per-timestep-bucket logging."""
        latents = latents.float()
        t = self.sample_timesteps(latents.shape[0], latents.device, generator)
        noise = self.sample_noise(latents, generator)
        noised = self.schedule.add_noise(latents, noise, t)
        prediction = denoiser(noised, t, cond if cond is not None else {})  # [B, C, h, w]
        if prediction.shape != latents.shape:
            raise ValueError(f"denoiser output shape {tuple(prediction.shape)} != latents shape "
                             f"{tuple(latents.shape)} (prediction_type={self.prediction_type!r})")
        # The loss is reduced in fp32 even when the forward ran in bf16/fp16 under autocast.
        with torch.autocast(device_type=latents.device.type, enabled=False):
            target = self.schedule.target(self.prediction_type, latents, noise, t)
            mse = (prediction.float() - target).pow(2).flatten(1).mean(dim=1)
            loss = self.weights(t) * mse
        return {"loss": loss, "mse": mse.detach(), "t": t}
