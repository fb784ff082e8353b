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
        self._pairs_key: tuple[int, ...] = ()  # data pointers the cached views were made from
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def _local_views(self) -> list[torch.Tensor]:
        """This rank's current values of its partition, one (possibly empty) 1-d tensor per parameter."""
        if self.zero3:
            return [p.ds_tensor.detach().view(-1) for p in self._params]
        return [p.detach().view(-1)[s:e] for p, (s, e) in zip(self._params, self._slices)]

    def current_decay(self, step: int) -> float:
        """0 before `start_step` (the EMA just copies the weights), `decay` afterwards."""
        return 0.0 if step < self.start_step else self.decay

    @torch.no_grad()
    def update(self, step: int, applied: torch.Tensor | float = 1.0) -> None:
        """`applied`: 1, or a device 0/1 tensor that is 0 when the optimiser step was skipped (then the
        shadow stays as it is, decided on the device without a host sync)."""
        weight = (1.0 - self.current_decay(step)) * applied
        shadow, views = self._update_pairs()
        if shadow:
            values = [v.float() for v in views] if views[0].dtype != torch.float32 else views
            if torch.is_tensor(weight):  # one weight per tensor: the single-tensor overload reads it on the host
                torch._foreach_lerp_(shadow, values, [weight.to(torch.float32)] * len(shadow))
            else:
                torch._foreach_lerp_(shadow, values, weight)
        self.num_updates += 1

    def _update_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadow, live view) of every non-empty slice. Making 300 views costs as much as the lerp itself,
        so they are kept, and remade only when a parameter's storage moved (DeepSpeed may reassign it)."""
        key = tuple((p.ds_tensor if self.zero3 else p).data_ptr() for p in self._params)
        if key != self._pairs_key:
            keep = [(s, v) for s, v in zip(self.shadow, self._local_views()) if s.numel()]
            self._pairs = ([s for s, _ in keep], [v for _, v in keep])
            self._pairs_key = key
        return self._pairs

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
                "python tools/export_checkpoint.py RUN_DIR --raw --out W.safetensors, then start with "
                "checkpoint.load_weights_only=W.safetensors"
            )
        self.num_updates = int(state["num_updates"])
        for mine, saved in zip(self.shadow, state["shadow"]):
            mine.copy_(saved)

    # ---- materialise the full EMA weights (collective: every rank must call it)
    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """{name: full fp32 tensor} on every rank; gathers the partitions across ranks."""
        world = self.world_size
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
        return _unflatten(flat, self.names, [p.shape for p in self._params])


def _unflatten(flat: torch.Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in zip(names, shapes):
        numel = int(torch.Size(shape).numel())
        out[name] = flat[offset: offset + numel].view(shape).clone()
        offset += numel
    return out


def assemble_partitions(states: list[dict[str, Any]], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Full fp32 EMA weights from every rank's saved `state_dict()` (offline: no process group).

    `states` are the per-rank states in any order; `shapes` gives each parameter's full shape (e.g. from
    the consolidated raw weights). ZeRO 0/1/2 shadows are consecutive slices of one flat vector; ZeRO-3
    shadows are each parameter's padded `ds_tensor` partition, in rank order.
    """
    states = sorted(states, key=lambda s: s["rank"])
    first = states[0]
    world, names = first["world_size"], list(first["names"])
    if [s["rank"] for s in states] != list(range(world)):
        raise ValueError(f"EMA partitions of ranks {[s['rank'] for s in states]} found; a run of world size "
                         f"{world} needs all ranks 0..{world - 1}")
    missing = [n for n in names if n not in shapes]
    if missing:
        raise KeyError(f"EMA parameters {missing[:5]} are not in the model's weights")
    for s in states:
        if list(s["names"]) != names or s["world_size"] != world or s["zero3"] != first["zero3"]:
            raise ValueError(f"EMA partition of rank {s['rank']} disagrees with rank 0 on names/world/zero3")
    if first["zero3"]:
        out = {}
        for i, name in enumerate(names):
            numel = int(torch.Size(shapes[name]).numel())
            out[name] = torch.cat([s["shadow"][i].float() for s in states])[:numel].view(shapes[name]).clone()
        return out
    flat = torch.cat([piece.float() for s in states for piece in s["shadow"]])
    total = sum(int(torch.Size(shapes[n]).numel()) for n in names)
    if flat.numel() != total:
        raise ValueError(f"EMA partitions hold {flat.numel()} values, the parameters {total}")
    return _unflatten(flat, names, [shapes[n] for n in names])
