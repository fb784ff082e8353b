"""Opening what a user points at: the one reader of weights files (safetensors, or torch weights-only)."""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def read_weights(path: str | Path, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """A weights file → its state dict, on CPU. Never unpickles code (principle 15): safetensors, or a torch
    file loaded with weights_only=True. An LDM/SD `.ckpt` ({"state_dict": ..., "global_step": ...}) gives
    its "state_dict". `what` names the setting the path came from, for the error message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}={str(path)!r}: no such file (safetensors, or a torch state dict)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled code, or not a torch file at all
        raise ValueError(f"{what}={str(path)!r} cannot be read weights-only (tensors only, no pickled "
                         f"objects): {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what}={str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state
