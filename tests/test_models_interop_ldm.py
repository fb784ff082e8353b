"""LDM's plain-attention U-Nets, the x4 upscaler's disable_self_attentions and autoencoders with attention at any
level: numerics against the original formulas and diffusers (both directions, fp32), original-config loading and
the refusal to guess heads."""

import math

import pytest
import torch
from _model_helpers import assert_same_state, randomize

from ldmscale.models import load_autoencoder, load_unet, save_autoencoder, save_unet
from ldmscale.models.attention import AttentionBlock
from ldmscale.models.autoencoder import AutoencoderKL, VQModel
from ldmscale.models.interop import AmbiguousCheckpointError, load_autoencoder_weights
from ldmscale.models.unet import UNet
from tools.convert_checkpoint import main as convert

TOL = 1e-4  # fp32, the bound; observed differences are ~1e-6


def original_attention_block(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """openaimodel.AttentionBlock._forward with QKVAttentionLegacy / QKVAttention, transcribed from the original."""
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(x))
    bs, width, length = qkv.shape
    ch = width // (3 * block.heads)
    scale = 1 / math.sqrt(math.sqrt(ch))
    if block.new_order:  # QKVAttention
        q, k, v = qkv.chunk(3, dim=1)
        weight = torch.einsum("bct,bcs->bts", (q * scale).view(bs * block.heads, ch, length),
                              (k * scale).view(bs * block.heads, ch, length))
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * block.heads, ch, length))
    else:  # QKVAttentionLegacy
        q, k, v = qkv.reshape(bs * block.heads, ch * 3, length).split(ch, dim=1)
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v)
    h = block.proj_out(a.reshape(bs, -1, length))
    return (x + h).reshape(b, c, *spatial)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_plain_attention_block_matches_the_original_in_both_head_orders(backend):
    x = torch.randn(2, 32, 4, 5, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for new_order in (False, True):
        block = randomize(AttentionBlock(32, heads=4, new_order=new_order, norm_num_groups=8, backend=backend))
        with torch.no_grad():
            outputs[new_order] = block(x)
            assert (outputs[new_order] - original_attention_block(block, x)).abs().max() < 1e-5
    assert (outputs[False] - outputs[True]).abs().max() > 1e-3  # same weights, other order: another function


def test_plain_unet_keeps_middle_attention_at_depth_zero():
    """The original puts an AttentionBlock in the middle block whatever the levels do (semantic_synthesis:
    no attention at any level); only an explicit transformer_depth_middle=0 removes it."""
    kwargs = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                  attention_resolutions=[], num_heads=8, num_head_channels=-1, context_dim=None, attention_block="plain",
                  transformer_depth=[0])
    with torch.device("meta"):
        unet = UNet(**kwargs)
        assert isinstance(unet.middle_block[1], AttentionBlock) and unet.middle_block[1].heads == 8
        assert not any(isinstance(m, AttentionBlock) for m in unet.input_blocks.modules())
        assert len(UNet(**kwargs, transformer_depth_middle=0).middle_block) == 2


def test_num_heads_upsample_follows_the_original_legacy_rule():
    """Legacy plain U-Nets with num_heads use num_heads_upsample in the decoder half; non-legacy ignores it."""
    from ldmscale.models.interop import unet_config_from_original

    params = dict(in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2], num_res_blocks=1,
                  channel_mult=[1, 2], num_heads=4, num_heads_upsample=2)
    for legacy, decoder_heads in ((True, 2), (False, 4)):
        original = {"model": {"params": {"unet_config": {"params": {**params, "legacy": legacy}}}}}
        with torch.device("meta"):
            unet = UNet(**unet_config_from_original(original))
        assert {m.heads for m in unet.input_blocks.modules() if isinstance(m, AttentionBlock)} == {4}
        assert {m.heads for m in unet.output_blocks.modules() if isinstance(m, AttentionBlock)} == {decoder_heads}
        assert unet.middle_block[1].heads == 4


PLAIN = {
    # LDM's unconditional/SR U-Nets (celebahq, bsr_sr): head width, conv resampling, class labels
    "head_width": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=16,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=5),
    # resblock_updown (lsun_churches, inpainting_big): up/down-sampling ResBlocks
    "resblock_updown": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                            attention_head_dim=8, downsample_type="resnet", upsample_type="resnet",
                            down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")),
    # scale-shift norm (diffusers cannot hold it with mid attention: none here)
    "scale_shift": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=16,
                        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                        resnet_time_scale_shift="scale_shift", add_attention=False),
}


def unet_inputs(in_channels=3, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, in_channels, size, size, generator=g), torch.tensor([3, 811])


@pytest.mark.parametrize("style", sorted(PLAIN))
def test_plain_unet_matches_diffusers_unet2dmodel_both_ways(style, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    theirs = randomize(diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, **PLAIN[style])).eval()
    theirs.save_pretrained(tmp_path / "unet")
    ours = load_unet(tmp_path / "unet")
    assert ours.config["attention_block"] == "plain"
    x, t = unet_inputs()
    labels = torch.tensor([1, 4]) if "num_class_embeds" in PLAIN[style] else None
    with torch.no_grad():
        expected = theirs(x, t, class_labels=labels).sample
        got = ours(x, t, y=labels)
    assert (got - expected).abs().max() < TOL
    # ours → diffusers: bit-exact weights, same function
    save_unet(ours, tmp_path / "export", "diffusers")
    again = diffusers.UNet2DModel.from_pretrained(tmp_path / "export").eval()
    assert_same_state(again, theirs)
    with torch.no_grad():
        assert (again(x, t, class_labels=labels).sample - got).abs().max() < TOL
    # and through an LDM file, whose heads are given as the loader asks
    save_unet(ours, tmp_path / "plain.safetensors", "ldm")
    assert_same_state(load_unet(tmp_path / "plain.safetensors"), ours)  # carries our config


def test_new_attention_order_exports_to_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ours = randomize(UNet(in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                          attention_resolutions=[1, 2], num_heads=-1, num_head_channels=8, context_dim=None,
                          norm_num_groups=8, attention_block="plain", use_new_attention_order=True)).eval()
    save_unet(ours, tmp_path / "export", "diffusers")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "export").eval()
    back = load_unet(tmp_path / "export")  # diffusers has one qkv layout: read back in legacy order
    x, t = unet_inputs()
    with torch.no_grad():
        got = ours(x, t)
        assert (theirs(x, t).sample - got).abs().max() < TOL
        assert (back(x, t) - got).abs().max() < TOL


def test_disable_self_attentions_matches_diffusers_only_cross_attention(tmp_path):
    """The SD x4 upscaler's layout, small: 7 input channels, noise-level classes, attn1 over the context."""
    diffusers = pytest.importorskip("diffusers")
    theirs = randomize(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=7, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=24, attention_head_dim=4, use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=[False, True, False], num_class_embeds=10)).eval()
    theirs.save_pretrained(tmp_path / "unet")
    ours = load_unet(tmp_path / "unet")
    assert ours.config["disable_self_attentions"] == [False, True, False]
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 7, 8, 8, generator=g), torch.tensor([5, 900])
    ctx, labels = torch.randn(2, 6, 24, generator=g), torch.tensor([2, 7])
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
        got = ours(x, t, ctx, y=labels)
        assert (got - expected).abs().max() < TOL
        save_unet(ours, tmp_path / "export", "diffusers")
        again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "export").eval()
        assert_same_state(again, theirs)
        assert (again(x, t, encoder_hidden_states=ctx, class_labels=labels).sample - got).abs().max() < TOL


AUTOENCODERS = {  # attention at any level (KL-f16/f32, VQ-f8/f16) and none at all (vq-f4-noattn)
    "kl_level_attn": ("AutoencoderKL", dict(block_out_channels=(32, 64, 64), latent_channels=4,
                                            down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D",
                                                              "AttnDownEncoderBlock2D"),
                                            up_block_types=("AttnUpDecoderBlock2D", "AttnUpDecoderBlock2D",
                                                            "UpDecoderBlock2D"))),
    "vq_level_attn": ("VQModel", dict(block_out_channels=(32, 64), latent_channels=3, num_vq_embeddings=64,
                                      vq_embed_dim=3, down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
                                      up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D"))),
    "vq_no_attn": ("VQModel", dict(block_out_channels=(32, 32), latent_channels=3, num_vq_embeddings=32,
                                   mid_block_add_attention=False, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2)),
}


@pytest.mark.parametrize("style", sorted(AUTOENCODERS))
def test_autoencoder_attention_at_any_level_matches_diffusers_both_ways(style, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cls, kwargs = AUTOENCODERS[style]
    theirs = randomize(getattr(diffusers, cls)(sample_size=16, layers_per_block=1, **kwargs)).eval()
    theirs.save_pretrained(tmp_path / "pipe" / ("vae" if cls == "AutoencoderKL" else "vqvae"))  # LDMPipeline: vqvae/
    ours = load_autoencoder(tmp_path / "pipe")
    assert isinstance(ours, AutoencoderKL if cls == "AutoencoderKL" else VQModel)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def outputs(model, dmodel):
        with torch.no_grad():
            if cls == "AutoencoderKL":
                dist = dmodel.encode(pixels).latent_dist
                theirs_enc = torch.cat([dist.mean, dist.logvar], 1)
                return model.encode_moments(pixels), theirs_enc, model.decode(dist.mean), dmodel.decode(dist.mean).sample
            latents = dmodel.encode(pixels).latents  # pre-quantisation, as LDM trains stage 2 on
            return model.encode_moments(pixels), latents, model.decode(latents), dmodel.decode(latents).sample

    for a, b in zip(*[iter(outputs(ours, theirs))] * 2):
        assert (a - b).abs().max() < TOL
    save_autoencoder(ours, tmp_path / "export", "diffusers")
    again = getattr(diffusers, cls).from_pretrained(tmp_path / "export").eval()
    assert_same_state(again, theirs)
    for a, b in zip(*[iter(outputs(ours, again))] * 2):
        assert (a - b).abs().max() < TOL
    # a plain LDM file (no config of ours): the attention levels are read from the keys
    plain = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    torch.save({"state_dict": plain}, tmp_path / "plain.ckpt")
    assert_same_state(load_autoencoder(tmp_path / "plain.ckpt"), ours)
    # and into a model built from the right config, without inferring anything first
    config = {k: v for k, v in ours.config.items() if k not in ("kind", "double_z")}
    fresh = (AutoencoderKL if cls == "AutoencoderKL" else VQModel)(**config)
    assert_same_state(load_autoencoder_weights(fresh, tmp_path / "plain.ckpt"), ours)


CIN256_V2_SMALL = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    scale_by_std: true
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 3
        out_channels: 3
        model_channels: 32
        attention_resolutions: [2, 1]
        num_res_blocks: 1
        channel_mult: [1, 2]
        num_heads: 1
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 24
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 64
        ddconfig: {double_z: false, z_channels: 3, resolution: 32, in_channels: 3, out_ch: 3, ch: 32,
                   ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [16], dropout: 0.0}
"""


def test_ambiguous_heads_are_refused_and_the_original_config_loads_them(tmp_path):
    """A small cin256-v2: one head per level, which no weight shows. The old loader silently used 64-channel
    heads; now the file alone is refused, naming the flag, and the shipped YAML loads it exactly."""
    from ldmscale.models.interop import autoencoder_config_from_original, unet_config_from_original

    (tmp_path / "config.yaml").write_text(CIN256_V2_SMALL)
    unet = randomize(UNet(**unet_config_from_original(tmp_path / "config.yaml"))).eval()
    ae_kwargs = autoencoder_config_from_original(tmp_path / "config.yaml")
    ae_kwargs.pop("kind")
    vq = randomize(VQModel(**ae_kwargs), seed=1).eval()
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    state.update({"first_stage_model." + k: v for k, v in vq.state_dict().items()})
    state["scale_factor"] = torch.tensor(0.5)  # LatentDiffusion's buffer under scale_by_std
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")

    with pytest.raises(AmbiguousCheckpointError, match=r"heads.*original_config=.*--original-config"):
        load_unet(tmp_path / "model.ckpt")
    with pytest.raises(AmbiguousCheckpointError, match="--original-config"):
        convert(["unet", str(tmp_path / "model.ckpt"), str(tmp_path / "out"), "--to", "ldmscale"])
    assert not (tmp_path / "out").exists()  # nothing written with a guessed head count

    loaded = load_unet(tmp_path / "model.ckpt", original_config=tmp_path / "config.yaml")
    assert loaded.config["num_heads"] == 1
    assert_same_state(loaded, unet)
    g = torch.Generator().manual_seed(4)
    x, t, ctx = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([1, 500]), torch.randn(2, 5, 24, generator=g)
    guessed = load_unet(tmp_path / "model.ckpt", num_head_channels=16)  # what a silent default would give
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx), unet(x, t, ctx))
        assert (guessed(x, t, ctx) - unet(x, t, ctx)).abs().max() > 1e-3

    out = convert(["unet", str(tmp_path / "model.ckpt"), str(tmp_path / "out"), "--to", "ldmscale",
                   "--original-config", str(tmp_path / "config.yaml")])
    assert load_unet(out).config["num_heads"] == 1
    ae = load_autoencoder(tmp_path / "model.ckpt", original_config=tmp_path / "config.yaml")
    assert_same_state(ae, vq)
    assert ae.scale_factor == 0.5 and ae.config["attn_resolutions"] == [16]
    vae_out = convert(["vae", str(tmp_path / "model.ckpt"), str(tmp_path / "vae"), "--to", "ldmscale",
                       "--original-config", str(tmp_path / "config.yaml")])
    assert_same_state(load_autoencoder(vae_out), vq)
    assert load_autoencoder(tmp_path / "model.ckpt").config["attn_resolutions"] == [256 // 2]  # from the keys


def test_plain_ldm_unet_without_config_is_refused_and_loads_with_its_yaml(tmp_path):
    """A small celebahq (plain AttentionBlocks, middle attention, 32-channel heads) as a bare LDM file."""
    import yaml

    original = {"model": {"params": {"unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                                     "params": dict(image_size=16, in_channels=3, out_channels=3,
                                                                    model_channels=32, attention_resolutions=[2],
                                                                    num_res_blocks=1, channel_mult=[1, 2, 2],
                                                                    num_head_channels=16)}}}}
    (tmp_path / "celebahq.yaml").write_text(yaml.safe_dump(original))
    from ldmscale.models.interop import unet_config_from_original

    unet = randomize(UNet(**unet_config_from_original(original))).eval()
    torch.save({"state_dict": {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}},
               tmp_path / "model.ckpt")
    with pytest.raises(AmbiguousCheckpointError, match="original_config"):
        load_unet(tmp_path / "model.ckpt")
    loaded = load_unet(tmp_path / "model.ckpt", original_config=tmp_path / "celebahq.yaml")
    assert_same_state(loaded, unet)
    assert isinstance(loaded.middle_block[1], AttentionBlock)
    assert [m.heads for m in loaded.modules() if isinstance(m, AttentionBlock)] == [4] * 4  # level 1: 1 + 2, middle: 1


ADM = {  # vector conditioning: SD 2.1 unCLIP (image embedding + noise level) and SDXL (pooled text + sizes)
    "unclip": dict(class_embed_type="projection", projection_class_embeddings_input_dim=12),
    "sdxl": dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=52),
}


@pytest.mark.parametrize("style", sorted(ADM))
def test_vector_conditioned_unets_match_diffusers_both_ways(style, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from ldmscale.models.unet import timestep_embedding

    theirs = randomize(diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **ADM[style])).eval()
    theirs.save_pretrained(tmp_path / "unet")
    ours = load_unet(tmp_path / "unet")
    assert ours.config["num_head_channels"] == 16
    assert ours.config["adm_in_channels"] == ADM[style]["projection_class_embeddings_input_dim"]
    g = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([7, 600]), torch.randn(2, 5, 24, generator=g)
    with torch.no_grad():
        if style == "sdxl":  # SDXL's vector: pooled text ‖ sinusoidal embeddings of the six size/crop numbers
            pooled, ids = torch.randn(2, 4, generator=g), torch.tensor([[512., 512, 0, 0, 512, 512]] * 2)
            y = torch.cat([pooled, timestep_embedding(ids.flatten(), 8).reshape(2, -1)], dim=1)
            expected = theirs(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        else:
            y = torch.randn(2, 12, generator=g)
            expected = theirs(x, t, ctx, class_labels=y).sample
        got = ours(x, t, ctx, y=y)
        assert (got - expected).abs().max() < TOL
        save_unet(ours, tmp_path / "export", "diffusers")  # the vector enters as a projected class embedding
        again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "export").eval()
        assert (again(x, t, ctx, class_labels=y).sample - got).abs().max() < TOL
