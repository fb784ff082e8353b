"""Samplers vs diffusers, step by step; seeds, guidance, inpainting and argument errors."""

import pytest
import torch

from ldmscale.config import ScheduleConfig
from ldmscale.diffusion.samplers import (
    SAMPLERS,
    build_sampler,
    generators_for_seeds,
    guided_model_fn,
    randn,
    sample,
)
from ldmscale.diffusion.schedules import Schedule

diffusers = pytest.importorskip("diffusers")

OURS_TO_DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
OURS_TO_DIFFUSERS_BETA = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
TOL = 1e-5


class FixedModel:
    """A fixed random map of (x_t, t): a 1x1 channel mix, a 3x3 conv and a timestep-dependent bias.

    Deterministic and per-sample (no batch coupling), so equal inputs give equal outputs. Records inputs.
    """

    def __init__(self, channels: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(channels, channels, generator=g) * 0.3
        self.conv = torch.randn(channels, channels, 3, 3, generator=g) * 0.05
        self.bias = torch.randn(channels, generator=g)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        x64 = x.double()
        out = torch.einsum("oc,bchw->bohw", self.mix.double(), x64)
        out = out + torch.nn.functional.conv2d(x64, self.conv.double(), padding=1)
        phase = torch.sin(t.double() / 137.0).view(-1, 1, 1, 1)
        out = out + phase * self.bias.double().view(1, -1, 1, 1)
        return out.float()


def _diffusers_scheduler(sampler, cfg: ScheduleConfig, prediction_type, spacing, karras, steps_offset=0,
                         set_alpha_to_one=True):
    common = dict(steps_offset=steps_offset, num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                  beta_end=cfg.beta_end, beta_schedule=OURS_TO_DIFFUSERS_BETA[cfg.beta_schedule],
                  prediction_type=OURS_TO_DIFFUSERS_PRED[prediction_type], timestep_spacing=spacing,
                  rescale_betas_zero_snr=cfg.zero_terminal_snr)
    if sampler == "ddpm":
        return diffusers.DDPMScheduler(**common, clip_sample=False, variance_type="fixed_small")
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                      use_karras_sigmas=karras)
    if sampler == "euler":
        return diffusers.EulerDiscreteScheduler(**common, use_karras_sigmas=karras)
    if sampler == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**common)
    raise AssertionError(sampler)


def _run_diffusers(scheduler, model, x_T, num_steps, eta, seed, init_scale):
    scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(seed)
    latents = x_T * init_scale
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        out = model(model_input, t.expand(x_T.shape[0]))
        kwargs = {"eta": eta} if isinstance(scheduler, diffusers.DDIMScheduler) else {}
        latents = scheduler.step(out, t, latents, generator=generator, **kwargs).prev_sample
    return latents


def _compare(sampler, cfg, prediction_type, *, spacing="leading", karras=False, eta=0.0, num_steps=10,
             **options):
    torch.manual_seed(0)
    x_T = torch.randn(2, 4, 8, 8)
    ours_model, ref_model = FixedModel(), FixedModel()
    seed = 1234
    ours = sample(ours_model, x_T, sampler=sampler, num_steps=num_steps, schedule=cfg,
                  prediction_type=prediction_type, eta=eta, generator=torch.Generator().manual_seed(seed),
                  timestep_spacing=spacing, karras_sigmas=karras, **options)
    run = build_sampler(sampler, num_steps=num_steps, schedule=cfg, prediction_type=prediction_type,
                        eta=eta, timestep_spacing=spacing, karras_sigmas=karras, **options)
    init_scale = run.init(torch.ones(())).item()  # the VP -> sampler-space factor (Euler: sqrt(1+sigma^2))
    scheduler = _diffusers_scheduler(sampler, cfg, prediction_type, spacing, karras, **options)
    ref = _run_diffusers(scheduler, ref_model, x_T, num_steps, eta, seed, init_scale)

    assert len(ours_model.calls) == len(ref_model.calls) == len(scheduler.timesteps)
    max_err = 0.0
    for (x_ours, t_ours), (x_ref, t_ref) in zip(ours_model.calls, ref_model.calls):
        torch.testing.assert_close(t_ours.double(), t_ref.double(), rtol=0, atol=1e-4)
        max_err = max(max_err, (x_ours - x_ref).abs().max().item())
    max_err = max(max_err, (ours - ref).abs().max().item())
    assert max_err <= TOL, f"max abs error {max_err:.3g} > {TOL}"
    assert torch.isfinite(ours).all()
    return max_err


SD = ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
LDM = ScheduleConfig(beta_schedule="linear", beta_start=0.0015, beta_end=0.0195)
COSINE = ScheduleConfig(beta_schedule="cosine")
ZSNR = ScheduleConfig(beta_schedule="scaled_linear", zero_terminal_snr=True)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("sampler,eta,karras", [
    ("ddpm", 0.0, False), ("ddim", 0.0, False), ("ddim", 1.0, False), ("dpmpp_2m", 0.0, False),
    ("dpmpp_2m", 0.0, True), ("euler", 0.0, False), ("euler_a", 0.0, False),
])
def test_matches_diffusers_step_by_step(sampler, eta, karras, prediction_type):
    _compare(sampler, SD, prediction_type, eta=eta, karras=karras)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "euler", "euler_a"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_matches_diffusers_other_spacings_and_schedules(sampler, spacing):
    if sampler == "ddim" and spacing == "linspace":
        pytest.skip("diffusers' DDIM steps to t - T//n, not to the next linspace point; we use the next point")
    _compare(sampler, LDM, "eps", spacing=spacing, num_steps=8)
    _compare(sampler, COSINE, "v", spacing=spacing, num_steps=8)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler", "euler_a", "ddpm"])
def test_matches_diffusers_zero_terminal_snr_v(sampler):
    _compare(sampler, ZSNR, "v", spacing="trailing", num_steps=10)


def test_euler_karras_matches_diffusers():
    _compare("euler", SD, "eps", karras=True)
    _compare("euler", SD, "v", karras=True, spacing="trailing")


def test_stable_diffusion_scheduler_options_match_diffusers():
    """SD ships DDIM/PNDM configs with steps_offset=1 and set_alpha_to_one=False."""
    _compare("ddim", SD, "eps", steps_offset=1, set_alpha_to_one=False)
    _compare("ddim", SD, "v", eta=1.0, steps_offset=1, set_alpha_to_one=False)
    for sampler in ("ddpm", "dpmpp_2m", "euler", "euler_a"):
        _compare(sampler, SD, "eps", steps_offset=1)


def test_x0_prediction_matches_diffusers():
    for sampler in ("ddpm", "ddim", "dpmpp_2m", "euler"):
        _compare(sampler, SD, "x0")


def test_perfect_model_recovers_data():
    """With the true eps of a single known x0, every deterministic sampler lands on x0."""
    schedule = Schedule.from_config(SD)
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))

    def oracle(x_t, t):
        alpha, sigma = schedule.alpha_sigma(t, x_t)
        return (x_t - alpha * x0) / sigma

    x_T = torch.randn(1, 4, 4, 4)
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        out = sample(oracle, x_T, sampler=sampler, num_steps=20, schedule=schedule, prediction_type="eps")
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_same_seed_same_result_and_batched_seeds_equal_single_runs(sampler):
    model = FixedModel()
    seeds = [10, 11, 12, 13]
    shape = (4, 4, 6, 10)  # not square: any latent size works

    def run(seed_list):
        gens = generators_for_seeds(seed_list)
        x_T = randn((len(seed_list), *shape[1:]), gens)
        return sample(model, x_T, sampler=sampler, num_steps=6, schedule=SD, prediction_type="eps",
                      generator=gens, eta=1.0 if sampler == "ddim" else 0.0)

    batched = run(seeds)
    assert torch.equal(batched, run(seeds))
    singles = torch.cat([run([s]) for s in seeds])
    torch.testing.assert_close(batched, singles, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(batched[0], batched[1])


class TinyDenoiser(torch.nn.Module):
    """denoiser(x_t, t, cond) that uses a class embedding and an optional concat input."""

    def __init__(self, num_classes=3, channels=4, concat_channels=0):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.embed = torch.nn.Parameter(torch.randn(num_classes + 1, channels, generator=g))
        self.proj = torch.nn.Parameter(torch.randn(channels, channels + concat_channels, generator=g) * 0.3)
        self.batch_sizes: list[int] = []

    def forward(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        if "concat" in cond:
            x = torch.cat([x, cond["concat"]], dim=1)
        out = torch.einsum("oc,bchw->bohw", self.proj, x)
        return out + self.embed[cond["class_labels"]][:, :, None, None] * torch.cos(t.float() / 300)[:, None,
                                                                                                     None, None]


def test_guidance_scale_one_equals_conditional_and_cfg_is_one_forward():
    den = TinyDenoiser()
    cond = {"class_labels": torch.tensor([0, 1])}
    uncond = {"class_labels": torch.tensor([3, 3])}
    x_T = torch.randn(2, 4, 8, 8)
    kw = dict(sampler="dpmpp_2m", num_steps=5, schedule=SD, prediction_type="eps")
    with torch.no_grad():
        plain = sample(lambda x, t: den(x, t, cond), x_T, **kw)
        one = sample(guided_model_fn(den, cond, uncond, 1.0), x_T, **kw)
        assert torch.equal(plain, one)
        den.batch_sizes.clear()
        guided = sample(guided_model_fn(den, cond, uncond, 4.0, guidance_rescale=0.5), x_T, **kw)
    assert den.batch_sizes == [4] * 5  # cond + uncond batched in one forward per step
    assert not torch.allclose(guided, plain)
    # the guided output is uncond + s * (cond - uncond), computed from separate passes here
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    with torch.no_grad():
        expected = den(x, t, uncond) + 3.0 * (den(x, t, cond) - den(x, t, uncond))
        torch.testing.assert_close(guided_model_fn(den, cond, uncond, 3.0)(x, t), expected)


def test_guidance_rescale_is_eq_16_and_leaves_a_constant_output_finite():
    from ldmscale.diffusion.samplers import rescale_guidance

    g = torch.Generator().manual_seed(0)
    guided, conditional = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g)
    ratio = conditional.std(dim=[1, 2, 3], keepdim=True) / guided.std(dim=[1, 2, 3], keepdim=True)
    torch.testing.assert_close(rescale_guidance(guided, conditional, 0.7), 0.7 * guided * ratio + 0.3 * guided)
    zeros = torch.zeros(2, 4, 8, 8)  # an untrained zero-initialised denoiser: std 0 / 0 used to give NaN
    assert torch.equal(rescale_guidance(zeros, zeros, 0.7), zeros)


def test_concat_condition_is_shared_by_both_halves():
    den = TinyDenoiser(concat_channels=5)
    concat = torch.randn(2, 5, 8, 8)
    cond = {"class_labels": torch.tensor([0, 1]), "concat": concat}
    uncond = {"class_labels": torch.tensor([3, 3]), "concat": concat}
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    with torch.no_grad():
        expected = den(x, t, uncond) + 2.0 * (den(x, t, cond) - den(x, t, uncond))
        torch.testing.assert_close(guided_model_fn(den, cond, uncond, 2.0)(x, t), expected)


def test_inpainting_blend_keeps_known_region():
    model = FixedModel()
    known = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1  # generate the centre
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        out = sample(model, torch.randn(2, 4, 8, 8), sampler=sampler, num_steps=8, schedule=SD,
                     prediction_type="eps", inpaint_mask=mask, inpaint_latents=known)
        assert torch.equal(out * (1 - mask), known * (1 - mask))
        assert not torch.allclose(out[..., 2:6, 2:6], known[..., 2:6, 2:6])


def test_errors_are_clear():
    model = FixedModel()
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"unknown sampler 'plms'.*ddim.*dpmpp_2m.*euler_a"):
        sample(model, x, sampler="plms", num_steps=5, schedule=SD, prediction_type="eps")
    with pytest.raises(ValueError, match="num_steps=1001 is more than .*num_train_timesteps=1000"):
        sample(model, x, sampler="ddim", num_steps=1001, schedule=SD, prediction_type="eps")
    with pytest.raises(ValueError, match="ucg_rate=0"):
        guided_model_fn(TinyDenoiser(), {}, {}, 5.0, trained_ucg_rate=0.0)
    guided_model_fn(TinyDenoiser(), {}, {}, 1.0, trained_ucg_rate=0.0)  # no guidance: fine
    with pytest.raises(ValueError, match="prediction_type"):
        sample(model, x, sampler="ddim", num_steps=5, schedule=SD, prediction_type="epsilon")
    with pytest.raises(ValueError, match="karras"):
        sample(model, x, sampler="ddim", num_steps=5, schedule=SD, prediction_type="eps", karras_sigmas=True)
    with pytest.raises(ValueError, match="one per sample"):
        sample(model, torch.randn(3, 4, 4, 4), sampler="ddpm", num_steps=2, schedule=SD,
               prediction_type="eps", generator=generators_for_seeds([1, 2]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_cuda_sampling_matches_cpu_with_cpu_generators(sampler):
    """CPU generators make the noise device-independent: the same seeds give the same latents on GPU."""
    model = FixedModel()
    gens = lambda: generators_for_seeds([1, 2])  # noqa: E731
    x_T = randn((2, 4, 8, 8), gens())
    kw = dict(sampler=sampler, num_steps=8, schedule=SD, prediction_type="eps")
    cpu = sample(model, x_T, generator=gens(), **kw)
    gpu_model = FixedModel()
    gpu_model.mix, gpu_model.conv, gpu_model.bias = (p.cuda() for p in (model.mix, model.conv, model.bias))
    cuda = sample(gpu_model, x_T.cuda(), generator=gens(), **kw)
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=1e-4)
