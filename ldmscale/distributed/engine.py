"""DeepSpeed behind one small interface: config, optimiser, lr schedule, step, save/load, memory estimates.

This is the ONLY module that imports deepspeed; everything else talks to `Engine`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ldmscale.config import DeepSpeedConfig, OptimConfig

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set before the import)
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

from ldmscale.runs import load_data  # noqa: E402

# The only non-tensor classes in DeepSpeed's checkpoint files (ZeRO 0-3; fp32, bf16, fp16), found with
# torch.serialization.get_unsafe_globals_in_checkpoint: plain records of numbers, rebuilt from their fields.
DEEPSPEED_SAFE_GLOBALS = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def load_deepspeed_file(path: str, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """One DeepSpeed checkpoint file, as data (weights_only with DEEPSPEED_SAFE_GLOBALS)."""
    return load_data(path, map_location=map_location, allowed=DEEPSPEED_SAFE_GLOBALS, **kwargs)


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with `load` replaced by a weights-only load; the rest delegates."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_deepspeed_file(path, map_location=map_location)


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """DeepSpeed also calls torch.load(weights_only=False) directly (zero_to_fp32, ZeRO-3 helpers); inside
    this block every such call loads as data. Used only around DeepSpeed's loading entry points."""
    original = torch.load
    torch.load = load_deepspeed_file
    try:
        yield
    finally:
        torch.load = original


class BatchArithmeticError(ValueError):
    """global batch != micro batch × accumulation × world size."""


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """global = micro × accumulation × world (EDM2's rule); fail at start with the arithmetic shown."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step or global_batch_size < per_step:
        raise BatchArithmeticError(
            f"data.global_batch_size={global_batch_size} is not a multiple of data.micro_batch_size="
            f"{micro_batch_size} × world_size={world_size} = {per_step}; "
            f"pick a global batch in {{{per_step}, {2 * per_step}, {3 * per_step}, ...}}"
        )
    return global_batch_size // per_step


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` wins key by key, recursing into nested dicts (so `zero_optimization.x` can be added)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _offload(device: str, nvme_path: str, *, pin: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {"device": device, "pin_memory": pin}
    if device == "nvme":
        cfg["nvme_path"] = nvme_path
    return cfg


def build_ds_config(
    ds: DeepSpeedConfig,
    optim: OptimConfig,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    world_size: int,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run; `ds.extra` is deep-merged last (raw keys pass through)."""
    accumulation = gradient_accumulation_steps(global_batch_size, micro_batch_size, world_size)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=torch.cuda.is_available(), contiguous_gradients=True,
                    reduce_bucket_size=int(5e8), allgather_bucket_size=int(5e8))
    pin = torch.cuda.is_available()
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds.nvme_path, pin=pin)
    if ds.offload_param != "none":
        if ds.zero_stage != 3:
            raise ValueError(f"deepspeed.offload_param={ds.offload_param!r} needs deepspeed.zero_stage=3")
        zero["offload_param"] = _offload(ds.offload_param, ds.nvme_path, pin=pin)
    config: dict[str, Any] = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,  # our own metrics do the logging
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer != "none":
        # Offloaded optimiser states need DeepSpeed's CPU Adam; it is built from this entry.
        config["optimizer"] = {"type": "AdamW", "params": _adam_kwargs(optim)}
    return deep_merge(config, ds.extra)


def _adam_kwargs(optim: OptimConfig) -> dict[str, Any]:
    return {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}


def lr_lambda(optim: OptimConfig, max_steps: int):
    """Multiplier of `optim.lr` at a step: linear warmup, then constant or cosine down to min_lr_ratio."""
    warmup = max(0, optim.warmup_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optim.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and convolutions, not biases, norms or embeddings' 1-d parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, optim: OptimConfig, *, skip_on_device: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups`. `skip_on_device`: torch's fused AdamW, whose `found_inf` tensor skips an
    update on the device (ZeRO-0 fp32, where DeepSpeed has no overflow check of its own)."""
    groups = param_groups(model, optim.weight_decay)
    kwargs = _adam_kwargs(optim)
    kwargs.pop("weight_decay")
    if skip_on_device:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if optim.fused and torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


class Engine:
    """A DeepSpeed engine with the few calls the trainer needs; `module` is the wrapped model.

    Non-finite steps are skipped without a host sync of ours: `backward` turns a non-finite loss into
    non-finite gradients, and the optimiser update at the boundary is dropped by DeepSpeed's own overflow
    check (ZeRO 1-3, bf16, fp16) or, at ZeRO-0 fp32, by torch's fused AdamW reading a device `found_inf`.
    `skipped` is a device 0/1 tensor for the last optimiser step; the trainer reads it when it syncs anyway.
    """

    def __init__(self, ds_engine: Any, ds_config: dict[str, Any], lr_scheduler: Any, *,
                 gradient_clipping: float | None = None, skip_on_device: bool = False):
        self._ds = ds_engine
        self.config = ds_config
        self.lr_scheduler = lr_scheduler
        self.zero_stage: int = ds_config["zero_optimization"]["stage"]
        self.gradient_accumulation_steps: int = ds_config["gradient_accumulation_steps"]
        self.gradient_clipping = ds_config["gradient_clipping"] if gradient_clipping is None else gradient_clipping
        self.skip_on_device = skip_on_device  # we clip and skip (ZeRO-0 fp32); else DeepSpeed does
        self._params = list(ds_engine.module.parameters())  # walking the module tree costs ~1 ms a step
        self._last_grad_norm = torch.zeros(())
        self._flags = torch.tensor([0.0, 1.0], device=self.device)  # (not skipped, skipped): no H2D copy later
        self.skipped = self._flags[0]
        self.track_grad_norm = False  # set by the trainer for the steps it logs

    # ---- compute
    @property
    def module(self) -> nn.Module:
        return self._ds.module

    @property
    def device(self) -> torch.device:
        return self._ds.device

    @property
    def optimizer(self) -> Any:
        return self._ds.optimizer

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.config["bf16"]["enabled"]:
            return torch.bfloat16
        return torch.float16 if self.config["fp16"]["enabled"] else torch.float32

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ds(*args, **kwargs)

    forward = __call__

    def backward(self, loss: torch.Tensor, *, judged_by: tuple[torch.Tensor, ...] = ()) -> None:
        """Backward of `loss`; a non-finite loss (or any non-finite tensor in `judged_by`: another player's
        loss, the loss a surrogate stands for) is made to poison every gradient (×NaN), so the overflow
        check at the boundary drops the whole optimiser step on every rank (the gradient reduction spreads
        the NaN). Decided on the device; a finite loss is multiplied by exactly 1."""
        finite = torch.isfinite(loss.detach()).all()
        for other in judged_by:
            finite = finite & torch.isfinite(other.detach()).all()
        self._ds.backward(loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype))

    def step(self) -> None:
        """DeepSpeed's step: a no-op between accumulation boundaries, the optimiser update at one."""
        boundary = self._ds.is_gradient_accumulation_boundary()
        if boundary and self.skip_on_device:
            self.optimizer.found_inf = None  # set below from this step's gradients
        if boundary and (self.skip_on_device or (self.track_grad_norm and self.zero_stage == 0)):
            # ZeRO-0 leaves DeepSpeed's norm unset; the gradients sit on the parameters until step() zeroes
            # them. One foreach norm (a tensor: no host sync) serves the log, the clip and the skip.
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
                self._last_grad_norm = norm
                if self.skip_on_device:
                    if self.gradient_clipping > 0:  # torch's clip_grad_norm_ rule, as one foreach multiply
                        torch._foreach_mul_(grads, (self.gradient_clipping / (norm + 1e-6)).clamp(max=1.0))
                    self.optimizer.found_inf = (~torch.isfinite(norm)).float()
        self._ds.step()
        if boundary:
            if self.skip_on_device:
                found_inf = getattr(self.optimizer, "found_inf", None)
                self.skipped = self._flags[0] if found_inf is None else found_inf
            else:  # DeepSpeed synced for its own overflow check already: reading its flag costs nothing
                self.skipped = self._flags[int(bool(getattr(self._ds.optimizer, "overflow", False)))]

    def grad_norm(self) -> float:
        norm = self._ds.get_global_grad_norm()
        if norm is None:
            norm = self._last_grad_norm if self.zero_stage == 0 else float("nan")
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0]) if self.lr_scheduler is not None else float("nan")

    @property
    def global_steps(self) -> int:
        return int(self._ds.global_steps)

    # ---- checkpoints
    def save(self, save_dir: str, tag: str, client_state: dict[str, Any] | None = None) -> None:
        """Every rank writes its shard; no 'latest' file (ldmscale.checkpoint writes it atomically)."""
        self._ds.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=False)

    def load(self, load_dir: str, tag: str, *, load_optimizer_states: bool = True) -> dict[str, Any]:
        """Every file is read as data (WeightsOnlyCheckpointEngine); a file holding code is refused, named."""
        if not isinstance(self._ds.checkpoint_engine, WeightsOnlyCheckpointEngine):
            self._ds.checkpoint_engine = WeightsOnlyCheckpointEngine(self._ds.checkpoint_engine)
        scheduler = self.lr_scheduler
        configured = list(getattr(scheduler, "base_lrs", []))
        with _weights_only_torch_load():
            path, client_state = self._ds.load_checkpoint(
                load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_optimizer_states,
            )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {load_dir}")
        if configured and list(scheduler.base_lrs) != configured:
            # The configured optim.lr wins over the saved one, so "resume with a lower LR" (the advice after
            # a divergence) takes effect; the schedule's position (warmup, cosine) is the checkpoint's.
            scheduler.base_lrs = configured
            factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
            for group, base, factor in zip(scheduler.optimizer.param_groups, configured, factors):
                group["lr"] = base * factor
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        return client_state or {}

    def destroy(self) -> None:
        """Free DeepSpeed's hooks and buffers; part of the clean exit (see ENVIRONMENT.md)."""
        destroy = getattr(self._ds, "destroy", None)
        if destroy is not None:
            destroy()

    # ---- ZeRO-3 partition access, for EMA and export
    @contextlib.contextmanager
    def gathered_parameters(self, params: list[nn.Parameter] | None = None, modifier_rank: int | None = None):
        """Full parameters inside the block (ZeRO-3 all-gathers them; other stages are full already)."""
        if self.zero_stage == 3:
            params = list(self.module.parameters()) if params is None else params
            with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
                yield
        else:
            yield


def initialize(
    model: nn.Module,
    ds: DeepSpeedConfig,
    optim: OptimConfig,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    world_size: int,
    max_steps: int,
) -> Engine:
    """Wrap `model` (already built, on CPU or the local device) in DeepSpeed with AdamW and the lr schedule."""
    ds_config = build_ds_config(ds, optim, micro_batch_size=micro_batch_size,
                                global_batch_size=global_batch_size, world_size=world_size)
    # ZeRO-0 fp32 has no DeepSpeed overflow check, and its per-parameter clip costs ~5x a foreach one:
    # the Engine clips and skips there itself (DeepSpeed is told not to clip).
    skip_on_device = ds_config["zero_optimization"]["stage"] == 0 and ds.precision == "fp32" \
        and "optimizer" not in ds_config
    clipping = ds_config["gradient_clipping"]
    if skip_on_device:
        ds_config = dict(ds_config, gradient_clipping=0.0)
    optimizer = None if "optimizer" in ds_config else build_optimizer(model, optim, skip_on_device=skip_on_device)
    factor = lr_lambda(optim, max_steps)
    holder: dict[str, Any] = {}

    def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        holder["sched"] = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return holder["sched"]

    model_parameters = param_groups(model, optim.weight_decay) if optimizer is None else None
    ds_engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=model_parameters,
        lr_scheduler=make_scheduler, config=ds_config,
    )
    engine = Engine(ds_engine, ds_config, scheduler or holder.get("sched"), gradient_clipping=clipping,
                    skip_on_device=skip_on_device)
    if world_size == 1 and engine.zero_stage == 0 and engine.compute_dtype == torch.float32:
        # Alone, DeepSpeed would still flatten, "all-reduce" and copy back every gradient each step (6% of
        # the demo's step on CPU) for an identical result. (The bf16/fp16 optimizers keep their own path.)
        ds_engine.enable_backward_allreduce = False
    return engine


def zero3_init_context(ds_config: dict[str, Any] | None, enabled: bool):
    """Build a model directly partitioned (deepspeed.zero.Init) when ZeRO-3 is asked for."""
    if not enabled or ds_config is None or ds_config["zero_optimization"]["stage"] != 3:
        return contextlib.nullcontext()
    deepspeed.init_distributed()  # adopts the process group env.setup made (zero.Init reads the world size)
    return deepspeed.zero.Init(config_dict_or_path=ds_config)


# ---------------------------------------------------------------------------- memory estimates
@dataclass(frozen=True)
class MemoryEstimate:
    """DeepSpeed's estimate of model-state memory (params, grads, optimiser) per GPU and per node."""

    zero_stage: int
    num_gpus: int
    gpu_bytes: int
    cpu_bytes_per_node: int
    offload: bool


def estimate_model_state_memory(
    total_params: int,
    largest_layer_params: int,
    *,
    zero_stage: int,
    num_gpus: int,
    gpus_per_node: int = 8,
    offload_optimizer: bool = False,
    offload_param: bool = False,
) -> MemoryEstimate:
    """DeepSpeed's own formulas (estimate_zero{2,3}_model_states_mem_needs) at a given scale.

    Stage 0/1 are derived the same way: 0 = everything replicated (16 bytes/param mixed precision),
    1 = only the 12 bytes of fp32 master + Adam moments partitioned.
    """
    gpus_per_node = min(gpus_per_node, num_gpus)
    nodes = max(1, num_gpus // gpus_per_node)
    if zero_stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest_layer_params, gpus_per_node, nodes,
            cpu_offload=offload_optimizer, cpu_offload_params=offload_param, zero_init=True,
        )
    elif zero_stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, gpus_per_node, nodes,
                                                         cpu_offload=offload_optimizer)
    elif zero_stage == 1:
        cpu, gpu = 0, 4 * total_params + int(12 * total_params / num_gpus)
    else:
        cpu, gpu = 0, 16 * total_params
    return MemoryEstimate(zero_stage, num_gpus, int(gpu), int(cpu), offload_optimizer or offload_param)


# ---------------------------------------------------------------------------- offline consolidation
def consolidate_state_dict(checkpoint_dir: str, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 module weights of one engine's checkpoint, on CPU, with no process group.

    ZeRO 1-3 hold the fp32 master weights in per-rank optimizer partitions: DeepSpeed's zero_to_fp32
    merges them (bit-equal to the live fp32 weights). Stage 0 does not partition, and zero_to_fp32 does
    not read it: its `mp_rank_00_model_states.pt` holds the whole module (in the compute dtype).
    """
    folder = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no DeepSpeed checkpoint folder {folder}")
    if zero_stage == 0:
        path = os.path.join(folder, "mp_rank_00_model_states.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: a ZeRO-0 checkpoint keeps the module there")
        module = load_deepspeed_file(path)["module"]
        return {name: value.detach().float() if value.is_floating_point() else value.detach()
                for name, value in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _weights_only_torch_load():
        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    return {name: value.detach().cpu().contiguous() for name, value in state.items()}
