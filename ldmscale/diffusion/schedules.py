"""Forward-process noise schedules: betas, alphas_cumprod, SNR, sigmas, noising and the v-target.

Everything is computed in float32 exactly as diffusers does (same op order), so that schedules,
`add_noise` and `velocity` agree bit-for-bit-ish with `DDPMScheduler` and checkpoints trained with
either code base sample identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ldmscale.config import ScheduleConfig

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("eps", "v", "x0")

# diffusers clamps alphas_cumprod[-1] of a zero-terminal-SNR schedule to this value wherever it needs a
# finite sigma (Euler, DPM-Solver); we do the same so the two stay interchangeable.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """iDDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17) with s = 0.008, betas capped at max_beta."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas [T] float32. linear: DDPM (linear in beta; LDM's "sqrt_linear"); scaled_linear: linear in
    sqrt(beta), what the LDM/SD code calls "linear"; cosine: iDDPM."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "cosine":
        return cosine_betas(num_train_timesteps)
    raise ValueError(f"beta_schedule={beta_schedule!r} is not one of {list(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has SNR 0 (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


def snr_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per timestep."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """Variance-exploding noise levels sqrt((1 - alpha_bar) / alpha_bar); a zero-SNR step gets a finite one."""
    alphas_cumprod = torch.where(alphas_cumprod == 0, ZERO_SNR_ALPHA_CUMPROD, alphas_cumprod)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def _per_sample(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] reshaped to [B, 1, 1, ...] so it broadcasts against `like` [B, ...]."""
    out = values.to(device=like.device, dtype=like.dtype)[t.to(like.device).long()].flatten()
    return out.reshape(out.shape[0], *([1] * (like.ndim - 1)))


@dataclass
class Schedule:
    """A discrete variance-preserving forward process q(x_t | x_0) with T training timesteps."""

    betas: Tensor  # [T] float32
    alphas_cumprod: Tensor  # [T] float32
    beta_schedule: str = "custom"
    zero_terminal_snr: bool = False

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> Schedule:
        if cfg.num_train_timesteps < 1:
            raise ValueError(f"diffusion.schedule.num_train_timesteps={cfg.num_train_timesteps} must be >= 1")
        betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, alphas_cumprod_from_betas(betas), cfg.beta_schedule, cfg.zero_terminal_snr)

    @classmethod
    def coerce(cls, schedule: Schedule | ScheduleConfig) -> Schedule:
        """Accept either the object or its config (the public sampler API takes both)."""
        if isinstance(schedule, Schedule):
            return schedule
        if isinstance(schedule, ScheduleConfig):
            return cls.from_config(schedule)
        raise TypeError(f"schedule must be a Schedule or ScheduleConfig, got {type(schedule).__name__}")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def snr(self) -> Tensor:
        return snr_from_alphas_cumprod(self.alphas_cumprod)

    @property
    def sigmas(self) -> Tensor:
        return sigmas_from_alphas_cumprod(self.alphas_cumprod)

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) broadcastable to `like`."""
        alphas_cumprod = _per_sample(self.alphas_cumprod, t, like)
        return alphas_cumprod**0.5, (1 - alphas_cumprod) ** 0.5

    def add_noise(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4)."""
        alpha, sigma = self.alpha_sigma(t, latents)
        return alpha * latents + sigma * noise

    def velocity(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4)."""
        alpha, sigma = self.alpha_sigma(t, latents)
        return alpha * noise - sigma * latents

    def target(self, prediction_type: str, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What a network with this prediction type is trained to output."""
        if prediction_type == "eps":
            return noise
        if prediction_type == "v":
            return self.velocity(latents, noise, t)
        if prediction_type == "x0":
            return latents
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {list(PREDICTION_TYPES)}")

    def predict_x0_eps(
        self, prediction_type: str, noised: Tensor, model_output: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Turn a network output into (x_0, eps) estimates at timestep t."""
        alpha, sigma = self.alpha_sigma(t, noised)
        if prediction_type == "eps":
            return (noised - sigma * model_output) / alpha, model_output
        if prediction_type == "v":
            return alpha * noised - sigma * model_output, alpha * model_output + sigma * noised
        if prediction_type == "x0":
            return model_output, (noised - alpha * model_output) / sigma
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {list(PREDICTION_TYPES)}")

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(self.betas.to(device), self.alphas_cumprod.to(device), self.beta_schedule,
                        self.zero_terminal_snr)
