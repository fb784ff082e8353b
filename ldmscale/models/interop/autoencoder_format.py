"""The autoencoder (KL or VQ) in other formats: LDM/SD first stages (.yaml or inferred from the weights),
diffusers AutoencoderKL / VQModel and our export."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ldmscale.models.autoencoder import AutoencoderKL, VQModel
from ldmscale.models.interop.common import (
    AE_PREFIX,
    OUR_CONFIG,
    OUR_WEIGHTS,
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
from ldmscale.runs import read_weights


def autoencoder_config_from_original(original_config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Our autoencoder keyword arguments from an LDM/SD config's `first_stage_config` or a first-stage model's own
    config (models/first_stage_models/*/config.yaml), with the latent scale factor of a full LDM/SD config."""
    cfg = read_original_config(original_config)
    target, p = _original_section(cfg, ("first_stage_config",), ("AutoencoderKL", "VQModel", "VQModelInterface"),
                                  "first stage (first_stage_config)")
    dd = p.get("ddconfig") or {}
    attn_type = dd.get("attn_type", "vanilla")
    attn_type = "vanilla" if attn_type == "vanilla-xformers" else attn_type
    for key, want in (("resamp_with_conv", True), ("tanh_out", False), ("give_pre_end", False)):
        if dd.get(key, want) != want:
            raise ValueError(f"original ddconfig {key}={dd[key]!r} is not supported (expected {want!r})")
    kwargs = dict(ch=dd["ch"], ch_mult=list(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                  attn_resolutions=list(dd.get("attn_resolutions") or []), in_channels=dd["in_channels"],
                  out_ch=dd["out_ch"], resolution=dd["resolution"], z_channels=dd["z_channels"],
                  embed_dim=p["embed_dim"], dropout=float(dd.get("dropout", 0.0)), attn_type=attn_type)
    if "n_embed" in p or "VQ" in target:
        kwargs.update(kind="vq", n_embed=p["n_embed"])
    else:
        kwargs["kind"] = "kl"
    model_params = cfg.get("model", {}).get("params") or {}
    if "first_stage_config" in model_params:  # a full LDM/SD config: LatentDiffusion's default scale is 1.0
        kwargs["scale_factor"] = float(model_params.get("scale_factor", 1.0))
    return kwargs


# ------------------------------------------------------------------------------------------ autoencoder
_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}


def autoencoder_key_map(model: AutoencoderKL | VQModel) -> dict[str, str]:
    """Our (= LDM) key prefixes → diffusers AutoencoderKL / VQModel key prefixes."""
    levels = len(model.config["ch_mult"])
    mapping = {"encoder.norm_out.": "encoder.conv_norm_out.", "decoder.norm_out.": "decoder.conv_norm_out."}
    for part, coder in (("encoder", model.encoder), ("decoder", model.decoder)):
        for src, dst in _VAE_ATTN.items():
            mapping[f"{part}.mid.attn_1.{src}"] = f"{part}.mid_block.attentions.0.{dst}"
        mapping[f"{part}.mid.block_1."] = f"{part}.mid_block.resnets.0."
        mapping[f"{part}.mid.block_2."] = f"{part}.mid_block.resnets.1."
        for i, level in enumerate(coder.down if part == "encoder" else coder.up):
            if part == "encoder":
                ours, theirs, sampler = f"encoder.down.{i}.", f"encoder.down_blocks.{i}.", "downsample"
            else:
                ours, theirs, sampler = f"decoder.up.{i}.", f"decoder.up_blocks.{levels - 1 - i}.", "upsample"
            for j in range(len(level.block)):
                mapping[f"{ours}block.{j}."] = f"{theirs}resnets.{j}."
                mapping[f"{ours}block.{j}.nin_shortcut."] = f"{theirs}resnets.{j}.conv_shortcut."
            for j in range(len(level.attn)):
                for src, dst in _VAE_ATTN.items():
                    mapping[f"{ours}attn.{j}.{src}"] = f"{theirs}attentions.{j}.{dst}"
            mapping[f"{ours}{sampler}.conv."] = f"{theirs}{sampler}rs.0.conv."
    return mapping


_VAE_ATTN_PROJ = re.compile(r"\.(mid\.attn_1|(down|up)\.\d+\.attn\.\d+)\.(q|k|v|proj_out)\.weight$")


def _autoencoder_attention_levels(cfg: dict[str, Any]) -> list[bool]:
    return [cfg["resolution"] // 2 ** i in cfg["attn_resolutions"] and cfg.get("attn_type", "vanilla") == "vanilla"
            for i in range(len(cfg["ch_mult"]))]


def autoencoder_config_to_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    attn = _autoencoder_attention_levels(cfg)
    common = {"in_channels": cfg["in_channels"], "out_channels": cfg["out_ch"],
              "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
              "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
              "block_out_channels": [cfg["ch"] * m for m in cfg["ch_mult"]], "layers_per_block": cfg["num_res_blocks"],
              "act_fn": "silu", "latent_channels": cfg["z_channels"], "norm_num_groups": 32,
              "sample_size": cfg["resolution"], "scaling_factor": cfg["scale_factor"],
              "mid_block_add_attention": cfg.get("attn_type", "vanilla") == "vanilla"}
    if cfg["kind"] == "vq":
        return {"_class_name": "VQModel", **common, "num_vq_embeddings": cfg["n_embed"],
                "vq_embed_dim": cfg["embed_dim"]}
    if cfg["z_channels"] != cfg["embed_dim"]:
        raise ValueError("diffusers' AutoencoderKL needs z_channels == embed_dim")
    if cfg.get("bicubic_skip"):
        raise ValueError("diffusers' AutoencoderKL has no bicubic skip (autoencoder.bicubic_skip): use format='ldmscale'")
    return {"_class_name": "AutoencoderKL", **common, "shift_factor": cfg["shift_factor"] or None}


def autoencoder_config_from_diffusers(dcfg: dict[str, Any]) -> dict[str, Any]:
    name = dcfg.get("_class_name", "AutoencoderKL")
    if name not in ("AutoencoderKL", "VQModel"):
        raise ValueError(f"diffusers {name} is neither an AutoencoderKL nor a VQModel")
    if dcfg.get("norm_num_groups", 32) != 32 or dcfg.get("act_fn", "silu") != "silu" \
            or dcfg.get("norm_type", "group") != "group":
        raise ValueError("diffusers autoencoder with non-LDM norm/activation is not supported")
    chans = list(dcfg["block_out_channels"])
    resolution = dcfg.get("sample_size", 256)
    resolution = resolution[0] if isinstance(resolution, (list, tuple)) else resolution
    attn = [resolution // 2 ** i for i, t in enumerate(dcfg["down_block_types"]) if t.startswith("Attn")]
    up_attn = [resolution // 2 ** (len(chans) - 1 - i) for i, t in enumerate(dcfg["up_block_types"])
               if t.startswith("Attn")]
    if sorted(attn) != sorted(up_attn):
        raise ValueError("diffusers autoencoder with attention at different encoder and decoder levels")
    kwargs = dict(kind="kl", ch=chans[0], ch_mult=[c // chans[0] for c in chans],
                  num_res_blocks=dcfg["layers_per_block"], attn_resolutions=attn, in_channels=dcfg["in_channels"],
                  out_ch=dcfg["out_channels"], resolution=resolution, z_channels=dcfg["latent_channels"],
                  embed_dim=dcfg["latent_channels"], scale_factor=dcfg.get("scaling_factor", 1.0) or 1.0,
                  attn_type="vanilla" if dcfg.get("mid_block_add_attention", True) else "none")
    if attn and kwargs["attn_type"] == "none":
        raise ValueError("diffusers autoencoder with level attention but no mid-block attention is not supported")
    if name == "VQModel":
        kwargs.update(kind="vq", n_embed=dcfg.get("num_vq_embeddings", 256),
                      embed_dim=dcfg.get("vq_embed_dim") or dcfg["latent_channels"])
    else:
        kwargs["shift_factor"] = dcfg.get("shift_factor") or 0.0
    return kwargs


def autoencoder_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer an LDM autoencoder from its weights; attention levels from the `encoder.down.{i}.attn.*` keys
    (attn_resolutions are then given at resolution 256, as in every released LDM/SD first stage)."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    nrb = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    mult = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
    z = state["decoder.conv_in.weight"].shape[1]
    resolution = 256
    attn_levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")
                          and k.split(".")[3] == "attn"})
    attn_type = "vanilla" if "encoder.mid.attn_1.q.weight" in state else "none"
    if attn_levels and attn_type == "none":
        raise ValueError("LDM autoencoder with level attention but none in the mid block is not supported")
    kwargs = dict(ch=ch, ch_mult=mult, num_res_blocks=nrb, attn_resolutions=[resolution // 2 ** i for i in attn_levels],
                  in_channels=state["encoder.conv_in.weight"].shape[1], out_ch=state["decoder.conv_out.weight"].shape[0],
                  resolution=resolution, z_channels=z, embed_dim=state["post_quant_conv.weight"].shape[1],
                  attn_type=attn_type)
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


STAGE1_EXPORT = "autoencoder"  # a stage-1 run directory keeps its export here (ldmscale.stage1)


def _read_autoencoder(path: Path) -> tuple[Optional[dict[str, Any]], dict[str, torch.Tensor], str, Optional[float]]:
    """(config if the checkpoint carries one, LDM-named weights, source, the scale_factor buffer of a full
    LDM checkpoint trained with scale_by_std). Nothing is inferred here."""
    if path.is_dir() and (path / STAGE1_EXPORT / OUR_CONFIG).is_file():
        path = path / STAGE1_EXPORT  # `autoencoder.weights=<stage-1 run dir>`
    if path.is_dir():
        if ours := _ours_dir(path, "autoencoder"):
            meta = json.loads((ours / OUR_CONFIG).read_text())
            return meta["config"], read_weights(ours / OUR_WEIGHTS), str(ours), None
        if folder := _diffusers_dir(path, "vae", "vqvae"):  # vqvae: diffusers' LDM pipelines
            config = autoencoder_config_from_diffusers(json.loads((folder / "config.json").read_text()))
            with torch.device("meta"):
                skeleton = _build_autoencoder(config)
            state = _rename(_load_diffusers_weights(folder), {v: k for k, v in autoencoder_key_map(skeleton).items()})
            state = {k: v[:, :, None, None] if _VAE_ATTN_PROJ.search(k) and v.dim() == 2 else v
                     for k, v in state.items()}
            return config, state, str(folder), None
        raise FileNotFoundError(f"{path}: neither an ldmscale export, a diffusers vae folder nor a pipeline folder")
    state, extra = _read_tensors(path)
    scale = state.get("scale_factor") if AE_PREFIX + "encoder.conv_in.weight" in state else None
    state = _strip(state, AE_PREFIX)
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # LDM files carry the GAN loss too
    config = extra.get("autoencoder")
    return config, state, str(path), None if config or scale is None else float(scale)


def load_autoencoder_weights(model: AutoencoderKL | VQModel, path: str | Path) -> AutoencoderKL | VQModel:
    """Load weights into an existing autoencoder (its config decides the structure; nothing is inferred)."""
    _, state, source, _ = _read_autoencoder(Path(path))
    if isinstance(model, VQModel) and not any(k.endswith("quantize.codebook_proj.weight") for k in state):
        model.fold()  # a config with codebook=linear reading plain codes (every export is folded)
    _strict_load(model, state, source)
    return model


def load_autoencoder(path: str | Path, original_config: Any = None, **overrides: Any) -> AutoencoderKL | VQModel:
    """An autoencoder in eval mode from a diffusers folder (vae or pipeline), an LDM/SD file or our export.

    original_config: the .yaml shipped with an LDM/SD file (a full LDM/SD config or a first stage's own); else
    the structure is inferred from the weights. A full LDM checkpoint's scale_factor buffer (scale_by_std)
    sets the latent scale."""
    path = Path(path)
    config, state, source, scale = _read_autoencoder(path)
    if _original_config_for_file(path, original_config) is not None:
        config = autoencoder_config_from_original(original_config)
    elif config is None:
        config = autoencoder_config_from_state_dict(state)
    if scale is not None:
        config = {**config, "scale_factor": scale}
    model = _build_autoencoder({**config, **overrides})
    _strict_load(model, state, source)
    return model.eval()


def save_autoencoder(model: AutoencoderKL | VQModel, path: str | Path, format: str = "ldmscale") -> Path:
    """Save as our export (folder), a diffusers `vae/` folder, or an LDM file (.ckpt or .safetensors).

    A VQ model with a linear (SimVQ) codebook is saved folded into the plain codebook it computes."""
    if isinstance(model, VQModel) and model.quantize.codebook_proj is not None:
        model = copy.deepcopy(model).fold()

    def squeeze(state: dict[str, torch.Tensor], _model: nn.Module) -> dict[str, torch.Tensor]:
        # diffusers' VAE attention uses Linear projections where LDM has 1x1 convs
        return {k: v[:, :, 0, 0] if _VAE_ATTN_PROJ.search(k) else v for k, v in state.items()}
    return _save(model, "autoencoder", model.config, autoencoder_config_to_diffusers, autoencoder_key_map,
                 AE_PREFIX, path, format, squeeze)
