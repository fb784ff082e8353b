"""Exponential moving average of the trained weights, kept on each rank's own ZeRO partition.

ZeRO 0/1/2 keep full module parameters on every rank, so each rank averages only its 1/world slice
of the flattened parameter vector. ZeRO-3 averages the local `ds_tensor` shard of every parameter.
Either way no rank holds the full EMA and nothing is gathered per step; `full_state_dict()` gathers
on demand (sampling, export).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist
from torch import nn


def _dist() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


class PartitionedEMA:
    """fp32 EMA of this rank's partition of `module`'s parameters: ema ← decay·ema + (1−decay)·param."""

    def __init__(self, module: nn.Module, decay: float, start_step: int = 0, *, zero3: bool | None = None):
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.rank, self.world_size = _dist()
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self._params = [params[name] for name in self.names]
        self.zero3 = any(hasattr(p, "ds_tensor") for p in self._params) if zero3 is None else zero3
        self.num_updates = 0
        # (start, end) of this rank's slice of each parameter's flattened values (ZeRO 0/1/2 only).
        self._slices: list[tuple[int, int]] = []
        if not self.zero3:
            total = sum(p.numel() for p in self._params)
            per_rank = -(-total // self.world_size)
            lo, hi = self.rank * per_rank, min(total, (self.rank + 1) * per_rank)
            offset = 0
            for p in self._params:
                start, end = max(lo, offset) - offset, min(hi, offset + p.numel()) - offset
                self._slices.append((start, max(start, end)))
                offset += p.numel()
        self.shadow: list[torch.Tensor] = [t.detach().float().clone() for t in self._local_views()]

    def _local_views(self) -> list[torch.Tensor]:
        """This rank's current values of its partition, one (possibly empty) 1-d tensor per parameter."""
        if self.zero3:
            return [p.ds_tensor.detach().view(-1) for p in self._params]
        return [p.detach().view(-1)[s:e] for p, (s, e) in zip(self._params, self._slices)]

    def current_decay(self, step: int) -> float:
        """0 before `start_step` (the EMA just copies the weights), `decay` afterwards."""
        return 0.0 if step < self.start_step else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.current_decay(step)
        views = [v.float() for v in self._local_views()]
        pairs = [(s, v) for s, v in zip(self.shadow, views) if s.numel()]
        if pairs:
            shadow, values = zip(*pairs)
            torch._foreach_lerp_(list(shadow), list(values), 1.0 - decay)
        self.num_updates += 1

    # ---- checkpoint state (per rank: it is this rank's partition)
    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay, "start_step": self.start_step, "num_updates": self.num_updates,
            "world_size": self.world_size, "rank": self.rank, "zero3": self.zero3,
            "names": list(self.names), "shadow": [s.clone() for s in self.shadow],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size or state["zero3"] != self.zero3 or state["names"] != self.names:
            raise ValueError(
                f"EMA state was saved by a run with world_size={state['world_size']} zero3={state['zero3']}; "
                f"this run has world_size={self.world_size} zero3={self.zero3}. Consolidate it first: "
                "python tools/export_checkpoint.py RUN_DIR --out W.safetensors, then start with "
                "checkpoint.load_weights_only=W.safetensors"
            )
        self.num_updates = int(state["num_updates"])
        for mine, saved in zip(self.shadow, state["shadow"]):
            mine.copy_(saved)

    # ---- materialise the full EMA weights (collective: every rank must call it)
    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """{name: full fp32 tensor} on every rank; gathers the partitions across ranks."""
        rank, world = self.rank, self.world_size
        if self.zero3:
            out = {}
            for name, p, shard in zip(self.names, self._params, self.shadow):
                pieces = [torch.empty_like(shard) for _ in range(world)]
                if world > 1:
                    tdist.all_gather(pieces, shard.contiguous())
                else:
                    pieces = [shard]
                out[name] = torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).clone()
            return out
        local = torch.cat([s for s in self.shadow]) if self.shadow else torch.empty(0)
        total = sum(p.numel() for p in self._params)
        per_rank = -(-total // world)
        padded = torch.zeros(per_rank, dtype=torch.float32, device=local.device)
        padded[: local.numel()] = local
        if world > 1:
            pieces = [torch.empty_like(padded) for _ in range(world)]
            tdist.all_gather(pieces, padded)
            flat = torch.cat(pieces)[:total]
        else:
            flat = padded[:total]
        out, offset = {}, 0
        for name, p in zip(self.names, self._params):
            out[name] = flat[offset: offset + p.numel()].view(p.shape).clone()
            offset += p.numel()
        del rank
        return out

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Load the full EMA weights into a plain (unpartitioned) copy of the module."""
        full = self.full_state_dict()
        params = dict(module.named_parameters())
        for name, value in full.items():
            params[name].copy_(value.to(params[name].dtype))
