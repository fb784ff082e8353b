"""The U-Net in other formats: LDM/SD (.yaml or inferred from the weights, refusing what the weights do not
determine), diffusers (UNet2DConditionModel / UNet2DModel key and config maps) and our export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ldmscale.models.attention import AttentionBlock, SpatialTransformer
from ldmscale.models.interop.common import (
    OUR_CONFIG,
    OUR_WEIGHTS,
    UNET_PREFIX,
    _diffusers_dir,
    _load_diffusers_weights,
    _original_config_for_file,
    _original_section,
    _ours_dir,
    _read_tensors,
    _rename,
    _save,
    _strict_load,
    _strip,
    read_original_config,
)
from ldmscale.models.unet import Downsample, ResBlock, UNet, Upsample, _per_level
from ldmscale.runs import read_weights


def unet_config_from_original(original_config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Our UNet keyword arguments from an LDM/SD/SDXL config's `unet_config` (or sgm `network_config`), with the
    original's head arithmetic: heads, attention levels, depths, plain vs transformer attention and all."""
    _, p = _original_section(read_original_config(original_config), ("unet_config", "network_config"),
                             ("UNetModel",), "U-Net (unet_config/network_config)")
    for key, want in (("dims", 2), ("n_embed", None), ("num_attention_blocks", None)):
        if p.get(key, want) != want:
            raise ValueError(f"original unet_config {key}={p[key]!r} is not supported (expected {want!r})")
    mult = list(p.get("channel_mult", (1, 2, 4, 8)))
    spatial = bool(p.get("use_spatial_transformer", False))
    depth = p.get("transformer_depth", 1)
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(mult)
    context_dim = p.get("context_dim")
    if isinstance(context_dim, (list, tuple)):
        if len(set(context_dim)) != 1:
            raise ValueError(f"original unet_config context_dim={context_dim}: per-level context widths are not "
                             "supported")
        context_dim = context_dim[0]
    num_heads, num_head_channels = p.get("num_heads", -1), p.get("num_head_channels", -1)
    legacy = p.get("legacy", True)
    num_classes, adm = p.get("num_classes"), p.get("adm_in_channels")
    if num_classes == "sequential":
        num_classes = None
    elif adm is not None:
        raise ValueError("original unet_config sets adm_in_channels without num_classes: 'sequential'")
    disabled = p.get("disable_self_attentions")
    kwargs = dict(in_channels=p["in_channels"], out_channels=p["out_channels"], model_channels=p["model_channels"],
                  channel_mult=mult, num_res_blocks=p["num_res_blocks"],
                  attention_resolutions=list(p["attention_resolutions"]), num_heads=num_heads,
                  num_head_channels=num_head_channels, dropout=float(p.get("dropout", 0.0)),
                  use_scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
                  resblock_updown=bool(p.get("resblock_updown", False)),
                  conv_resample=bool(p.get("conv_resample", True)), num_classes=num_classes, adm_in_channels=adm)
    if spatial:
        middle = p.get("transformer_depth_middle")
        kwargs.update(attention_block="transformer", transformer_depth=depth, context_dim=context_dim,
                      transformer_depth_middle=depth[-1] if middle is None else middle,
                      use_linear_in_transformer=bool(p.get("use_linear_in_transformer", False)),
                      disable_self_attentions=None if disabled is None else [bool(d) for d in disabled],
                      disable_middle_self_attn=bool(p.get("disable_middle_self_attn", False)))
    else:
        if context_dim is not None:
            raise ValueError("original unet_config has context_dim without use_spatial_transformer")
        # the original's output blocks pass num_heads_upsample only in legacy mode with num_heads
        upsample = p.get("num_heads_upsample", -1) if legacy and num_head_channels == -1 else -1
        kwargs.update(attention_block="plain", transformer_depth=[1] * len(mult), transformer_depth_middle=1,
                      context_dim=None, use_new_attention_order=bool(p.get("use_new_attention_order", False)),
                      num_heads_upsample=upsample)
    return kwargs


# ------------------------------------------------------------------------------------------ U-Net
_RESNET = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
           "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
_PLAIN_ATTN = {"norm.": "group_norm.", "proj_out.": "to_out.0."}  # qkv: split by _plain_attention_to_linear


def _unet_layer_map(ours: str, theirs: str, layer: nn.Module) -> dict[str, str]:
    if isinstance(layer, ResBlock):
        return {ours + a: theirs + b for a, b in _RESNET.items()}
    if isinstance(layer, AttentionBlock):
        return {ours + a: theirs + b for a, b in {**_PLAIN_ATTN, "to_": "to_"}.items()}
    return {ours: theirs}


def unet_key_map(model: UNet) -> dict[str, str]:
    """Our (= LDM) key prefixes → diffusers UNet2DConditionModel / UNet2DModel key prefixes (plain attention's
    fused qkv is split into to_q/to_k/to_v first: `_plain_attention_to_linear`)."""
    cfg = model.config
    if not cfg["conv_resample"]:
        raise ValueError("diffusers U-Nets need conv_resample=True")
    mapping = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
               "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    if cfg["num_classes"] is not None:
        mapping["label_emb."] = "class_embedding."
    elif cfg["adm_in_channels"] is not None:
        mapping.update({"label_emb.0.0.": "class_embedding.linear_1.", "label_emb.0.2.": "class_embedding.linear_2."})
    nrb, levels = cfg["num_res_blocks"], len(cfg["channel_mult"])
    for n, block in enumerate(model.input_blocks):
        if n == 0:
            continue
        level, j = divmod(n - 1, nrb + 1)
        for k, layer in enumerate(block):
            ours = f"input_blocks.{n}.{k}."
            if isinstance(layer, Downsample):
                mapping[ours + "op."] = f"down_blocks.{level}.downsamplers.0.conv."
            elif isinstance(layer, ResBlock) and layer.updown:
                mapping.update(_unet_layer_map(ours, f"down_blocks.{level}.downsamplers.0.", layer))
            elif isinstance(layer, (SpatialTransformer, AttentionBlock)):
                mapping.update(_unet_layer_map(ours, f"down_blocks.{level}.attentions.{j}.", layer))
            else:
                mapping.update(_unet_layer_map(ours, f"down_blocks.{level}.resnets.{j}.", layer))
    resnets = 0
    for k, layer in enumerate(model.middle_block):
        ours = f"middle_block.{k}."
        if isinstance(layer, (SpatialTransformer, AttentionBlock)):
            mapping.update(_unet_layer_map(ours, "mid_block.attentions.0.", layer))
        else:
            mapping.update(_unet_layer_map(ours, f"mid_block.resnets.{resnets}.", layer))
            resnets += 1
    for n, block in enumerate(model.output_blocks):
        up, j = divmod(n, nrb + 1)
        for k, layer in enumerate(block):
            ours = f"output_blocks.{n}.{k}."
            if isinstance(layer, Upsample):
                mapping[ours + "conv."] = f"up_blocks.{up}.upsamplers.0.conv."
            elif isinstance(layer, ResBlock) and k > 0:  # resblock_updown's upsampler
                mapping.update(_unet_layer_map(ours, f"up_blocks.{up}.upsamplers.0.", layer))
            elif isinstance(layer, (SpatialTransformer, AttentionBlock)):
                mapping.update(_unet_layer_map(ours, f"up_blocks.{up}.attentions.{j}.", layer))
            else:
                mapping.update(_unet_layer_map(ours, f"up_blocks.{up}.resnets.{j}.", layer))
    assert up == levels - 1
    return mapping


def _plain_attention_to_linear(state: dict[str, torch.Tensor], model: UNet) -> dict[str, torch.Tensor]:
    """Each AttentionBlock's fused 1x1 qkv → diffusers' to_q/to_k/to_v Linear weights (heads concatenated), in
    the block's head order (legacy: [h: q k v]..., new: [q: h...][k][v]); proj_out → a Linear weight."""
    out = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, AttentionBlock):
            continue
        for kind in ("weight", "bias"):
            fused = out.pop(f"{name}.qkv.{kind}")
            c = fused.shape[0] // 3
            split = fused.reshape((3, module.heads, c // module.heads, -1) if module.new_order
                                  else (module.heads, 3, c // module.heads, -1))
            for i, q in enumerate("qkv"):
                part = split[i] if module.new_order else split[:, i]
                out[f"{name}.to_{q}.{kind}"] = part.reshape(c, -1) if kind == "weight" else part.reshape(c)
        out[f"{name}.proj_out.weight"] = out[f"{name}.proj_out.weight"][..., 0]
    return out


def _plain_attention_from_linear(state: dict[str, torch.Tensor], model: UNet) -> dict[str, torch.Tensor]:
    """Inverse of `_plain_attention_to_linear` on keys already renamed back to our prefixes."""
    out = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, AttentionBlock) or f"{name}.to_q.weight" not in out:
            continue
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{name}.to_{q}.{kind}") for q in "qkv"]
            c = parts[0].shape[0]
            parts = [t.reshape(module.heads, c // module.heads, -1) for t in parts]
            fused = torch.stack(parts, dim=0 if module.new_order else 1).reshape(3 * c, -1)
            out[f"{name}.qkv.{kind}"] = fused[:, :, None] if kind == "weight" else fused.reshape(3 * c)
        out[f"{name}.proj_out.weight"] = out[f"{name}.proj_out.weight"][:, :, None]
    return out


def _heads_per_level(cfg: dict[str, Any]) -> list[int]:
    chans = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    if cfg["num_head_channels"] == -1:
        return [cfg["num_heads"]] * len(chans)
    return [c // cfg["num_head_channels"] for c in chans]


def _attention_levels(cfg: dict[str, Any]) -> list[bool]:
    depth = _per_level(cfg["transformer_depth"], len(cfg["channel_mult"]), "transformer_depth")
    return [2 ** i in cfg["attention_resolutions"] and depth[i] > 0 for i in range(len(cfg["channel_mult"]))]


def _unet2d_config_to_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """A plain-attention U-Net → diffusers' UNet2DModel config (its attention is the original AttentionBlock)."""
    if cfg["num_head_channels"] == -1:
        raise ValueError(f"diffusers' UNet2DModel sets heads by their width; this U-Net has num_heads="
                         f"{cfg['num_heads']} at every level: export with format='ldm' or 'ldmscale'")
    if cfg["adm_in_channels"] is not None:
        raise ValueError("diffusers' UNet2DModel has no vector (adm) conditioning")
    if cfg["use_scale_shift_norm"] and cfg["transformer_depth_middle"] > 0:
        raise ValueError("diffusers' UNet2DModel drops the mid-block attention's GroupNorm under scale-shift norm: "
                         "export with format='ldm' or 'ldmscale'")
    attn, updown = _attention_levels(cfg), cfg["resblock_updown"]
    plain_down = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    out = {"_class_name": "UNet2DModel", "sample_size": 64, "in_channels": cfg["in_channels"],
           "out_channels": cfg["out_channels"],
           "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attn],
           "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attn)],
           "block_out_channels": [cfg["model_channels"] * m for m in cfg["channel_mult"]],
           "layers_per_block": cfg["num_res_blocks"], "attention_head_dim": cfg["num_head_channels"],
           "add_attention": cfg["transformer_depth_middle"] > 0, "norm_num_groups": cfg["norm_num_groups"],
           "norm_eps": 1e-5, "resnet_time_scale_shift": "scale_shift" if cfg["use_scale_shift_norm"] else "default",
           "downsample_type": "resnet" if updown else "conv", "upsample_type": "resnet" if updown else "conv",
           "flip_sin_to_cos": True, "freq_shift": 0, "dropout": cfg["dropout"]}
    if cfg["num_classes"] is not None:
        out["num_class_embeds"] = cfg["num_classes"]
    return out


def unet_config_to_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg["attention_block"] == "plain":
        return _unet2d_config_to_diffusers(cfg)
    if cfg["context_dim"] is None:
        raise ValueError("diffusers' UNet2DConditionModel needs a cross-attention context (model.context_dim)")
    if cfg["resblock_updown"] or cfg["disable_middle_self_attn"]:
        raise ValueError("diffusers' UNet2DConditionModel has no resblock_updown / disable_middle_self_attn")
    depth = list(cfg["transformer_depth"])
    attn = _attention_levels(cfg)
    middle = cfg["transformer_depth_middle"]
    if middle == 0 or (attn[-1] and middle != depth[-1]):
        raise ValueError("diffusers' mid block uses the last level's transformer depth (and needs one)")
    depth = [d if a else 1 for d, a in zip(depth, attn)][:-1] + [middle]  # unused levels: any value
    out = {
        "_class_name": "UNet2DConditionModel", "sample_size": 64,
        "in_channels": cfg["in_channels"], "out_channels": cfg["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [cfg["model_channels"] * m for m in cfg["channel_mult"]],
        "layers_per_block": cfg["num_res_blocks"], "attention_head_dim": _heads_per_level(cfg),
        "transformer_layers_per_block": depth, "cross_attention_dim": cfg["context_dim"],
        "use_linear_projection": cfg["use_linear_in_transformer"], "norm_num_groups": cfg["norm_num_groups"],
        "norm_eps": 1e-5, "resnet_time_scale_shift": "scale_shift" if cfg["use_scale_shift_norm"] else "default",
        "flip_sin_to_cos": True, "freq_shift": 0, "dropout": cfg["dropout"], "upcast_attention": False,
    }
    if cfg["disable_self_attentions"] is not None:
        out["only_cross_attention"] = [bool(d) for d in cfg["disable_self_attentions"]]
    if cfg["num_classes"] is not None:
        out["num_class_embeds"] = cfg["num_classes"]
    if cfg["adm_in_channels"] is not None:
        out.update(class_embed_type="projection", projection_class_embeddings_input_dim=cfg["adm_in_channels"])
    return out


def _check_diffusers(dcfg: dict[str, Any], expected: tuple[tuple[str, Any], ...]) -> None:
    for key, want in expected:
        if dcfg.get(key, want) != want:
            raise ValueError(f"diffusers config {key}={dcfg[key]!r} is not supported (expected {want!r})")


def _unet2d_config_from_diffusers(dcfg: dict[str, Any]) -> dict[str, Any]:
    """A diffusers UNet2DModel config → our plain-attention UNet keyword arguments."""
    _check_diffusers(dcfg, (("flip_sin_to_cos", True), ("freq_shift", 0), ("center_input_sample", False),
                            ("act_fn", "silu"), ("time_embedding_type", "positional"), ("class_embed_type", None),
                            ("time_embedding_dim", None), ("mid_block_scale_factor", 1), ("downsample_padding", 1),
                            ("norm_eps", 1e-5), ("mid_block_type", "UNetMidBlock2D")))
    chans = list(dcfg["block_out_channels"])
    mc, groups = chans[0], dcfg.get("norm_num_groups", 32)
    if dcfg.get("attn_norm_num_groups") not in (None, groups):
        raise ValueError("diffusers config attn_norm_num_groups != norm_num_groups is not supported")
    updown = dcfg.get("downsample_type", "conv") == "resnet"
    if updown != (dcfg.get("upsample_type", "conv") == "resnet"):
        raise ValueError("diffusers config: downsample_type and upsample_type must both be 'resnet' or 'conv'")
    attn = ["Attn" in t for t in dcfg["down_block_types"]]
    head = dcfg.get("attention_head_dim", 8)
    kwargs = dict(in_channels=dcfg["in_channels"], out_channels=dcfg["out_channels"], model_channels=mc,
                  channel_mult=[c // mc for c in chans], num_res_blocks=dcfg["layers_per_block"],
                  attention_resolutions=[2 ** i for i, a in enumerate(attn) if a],
                  num_heads=1 if head is None else -1, num_head_channels=-1 if head is None else head,
                  transformer_depth=[int(a) for a in attn], transformer_depth_middle=int(dcfg.get("add_attention", True)),
                  context_dim=None, attention_block="plain", resblock_updown=updown,
                  use_scale_shift_norm=dcfg.get("resnet_time_scale_shift", "default") == "scale_shift",
                  norm_num_groups=groups, dropout=dcfg.get("dropout", 0.0))
    if dcfg.get("num_class_embeds") is not None:
        kwargs["num_classes"] = dcfg["num_class_embeds"]
    return kwargs


def unet_config_from_diffusers(dcfg: dict[str, Any]) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel / UNet2DModel config → our UNet keyword arguments (refuses what we cannot
    mirror)."""
    if dcfg.get("_class_name") == "UNet2DModel":
        return _unet2d_config_from_diffusers(dcfg)
    _check_diffusers(dcfg, (("flip_sin_to_cos", True), ("freq_shift", 0), ("center_input_sample", False),
                            ("act_fn", "silu"), ("time_embedding_type", "positional"), ("encoder_hid_dim", None),
                            ("time_cond_proj_dim", None), ("class_embeddings_concat", False)))
    chans = list(dcfg["block_out_channels"])
    mc, levels = chans[0], len(chans)
    heads = dcfg.get("num_attention_heads") or dcfg.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    head_dims = [c // h for c, h in zip(chans, heads)]
    if len(set(heads)) == 1:
        num_heads, num_head_channels = heads[0], -1
    elif len(set(head_dims)) == 1:
        num_heads, num_head_channels = -1, head_dims[0]
    else:
        raise ValueError(f"diffusers attention_head_dim={heads} fits neither a fixed head count nor head width")
    depth = dcfg.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * levels
    middle = depth[-1]
    attn_res = [2 ** i for i, t in enumerate(dcfg["down_block_types"]) if "CrossAttn" in t]
    depth = [d if 2 ** i in attn_res else 0 for i, d in enumerate(depth)]
    only_cross = dcfg.get("only_cross_attention", False)
    only_cross = list(only_cross) if isinstance(only_cross, (list, tuple)) else [only_cross] * levels
    lpb = dcfg["layers_per_block"]
    kwargs = dict(in_channels=dcfg["in_channels"], out_channels=dcfg["out_channels"], model_channels=mc,
                  channel_mult=[c // mc for c in chans], num_res_blocks=lpb if isinstance(lpb, int) else lpb[0],
                  attention_resolutions=attn_res, num_heads=num_heads, num_head_channels=num_head_channels,
                  transformer_depth=depth, transformer_depth_middle=middle,
                  context_dim=dcfg.get("cross_attention_dim"),
                  use_linear_in_transformer=bool(dcfg.get("use_linear_projection", False)),
                  use_scale_shift_norm=dcfg.get("resnet_time_scale_shift", "default") == "scale_shift",
                  norm_num_groups=dcfg.get("norm_num_groups", 32), dropout=dcfg.get("dropout", 0.0),
                  disable_self_attentions=[bool(o) for o in only_cross] if any(only_cross) else None)
    if dcfg.get("num_class_embeds") is not None:
        kwargs["num_classes"] = dcfg["num_class_embeds"]
    if dcfg.get("class_embed_type") == "projection" or dcfg.get("addition_embed_type") == "text_time":
        kwargs["adm_in_channels"] = dcfg["projection_class_embeddings_input_dim"]
    return kwargs


# Families whose released configs all fix the same heads: (model_channels, channel_mult, context_dim, linear
# projections) → (name, heads). Anything else with attention needs its config (head counts leave no trace).
PINNED_HEADS = {
    (320, (1, 2, 4, 4), 768, False): ("SD 1.x (incl. inpainting)", dict(num_heads=8, num_head_channels=-1)),
    (320, (1, 2, 4, 4), 1024, True): ("SD 2.x (incl. 2-inpainting, depth, unCLIP)",
                                      dict(num_heads=-1, num_head_channels=64)),
    (320, (1, 2, 4), 2048, True): ("SDXL base", dict(num_heads=-1, num_head_channels=64)),
    (384, (1, 2, 4, 4), 1280, True): ("SDXL refiner", dict(num_heads=-1, num_head_channels=64)),
}


class AmbiguousCheckpointError(ValueError):
    """A checkpoint without a config whose structure the weights do not determine (heads, above all)."""


def _layer_kind(state: dict[str, torch.Tensor], prefix: str) -> str:
    """What the layer at `prefix` is: plain | transformer | resblock | upsample | none."""
    if prefix + "qkv.weight" in state:
        return "plain"
    if prefix + "proj_in.weight" in state:
        return "transformer"
    if prefix + "in_layers.0.weight" in state:
        return "resblock"
    if prefix + "conv.weight" in state:
        return "upsample"
    return "none"


def _transformer_info(state: dict[str, torch.Tensor], prefix: str, ch: int, context_dim: Optional[int]):
    """(depth, self-attention disabled: True | False | None when undecidable) of a SpatialTransformer."""
    depth = len({int(k[len(prefix):].split(".")[1]) for k in state if k.startswith(prefix + "transformer_blocks.")})
    attn1_in = state[prefix + "transformer_blocks.0.attn1.to_k.weight"].shape[1]
    inner = state[prefix + "transformer_blocks.0.attn1.to_q.weight"].shape[0]
    disabled = None if context_dim == inner else attn1_in != inner
    return depth, disabled


def unet_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer an LDM U-Net's structure from its weights (an LDM file carries no config of its own).

    Head counts leave no trace in the weights: they are set only for the PINNED_HEADS families and are None
    otherwise (load_unet then refuses, asking for the original config). So is a level's disable_self_attn
    where the level's width equals the context width."""
    mc = state["input_blocks.0.0.weight"].shape[0]
    n_input = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))
    n_output = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("output_blocks."))
    # levels = upsamplers + 1, counted in the output path: a conv Upsample or (resblock_updown) an up-ResBlock
    # after a block's first layer; param-free resamplers (conv_resample=False) leave gaps in the input indices
    ups, updown = set(), False
    for n in range(n_output):
        kinds = [_layer_kind(state, f"output_blocks.{n}.{k}.") for k in (1, 2)]
        if "upsample" in kinds or "resblock" in kinds:
            ups.add(n)
            updown = updown or "resblock" in kinds
    gaps = n_input - len({int(k.split(".")[1]) for k in state if k.startswith("input_blocks.")})
    levels = 1 + (len(ups) or gaps)
    nrb = n_output // levels - 1
    if n_input != levels * (nrb + 1) or n_output != levels * (nrb + 1):
        raise ValueError(f"cannot infer the U-Net's levels: {n_input} input and {n_output} output blocks for "
                         f"{levels} levels")
    ctx_key = next((k for k in state if k.endswith("attn2.to_k.weight")), None)
    context_dim = state[ctx_key].shape[1] if ctx_key else None
    mult, attn, depth, disabled, kinds = [], [], [], [], set()
    for level in range(levels):
        n = 1 + level * (nrb + 1)
        mult.append(state[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0] // mc)
        kind = _layer_kind(state, f"input_blocks.{n}.1.")
        if kind == "transformer":
            d, off = _transformer_info(state, f"input_blocks.{n}.1.", mc * mult[-1], context_dim)
        else:
            d, off = int(kind == "plain"), False
        depth.append(d)
        disabled.append(off)
        if d:
            attn.append(2 ** level)
            kinds.add(kind)
    middle_kind = _layer_kind(state, "middle_block.1.") if "middle_block.2.in_layers.0.weight" in state else "none"
    middle, middle_off = 0, False
    if middle_kind == "transformer":
        middle, middle_off = _transformer_info(state, "middle_block.1.", mc * mult[-1], context_dim)
    elif middle_kind == "plain":
        middle = 1
    kinds.discard("none")
    kinds |= {middle_kind} - {"none"}
    if len(kinds) > 1:
        raise ValueError("U-Net mixes plain attention blocks and transformers: not an LDM/SD U-Net")
    plain = kinds == {"plain"}
    proj = next((state[k] for k in state if k.endswith("proj_in.weight")), None)
    linear = proj is not None and proj.dim() == 2
    kwargs = dict(in_channels=state["input_blocks.0.0.weight"].shape[1], out_channels=state["out.2.weight"].shape[0],
                  model_channels=mc, channel_mult=mult, num_res_blocks=nrb, attention_resolutions=attn,
                  num_heads=None, num_head_channels=None, transformer_depth=depth, transformer_depth_middle=middle,
                  context_dim=context_dim, use_linear_in_transformer=linear, resblock_updown=updown,
                  conv_resample=not gaps, attention_block="plain" if plain else "transformer",
                  use_scale_shift_norm=state["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * mc * mult[0])
    if any(disabled) or middle_off:  # the x4 upscaler's disable_self_attentions; None: undecidable
        kwargs.update(disable_self_attentions=disabled, disable_middle_self_attn=middle_off)
    if not kinds:  # no attention anywhere: heads do not matter
        kwargs.update(num_heads=1, num_head_channels=-1)
    elif not plain and (pinned := PINNED_HEADS.get((mc, tuple(mult), context_dim, linear))):
        kwargs.update(pinned[1])
    if "label_emb.weight" in state:
        kwargs["num_classes"] = state["label_emb.weight"].shape[0]
    elif "label_emb.0.0.weight" in state:
        kwargs["adm_in_channels"] = state["label_emb.0.0.weight"].shape[1]
    return kwargs


def resolve_unet_config(config: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """`config` with `overrides` applied; refuses what is still undetermined (None) instead of guessing."""
    config = {**config, **overrides}
    if "num_heads" in overrides or "num_head_channels" in overrides:  # one of the two given: the other is off
        for key in ("num_heads", "num_head_channels"):
            config[key] = -1 if config[key] is None else config[key]
    unknown = []
    if config.get("num_heads") is None or config.get("num_head_channels") is None:
        unknown.append("the attention heads (num_heads / num_head_channels)")
    disabled = config.get("disable_self_attentions")
    if disabled is not None and None in disabled:
        unknown.append(f"disable_self_attentions at levels {[i for i, d in enumerate(disabled) if d is None]}")
    if "disable_middle_self_attn" in config and config["disable_middle_self_attn"] is None:
        unknown.append("disable_middle_self_attn")
    if unknown:
        families = "; ".join(f"{name}: {heads}" for name, heads in PINNED_HEADS.values())
        raise AmbiguousCheckpointError(
            f"{source}: {' and '.join(unknown)} cannot be read from the weights and this U-Net is not one of the "
            f"families that fix them ({families}). Pass the checkpoint's original .yaml: "
            f"load_unet(path, original_config='config.yaml') or tools/convert_checkpoint.py unet {source} OUT "
            f"--original-config config.yaml --to ...")
    return config


def _read_unet(path: Path) -> tuple[Optional[dict[str, Any]], dict[str, torch.Tensor], str]:
    """(config if the checkpoint carries one, LDM-named weights, source). Nothing is inferred here."""
    if path.is_dir():
        if ours := _ours_dir(path, "unet"):
            meta = json.loads((ours / OUR_CONFIG).read_text())
            return meta["config"], read_weights(ours / OUR_WEIGHTS), str(ours)
        if folder := _diffusers_dir(path, "unet"):
            dcfg = json.loads((folder / "config.json").read_text())
            if dcfg["_class_name"] not in ("UNet2DConditionModel", "UNet2DModel"):
                raise ValueError(f"{folder}/config.json: {dcfg['_class_name']} is neither a UNet2DConditionModel "
                                 "nor a UNet2DModel")
            kwargs = unet_config_from_diffusers(dcfg)
            with torch.device("meta"):
                skeleton = UNet(**kwargs)
            inverse = {v: k for k, v in unet_key_map(skeleton).items()}
            inverse.update({"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."})
            state = _plain_attention_from_linear(_rename(_load_diffusers_weights(folder), inverse), skeleton)
            return kwargs, state, str(folder)
        raise FileNotFoundError(f"{path}: neither an ldmscale export, a diffusers unet folder nor a pipeline folder")
    state, extra = _read_tensors(path)
    return extra.get("unet"), _strip(state, UNET_PREFIX), str(path)


def load_unet_weights(model: UNet, path: str | Path) -> UNet:
    """Load weights from any supported checkpoint into an existing U-Net (keys must match exactly)."""
    _, state, source = _read_unet(Path(path))
    _strict_load(model, state, source)
    return model


def load_unet(path: str | Path, original_config: Any = None, **overrides: Any) -> UNet:
    """A U-Net in eval mode from a diffusers folder (model or pipeline), an LDM/SD file or our export.

    original_config: the .yaml (path or parsed dict) shipped with an LDM/SD file; its structure is taken from
    there. Without it an LDM/SD file's structure is inferred from the weights, and a checkpoint whose heads
    the weights do not determine is refused (AmbiguousCheckpointError) unless `overrides` give them."""
    path = Path(path)
    config, state, source = _read_unet(path)
    if _original_config_for_file(path, original_config) is not None:
        config = unet_config_from_original(original_config)
    elif config is None:
        config = unet_config_from_state_dict(state)
    model = UNet(**resolve_unet_config(config, overrides, source))
    _strict_load(model, state, source)
    return model.eval()


def save_unet(model: UNet, path: str | Path, format: str = "ldmscale") -> Path:
    """Save as our export (folder), a diffusers `unet/` folder, or an LDM file (.ckpt or .safetensors)."""
    model = getattr(model, "_orig_mod", model)
    return _save(model, "unet", model.config, unet_config_to_diffusers, unet_key_map, UNET_PREFIX, path, format,
                 _plain_attention_to_linear)


