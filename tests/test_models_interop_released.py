"""Every released LDM / Stable Diffusion checkpoint's structure, built on the meta device from its original YAML.

The YAML below carries the structural fields of the public originals, copied from CompVis/latent-diffusion
(models/ldm/*/config.yaml, configs/latent-diffusion/*.yaml, models/first_stage_models/*/config.yaml),
CompVis/stable-diffusion (configs/stable-diffusion/v1-inference.yaml), Stability-AI/stablediffusion
(configs/stable-diffusion/*.yaml) and Stability-AI/generative-models (configs/inference/sd_xl_base.yaml);
training-only fields are left out. For each: the config builds, the weights' key set alone infers the same
structure (heads where the family pins them, else given as the loader's refusal asks), and the parameter count
equals diffusers' independent implementation of the same architecture (and the published totals for SD)."""

import textwrap

import pytest
import torch
import yaml

from ldmscale.models.autoencoder import AutoencoderKL, VQModel
from ldmscale.models.interop import (
    AmbiguousCheckpointError,
    autoencoder_config_from_original,
    autoencoder_config_from_state_dict,
    autoencoder_config_to_diffusers,
    resolve_unet_config,
    unet_config_from_original,
    unet_config_from_state_dict,
    unet_config_to_diffusers,
)
from ldmscale.models.unet import UNet


def ldm(unet: str, first_stage: str = "", extra: str = "") -> str:
    """A LatentDiffusion config: model.params.{unet_config, first_stage_config} (+ model.params extras)."""
    text = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n" + extra
    text += "    unet_config:\n      target: ldm.modules.diffusionmodules.openaimodel.UNetModel\n      params:\n"
    text += "".join(f"        {line}\n" for line in unet.strip().splitlines())
    if first_stage:
        text += "    first_stage_config:\n" + "".join(f"      {line}\n" for line in first_stage.strip().splitlines())
    return text


def ae(target: str, embed_dim: int, ddconfig: str, n_embed: int = 0) -> str:
    """A first_stage_config (or a first stage's own model:) body: target, params with ddconfig."""
    quant = f"  n_embed: {n_embed}\n" if n_embed else ""
    common = "resolution: 256, in_channels: 3, out_ch: 3, ch: 128, num_res_blocks: 2, dropout: 0.0"
    return (f"target: ldm.models.autoencoder.{target}\nparams:\n  embed_dim: {embed_dim}\n{quant}"
            f"  ddconfig: {{double_z: {str(target == 'AutoencoderKL').lower()}, {common}, {ddconfig}}}")


VQ_F4 = ae("VQModelInterface", 3, "z_channels: 3, ch_mult: [1, 2, 4], attn_resolutions: []", 8192)
VQ_F4_NOATTN = ae("VQModelInterface", 3, "attn_type: none, z_channels: 3, ch_mult: [1, 2, 4], attn_resolutions: []",
                  8192)
VQ_F8 = ae("VQModelInterface", 4, "z_channels: 4, ch_mult: [1, 2, 2, 4], attn_resolutions: [32]", 16384)
KL_F8 = ae("AutoencoderKL", 4, "z_channels: 4, ch_mult: [1, 2, 4, 4], attn_resolutions: []")
KL_F4_UPSCALER = ae("AutoencoderKL", 4, "z_channels: 4, ch_mult: [1, 2, 4], attn_resolutions: []")
SD = "    scale_factor: 0.18215\n"
SD_V2 = ("{use_checkpoint: true, image_size: 32, in_channels: 4, out_channels: 4, model_channels: 320, "
         "attention_resolutions: [4, 2, 1], num_res_blocks: 2, channel_mult: [1, 2, 4, 4], num_head_channels: 64, "
         "use_spatial_transformer: true, use_linear_in_transformer: true, transformer_depth: 1, context_dim: 1024, "
         "legacy: false}")

UNETS = {  # unet_config.params as in the originals (flow style)
    # LDM (CompVis/latent-diffusion): plain AttentionBlock U-Nets
    "celebahq": ldm("{image_size: 64, in_channels: 3, out_channels: 3, model_channels: 224, "
        "attention_resolutions: [8, 4, 2], num_res_blocks: 2, channel_mult: [1, 2, 3, 4], "
        "num_head_channels: 32}",
        VQ_F4),
    "ffhq": ldm("{image_size: 64, in_channels: 3, out_channels: 3, model_channels: 224, "
        "attention_resolutions: [8, 4, 2], num_res_blocks: 2, channel_mult: [1, 2, 3, 4], "
        "num_head_channels: 32}",
        VQ_F4),
    "lsun_beds": ldm("{image_size: 64, in_channels: 3, out_channels: 3, model_channels: 224, "
        "attention_resolutions: [8, 4, 2], num_res_blocks: 2, channel_mult: [1, 2, 3, 4], "
        "num_head_channels: 32}",
        VQ_F4),
    "lsun_churches": ldm("{image_size: 32, in_channels: 4, out_channels: 4, model_channels: 192, "
        "attention_resolutions: [1, 2, 4, 8], num_res_blocks: 2, channel_mult: [1, 2, 2, 4, 4], "
        "num_heads: 8, use_scale_shift_norm: true, resblock_updown: true}",
        KL_F8, "    scale_by_std: true\n"),
    "semantic_synthesis": ldm("{image_size: 64, in_channels: 6, out_channels: 3, model_channels: 128, "
        "attention_resolutions: [32, 16, 8], num_res_blocks: 2, channel_mult: [1, 4, 8], "
        "num_heads: 8}",
        VQ_F4),
    "bsr_sr": ldm("{image_size: 64, in_channels: 6, out_channels: 3, model_channels: 160, "
        "attention_resolutions: [16, 8], num_res_blocks: 2, channel_mult: [1, 2, 2, 4], "
        "num_head_channels: 32}",
        VQ_F4),
    "inpainting_big": ldm("{image_size: 64, in_channels: 7, out_channels: 3, model_channels: 256, "
        "attention_resolutions: [8, 4, 2], num_res_blocks: 2, channel_mult: [1, 2, 3, 4], "
        "num_heads: 8, resblock_updown: true}",
        VQ_F4_NOATTN),
    # LDM: cross-attention U-Nets
    "cin256": ldm("{image_size: 32, in_channels: 4, out_channels: 4, model_channels: 256, "
        "attention_resolutions: [4, 2, 1], num_res_blocks: 2, channel_mult: [1, 2, 4], "
        "num_head_channels: 32, use_spatial_transformer: true, transformer_depth: 1, "
        "context_dim: 512}",
        VQ_F8),
    "cin256-v2": ldm("{image_size: 64, in_channels: 3, out_channels: 3, model_channels: 192, "
        "attention_resolutions: [8, 4, 2], num_res_blocks: 2, channel_mult: [1, 2, 3, 5], "
        "num_heads: 1, use_spatial_transformer: true, transformer_depth: 1, context_dim: 512}",
        VQ_F4),
    "txt2img-1p4B": ldm("{image_size: 32, in_channels: 4, out_channels: 4, model_channels: 320, "
        "attention_resolutions: [4, 2, 1], num_res_blocks: 2, channel_mult: [1, 2, 4, 4], "
        "num_heads: 8, use_spatial_transformer: true, transformer_depth: 1, context_dim: 1280, "
        "use_checkpoint: true, legacy: false}",
        KL_F8, SD),
    "layout2img": ldm("{image_size: 64, in_channels: 3, out_channels: 3, model_channels: 128, "
        "attention_resolutions: [8, 4, 2], num_res_blocks: 2, channel_mult: [1, 2, 3, 4], "
        "num_head_channels: 32, use_spatial_transformer: true, transformer_depth: 3, "
        "context_dim: 512}",
        VQ_F4),
    # Stable Diffusion
    "sd1": ldm("{image_size: 32, in_channels: 4, out_channels: 4, model_channels: 320, "
        "attention_resolutions: [4, 2, 1], num_res_blocks: 2, channel_mult: [1, 2, 4, 4], "
        "num_heads: 8, use_spatial_transformer: true, transformer_depth: 1, context_dim: 768, "
        "use_checkpoint: true, legacy: false}",
        KL_F8, SD),
    "sd2": ldm(SD_V2, KL_F8, SD),
    "sd2-inpainting": ldm(SD_V2.replace("in_channels: 4", "in_channels: 9"), KL_F8, SD),
    "sd2-unclip-h": ldm(SD_V2.replace("{", "{num_classes: sequential, adm_in_channels: 2048, "), KL_F8, SD),
    "sd-x4-upscaler": ldm("{use_checkpoint: true, num_classes: 1000, image_size: 128, in_channels: 7, "
        "out_channels: 4, model_channels: 256, attention_resolutions: [2, 4, 8], "
        "num_res_blocks: 2, channel_mult: [1, 2, 2, 4], "
        "disable_self_attentions: [true, true, true, false], disable_middle_self_attn: false, "
        "num_heads: 8, use_spatial_transformer: true, transformer_depth: 1, context_dim: 1024, "
        "legacy: false, use_linear_in_transformer: true}",
        KL_F4_UPSCALER, "    scale_factor: 0.08333\n"),
    "sdxl-base": """model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 2816
        num_classes: sequential
        use_checkpoint: True
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 4]
        num_head_channels: 64
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: [1, 2, 10]
        context_dim: 2048
        spatial_transformer_attn_type: softmax-xformers
        legacy: False
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        ddconfig: {attn_type: vanilla-xformers, double_z: true, z_channels: 4, resolution: 256, in_channels: 3,
                   out_ch: 3, ch: 128, ch_mult: [1, 2, 4, 4], num_res_blocks: 2, attn_resolutions: [],
                   dropout: 0.0}
""",
}
# published parameter totals (diffusers model cards / Stability reports)
PUBLISHED = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl-base": 2_567_463_684}
PINNED = {"sd1", "sd2", "sd2-inpainting", "sd2-unclip-h", "sdxl-base"}


def first_stage(*args) -> str:
    """A first stage's own config (models/first_stage_models/*/config.yaml): model.target / model.params."""
    return "model:\n" + textwrap.indent(ae(*args), "  ") + "\n"


FIRST_STAGES = {  # models/first_stage_models/*/config.yaml
    "kl-f4": first_stage("AutoencoderKL", 3, "z_channels: 3, ch_mult: [1, 2, 4], attn_resolutions: []"),
    "kl-f8": first_stage("AutoencoderKL", 4, "z_channels: 4, ch_mult: [1, 2, 4, 4], attn_resolutions: []"),
    "kl-f16": first_stage("AutoencoderKL", 16, "z_channels: 16, ch_mult: [1, 1, 2, 2, 4], attn_resolutions: [16]"),
    "kl-f32": first_stage("AutoencoderKL", 64, "z_channels: 64, ch_mult: [1, 1, 2, 2, 4, 4], "
                                                "attn_resolutions: [16, 8]"),
    "vq-f4": first_stage("VQModel", 3, "z_channels: 3, ch_mult: [1, 2, 4], attn_resolutions: []", 8192),
    "vq-f4-noattn": first_stage("VQModel", 3, "attn_type: none, z_channels: 3, ch_mult: [1, 2, 4], "
                                              "attn_resolutions: []", 8192),
    "vq-f8": first_stage("VQModel", 4, "z_channels: 4, ch_mult: [1, 2, 2, 4], attn_resolutions: [32]", 16384),
    "vq-f8-n256": first_stage("VQModel", 4, "z_channels: 4, ch_mult: [1, 2, 2, 4], attn_resolutions: [32]", 256),
    "vq-f16": first_stage("VQModel", 8, "z_channels: 8, ch_mult: [1, 1, 2, 2, 4], attn_resolutions: [16]", 16384),
}


def meta_unet(kwargs):
    with torch.device("meta"):
        return UNet(**kwargs)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(UNETS))
def test_released_unet_config_builds_and_its_keys_infer_it(name):
    original = yaml.safe_load(UNETS[name])
    kwargs = unet_config_from_original(original)
    model = meta_unet(kwargs)
    inferred = unet_config_from_state_dict(model.state_dict())  # shapes only: meta tensors suffice
    if name in PINNED:
        resolved = resolve_unet_config(inferred, {}, name)
        assert (resolved["num_heads"], resolved["num_head_channels"]) == (kwargs["num_heads"],
                                                                           kwargs["num_head_channels"])
    else:  # heads are not in the weights: refused, and given as the refusal asks
        with pytest.raises(AmbiguousCheckpointError, match="original_config"):
            resolve_unet_config(inferred, {}, name)
        given = {k: kwargs[k] for k in ("num_heads", "num_head_channels")}
        if name == "sd-x4-upscaler":  # level 3 and the middle are as wide as the context: undecidable too
            assert inferred["disable_self_attentions"] == [False, True, True, None]
            given.update(disable_self_attentions=kwargs["disable_self_attentions"], disable_middle_self_attn=False)
        resolved = resolve_unet_config(inferred, given, name)
    again = meta_unet(resolved)
    assert shapes(again) == shapes(model)
    for key in ("attention_block", "resblock_updown", "use_scale_shift_norm", "use_linear_in_transformer",
                "context_dim", "num_classes", "adm_in_channels", "num_heads", "num_head_channels", "channel_mult",
                "num_res_blocks", "transformer_depth_middle"):
        assert again.config[key] == model.config[key], key
    if name in PUBLISHED:
        assert count(model) == PUBLISHED[name]


EXPECTED_STRUCTURE = {  # what the original code builds, spelled out: (attention kind, attention levels, middle)
    "celebahq": ("plain", [1, 2, 3], 1), "lsun_churches": ("plain", [0, 1, 2, 3], 1),
    "semantic_synthesis": ("plain", [], 1), "bsr_sr": ("plain", [3], 1), "inpainting_big": ("plain", [1, 2, 3], 1),
    "cin256": ("transformer", [0, 1, 2], 1), "layout2img": ("transformer", [1, 2, 3], 3),
    "sdxl-base": ("transformer", [1, 2], 10), "sd-x4-upscaler": ("transformer", [1, 2, 3], 1),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_STRUCTURE))
def test_released_unet_structure(name):
    model = meta_unet(unet_config_from_original(yaml.safe_load(UNETS[name])))
    kind, levels, middle = EXPECTED_STRUCTURE[name]
    inferred = unet_config_from_state_dict(model.state_dict())
    assert inferred["attention_block"] == kind
    assert [i for i, d in enumerate(inferred["transformer_depth"]) if d] == levels
    assert inferred["transformer_depth_middle"] == middle
    assert len(inferred["channel_mult"]) == len(model.config["channel_mult"])  # resblock_updown counted right
    if kind == "plain":  # heads as the original computes them: num_head_channels, or num_heads everywhere
        heads = {m.heads for m in model.modules() if hasattr(m, "qkv")}
        cfg = model.config
        expected = ({cfg["model_channels"] * cfg["channel_mult"][i] // cfg["num_head_channels"]
                     for i in levels + [len(cfg["channel_mult"]) - 1]}
                    if cfg["num_head_channels"] != -1 else {cfg["num_heads"]})
        assert heads == expected


@pytest.mark.parametrize("name", sorted(UNETS))
def test_released_unet_parameter_count_matches_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    model = meta_unet(unet_config_from_original(yaml.safe_load(UNETS[name])))
    cfg = dict(model.config)
    if cfg["attention_block"] == "plain" and cfg["num_head_channels"] == -1:
        # diffusers' UNet2DModel sets heads by width only; the head split has no parameters of its own
        cfg.update(num_heads=-1, num_head_channels=cfg["model_channels"])
    if name == "lsun_churches":  # scale-shift norm + mid attention: diffusers' mid attention has no GroupNorm
        with pytest.raises(ValueError, match="GroupNorm"):
            unet_config_to_diffusers(cfg)
        return
    dcfg = unet_config_to_diffusers(cfg)
    cls = getattr(diffusers, dcfg.pop("_class_name"))
    with torch.device("meta"):
        theirs = cls(**dcfg)
    assert count(theirs) == count(model)


@pytest.mark.parametrize("name", sorted(FIRST_STAGES) + ["sdxl-base", "cin256", "inpainting_big"])
def test_released_first_stage_builds_infers_and_matches_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    original = yaml.safe_load(FIRST_STAGES.get(name) or UNETS[name])
    kwargs = autoencoder_config_from_original(original)
    build = {"kl": AutoencoderKL, "vq": VQModel}[kwargs.pop("kind")]
    with torch.device("meta"):
        model = build(**kwargs)
    inferred = autoencoder_config_from_state_dict(model.state_dict())
    assert inferred["kind"] == model.config["kind"]
    inferred.pop("kind")
    with torch.device("meta"):
        again = build(**inferred)
    assert shapes(again) == shapes(model)
    assert inferred["attn_resolutions"] == model.config["attn_resolutions"]
    assert inferred["attn_type"] == model.config["attn_type"]
    dcfg = autoencoder_config_to_diffusers(model.config)
    with torch.device("meta"):
        theirs = getattr(diffusers, dcfg.pop("_class_name"))(**dcfg)
    assert count(theirs) == count(model)
    if name == "kl-f8":
        assert count(model) == 83_653_863  # the SD VAE
    if name in UNETS:  # a full LDM/SD config carries the latent scale
        assert model.scale_factor == original["model"]["params"].get("scale_factor", 1.0)
