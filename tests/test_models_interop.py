"""Interop with diffusers and original LDM checkpoints: numerics (1e-5) and bit-exact round trips."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from _model_helpers import assert_same_state, randomize  # noqa: E402

from ldmscale.models import load_autoencoder, load_unet, save_autoencoder, save_unet  # noqa: E402
from ldmscale.models.autoencoder import AutoencoderKL, VQModel  # noqa: E402
from ldmscale.models.interop import CheckpointMismatchError  # noqa: E402

UNET_CONFIGS = {
    # SD1-style: convolutional proj_in/out, a fixed head count
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                use_linear_projection=False),
    # SD2-style: linear projections, 16-channel heads (diffusers spells head counts per level)
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=40,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2, 2)),
}
VAE_CONFIGS = {
    "f4": dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
               down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
    "f2": dict(block_out_channels=(32, 32), layers_per_block=2, latent_channels=3, norm_num_groups=32,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
}


@pytest.mark.parametrize("style", sorted(UNET_CONFIGS))
def test_unet_matches_diffusers_and_round_trips(style, tmp_path):
    theirs = randomize(diffusers.UNet2DConditionModel(sample_size=8, **UNET_CONFIGS[style])).eval()
    theirs.save_pretrained(tmp_path / "pipe" / "unet")
    ours = load_unet(tmp_path / "pipe")  # a pipeline folder: finds unet/
    assert not ours.training
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 5, UNET_CONFIGS[style]["cross_attention_dim"], generator=g)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert (got - expected).abs().max() < 1e-5
    # ours → diffusers → ours, and through both LDM file formats: bit-exact
    save_unet(ours, tmp_path / "export_unet", "diffusers")
    assert_same_state(load_unet(tmp_path / "export_unet"), ours)
    again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "export_unet").eval()
    with torch.no_grad():
        assert torch.equal(again(x, t, encoder_hidden_states=ctx).sample, expected)
    for name in ("sd.ckpt", "sd.safetensors"):
        save_unet(ours, tmp_path / name, "ldm")
        assert_same_state(load_unet(tmp_path / name), ours)
    save_unet(ours, tmp_path / "ours", "ldmscale")
    assert_same_state(load_unet(tmp_path / "ours"), ours)


def test_unet_ldm_file_without_our_config_infers_structure(tmp_path):
    theirs = randomize(diffusers.UNet2DConditionModel(sample_size=8, **UNET_CONFIGS["sd2"]))
    theirs.save_pretrained(tmp_path / "unet")
    ours = load_unet(tmp_path / "unet")
    state = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    state["model_ema.decay"] = torch.tensor(0.999)
    torch.save({"state_dict": state}, tmp_path / "plain.ckpt")
    # head width 16 cannot be inferred from weights: pass it, as a user with the SD yaml would
    loaded = load_unet(tmp_path / "plain.ckpt", num_head_channels=16)
    assert_same_state(loaded, ours)


@pytest.mark.parametrize("style", sorted(VAE_CONFIGS))
def test_autoencoder_matches_diffusers_and_round_trips(style, tmp_path):
    theirs = randomize(diffusers.AutoencoderKL(sample_size=16, **VAE_CONFIGS[style])).eval()
    theirs.save_pretrained(tmp_path / "vae")
    ours = load_autoencoder(tmp_path / "vae")
    assert isinstance(ours, AutoencoderKL) and not ours.training
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        dist = theirs.encode(pixels).latent_dist
        moments = ours.encode_moments(pixels)
        assert (moments - torch.cat([dist.mean, dist.logvar], 1)).abs().max() < 1e-5
        assert (ours.decode(dist.mean) - theirs.decode(dist.mean).sample).abs().max() < 1e-5
    save_autoencoder(ours, tmp_path / "export_vae", "diffusers")
    assert_same_state(load_autoencoder(tmp_path / "export_vae"), ours)
    for name in ("vae.ckpt", "vae.safetensors"):
        save_autoencoder(ours, tmp_path / name, "ldm")
        assert_same_state(load_autoencoder(tmp_path / name), ours)
    # a plain LDM file (no config of ours) with the GAN-loss weights LDM checkpoints carry
    plain = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    plain["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": plain}, tmp_path / "plain.ckpt")
    assert_same_state(load_autoencoder(tmp_path / "plain.ckpt"), ours)


def test_vq_round_trips_through_ldm_and_ours(tmp_path):
    vq = randomize(VQModel(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=3, embed_dim=3, n_embed=16))
    save_autoencoder(vq, tmp_path / "vq.safetensors", "ldm")
    assert_same_state(load_autoencoder(tmp_path / "vq.safetensors"), vq)
    save_autoencoder(vq, tmp_path / "vq", "ldmscale")
    assert isinstance(load_autoencoder(tmp_path / "vq"), VQModel)
    # diffusers' VQModel takes LDM's VQ first stage (#18): exported and read back exactly
    save_autoencoder(vq, tmp_path / "vq_diffusers", "diffusers")
    assert_same_state(load_autoencoder(tmp_path / "vq_diffusers"), vq)


def test_bad_checkpoints_are_refused(tmp_path):
    ours = load_unet_tiny(tmp_path)
    state = ours.state_dict()
    state.pop("out.2.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \[out.2.bias\].*unexpected keys \[extra.weight\]"):
        from ldmscale.models.interop import load_unet_weights

        load_unet_weights(ours, tmp_path / "bad.ckpt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.ckpt", _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="arbitrary pickles are never loaded"):
        load_unet(tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="format="):
        save_unet(ours, tmp_path / "x", "onnx")


def load_unet_tiny(tmp_path):
    from ldmscale.config import UNetConfig
    from ldmscale.models import build_unet

    unet = build_unet(UNetConfig())
    save_unet(unet, tmp_path / "tiny", "ldmscale")
    return load_unet(tmp_path / "tiny")
