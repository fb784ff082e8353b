"""Checkpoint interop: original LDM/SD files (.ckpt via weights_only, .safetensors), diffusers folders and
our own export (model.safetensors + config.json), for the U-Net and AutoencoderKL/VQModel.

Our modules use LDM's parameter names, so the LDM format is a prefix away; diffusers names are produced
by a prefix map generated from the model's own structure. Arbitrary pickles are never loaded."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldmscale.models.attention import SpatialTransformer
from ldmscale.models.autoencoder import AutoencoderKL, VQModel
from ldmscale.models.unet import Downsample, ResBlock, UNet, Upsample

UNET_PREFIX = "model.diffusion_model."
AE_PREFIX = "first_stage_model."
FORMATS = ("diffusers", "ldm", "ldmscale")
def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors' save_file, then the permissions of any new file (safetensors writes 0600): exports
    are read by other people and jobs."""
    import os

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


OUR_CONFIG = "config.json"
OUR_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class CheckpointMismatchError(KeyError):
    """A checkpoint's keys do not match the model; the message lists missing and unexpected keys."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def _strict_load(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        def show(keys):
            return ", ".join(keys[:20]) + (f" ... (+{len(keys) - 20})" if len(keys) > 20 else "")
        raise CheckpointMismatchError(
            f"{source} does not match {type(model).__name__}: missing keys [{show(missing)}]; "
            f"unexpected keys [{show(unexpected)}]; shape mismatches [{show(wrong_shape)}]")
    model.load_state_dict(state, strict=True)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint file → (tensors, our config if it carries one). Pickles only through weights_only."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        extra = json.loads(metadata["ldmscale_config"]) if "ldmscale_config" in metadata else {}
        return load_file(str(path)), extra
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError for anything but tensors and plain containers
        raise ValueError(f"{path}: not a weights-only checkpoint (arbitrary pickles are never loaded): {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    extra = obj.get("ldmscale_config") or {}
    state = obj.get("state_dict", obj)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, extra


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _rename(state: dict[str, torch.Tensor], prefix_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by their longest matching prefix; unmatched keys are kept (the strict load names them)."""
    ordered = sorted(prefix_map, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        for src in ordered:
            if key.startswith(src):
                key = prefix_map[src] + key[len(src):]
                break
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------ U-Net
_RESNET = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
           "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}


def _unet_layer_map(ours: str, theirs: str, layer: nn.Module) -> dict[str, str]:
    if isinstance(layer, ResBlock):
        if layer.updown:
            raise ValueError("diffusers has no resblock_updown U-Net: export with format='ldm' or 'ldmscale'")
        return {ours + a: theirs + b for a, b in _RESNET.items()}
    return {ours: theirs}


def unet_key_map(model: UNet) -> dict[str, str]:
    """Our (= LDM) key prefixes → diffusers UNet2DConditionModel key prefixes."""
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
            elif isinstance(layer, SpatialTransformer):
                mapping[ours] = f"down_blocks.{level}.attentions.{j}."
            else:
                mapping.update(_unet_layer_map(ours, f"down_blocks.{level}.resnets.{j}.", layer))
    resnets = 0
    for k, layer in enumerate(model.middle_block):
        ours = f"middle_block.{k}."
        if isinstance(layer, SpatialTransformer):
            mapping[ours] = "mid_block.attentions.0."
        else:
            mapping.update(_unet_layer_map(ours, f"mid_block.resnets.{resnets}.", layer))
            resnets += 1
    for n, block in enumerate(model.output_blocks):
        up, j = divmod(n, nrb + 1)
        for k, layer in enumerate(block):
            ours = f"output_blocks.{n}.{k}."
            if isinstance(layer, Upsample):
                mapping[ours + "conv."] = f"up_blocks.{up}.upsamplers.0.conv."
            elif isinstance(layer, SpatialTransformer):
                mapping[ours] = f"up_blocks.{up}.attentions.{j}."
            else:
                mapping.update(_unet_layer_map(ours, f"up_blocks.{up}.resnets.{j}.", layer))
    assert up == levels - 1
    return mapping


def _heads_per_level(cfg: dict[str, Any]) -> list[int]:
    chans = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    if cfg["num_head_channels"] == -1:
        return [cfg["num_heads"]] * len(chans)
    return [c // cfg["num_head_channels"] for c in chans]


def unet_config_to_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    levels = len(cfg["channel_mult"])
    if cfg["context_dim"] is None:
        raise ValueError("diffusers' UNet2DConditionModel needs a cross-attention context (model.context_dim)")
    depth = list(cfg["transformer_depth"])
    attn = [2 ** i in cfg["attention_resolutions"] and depth[i] > 0 for i in range(levels)]
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
    if cfg["num_classes"] is not None:
        out["num_class_embeds"] = cfg["num_classes"]
    if cfg["adm_in_channels"] is not None:
        out.update(class_embed_type="projection", projection_class_embeddings_input_dim=cfg["adm_in_channels"])
    return out


def unet_config_from_diffusers(dcfg: dict[str, Any]) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config → our UNet keyword arguments (refuses what we cannot mirror)."""
    for key, want in (("flip_sin_to_cos", True), ("freq_shift", 0), ("center_input_sample", False),
                      ("act_fn", "silu"), ("time_embedding_type", "positional"), ("encoder_hid_dim", None),
                      ("time_cond_proj_dim", None), ("class_embeddings_concat", False)):
        if dcfg.get(key, want) != want:
            raise ValueError(f"diffusers config {key}={dcfg[key]!r} is not supported (expected {want!r})")
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
    lpb = dcfg["layers_per_block"]
    kwargs = dict(in_channels=dcfg["in_channels"], out_channels=dcfg["out_channels"], model_channels=mc,
                  channel_mult=[c // mc for c in chans], num_res_blocks=lpb if isinstance(lpb, int) else lpb[0],
                  attention_resolutions=attn_res, num_heads=num_heads, num_head_channels=num_head_channels,
                  transformer_depth=depth, transformer_depth_middle=middle,
                  context_dim=dcfg.get("cross_attention_dim"),
                  use_linear_in_transformer=bool(dcfg.get("use_linear_projection", False)),
                  use_scale_shift_norm=dcfg.get("resnet_time_scale_shift", "default") == "scale_shift",
                  norm_num_groups=dcfg.get("norm_num_groups", 32), dropout=dcfg.get("dropout", 0.0))
    if dcfg.get("num_class_embeds") is not None:
        kwargs["num_classes"] = dcfg["num_class_embeds"]
    if dcfg.get("class_embed_type") == "projection" or dcfg.get("addition_embed_type") == "text_time":
        kwargs["adm_in_channels"] = dcfg["projection_class_embeddings_input_dim"]
    return kwargs


def unet_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer an LDM U-Net's structure from its weights (an LDM file carries no config of its own).

    Head counts leave no trace in the weights: SD1's 8 heads are assumed for 768-d context, 64-channel
    heads (SD2/SDXL) otherwise; save with `save_unet(..., "ldm")` to carry the exact config."""
    mc = state["input_blocks.0.0.weight"].shape[0]
    n_input = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))
    ops = {int(k.split(".")[1]) for k in state if k.startswith("input_blocks.") and ".op." in k}
    levels = len(ops) + 1
    nrb = (n_input - 1 - len(ops)) // levels
    mult, attn, depth = [], [], []
    for level in range(levels):
        n = 1 + level * (nrb + 1)
        mult.append(state[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0] // mc)
        blocks = {int(k.split(".")[4]) for k in state if k.startswith(f"input_blocks.{n}.1.transformer_blocks.")}
        depth.append(len(blocks))
        if blocks:
            attn.append(2 ** level)
    mid_blocks = {int(k.split(".")[3]) for k in state if k.startswith("middle_block.1.transformer_blocks.")}
    ctx_key = next((k for k in state if k.endswith("attn2.to_k.weight")), None)
    context_dim = state[ctx_key].shape[1] if ctx_key else None
    proj = next((state[k] for k in state if k.endswith("proj_in.weight")), None)
    kwargs = dict(in_channels=state["input_blocks.0.0.weight"].shape[1], out_channels=state["out.2.weight"].shape[0],
                  model_channels=mc, channel_mult=mult, num_res_blocks=nrb, attention_resolutions=attn,
                  num_heads=8 if context_dim == 768 else -1, num_head_channels=-1 if context_dim == 768 else 64,
                  transformer_depth=depth, transformer_depth_middle=len(mid_blocks), context_dim=context_dim,
                  use_linear_in_transformer=proj is not None and proj.dim() == 2,
                  use_scale_shift_norm=state["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * mc * mult[0])
    if "label_emb.weight" in state:
        kwargs["num_classes"] = state["label_emb.weight"].shape[0]
    elif "label_emb.0.0.weight" in state:
        kwargs["adm_in_channels"] = state["label_emb.0.0.weight"].shape[1]
    return kwargs


# ------------------------------------------------------------------------------------------ autoencoder
def autoencoder_key_map(model: AutoencoderKL | VQModel) -> dict[str, str]:
    """Our (= LDM) key prefixes → diffusers AutoencoderKL key prefixes."""
    levels = len(model.config["ch_mult"])
    mapping = {"encoder.norm_out.": "encoder.conv_norm_out.", "decoder.norm_out.": "decoder.conv_norm_out."}
    for part, coder in (("encoder", model.encoder), ("decoder", model.decoder)):
        attn = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
        for src, dst in attn.items():
            mapping[f"{part}.mid.attn_1.{src}"] = f"{part}.mid_block.attentions.0.{dst}"
        mapping[f"{part}.mid.block_1."] = f"{part}.mid_block.resnets.0."
        mapping[f"{part}.mid.block_2."] = f"{part}.mid_block.resnets.1."
        for i, level in enumerate(coder.down if part == "encoder" else coder.up):
            if len(level.attn):
                raise ValueError("diffusers' AutoencoderKL has no attention outside the mid block")
            if part == "encoder":
                ours, theirs, sampler = f"encoder.down.{i}.", f"encoder.down_blocks.{i}.", "downsample"
            else:
                ours, theirs, sampler = f"decoder.up.{i}.", f"decoder.up_blocks.{levels - 1 - i}.", "upsample"
            for j in range(len(level.block)):
                mapping[f"{ours}block.{j}."] = f"{theirs}resnets.{j}."
                mapping[f"{ours}block.{j}.nin_shortcut."] = f"{theirs}resnets.{j}.conv_shortcut."
            mapping[f"{ours}{sampler}.conv."] = f"{theirs}{sampler}rs.0.conv."
    return mapping


def _is_vae_attn_proj(key: str) -> bool:
    return ".mid.attn_1." in key and key.endswith("weight") and ".norm." not in key


def autoencoder_config_to_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg["kind"] != "kl":
        raise ValueError("diffusers export covers AutoencoderKL; save a VQModel with format='ldm' or 'ldmscale'")
    if cfg["z_channels"] != cfg["embed_dim"]:
        raise ValueError("diffusers' AutoencoderKL needs z_channels == embed_dim")
    if cfg.get("bicubic_skip"):
        raise ValueError("diffusers' AutoencoderKL has no bicubic skip (autoencoder.bicubic_skip): use format='ldmscale'")
    levels = len(cfg["ch_mult"])
    return {"_class_name": "AutoencoderKL", "in_channels": cfg["in_channels"], "out_channels": cfg["out_ch"],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [cfg["ch"] * m for m in cfg["ch_mult"]], "layers_per_block": cfg["num_res_blocks"],
            "act_fn": "silu", "latent_channels": cfg["z_channels"], "norm_num_groups": 32,
            "sample_size": cfg["resolution"], "scaling_factor": cfg["scale_factor"],
            "shift_factor": cfg["shift_factor"] or None}


def autoencoder_config_from_diffusers(dcfg: dict[str, Any]) -> dict[str, Any]:
    if dcfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"diffusers {dcfg.get('_class_name')} is not an AutoencoderKL")
    if dcfg.get("norm_num_groups", 32) != 32 or dcfg.get("act_fn", "silu") != "silu" \
            or not dcfg.get("mid_block_add_attention", True):
        raise ValueError("diffusers AutoencoderKL with non-LDM norm/activation/mid-attention is not supported")
    chans = list(dcfg["block_out_channels"])
    return dict(kind="kl", ch=chans[0], ch_mult=[c // chans[0] for c in chans],
                num_res_blocks=dcfg["layers_per_block"], attn_resolutions=[], in_channels=dcfg["in_channels"],
                out_ch=dcfg["out_channels"], resolution=dcfg.get("sample_size", 256),
                z_channels=dcfg["latent_channels"], embed_dim=dcfg["latent_channels"],
                scale_factor=dcfg.get("scaling_factor", 1.0) or 1.0, shift_factor=dcfg.get("shift_factor") or 0.0)


def autoencoder_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    nrb = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    mult = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
    z = state["decoder.conv_in.weight"].shape[1]
    kwargs = dict(ch=ch, ch_mult=mult, num_res_blocks=nrb, attn_resolutions=[],
                  in_channels=state["encoder.conv_in.weight"].shape[1], out_ch=state["decoder.conv_out.weight"].shape[0],
                  z_channels=z, embed_dim=state["post_quant_conv.weight"].shape[1])
    if any(".attn." in k for k in state):
        raise ValueError("LDM autoencoder with attention outside the mid block: save it with its config "
                         "(save_autoencoder(..., 'ldm')) so attn_resolutions is known")
    if "quantize.embedding.weight" in state:
        kwargs.update(kind="vq", n_embed=state["quantize.embedding.weight"].shape[0])
    else:
        kwargs["kind"] = "kl"
    return kwargs


def _build_autoencoder(cfg: dict[str, Any]) -> AutoencoderKL | VQModel:
    cfg = dict(cfg)
    kind = cfg.pop("kind", "kl")
    cfg.pop("double_z", None)
    if kind == "vq":
        return VQModel(**cfg)
    return AutoencoderKL(**cfg)


# ------------------------------------------------------------------------------------------ load / save
def _diffusers_dir(path: Path, sub: str) -> Optional[Path]:
    for candidate in (path, path / sub):
        config = candidate / "config.json"
        if config.is_file() and "_class_name" in json.loads(config.read_text()):
            return candidate
    return None


def _ours_dir(path: Path, kind: str) -> Optional[Path]:
    config = path / OUR_CONFIG
    if config.is_file():
        meta = json.loads(config.read_text())
        if meta.get("ldmscale") == kind:
            return path
    return None


def _load_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    file = folder / DIFFUSERS_WEIGHTS
    if file.is_file():
        return load_file(str(file))
    binary = folder / "diffusion_pytorch_model.bin"
    if binary.is_file():
        return _read_tensors(binary)[0]
    raise FileNotFoundError(f"{folder}: no {DIFFUSERS_WEIGHTS}")


def _read_unet(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    if path.is_dir():
        if ours := _ours_dir(path, "unet"):
            meta = json.loads((ours / OUR_CONFIG).read_text())
            return meta["config"], load_file(str(ours / OUR_WEIGHTS)), str(ours)
        if folder := _diffusers_dir(path, "unet"):
            dcfg = json.loads((folder / "config.json").read_text())
            if dcfg["_class_name"] != "UNet2DConditionModel":
                raise ValueError(f"{folder}/config.json: {dcfg['_class_name']} is not a UNet2DConditionModel")
            kwargs = unet_config_from_diffusers(dcfg)
            with torch.device("meta"):
                skeleton = UNet(**kwargs)
            inverse = {v: k for k, v in unet_key_map(skeleton).items()}
            inverse.update({"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."})
            return kwargs, _rename(_load_diffusers_weights(folder), inverse), str(folder)
        raise FileNotFoundError(f"{path}: neither an ldmscale export, a diffusers unet folder nor a pipeline folder")
    state, extra = _read_tensors(path)
    state = _strip(state, UNET_PREFIX)
    config = extra.get("unet") or unet_config_from_state_dict(state)
    return config, state, str(path)


def load_unet_weights(model: UNet, path: str | Path) -> UNet:
    """Load weights from any supported checkpoint into an existing U-Net (keys must match exactly)."""
    _, state, source = _read_unet(Path(path))
    _strict_load(model, state, source)
    return model


def load_unet(path: str | Path, **overrides: Any) -> UNet:
    """A U-Net in eval mode from a diffusers folder (model or pipeline), an LDM/SD file or our export."""
    config, state, source = _read_unet(Path(path))
    model = UNet(**{**config, **overrides})
    _strict_load(model, state, source)
    return model.eval()


STAGE1_EXPORT = "autoencoder"  # a stage-1 run directory keeps its export here (ldmscale.stage1)


def _read_autoencoder(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    if path.is_dir() and (path / STAGE1_EXPORT / OUR_CONFIG).is_file():
        path = path / STAGE1_EXPORT  # `autoencoder.weights=<stage-1 run dir>`
    if path.is_dir():
        if ours := _ours_dir(path, "autoencoder"):
            meta = json.loads((ours / OUR_CONFIG).read_text())
            return meta["config"], load_file(str(ours / OUR_WEIGHTS)), str(ours)
        if folder := _diffusers_dir(path, "vae"):
            config = autoencoder_config_from_diffusers(json.loads((folder / "config.json").read_text()))
            with torch.device("meta"):
                skeleton = _build_autoencoder(config)
            state = _rename(_load_diffusers_weights(folder), {v: k for k, v in autoencoder_key_map(skeleton).items()})
            state = {k: v[:, :, None, None] if _is_vae_attn_proj(k) and v.dim() == 2 else v for k, v in state.items()}
            return config, state, str(folder)
        raise FileNotFoundError(f"{path}: neither an ldmscale export, a diffusers vae folder nor a pipeline folder")
    state, extra = _read_tensors(path)
    state = _strip(state, AE_PREFIX)
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # LDM files carry the GAN loss too
    config = extra.get("autoencoder") or autoencoder_config_from_state_dict(state)
    return config, state, str(path)


def load_autoencoder_weights(model: AutoencoderKL | VQModel, path: str | Path) -> AutoencoderKL | VQModel:
    _, state, source = _read_autoencoder(Path(path))
    if isinstance(model, VQModel) and not any(k.endswith("quantize.codebook_proj.weight") for k in state):
        model.fold()  # a config with codebook=linear reading plain codes (every export is folded)
    _strict_load(model, state, source)
    return model


def load_autoencoder(path: str | Path, **overrides: Any) -> AutoencoderKL | VQModel:
    """An autoencoder in eval mode from a diffusers folder (vae or pipeline), an LDM/SD file or our export."""
    config, state, source = _read_autoencoder(Path(path))
    model = _build_autoencoder({**config, **overrides})
    _strict_load(model, state, source)
    return model.eval()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _save(model: nn.Module, kind: str, config: dict[str, Any], diffusers_config: Any, key_map: Any,
          prefix: str, path: str | Path, format: str, transform=None) -> Path:
    path = Path(path)
    state = _contiguous(model.state_dict())
    if format == "ldmscale":
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(state, path / OUR_WEIGHTS)
        (path / OUR_CONFIG).write_text(json.dumps({"ldmscale": kind, "config": config}, indent=2))
    elif format == "diffusers":
        dcfg = diffusers_config(config)  # validates before anything is written
        renamed = _rename(state, key_map(model))
        if transform:
            renamed = {k: transform(k, v) for k, v in renamed.items()}
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(_contiguous(renamed), path / DIFFUSERS_WEIGHTS)
        (path / "config.json").write_text(json.dumps(dcfg, indent=2))
    elif format == "ldm":
        prefixed = {prefix + k: v for k, v in state.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            save_tensors(prefixed, path, metadata={"ldmscale_config": json.dumps({kind: config})})
        else:
            torch.save({"state_dict": prefixed, "ldmscale_config": {kind: config}}, str(path))
    else:
        raise ValueError(f"format={format!r} is not one of {list(FORMATS)}")
    return path


def save_unet(model: UNet, path: str | Path, format: str = "ldmscale") -> Path:
    """Save as our export (folder), a diffusers `unet/` folder, or an LDM file (.ckpt or .safetensors)."""
    model = getattr(model, "_orig_mod", model)
    return _save(model, "unet", model.config, unet_config_to_diffusers, unet_key_map, UNET_PREFIX, path, format)


def save_autoencoder(model: AutoencoderKL | VQModel, path: str | Path, format: str = "ldmscale") -> Path:
    """Save as our export (folder), a diffusers `vae/` folder, or an LDM file (.ckpt or .safetensors).

    A VQ model with a linear (SimVQ) codebook is saved folded into the plain codebook it computes."""
    if isinstance(model, VQModel) and model.quantize.codebook_proj is not None:
        model = copy.deepcopy(model).fold()

    def squeeze(key: str, value: torch.Tensor) -> torch.Tensor:
        # diffusers' VAE attention uses Linear projections where LDM has 1x1 convs
        if ".mid_block.attentions." in key and key.endswith("weight") and value.dim() == 4:
            return value[:, :, 0, 0]
        return value
    return _save(model, "autoencoder", model.config, autoencoder_config_to_diffusers, autoencoder_key_map,
                 AE_PREFIX, path, format, squeeze)
