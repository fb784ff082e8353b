"""Schedules vs diffusers' DDPMScheduler: betas, alphas_cumprod, zero-terminal SNR, add_noise, v-target."""

import pytest
import torch

from ldmscale.config import ScheduleConfig
from ldmscale.diffusion.schedules import Schedule, rescale_zero_terminal_snr

diffusers = pytest.importorskip("diffusers")

BETA_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
CASES = [
    ScheduleConfig(beta_schedule="linear", beta_start=0.0015, beta_end=0.0195),  # LDM
    ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),  # SD
    ScheduleConfig(beta_schedule="cosine"),  # iDDPM
    ScheduleConfig(beta_schedule="scaled_linear", zero_terminal_snr=True),
    ScheduleConfig(beta_schedule="linear", num_train_timesteps=100, beta_start=1e-4, beta_end=0.05,
                   zero_terminal_snr=True),
]


def _reference(cfg: ScheduleConfig):
    return diffusers.DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                                   beta_end=cfg.beta_end, beta_schedule=BETA_NAMES[cfg.beta_schedule],
                                   rescale_betas_zero_snr=cfg.zero_terminal_snr)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.beta_schedule}-zsnr{int(c.zero_terminal_snr)}")
def test_schedule_matches_diffusers(cfg):
    ours, ref = Schedule.from_config(cfg), _reference(cfg)
    assert ours.num_train_timesteps == cfg.num_train_timesteps
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 5, 7, generator=g)
    noise = torch.randn(6, 4, 5, 7, generator=g)
    t = torch.tensor([0, 1, cfg.num_train_timesteps // 2, cfg.num_train_timesteps - 2,
                      cfg.num_train_timesteps - 1, 17])
    torch.testing.assert_close(ours.add_noise(latents, noise, t), ref.add_noise(latents, noise, t),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.velocity(latents, noise, t), ref.get_velocity(latents, noise, t),
                               rtol=0, atol=1e-6)


def test_snr_and_zero_terminal_snr():
    plain = Schedule.from_config(ScheduleConfig(beta_schedule="scaled_linear"))
    zero = Schedule.from_config(ScheduleConfig(beta_schedule="scaled_linear", zero_terminal_snr=True))
    assert plain.snr[-1] > 0 and zero.snr[-1] == 0
    # Lin et al. keep the first step's sqrt(alpha_bar) and make alpha_bar strictly decreasing
    torch.testing.assert_close(zero.alphas_cumprod[0], plain.alphas_cumprod[0])
    assert (zero.alphas_cumprod[1:] < zero.alphas_cumprod[:-1]).all()
    torch.testing.assert_close(plain.snr, plain.alphas_cumprod / (1 - plain.alphas_cumprod))
    assert torch.isfinite(zero.sigmas).all() and zero.sigmas[-1] == pytest.approx(4096.0, rel=1e-3)
    assert torch.equal(rescale_zero_terminal_snr(plain.betas), zero.betas)


def test_prediction_conversions_are_inverse():
    schedule = Schedule.from_config(ScheduleConfig())
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([5, 500, 990])
    noised = schedule.add_noise(latents, noise, t)
    for prediction_type in ("eps", "v", "x0"):
        target = schedule.target(prediction_type, latents, noise, t)
        x0, eps = schedule.predict_x0_eps(prediction_type, noised, target, t)
        torch.testing.assert_close(x0, latents, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(eps, noise, atol=2e-4, rtol=1e-4)


def test_bad_schedule_is_named():
    with pytest.raises(ValueError, match="beta_schedule='sigmoid'"):
        Schedule.from_config(ScheduleConfig(beta_schedule="sigmoid"))
    with pytest.raises(TypeError, match="Schedule or ScheduleConfig"):
        Schedule.coerce({"beta_schedule": "linear"})
