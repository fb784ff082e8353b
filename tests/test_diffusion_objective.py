"""The training objective: target identities, min-SNR weights, sampling of t and noise, precision, seeds."""

import pytest
import torch

from ldmscale.config import DiffusionConfig, ScheduleConfig
from ldmscale.diffusion.objective import DiffusionObjective, min_snr_weights


def _cfg(**kw) -> DiffusionConfig:
    return DiffusionConfig(schedule=ScheduleConfig(beta_schedule="scaled_linear"), **kw)


class Oracle(torch.nn.Module):
    """Knows the clean latents, so it can output the exact target for any x_t: the loss must vanish."""

    def __init__(self, objective: DiffusionObjective, latents: torch.Tensor):
        super().__init__()
        self.objective, self.latents = objective, latents
        self.seen_cond = None

    def forward(self, x_t, t, cond):
        self.seen_cond = cond
        schedule = self.objective.schedule
        alpha, sigma = schedule.alpha_sigma(t, x_t)
        eps = (x_t - alpha * self.latents) / sigma
        return schedule.target(self.objective.prediction_type, self.latents, eps, t)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_exact_prediction_has_zero_loss(prediction_type, weighting):
    objective = DiffusionObjective(_cfg(prediction_type=prediction_type, weighting=weighting, offset_noise=0.1))
    latents = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.arange(16)}
    oracle = Oracle(objective, latents)
    loss = objective.loss(oracle, latents, cond, generator=torch.Generator().manual_seed(1))
    assert loss.shape == (16,) and loss.dtype == torch.float32
    assert loss.max() < 1e-8
    assert oracle.seen_cond is cond


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_loss_equals_weighted_mse_recomputed_by_hand(prediction_type):
    """Replays the generator: t first, then noise; target and min-SNR weight from the textbook formulas."""
    objective = DiffusionObjective(_cfg(prediction_type=prediction_type, weighting="min_snr", min_snr_gamma=5.0))
    latents = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    zero = lambda x_t, t, cond: torch.zeros_like(x_t)  # noqa: E731
    loss = objective.loss(zero, latents, None, generator=torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (8,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    a = objective.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {"eps": noise, "x0": latents, "v": a.sqrt() * noise - (1 - a).sqrt() * latents}[prediction_type]
    snr = a.flatten() / (1 - a.flatten())
    weight = {"eps": torch.clamp(snr, max=5.0) / snr, "v": torch.clamp(snr, max=5.0) / (snr + 1),
              "x0": torch.clamp(snr, max=5.0)}[prediction_type]
    torch.testing.assert_close(loss, weight * target.pow(2).mean(dim=(1, 2, 3)))


def test_min_snr_weights_formula():
    snr = torch.tensor([0.0, 0.01, 1.0, 5.0, 20.0, 1e4])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.25, 5e-4]))
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "x0"), torch.tensor([0.0, 0.01, 1.0, 5.0, 5.0, 5.0]))
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v"),
                               torch.tensor([0.0, 0.01 / 1.01, 0.5, 5 / 6, 5 / 21, 5 / 10001]))
    # as x0-losses the three are the same weight: min(SNR, gamma)  (Hang et al. 2023)
    eps_as_x0 = min_snr_weights(snr[1:], 5.0, "eps") * snr[1:]
    v_as_x0 = min_snr_weights(snr[1:], 5.0, "v") * (snr[1:] + 1)
    torch.testing.assert_close(eps_as_x0, torch.clamp(snr[1:], max=5.0))
    torch.testing.assert_close(v_as_x0, torch.clamp(snr[1:], max=5.0))


def test_min_snr_finite_with_zero_terminal_snr():
    cfg = _cfg(weighting="min_snr", prediction_type="v")
    cfg.schedule.zero_terminal_snr = True
    objective = DiffusionObjective(cfg)
    weights = objective.weights(torch.tensor([0, 999]))
    assert torch.isfinite(weights).all() and weights[1] == 0.0  # v at SNR 0: min(0, g) / (0 + 1)
    eps_weights = min_snr_weights(objective.schedule.snr[torch.tensor([0, 999])], 5.0, "eps")
    assert torch.isfinite(eps_weights).all() and eps_weights[1] == 1.0
    cfg.prediction_type = "eps"
    with pytest.raises(ValueError, match="zero_terminal_snr=true needs diffusion.prediction_type"):
        DiffusionObjective(cfg)


def test_deterministic_under_generator():
    objective = DiffusionObjective(_cfg(prediction_type="v", offset_noise=0.05, timestep_sampling="logit_normal"))
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    latents = torch.randn(4, 4, 8, 8)
    run = lambda seed: objective.loss(lambda x, t, c: net(x), latents, {},  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_fp32_loss_under_autocast():
    objective = DiffusionObjective(_cfg())
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    latents = torch.randn(4, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = []
        loss = objective.loss(lambda x, t, c: outputs.append(net(x)) or outputs[-1], latents, {},
                              generator=torch.Generator().manual_seed(0))
    assert outputs[0].dtype == torch.bfloat16  # the forward really ran in bf16
    assert loss.dtype == torch.float32
    loss.mean().backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()


def test_timestep_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    uniform = DiffusionObjective(_cfg()).sample_timesteps(20000, torch.device("cpu"), g).float()
    logit = DiffusionObjective(_cfg(timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0))
    ln = logit.sample_timesteps(20000, torch.device("cpu"), g).float()
    assert uniform.min() == 0 and uniform.max() == 999
    assert abs(uniform.mean().item() - 499.5) < 10 and abs(uniform.std().item() - 288.7) < 5
    # sigmoid(N(0,1)): mean 0.5, std ~0.208 of T: concentrated in the middle
    assert abs(ln.mean().item() - 500) < 10 and abs(ln.std().item() - 208) < 8
    shifted = DiffusionObjective(_cfg(timestep_sampling="logit_normal", logit_mean=1.0))
    assert shifted.sample_timesteps(5000, torch.device("cpu"), g).float().mean() > 600


def test_offset_noise_adds_per_channel_shift():
    latents = torch.zeros(64, 4, 16, 16)
    g = torch.Generator().manual_seed(0)
    plain = DiffusionObjective(_cfg()).sample_noise(latents, g)
    offset = DiffusionObjective(_cfg(offset_noise=0.5)).sample_noise(latents, g)
    channel_means_plain = plain.mean(dim=(2, 3)).std().item()  # ~1/16
    channel_means_offset = offset.mean(dim=(2, 3)).std().item()  # ~sqrt(1/256 + 0.25)
    assert channel_means_plain < 0.09 and 0.4 < channel_means_offset < 0.6


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="diffusion.prediction_type='epsilon'"):
        DiffusionObjective(_cfg(prediction_type="epsilon"))
    with pytest.raises(ValueError, match="diffusion.weighting"):
        DiffusionObjective(_cfg(weighting="p2"))
    objective = DiffusionObjective(_cfg())
    with pytest.raises(ValueError, match="denoiser output shape"):
        objective.loss(lambda x, t, c: x[:, :2], torch.randn(2, 4, 4, 4), {})
