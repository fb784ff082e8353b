"""Moving averages of the trained weights, kept on each rank's own ZeRO partition, and post-hoc EMA.

Two kinds: `PartitionedEMA` (exponential, fixed decay) and `PowerEMA` (EDM2's power-function profiles,
Karras et al. 2024, whose periodic snapshots let `reconstruct` choose the EMA length after training).
ZeRO 0/1/2 keep full module parameters on every rank, so each rank averages only its 1/world slice
of the flattened parameter vector. ZeRO-3 averages the local `ds_tensor` shard of every parameter.
Either way no rank holds the full EMA and nothing is gathered per step; `full_state_dict()` gathers
on demand (sampling, export).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

if TYPE_CHECKING:
    from ldmscale.config import EMAConfig


def _dist() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


class _Partition:
    """This rank's share of a module's trainable parameters: local views now, full tensors on demand."""

    def __init__(self, module: nn.Module, zero3: bool | None = None):
        self.rank, self.world_size = _dist()
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self._params = [params[name] for name in self.names]
        self.zero3 = any(hasattr(p, "ds_tensor") for p in self._params) if zero3 is None else zero3
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
        self._views_key: tuple[int, ...] = ()  # data pointers the cached views were made from
        self._views: list[torch.Tensor] = []
        self._nonempty: list[int] = []  # parameters with values on this rank

    def _local_views(self) -> list[torch.Tensor]:
        """This rank's current values of its partition, one (possibly empty) 1-d tensor per parameter."""
        if self.zero3:
            return [p.ds_tensor.detach().view(-1) for p in self._params]
        return [p.detach().view(-1)[s:e] for p, (s, e) in zip(self._params, self._slices)]

    def _fresh_shadow(self) -> list[torch.Tensor]:
        shadow = [t.detach().float().clone() for t in self._local_views()]
        self._nonempty = [i for i, t in enumerate(shadow) if t.numel()]
        return shadow

    def _live_views(self) -> list[torch.Tensor]:
        """Views of this rank's non-empty slices. Making 300 views costs as much as the lerp itself, so they
        are kept, and remade only when a parameter's storage moved (DeepSpeed may reassign it)."""
        key = tuple((p.ds_tensor if self.zero3 else p).data_ptr() for p in self._params)
        if key != self._views_key:
            views = self._local_views()
            self._views = [views[i] for i in self._nonempty]
            self._views_key = key
        return self._views

    @torch.no_grad()
    def _fold_in(self, targets: list[list[torch.Tensor]], weights: list[torch.Tensor | float]) -> None:
        """targets[k] ← targets[k] + weights[k]·(live partition − targets[k]); each target holds the
        non-empty slices only. A tensor weight stays on the device (no host sync)."""
        views = self._live_views()
        if not views:
            return
        values = [v.float() for v in views] if views[0].dtype != torch.float32 else views
        for target, weight in zip(targets, weights):
            if torch.is_tensor(weight):  # one weight per tensor: the single-tensor overload reads it on the host
                torch._foreach_lerp_(target, values, [weight.to(torch.float32)] * len(target))
            else:
                torch._foreach_lerp_(target, values, weight)

    def _active(self, shadow: list[torch.Tensor]) -> list[torch.Tensor]:
        return [shadow[i] for i in self._nonempty]

    def _layout(self) -> dict[str, Any]:
        """What a saved partition must agree on to be loaded back (and to be assembled offline)."""
        return {"world_size": self.world_size, "rank": self.rank, "zero3": self.zero3, "names": list(self.names)}

    def _check_layout(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size or state["zero3"] != self.zero3 or state["names"] != self.names:
            raise ValueError(
                f"EMA state was saved by a run with world_size={state['world_size']} zero3={state['zero3']}; "
                f"this run has world_size={self.world_size} zero3={self.zero3}. Consolidate it first: "
                "python tools/export_checkpoint.py RUN_DIR --raw --out W.safetensors, then start with "
                "checkpoint.load_weights_only=W.safetensors"
            )

    # ---- materialise full weights (collective: every rank must call it)
    @torch.no_grad()
    def _gather(self, shadow: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """{name: full tensor in `dtype`} on every rank from each rank's `shadow` partition."""
        world = self.world_size
        if self.zero3:
            out = {}
            for name, p, shard in zip(self.names, self._params, shadow):
                shard = shard.to(dtype).contiguous()
                pieces = [torch.empty_like(shard) for _ in range(world)]
                if world > 1:
                    tdist.all_gather(pieces, shard)
                else:
                    pieces = [shard]
                out[name] = torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).clone()
            return out
        local = torch.cat([s.to(dtype) for s in shadow]) if shadow else torch.empty(0, dtype=dtype)
        total = sum(p.numel() for p in self._params)
        per_rank = -(-total // world)
        padded = torch.zeros(per_rank, dtype=dtype, device=local.device)
        padded[: local.numel()] = local
        if world > 1:
            pieces = [torch.empty_like(padded) for _ in range(world)]
            tdist.all_gather(pieces, padded)
            flat = torch.cat(pieces)[:total]
        else:
            flat = padded[:total]
        return _unflatten(flat, self.names, [p.shape for p in self._params])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class PartitionedEMA(_Partition):
    """fp32 EMA of this rank's partition of `module`'s parameters: ema ← decay·ema + (1−decay)·param."""

    kind = "exponential"

    def __init__(self, module: nn.Module, decay: float, start_step: int = 0, *, zero3: bool | None = None):
        super().__init__(module, zero3)
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.num_updates = 0
        self.shadow: list[torch.Tensor] = self._fresh_shadow()
        self._targets = [self._active(self.shadow)]

    def current_decay(self, step: int) -> float:
        """0 before `start_step` (the EMA just copies the weights), `decay` afterwards."""
        return 0.0 if step < self.start_step else self.decay

    @torch.no_grad()
    def update(self, step: int, applied: torch.Tensor | float = 1.0) -> None:
        """`applied`: 1, or a device 0/1 tensor that is 0 when the optimiser step was skipped (then the
        shadow stays as it is, decided on the device without a host sync)."""
        self._fold_in(self._targets, [(1.0 - self.current_decay(step)) * applied])
        self.num_updates += 1

    # ---- checkpoint state (per rank: it is this rank's partition)
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "decay": self.decay, "start_step": self.start_step,
                "num_updates": self.num_updates, **self._layout(), "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self._check_layout(state)
        self.num_updates = int(state["num_updates"])
        for mine, saved in zip(self.shadow, state["shadow"]):
            mine.copy_(saved)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """{name: full fp32 tensor} on every rank; gathers the partitions across ranks (collective)."""
        return self._gather(self.shadow)


def _check_kind(state: dict[str, Any], kind: str) -> None:
    saved = state.get("kind", "exponential")  # states from before ema.kind existed are exponential
    if saved != kind:
        raise ValueError(f"the checkpoint's EMA is ema.kind={saved}, this run has ema.kind={kind}: resume with "
                         f"ema.kind={saved}, or start a new run from its weights (checkpoint.load_weights_only)")


# ---------------------------------------------------------------------------- power-function EMA (EDM2)
MAX_SIGMA_REL = float(np.sqrt(1 / 12))  # γ → 0: a plain running mean of all weights so far


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent γ whose profile has relative standard deviation σ_rel (EDM2 Eq. 126,
    Alg. 2): σ_rel² = (γ+1) / ((γ+2)² (γ+3)), i.e. the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + 12 − σ⁻²."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel={sigma_rel} must lie in (0, {MAX_SIGMA_REL:.4f}) (γ > 0)")
    inv = float(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 Eq. 123: the relative standard deviation of the power-function profile t^γ."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_beta(gamma: float, t: int) -> float:
    """Decay after the t-th (1-based) update: β_t = (1 − 1/t)^(γ+1) (EDM2 Eq. 127, one step per unit).

    It makes the EMA at step t the exact average Σ_τ w_τ θ_τ with w_τ = (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1).
    """
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


class PowerEMA(_Partition):
    """EDM2's power-function EMAs, one per σ_rel, on this rank's partition; snapshots for post-hoc EMA.

    Time is counted in optimizer steps: the EMA after step t averages θ_1..θ_t with weights ∝ τ^γ, so it
    has no warm-up knob. Every `snapshot_every_steps` (and at `final_step`) all profiles are gathered and
    rank 0 writes each as an fp16 safetensors file under `snapshot_dir` (a sibling of the step_* folders:
    checkpoint retention never deletes it, and a resumed run rewrites the same values). The first profile
    is the "live" EMA: sample grids and `load_run_weights(ema=True)` use it.
    """

    kind = "power"

    def __init__(self, module: nn.Module, sigma_rels: list[float], *, snapshot_every_steps: int = 0,
                 snapshot_dir: str | Path | None = None, final_step: int | None = None,
                 zero3: bool | None = None):
        super().__init__(module, zero3)
        if not sigma_rels:
            raise ValueError("ema.sigma_rels is empty: a power EMA needs at least one σ_rel")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.snapshot_every_steps = int(snapshot_every_steps)
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        if self.snapshot_every_steps and self.snapshot_dir is None:
            raise ValueError("ema.snapshot_every_steps > 0 needs a snapshot directory")
        self.final_step = final_step
        self.num_updates = 0
        self.shadows: list[list[torch.Tensor]] = [self._fresh_shadow() for _ in self.sigma_rels]
        self._targets = [self._active(shadow) for shadow in self.shadows]

    @property
    def shadow(self) -> list[torch.Tensor]:
        return self.shadows[0]

    @torch.no_grad()
    def update(self, step: int, applied: torch.Tensor | float = 1.0) -> None:
        """After optimizer step `step` (0-based, as the trainer counts): fold in the new weights. `applied`
        as in PartitionedEMA.update: 0 leaves every profile as it is (a skipped step); t advances anyway."""
        t = step + 1
        self._fold_in(self._targets, [(1.0 - power_beta(gamma, t)) * applied for gamma in self.gammas])
        self.num_updates += 1
        if self.should_snapshot(t):
            self.snapshot(t)

    def should_snapshot(self, t: int) -> bool:
        every = self.snapshot_every_steps
        return bool(every) and (t % every == 0 or t == self.final_step)

    @torch.no_grad()
    def snapshot(self, t: int) -> list[Path]:
        """Collective: gather every profile in fp16; rank 0 writes them (atomically) for step t."""
        written = []
        for sigma_rel, gamma, shadow in zip(self.sigma_rels, self.gammas, self.shadows):
            full = self._gather(shadow, torch.float16)
            if self.rank == 0:
                assert self.snapshot_dir is not None
                path = self.snapshot_dir / snapshot_name(t, sigma_rel)
                write_snapshot(path, full, step=t, sigma_rel=sigma_rel, gamma=gamma)
                written.append(path)
        return written

    # ---- checkpoint state (per rank)
    def state_dict(self) -> dict[str, Any]:
        shadows = [[s.clone() for s in shadow] for shadow in self.shadows]
        # "shadow" (the live profile) shares storage with shadows[0]: torch.save stores it once, and the
        # offline consolidation (assemble_partitions) reads it like an exponential EMA's.
        return {"kind": self.kind, "sigma_rels": list(self.sigma_rels), "num_updates": self.num_updates,
                **self._layout(), "shadows": shadows, "shadow": shadows[0]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self._check_layout(state)
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"the checkpoint tracks ema.sigma_rels={state['sigma_rels']}, this run asks for "
                             f"{self.sigma_rels}: resume with the same list (post-hoc EMA reaches the others)")
        self.num_updates = int(state["num_updates"])
        for mine, saved in zip(self.shadows, state["shadows"]):
            for m, s in zip(mine, saved):
                m.copy_(s)

    def full_state_dict(self, profile: int = 0) -> dict[str, torch.Tensor]:
        """{name: full fp32 tensor} of profile `profile` on every rank (collective)."""
        return self._gather(self.shadows[profile])


def build_ema(module: nn.Module, cfg: EMAConfig, *, snapshot_dir: str | Path,
              max_steps: int | None = None) -> PartitionedEMA | PowerEMA | None:
    """The EMA `cfg` asks for over `module` (already wrapped by the engine), or None when disabled."""
    if not cfg.enabled:
        return None
    if cfg.kind == "power":
        return PowerEMA(module, list(cfg.sigma_rels), snapshot_every_steps=cfg.snapshot_every_steps,
                        snapshot_dir=snapshot_dir, final_step=max_steps)
    return PartitionedEMA(module, cfg.decay, cfg.start_step)


# ---------------------------------------------------------------------------- snapshots and post-hoc EMA
SNAPSHOT_DIR = "ema_snapshots"  # under checkpoint.dir, beside the step_* folders


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"step_{step:08d}-sigma_rel_{sigma_rel:.4f}.safetensors"


def write_snapshot(path: Path, weights: dict[str, torch.Tensor], *, step: int, sigma_rel: float,
                   gamma: float) -> None:
    """An fp16 safetensors file of one profile at one step; written to a temporary name, then renamed."""
    from ldmscale.runs import write_weights

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # the suffix picks the format
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in weights.items()}
    write_weights(tensors, tmp, metadata={"step": str(step), "sigma_rel": repr(float(sigma_rel)),
                                          "gamma": repr(float(gamma))})
    os.replace(tmp, path)


class Snapshot(NamedTuple):
    step: int
    sigma_rel: float
    path: Path


def list_snapshots(snapshot_dir: str | Path) -> list[Snapshot]:
    """Every complete snapshot in `snapshot_dir`, by (step, σ_rel), read from the files' metadata."""
    from ldmscale.runs import read_metadata

    out = []
    for path in sorted(Path(snapshot_dir).glob("step_*.safetensors")):
        meta = read_metadata(path, what="EMA snapshot")
        if "step" not in meta or "sigma_rel" not in meta:
            raise ValueError(f"{path} is not an EMA snapshot (no step/sigma_rel in its metadata)")
        out.append(Snapshot(int(meta["step"]), float(meta["sigma_rel"]), path))
    return sorted(out, key=lambda s: (s.step, s.sigma_rel))


def profile_inner_products(a_steps: np.ndarray, a_gammas: np.ndarray, b_steps: np.ndarray,
                           b_gammas: np.ndarray) -> np.ndarray:
    """⟨p_a, p_b⟩ of power-function profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t] (EDM2 Eq. 151, Alg. 3)."""
    ratio = a_steps / b_steps
    exponent = np.where(a_steps < b_steps, b_gammas, -a_gammas)
    num = (a_gammas + 1) * (b_gammas + 1) * ratio ** exponent
    return num / ((a_gammas + b_gammas + 1) * np.maximum(a_steps, b_steps))


def solve_posthoc_coefficients(in_steps: list[int], in_sigma_rels: list[float], out_steps: list[int],
                               out_sigma_rels: list[float]) -> np.ndarray:
    """[num_in, num_out] weights: output profile j ≈ Σ_i X_ij · snapshot i, the least-squares fit of the
    target profile by the snapshots' profiles (EDM2 Alg. 3), columns normalised to sum to 1."""
    column = lambda x: np.float64(x).reshape(-1, 1)  # noqa: E731
    row = lambda x: np.float64(x).reshape(1, -1)  # noqa: E731
    in_g = [sigma_rel_to_gamma(s) for s in in_sigma_rels]
    out_g = [sigma_rel_to_gamma(s) for s in out_sigma_rels]
    gram = profile_inner_products(column(in_steps), column(in_g), row(in_steps), row(in_g))
    target = profile_inner_products(column(in_steps), column(in_g), row(out_steps), row(out_g))
    coefficients = np.linalg.solve(gram, target)
    return coefficients / coefficients.sum(axis=0, keepdims=True)


@torch.no_grad()
def reconstruct(snapshot_dir: str | Path, sigma_rels: list[float],
                step: int | None = None) -> tuple[int, dict[float, dict[str, torch.Tensor]]]:
    """(step, {σ_rel: fp32 weights}): post-hoc EMAs at `step` (default: the last snapshot) from the snapshots
    up to it. A σ_rel that was tracked comes back as its own snapshot (the fit is exact for it)."""
    from ldmscale.runs import read_weights

    snapshots = list_snapshots(snapshot_dir)
    if not snapshots:
        raise FileNotFoundError(f"no EMA snapshots in {snapshot_dir}: train with ema.kind=power and "
                                "ema.snapshot_every_steps > 0")
    step = snapshots[-1].step if step is None else int(step)
    used = [s for s in snapshots if s.step <= step]
    if not used or used[-1].step != step:
        raise ValueError(f"no snapshot at step {step} in {snapshot_dir} (steps: "
                         f"{sorted({s.step for s in snapshots})}); reconstruct at a snapshot step")
    for sigma_rel in sigma_rels:
        sigma_rel_to_gamma(sigma_rel)  # range check before any reading
    coefficients = solve_posthoc_coefficients([s.step for s in used], [s.sigma_rel for s in used],
                                              [step] * len(sigma_rels), list(sigma_rels))
    outputs: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    for snapshot, weights in zip(used, coefficients):
        tensors = read_weights(snapshot.path, what="EMA snapshot")
        for out, weight in zip(outputs, weights):
            for name, value in tensors.items():
                out.setdefault(name, torch.zeros(value.shape)).add_(value.float(), alpha=float(weight))
    return step, dict(zip(sigma_rels, outputs))


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


def posthoc_export_name(sigma_rel: float) -> str:
    return f"denoiser_ema_sigma_rel_{sigma_rel:.4f}.safetensors"


def export_posthoc(run_dir: str | Path, sigma_rels: list[float], out_dir: str | Path | None = None,
                   step: int | None = None) -> dict[float, Path]:
    """Reconstruct each σ_rel from a run's snapshots and write it as the project's flat safetensors export
    (default RUN_DIR/export/denoiser_ema_sigma_rel_S.safetensors); buffers and frozen parameters, which
    the EMA does not average, come from the latest checkpoint's raw weights."""
    from ldmscale.checkpoint import load_run_weights, write_weights_export
    from ldmscale.runs import run_checkpoint_dir

    step, rebuilt = reconstruct(run_checkpoint_dir(run_dir) / SNAPSHOT_DIR, sigma_rels, step)
    raw, meta = load_run_weights(run_dir, ema=False)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "export"
    written = {}
    for sigma_rel, weights in rebuilt.items():
        unknown = sorted(set(weights) - set(raw))
        if unknown:
            raise KeyError(f"snapshot parameters {unknown[:5]} are not in {run_dir}'s model")
        written[sigma_rel] = write_weights_export(
            {**raw, **weights}, out_dir / posthoc_export_name(sigma_rel), weights=f"posthoc_ema:{sigma_rel}",
            step=step, source=run_dir, config=meta.get("config", {}))
    return written
