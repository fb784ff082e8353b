"""What every interop format shares: key prefixes, strict loading with a useful error, the LDM/SD .yaml,
our export and diffusers folders, and writing a model in any of the three formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from ldmscale.runs import read_weights, read_weights_and_metadata, write_weights

UNET_PREFIX = "model.diffusion_model."
AE_PREFIX = "first_stage_model."
FORMATS = ("diffusers", "ldm", "ldmscale")
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
    """A checkpoint file → (tensors, our config if it carries one), through the one weights-file reader."""
    state, metadata = read_weights_and_metadata(path, what="checkpoint")
    extra = json.loads(metadata["ldmscale_config"]) if "ldmscale_config" in metadata else {}
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


# ------------------------------------------------------------------------------------------ original configs
def read_original_config(original_config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The .yaml shipped with an LDM/SD checkpoint (a path, or the already-parsed dict / OmegaConf config)."""
    if isinstance(original_config, dict):
        return original_config
    if OmegaConf.is_config(original_config):  # what the original code itself loads it as
        return OmegaConf.to_container(original_config, resolve=True)
    path = Path(original_config)
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not an LDM/SD config (expected a YAML mapping)")
    return loaded


def _original_section(cfg: dict[str, Any], sections: tuple[str, ...], targets: tuple[str, ...],
                      what: str) -> tuple[str, dict[str, Any]]:
    """(target, params) of the sub-config named by `sections` under model.params, or of `model` itself."""
    model = cfg.get("model", cfg)
    params = model.get("params") or {}
    for name in sections:
        if isinstance(params.get(name), dict):
            return params[name].get("target", ""), params[name].get("params") or {}
    if any(str(model.get("target", "")).endswith(t) for t in targets):
        return model["target"], params
    raise ValueError(f"original config has no {what} (looked for model.params.{'/'.join(sections)} "
                     f"and a model.target ending in {'/'.join(targets)})")


# ------------------------------------------------------------------------------------------ load / save
def _diffusers_dir(path: Path, *subs: str) -> Optional[Path]:
    for candidate in (path, *(path / sub for sub in subs)):
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
    for file in (folder / DIFFUSERS_WEIGHTS, folder / "diffusion_pytorch_model.bin"):
        if file.is_file():
            return read_weights(file, what=f"{folder.name} weights")
    raise FileNotFoundError(f"{folder}: no {DIFFUSERS_WEIGHTS}")


def _original_config_for_file(path: Path, original_config: Any) -> Any:
    if original_config is not None and path.is_dir():
        raise ValueError(f"original_config is for LDM/SD checkpoint files; {path} carries its own config")
    return original_config


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _save(model: nn.Module, kind: str, config: dict[str, Any], diffusers_config: Any, key_map: Any,
          prefix: str, path: str | Path, format: str, prepare=None) -> Path:
    path = Path(path)
    state = _contiguous(model.state_dict())
    if format == "ldmscale":
        path.mkdir(parents=True, exist_ok=True)
        write_weights(state, path / OUR_WEIGHTS)
        (path / OUR_CONFIG).write_text(json.dumps({"ldmscale": kind, "config": config}, indent=2))
    elif format == "diffusers":
        dcfg = diffusers_config(config)  # validates before anything is written
        renamed = _rename(prepare(state, model) if prepare else state, key_map(model))
        path.mkdir(parents=True, exist_ok=True)
        write_weights(_contiguous(renamed), path / DIFFUSERS_WEIGHTS)
        (path / "config.json").write_text(json.dumps(dcfg, indent=2))
    elif format == "ldm":
        prefixed = {prefix + k: v for k, v in state.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_weights(prefixed, path, metadata={"ldmscale_config": json.dumps({kind: config})})  # .ckpt too
    else:
        raise ValueError(f"format={format!r} is not one of {list(FORMATS)}")
    return path


