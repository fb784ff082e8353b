"""generate() and `python -m ldmscale.sample` with tiny random models of every conditioning kind."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ldmscale.config import (
    AutoencoderConfig,
    ConditionerConfig,
    Config,
    DiffusionConfig,
    UNetConfig,
    save_resolved,
)
from ldmscale.diffusion.samplers import generators_for_seeds, randn, sample
from ldmscale.diffusion.schedules import Schedule
from ldmscale.inference import SampleInputs, SamplingSettings, generate
from ldmscale.runs import Run
from ldmscale.sample import main

models = pytest.importorskip("ldmscale.models")

UNET = dict(model_channels=16, channel_mult=[1, 2], attention_resolutions=[2], num_head_channels=8, norm_num_groups=8,
            context_dim=64)
DIFFUSION = DiffusionConfig(sampler="ddim", num_sampling_steps=4, guidance_scale=3.0)


def gen(parts, kind, *, diffusion_cfg, trained_ucg_rate=0.1, num_classes=0, **kwargs):
    """generate() for loose models: the run's config holds the kind, process and training dropout rate."""
    cfg = Config()
    cfg.diffusion = diffusion_cfg
    cfg.conditioner = ConditionerConfig(kind=kind, ucg_rate=trained_ucg_rate, num_classes=num_classes)
    inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in SampleInputs.__dataclass_fields__}
    return generate(Run(cfg, *parts), SampleInputs(**inputs), SamplingSettings(**kwargs))


def _unzero(module):
    """LDM zero-initialises output layers, so a fresh U-Net ignores its conditions; give them weights."""
    with torch.no_grad():
        for param in module.parameters():
            if not param.any():
                param.normal_(0, 0.05)


def _models(kind="text", **cond_kw):
    torch.manual_seed(0)
    cond_cfg = ConditionerConfig(kind=kind, **cond_kw)
    model_cfg = UNetConfig(**UNET)
    denoiser = models.build_denoiser(model_cfg, cond_cfg).eval()
    _unzero(denoiser)
    autoencoder = models.build_autoencoder(AutoencoderConfig()).eval()
    text_encoder = models.build_text_encoder(cond_cfg) if kind == "text" else None
    return denoiser, autoencoder, text_encoder


@pytest.fixture(scope="module")
def text_models():
    return _models("text")


def test_same_seed_same_images_and_batching_does_not_matter(text_models):
    prompts = ["a red circle", "a blue square", "two green triangles"]
    def run(batch_size, seed=7):
        return gen(text_models, "text", diffusion_cfg=DIFFUSION, prompts=prompts, seed=seed, height=16,
                        width=24, progress=False, trained_ucg_rate=0.1, batch_size=batch_size)

    first = run(batch_size=3)
    assert first.images.shape == (3, 3, 16, 24)  # non-square, not the training size
    assert first.images.min() >= 0 and first.images.max() <= 1
    assert torch.equal(first.images, run(batch_size=3).images)
    torch.testing.assert_close(first.latents, run(batch_size=1).latents, atol=1e-5, rtol=1e-5)
    assert first.seeds == [7, 8, 9]
    assert not torch.allclose(first.latents, run(batch_size=3, seed=8).latents)


def test_guidance_one_equals_conditional_sampling(text_models):
    denoiser, autoencoder, text_encoder = text_models
    prompts = ["a red circle", "a blue square"]
    out = gen((denoiser, autoencoder, text_encoder), "text", diffusion_cfg=DIFFUSION, prompts=prompts,
                   guidance_scale=1.0, seed=3, height=16, width=16, progress=False)
    encoding = text_encoder.encode(prompts)
    cond = {"context": encoding.tokens, "context_mask": encoding.mask, "pooled": encoding.pooled}
    gens = generators_for_seeds([3, 4])
    x_T = randn((2, autoencoder.latent_channels, 4, 4), gens)
    with torch.no_grad():
        expected = sample(lambda x, t: denoiser(x, t, cond), x_T, sampler="ddim", num_steps=4,
                          schedule=Schedule.from_config(DIFFUSION.schedule), prediction_type="eps",
                          generator=gens)
    assert torch.equal(out.latents, expected)
    guided = gen((denoiser, autoencoder, text_encoder), "text", diffusion_cfg=DIFFUSION, prompts=prompts,
                      guidance_scale=5.0, seed=3, height=16, width=16, progress=False)
    assert not torch.allclose(guided.latents, expected)


def test_guidance_refused_without_unconditional_training(text_models):
    with pytest.raises(ValueError, match="ucg_rate=0"):
        gen(text_models, "text", diffusion_cfg=DIFFUSION, prompts=["x"], guidance_scale=4.0,
                 trained_ucg_rate=0.0, height=16, width=16, progress=False)


def test_class_layout_and_sr_conditioning():
    denoiser, autoencoder, _ = _models("class", num_classes=5)
    out = gen((denoiser, autoencoder, None), "class", diffusion_cfg=DIFFUSION, class_labels=[0, 4],
                   num_classes=5, images_per_condition=2, height=16, width=16, progress=False)
    assert out.images.shape == (4, 3, 16, 16) and out.settings["class_ids"] == [0, 0, 4, 4]

    denoiser, autoencoder, _ = _models("layout", num_classes=5)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]], [[0.2, 0.3, 0.9, 0.8], [0.0, 0.0, 0.3, 0.3]]])
    out = gen((denoiser, autoencoder, None), "layout", diffusion_cfg=DIFFUSION, boxes=boxes,
                   box_classes=torch.tensor([[1, -1], [2, 3]]), height=16, width=16, progress=False)
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.latents).all()

    denoiser, autoencoder, _ = _models("sr")
    low_res = torch.rand(2, 3, 8, 8) * 2 - 1
    with pytest.warns(UserWarning, match="guidance_scale=3.0 ignored"):  # the config default cannot apply
        a = gen((denoiser, autoencoder, None), "sr", diffusion_cfg=DIFFUSION, low_res=low_res, height=32,
                     width=32, progress=False)
    b = gen((denoiser, autoencoder, None), "sr", diffusion_cfg=DIFFUSION, low_res=-low_res, height=32,
                 width=32, progress=False, guidance_scale=1.0)
    with pytest.raises(ValueError, match="nothing to guide"):
        gen((denoiser, autoencoder, None), "sr", diffusion_cfg=DIFFUSION, low_res=low_res, height=32,
                 width=32, progress=False, guidance_scale=3.0)
    assert a.images.shape == (2, 3, 32, 32) and not torch.allclose(a.latents, b.latents)


def test_inpainting_concat_model_and_blending():
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    denoiser, autoencoder, _ = _models("inpaint")
    out = gen((denoiser, autoencoder, None), "inpaint", diffusion_cfg=DIFFUSION, image=image, mask=mask,
                   height=16, width=16, progress=False, guidance_scale=1.0)
    assert out.images.shape == (2, 3, 16, 16) and out.settings["inpainting"] == "concat"

    denoiser, autoencoder, _ = _models("none")
    out = gen((denoiser, autoencoder, None), "none", diffusion_cfg=DIFFUSION, image=image, mask=mask,
                   height=16, width=16, progress=False, seed=5, guidance_scale=1.0)
    assert out.settings["inpainting"] == "blend"
    with torch.no_grad():
        moments = autoencoder.encode_moments(image)
        known = autoencoder.scale_latents(autoencoder.latent_from_moments(moments, torch.Generator().manual_seed(5)))
    keep = torch.nn.functional.interpolate(mask, size=(4, 4)) == 0
    keep = keep.expand_as(out.latents)
    torch.testing.assert_close(out.latents[keep], known[keep])


def test_cli_from_run_dir(tmp_path):
    cfg = Config()
    cfg.model = UNetConfig(**UNET)
    cfg.conditioner = ConditionerConfig(kind="class", num_classes=4, ucg_rate=0.1)
    cfg.diffusion = DiffusionConfig(sampler="dpmpp_2m", num_sampling_steps=3)
    cfg.data.resolution = 16
    run_dir = tmp_path / "run"
    save_resolved(cfg, run_dir)
    torch.manual_seed(1)
    denoiser = models.build_denoiser(cfg.model, cfg.conditioner)
    _unzero(denoiser)
    (run_dir / "export").mkdir()
    save_file(denoiser.state_dict(), str(run_dir / "export" / "denoiser_ema.safetensors"))
    out_dir = tmp_path / "out"
    argv = ["--checkpoint", str(run_dir), "--class-ids", "0,3", "--num-images", "2", "--guidance", "2.5",
            "--seed", "11", "--out", str(out_dir), "--no-progress", "--width", "24"]
    with pytest.warns(UserWarning, match="autoencoder.weights is not set"):
        main(argv)
    settings = json.loads((out_dir / "settings.json").read_text())
    assert settings["sampler"] == "dpmpp_2m" and settings["num_steps"] == 3 and settings["weights"] == "ema"
    assert settings["seeds"] == [11, 12, 13, 14] and settings["class_ids"] == [0, 0, 3, 3]
    assert len(settings["files"]) == 4 and (out_dir / "grid.png").is_file()
    from PIL import Image

    first = Image.open(out_dir / "images" / "000000.png")
    assert first.size == (24, 16)
    with pytest.warns(UserWarning):
        main([a if a != str(out_dir) else str(tmp_path / "again") for a in argv] + ["--batch-size", "1"])
    import numpy as np

    for i in range(4):  # batch size 1 vs 4: the same images up to float rounding of batched kernels
        again = np.asarray(Image.open(tmp_path / "again" / "images" / f"{i:06d}.png"), dtype=np.int16)
        assert np.abs(again - np.asarray(Image.open(out_dir / "images" / f"{i:06d}.png"), dtype=np.int16)).max() <= 1
    # explicit per-image seeds through the library entry point: seeds 11 and 13 are images 0 and 2 above
    from ldmscale.inference import generate_from_run

    with pytest.warns(UserWarning):
        pil = generate_from_run(run_dir, class_labels=[0, 3], seeds=[11, 13], guidance_scale=2.5, width=24,
                                progress=False, device="cpu")
    for image, index in zip(pil, (0, 2)):
        saved = np.asarray(Image.open(out_dir / "images" / f"{index:06d}.png"), dtype=np.int16)
        assert np.abs(np.asarray(image, dtype=np.int16) - saved).max() <= 1
    with pytest.raises(FileNotFoundError, match="export|checkpoint"):
        main(["--checkpoint", str(run_dir), "--raw", "--class-ids", "1", "--out", str(tmp_path / "raw")])


def test_cli_from_diffusers_pipeline_folder_and_our_unet_export(tmp_path, recwarn):
    from ldmscale.models.interop import save_autoencoder, save_unet

    diffusers = pytest.importorskip("diffusers")
    denoiser, autoencoder, _ = _models("text")
    pipeline = tmp_path / "pipeline"
    save_unet(denoiser.unet, pipeline / "unet", "diffusers")
    save_autoencoder(autoencoder, pipeline / "vae", "diffusers")
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="v_prediction", timestep_spacing="trailing",
                            rescale_betas_zero_snr=True).save_config(str(pipeline / "scheduler"))
    out = tmp_path / "out"
    main(["--checkpoint", str(pipeline), "--prompt", "a red circle", "--steps", "2", "--guidance", "1",
          "--height", "16", "--width", "16", "--out", str(out), "--no-progress"])
    assert not [w for w in recwarn if "autoencoder.weights" in str(w.message)]  # the pipeline's VAE is used
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prediction_type"] == "v" and settings["timestep_spacing"] == "trailing"
    assert settings["schedule"]["zero_terminal_snr"] is True

    # our U-Net export (a folder), class-conditioned: the config comes from the overrides
    class_den, _, _ = _models("class", num_classes=3)
    save_unet(class_den.unet, tmp_path / "unet_export", "ldmscale")
    with pytest.warns(UserWarning, match="autoencoder.weights"):
        main(["--checkpoint", str(tmp_path / "unet_export"), "--class-ids", "2", "--steps", "2",
              "--height", "16", "--width", "16", "--out", str(tmp_path / "out2"), "--no-progress",
              "-o", "conditioner=text_tiny", "-o", "conditioner.kind=class", "-o", "conditioner.num_classes=3"])
    assert json.loads((tmp_path / "out2" / "settings.json").read_text())["class_ids"] == [2]
