"""FLOP counting on the meta device (torch.utils.flop_counter): no memory, no compute; training MFU uses it."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def count_flops(module: nn.Module, *example_inputs: Any, with_backward: bool = False, **kwargs: Any) -> int:
    """FLOPs (2 per multiply-add) of one `module(*example_inputs, **kwargs)` call, forward only by default.

    Runs on the meta device: a module with real weights is copied there first (its weights are untouched)."""
    on_meta = all(p.is_meta for p in module.parameters())
    meta_module = module if on_meta else copy.deepcopy(module).to("meta")
    inputs, kwargs = _to_meta(example_inputs), _to_meta(kwargs)
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(with_backward):
        out = meta_module(*inputs, **kwargs)
        if with_backward:
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.sum().backward()
    return int(counter.get_total_flops())
