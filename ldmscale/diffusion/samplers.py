"""Samplers (DDPM, DDIM, DPM-Solver++(2M), Euler, Euler-ancestral) and classifier-free guidance.

Each sampler reproduces the corresponding diffusers scheduler step by step (same timestep grid, same
sigmas, same float32 op order, same order of noise draws from the generator), so a checkpoint samples
the same here and in diffusers given the same starting noise. The network never sees guidance: the
CFG wrapper turns a denoiser plus two condition dicts into a plain `model_fn(x_t, t)`.

Conventions: `x_T` and every model input are variance-preserving latents (x_t = a_t x_0 + s_t eps); the
sigma-space samplers (Euler) scale internally. `t` handed to model_fn is a [B] tensor of training
timesteps in [0, num_train_timesteps): long where the grid is integral, float where it is not (Euler
with "linspace" spacing or Karras sigmas, exactly what diffusers hands its U-Net).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ldmscale.config import ScheduleConfig
from ldmscale.diffusion.schedules import PREDICTION_TYPES, Schedule

ModelFn = Callable[[Tensor, Tensor], Tensor]
Generators = Union[torch.Generator, Sequence[torch.Generator], None]

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
KARRAS_SAMPLERS = ("dpmpp_2m", "euler")


# ---------------------------------------------------------------------------- noise and seeds
def randn(shape: Sequence[int], generator: Generators = None, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise; with a list of generators, sample i is drawn from generator i only.

    That makes a batch with seeds s..s+3 identical to four single-sample runs (diffusers' randn_tensor
    draws the same way, so the two agree noise for noise). CPU generators stay on CPU for portability.
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
            return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator]).to(device)
    gen_device = generator.device if isinstance(generator, torch.Generator) else torch.device(device)
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def generators_for_seeds(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded generator per sample."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


# ---------------------------------------------------------------------------- timestep grids
def timestep_grid(sampler: str, spacing: str, num_steps: int, num_train_timesteps: int,
                  steps_offset: int = 0) -> np.ndarray:
    """Descending training timesteps the model is evaluated at, as diffusers' set_timesteps makes them.

    DPM-Solver places num_steps + 1 points and drops the last for "leading"/"linspace" (its final step
    goes to sigma 0 instead); Euler keeps "linspace" points fractional.
    """
    T, n = num_train_timesteps, num_steps
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    if sampler == "dpmpp_2m":
        if spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        ratio = T // (n + 1)
        if ratio == 0:
            raise ValueError(f"num_steps={n} is too many for dpmpp_2m with leading spacing and "
                             f"{T} training timesteps; use at most {T - 1} or timestep_spacing='trailing'")
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    if spacing == "linspace":
        grid = np.linspace(0, T - 1, n, dtype=np.float32 if sampler.startswith("euler") else np.float64)
        grid = grid[::-1].copy()
        return grid if sampler.startswith("euler") else grid.round().astype(np.int64)
    ratio = T // n
    return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of a sigma, interpolating linearly in log-sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _sigma_plan(sampler: str, schedule: Schedule, timesteps: np.ndarray, num_steps: int,
                use_karras: bool) -> tuple[np.ndarray, Tensor]:
    """(timesteps, sigmas [n+1] float32 ending in 0) for the sigma-parameterised samplers."""
    full = np.array(schedule.sigmas.cpu().float().numpy())  # [T] float32, ascending in t
    log_sigmas = np.log(full)
    if use_karras and sampler == "dpmpp_2m":
        # DPM-Solver spans the whole training range; its timesteps are rounded to integers.
        sigmas = karras_sigmas(full[0].item(), full[-1].item(), num_steps)
        timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        if schedule.beta_schedule != "cosine":
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    elif use_karras:
        # Euler spans the range of the spaced grid and keeps fractional timesteps.
        grid = np.interp(timesteps, np.arange(0, len(full)), full)
        sigmas = karras_sigmas(grid[-1].item(), grid[0].item(), num_steps)
        timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas]).astype(np.float32)
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(full)), full)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return timesteps, torch.from_numpy(sigmas)


# ---------------------------------------------------------------------------- the samplers
class _Sampler:
    """One sampling run: a timestep grid, a state, and a step. `state * vp_scale(i)` is the VP latent."""

    stochastic = False

    def __init__(self, schedule: Schedule, timesteps: np.ndarray, prediction_type: str):
        self.schedule = schedule
        self.alphas_cumprod = schedule.alphas_cumprod.float().cpu()
        self.timesteps = timesteps
        self.prediction_type = prediction_type
        self.one = torch.tensor(1.0)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def init(self, x_T: Tensor) -> Tensor:
        return x_T

    def model_input(self, state: Tensor, i: int) -> Tensor:
        """The VP latent the network sees at step i (i == num_steps: the final sample)."""
        return state

    def noised_at_level(self, latents: Tensor, noise: Tensor, level: int) -> Tensor:
        """`latents` noised to where the state is after `level` steps (level == num_steps: clean)."""
        if level >= self.num_steps:
            return latents
        a = self.alphas_cumprod[int(self.timesteps[level])]
        return a**0.5 * latents + (1 - a) ** 0.5 * noise

    def step(self, state: Tensor, i: int, out: Tensor, generator: Generators) -> Tensor:
        raise NotImplementedError

    def _alpha_prev(self, i: int) -> Tensor:
        prev = int(self.timesteps[i + 1]) if i + 1 < self.num_steps else -1
        return self.alphas_cumprod[prev] if prev >= 0 else self.one

    def _x0_eps(self, x: Tensor, out: Tensor, a_t: Tensor) -> tuple[Tensor, Tensor]:
        b_t = 1 - a_t
        if self.prediction_type == "eps":
            return (x - b_t**0.5 * out) / a_t**0.5, out
        if self.prediction_type == "v":
            return a_t**0.5 * x - b_t**0.5 * out, a_t**0.5 * out + b_t**0.5 * x
        return out, (x - a_t**0.5 * out) / b_t**0.5


class DDPMSampler(_Sampler):
    """Ancestral sampling with the posterior q(x_prev | x_t, x_0) and its 'fixed small' variance (DDPM)."""

    stochastic = True

    def step(self, state, i, out, generator):
        t = int(self.timesteps[i])
        a_t, a_prev = self.alphas_cumprod[t], self._alpha_prev(i)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        cur_a = a_t / a_prev
        cur_b = 1 - cur_a
        x0, _ = self._x0_eps(state, out, a_t)
        mean = (a_prev**0.5 * cur_b / b_t) * x0 + (cur_a**0.5 * b_prev / b_t) * state  # DDPM eq. 7
        if t > 0:
            variance = torch.clamp(b_prev / b_t * cur_b, min=1e-20)
            mean = mean + variance**0.5 * randn(out.shape, generator, out.device, out.dtype)
        return mean


class DDIMSampler(_Sampler):
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""

    def __init__(self, schedule, timesteps, prediction_type, eta: float = 0.0, set_alpha_to_one: bool = True):
        super().__init__(schedule, timesteps, prediction_type)
        self.eta = eta
        self.stochastic = eta > 0
        # The last step goes to alpha_bar = 1 (a clean sample), or, as SD's scheduler config has it
        # (set_alpha_to_one=False), to alpha_bar_0 of the training schedule.
        self.final_alpha = self.one if set_alpha_to_one else self.alphas_cumprod[0]

    def _alpha_prev(self, i: int) -> Tensor:
        prev = int(self.timesteps[i + 1]) if i + 1 < self.num_steps else -1
        return self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha

    def step(self, state, i, out, generator):
        a_t, a_prev = self.alphas_cumprod[int(self.timesteps[i])], self._alpha_prev(i)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        x0, eps = self._x0_eps(state, out, a_t)
        std = self.eta * ((b_prev / b_t) * (1 - a_t / a_prev)) ** 0.5  # eq. 16
        prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            prev = prev + std * randn(out.shape, generator, out.device, out.dtype)
        return prev


class _SigmaSampler(_Sampler):
    def __init__(self, schedule, timesteps, prediction_type, sigmas: Tensor):
        super().__init__(schedule, timesteps, prediction_type)
        self.sigmas = sigmas  # [n+1] float32, last is 0

    @staticmethod
    def _alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha


class DPMSolverPP2MSampler(_SigmaSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, data prediction, first order at the ends."""

    def __init__(self, schedule, timesteps, prediction_type, sigmas):
        super().__init__(schedule, timesteps, prediction_type, sigmas)
        self.previous_x0: Optional[Tensor] = None

    def noised_at_level(self, latents, noise, level):
        alpha, sigma = self._alpha_sigma(self.sigmas[level])
        return alpha * latents + sigma * noise

    def step(self, state, i, out, generator):
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        if self.prediction_type == "eps":
            x0 = (state - sigma_s0 * out) / alpha_s0
        elif self.prediction_type == "v":
            x0 = alpha_s0 * state - sigma_s0 * out
        else:
            x0 = out
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # log-SNR / 2; +inf at sigma 0
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        # The last step (to sigma 0) and the first (no history) are first order: DPM-Solver++ eq. 9.
        if self.previous_x0 is None or i == self.num_steps - 1:
            prev = (sigma_t / sigma_s0) * state - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            d0, d1 = x0, (1.0 / r0) * (x0 - self.previous_x0)
            prev = ((sigma_t / sigma_s0) * state - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                    - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
        self.previous_x0 = x0
        return prev


class EulerSampler(_SigmaSampler):
    """Euler on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 1 without churn)."""

    ancestral = False

    def init(self, x_T):
        return x_T * (self.sigmas[0] ** 2 + 1) ** 0.5  # VP -> VE: x_sigma = x_t / alpha_t

    def model_input(self, state, i):
        return state / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def noised_at_level(self, latents, noise, level):
        return latents + self.sigmas[level] * noise

    def step(self, state, i, out, generator):
        sigma = self.sigmas[i]
        if self.prediction_type == "eps":
            x0 = state - sigma * out
        elif self.prediction_type == "v":
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + (state / (sigma**2 + 1))
        else:
            x0 = out
        derivative = (state - x0) / sigma
        if not self.ancestral:
            return state + derivative * (self.sigmas[i + 1] - sigma)
        sigma_to = self.sigmas[i + 1]
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev = state + derivative * (sigma_down - sigma)
        return prev + randn(out.shape, generator, out.device, out.dtype) * sigma_up


class EulerAncestralSampler(EulerSampler):
    """Euler-ancestral (k-diffusion's sample_euler_ancestral, eta = 1)."""

    ancestral = True
    stochastic = True


SAMPLERS: dict[str, type[_Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
    "euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
}


def build_sampler(sampler: str, *, num_steps: int, schedule: Schedule | ScheduleConfig,
                  prediction_type: str, eta: float = 0.0, timestep_spacing: str = "leading",
                  karras_sigmas: bool = False, steps_offset: int = 0, set_alpha_to_one: bool = True) -> _Sampler:
    """Validate the arguments and lay out the timestep/sigma grid of one sampling run."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {list(PREDICTION_TYPES)}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing={timestep_spacing!r} is not one of {list(TIMESTEP_SPACINGS)}")
    schedule = Schedule.coerce(schedule)
    T = schedule.num_train_timesteps
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be a positive integer")
    if num_steps > T:
        raise ValueError(f"num_steps={num_steps} is more than the model's num_train_timesteps={T}")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta={eta} only applies to sampler='ddim' (got {sampler!r}); "
                         "ddpm and euler_a are ancestral already")
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    if karras_sigmas and sampler not in KARRAS_SAMPLERS:
        raise ValueError(f"karras_sigmas is supported for {list(KARRAS_SAMPLERS)}, not {sampler!r}")
    timesteps = timestep_grid(sampler, timestep_spacing, num_steps, T, steps_offset)
    if timesteps.max() >= T or timesteps.min() < 0:
        raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {T})")
    if sampler == "ddim":
        return DDIMSampler(schedule, timesteps, prediction_type, eta, set_alpha_to_one)
    if sampler == "ddpm":
        return DDPMSampler(schedule, timesteps, prediction_type)
    timesteps, sigmas = _sigma_plan(sampler, schedule, timesteps, num_steps, karras_sigmas)
    return SAMPLERS[sampler](schedule, timesteps, prediction_type, sigmas)


def sample(model_fn: ModelFn, x_T: Tensor, *, sampler: str, num_steps: int,
           schedule: Schedule | ScheduleConfig, prediction_type: str, eta: float = 0.0,
           generator: Generators = None, timestep_spacing: str = "leading", karras_sigmas: bool = False,
           steps_offset: int = 0, set_alpha_to_one: bool = True, inpaint_mask: Optional[Tensor] = None,
           inpaint_latents: Optional[Tensor] = None,
           callback: Optional[Callable[[int, Tensor, Tensor], None]] = None,
           progress: bool = False) -> Tensor:
    """Run the reverse process from x_T ~ N(0, I) to x_0 (float32, same shape; any latent size).

    generator: one generator, or one per sample (then sample i depends on generator i only).
    steps_offset / set_alpha_to_one: diffusers' options of the same names ("leading" grids; DDIM's last step).
    inpaint_mask [B,1,h,w] (1 = generate, 0 = keep) with inpaint_latents [B,C,h,w]: after every step the
    kept region is replaced by inpaint_latents noised to the new level with x_T's noise (RePaint-style
    blending, Lugmayr et al. 2022, without resampling); the last step keeps it exactly. Models trained
    with concatenated mask/masked-image inputs get them through their cond dict instead.
    callback(i, t, x_i) sees the VP latent after step i.
    """
    run = build_sampler(sampler, num_steps=num_steps, schedule=schedule, prediction_type=prediction_type,
                        eta=eta, timestep_spacing=timestep_spacing, karras_sigmas=karras_sigmas,
                        steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one)
    if (inpaint_mask is None) != (inpaint_latents is None):
        raise ValueError("inpainting needs both inpaint_mask and inpaint_latents")
    batch_size = x_T.shape[0]
    if isinstance(generator, (list, tuple)) and len(generator) not in (1, batch_size):
        raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}; pass one per sample")
    x_T = x_T.float()
    if inpaint_mask is not None:
        inpaint_mask = inpaint_mask.to(x_T)
        inpaint_latents = inpaint_latents.to(x_T)
    integral = bool(np.all(np.asarray(run.timesteps) == np.round(np.asarray(run.timesteps))))
    state = run.init(x_T)
    steps = range(run.num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{sampler} x{run.num_steps}", leave=False)
    for i in steps:
        value = run.timesteps[i]
        t = torch.full((batch_size,), int(value) if integral else float(value), device=x_T.device,
                       dtype=torch.long if integral else torch.float32)
        out = model_fn(run.model_input(state, i), t).float()
        if out.shape != x_T.shape:
            raise ValueError(f"model_fn returned shape {tuple(out.shape)} for input {tuple(x_T.shape)}")
        state = run.step(state, i, out, generator)
        if inpaint_mask is not None:
            known = run.noised_at_level(inpaint_latents, x_T, i + 1)
            state = inpaint_mask * state + (1 - inpaint_mask) * known
        if callback is not None:
            callback(i, t, run.model_input(state, i + 1))
    return state


# ---------------------------------------------------------------------------- guidance
def concat_conditions(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Stack two condition dicts along the batch so both go through one forward pass."""
    if set(first) != set(second):
        raise ValueError(f"conditional and unconditional inputs have different keys: "
                         f"{sorted(first)} vs {sorted(second)}")
    merged: dict[str, Any] = {}
    for key in first:
        a, b = first[key], second[key]
        if a is None and b is None:
            merged[key] = None
        elif isinstance(a, Tensor) and isinstance(b, Tensor):
            merged[key] = torch.cat([a, b])
        else:
            raise ValueError(f"condition {key!r} must be a tensor in both inputs to batch them for guidance")
    return merged


def rescale_guidance(guided: Tensor, conditional: Tensor, guidance_rescale: float) -> Tensor:
    """Match the guided output's std to the conditional one's (Lin et al. 2023, sec. 3.4, eq. 15-16)."""
    dims = list(range(1, conditional.ndim))
    std_cond = conditional.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    # a constant guided output (an untrained, zero-initialised denoiser) has nothing to rescale: 0/0 is NaN
    ratio = torch.where(std_guided > 0, std_cond / std_guided.clamp_min(torch.finfo(guided.dtype).tiny), 1.0)
    rescaled = guided * ratio
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def guided_model_fn(denoiser: Callable[[Tensor, Tensor, dict[str, Any]], Tensor], cond: dict[str, Any],
                    uncond: Optional[dict[str, Any]] = None, guidance_scale: float = 1.0,
                    guidance_rescale: float = 0.0, *, trained_ucg_rate: Optional[float] = None) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a `model_fn(x_t, t)`.

    out = uncond + scale * (cond - uncond), computed from ONE forward on the [uncond; cond] batch.
    Scale 1.0 runs the conditional pass only (so it equals conditional sampling exactly).
    trained_ucg_rate: the model's training condition-dropout rate (conditioner.ucg_rate); 0 means it has
    never seen the unconditional input, so guidance is refused instead of silently producing garbage.
    """
    if guidance_scale != 1.0:
        if trained_ucg_rate is not None and trained_ucg_rate <= 0:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a model trained with unconditional dropout, but this "
                f"one was trained with conditioner.ucg_rate={trained_ucg_rate}; use guidance_scale=1.0")
        if uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs the unconditional inputs (uncond)")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale} must be in [0, 1]")

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        if guidance_scale == 1.0:
            return denoiser(x_t, t, cond)
        both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_conditions(uncond, cond))
        out_uncond, out_cond = both.float().chunk(2)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        if guidance_rescale > 0:
            guided = rescale_guidance(guided, out_cond, guidance_rescale)
        return guided

    return model_fn
