"""Presets compose and build on the meta device; parameter and FLOP counts match the published models."""

import pytest
import torch

from ldmscale.config import compose
from ldmscale.models import build_autoencoder, build_denoiser, build_unet, count_flops

UNET_PRESETS = {"tiny": (1.0e6, 1.2e6), "sd15": (859.4e6, 859.6e6), "sd2": (865.9e6 * 0.999, 865.9e6 * 1.001),
                "sdxl": (2.56e9, 2.58e9)}
AE_PRESETS = ("tiny_kl_f4", "kl_f8", "kl_f4", "kl_f16", "vq_f4")
# conditioner → the U-Net preset whose widths it matches (the tiny U-Net otherwise)
CONDITIONERS = {"text_tiny": "tiny", "openclip_vit_h14": "sd2", "sdxl": "sdxl", "class": "tiny", "layout": "tiny",
                "sr": "tiny", "inpaint": "tiny", "none": "tiny"}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset", sorted(UNET_PRESETS))
def test_unet_presets_build_on_meta_with_expected_size(preset):
    cfg = compose([f"model={preset}"])
    with torch.device("meta"):
        unet = build_unet(cfg.model)
    low, high = UNET_PRESETS[preset]
    assert low <= n_params(unet) <= high, n_params(unet)


@pytest.mark.parametrize("preset", AE_PRESETS)
def test_autoencoder_presets_build_on_meta(preset):
    cfg = compose([f"autoencoder={preset}"])
    with torch.device("meta"):
        ae = build_autoencoder(cfg.autoencoder)
    assert ae.downsample_factor == {"kl_f8": 8, "kl_f16": 16}.get(preset, 4)
    if preset == "kl_f8":
        assert abs(n_params(ae) - 83.65e6) < 0.05e6 and ae.scale_factor == 0.18215  # the SD VAE


@pytest.mark.parametrize("cond", sorted(CONDITIONERS))
def test_conditioner_presets_compose_and_build_a_denoiser(cond):
    cfg = compose([f"conditioner={cond}", f"model={CONDITIONERS[cond]}"])
    with torch.device("meta"):
        den = build_denoiser(cfg.model, cfg.conditioner)
    assert den.kind == cfg.conditioner.kind


@pytest.mark.parametrize("cond, model, message", [
    ("openclip_vit_h14", "tiny", "model.context_dim=64 but conditioner.text_model='ViT-H-14' gives 1024-wide"),
    ("sdxl", "sd2", "model.context_dim=1024 but conditioner.kind='sdxl' gives 2048-wide tokens"),
])
def test_conditioner_and_unet_width_mismatch_is_an_error_naming_both(cond, model, message):
    cfg = compose([f"conditioner={cond}", f"model={model}"])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        with torch.device("meta"):
            build_denoiser(cfg.model, cfg.conditioner)


def test_sd2_forward_flops_at_64x64_latents():
    with torch.device("meta"):
        unet = build_unet(compose(["model=sd2"]).model)
    flops = count_flops(unet, torch.zeros(1, 4, 64, 64), torch.zeros(1), torch.zeros(1, 77, 1024))
    assert abs(flops / 803e9 - 1) < 0.02, flops / 1e9


def test_count_flops_leaves_real_module_untouched_and_counts_a_linear():
    layer = torch.nn.Linear(8, 16)
    before = layer.weight.clone()
    assert count_flops(layer, torch.zeros(3, 8)) == 2 * 3 * 8 * 16
    assert count_flops(layer, torch.zeros(3, 8), with_backward=True) == 2 * (2 * 3 * 8 * 16)  # forward + weight grad (no input grad)
    assert torch.equal(layer.weight, before) and not layer.weight.is_meta
