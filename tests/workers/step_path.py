"""Worker: the real stage-2 step path (build_diffusion_task → Trainer.fit) on the demo's tiny denoiser.

usage: step_path.py CACHE_DIR RUN_DIR MODE ZERO_STAGE
  syncs     N non-logged steps inside a TorchDispatchMode/TorchFunctionMode that records every host sync
            (aten._local_scalar_dense, device→host copies, tolist/numpy) with the innermost ldmscale or
            DeepSpeed frame that asked for it. Prints JSON.
  nonfinite one rank feeds NaN latents: the step is skipped on every rank (weights, EMA unchanged), then
            a run of NaN steps stops the trainer at its next check. Prints JSON.
  compile   model.compile=true (backend: aot_eager behind a call counter) against eager: the training step
            runs the compiled blocks and gives the same losses and weights. Prints JSON.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ldmscale import checkpoint as ckpt
from ldmscale.config import compose
from ldmscale.distributed import env
from ldmscale.train import build_diffusion_task
from ldmscale.trainer import NonFiniteLossError, Trainer

PACKAGES = {"ldmscale": str(Path(__file__).resolve().parents[2] / "ldmscale"), "deepspeed": "/deepspeed/"}
HOST_METHODS = {"tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}


def owner() -> str:
    """The innermost ldmscale or DeepSpeed frame on the stack ("other" if neither)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(PACKAGES["ldmscale"]):
            return f"ldmscale:{Path(path).name}:{frame.f_code.co_name}:{frame.f_lineno}"
        if PACKAGES["deepspeed"] in path:
            return f"deepspeed:{Path(path).name}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "other"


class SyncCounter(TorchDispatchMode):
    """Counts host syncs by owner: scalar reads and copies from an accelerator to the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default or _device_to_host(func, args, kwargs):
            self.counts[owner()] += 1
        return func(*args, **kwargs)


class HostReadCounter(TorchFunctionMode):
    """tolist()/numpy()/bool() on a CPU tensor skip the dispatcher's scalar read: count them here."""

    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_METHODS:
            self.counts[owner()] += 1
        return func(*args, **(kwargs or {}))


def _device_to_host(func, args, kwargs) -> bool:
    if func is torch.ops.aten._to_copy.default:
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
    if func is torch.ops.aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class Batches:
    """Prefetched batches (the loader stays outside the measured step path); StopTest when used up."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield from self.batches
        raise StopTest


class StopTest(Exception):
    pass


def fit(trainer: Trainer, batches: list) -> None:
    trainer.loader, trainer._iter = Batches(batches), None
    try:
        trainer.fit()
    except StopTest:
        pass


def trainer_and_batches(task, loader, cfg, dist, run_dir: Path, accumulation: int,
                        num_batches: int) -> tuple[Trainer, list]:
    """The real Trainer around `task` (checkpoints under run_dir/ckpt) and `num_batches` prefetched batches."""
    trainer = Trainer(task, loader, cfg.trainer, checkpointer=ckpt.Checkpointer(cfg.checkpoint, run_dir / "ckpt"),
                      accumulation_steps=accumulation, world_size=dist.world_size, run_dir=run_dir)
    it = iter(loader)
    return trainer, [next(it) for _ in range(num_batches)]


def count_host_syncs(trainer: Trainer, batches: list, accumulation: int, steps: int = 4) -> SyncCounter:
    """Host syncs by owner over `steps` training steps, after one warm-up step (optimizer state, first calls)."""
    fit(trainer, batches[:accumulation])
    counter = SyncCounter()
    with counter, HostReadCounter(counter.counts):
        fit(trainer, [batches[i % len(batches)] for i in range(steps * accumulation)])
    return counter


GRAPH_CALLS: Counter = Counter()


def counting_aot_eager(graph, example_inputs, **kwargs):
    """aot_eager (Dynamo + AOTAutograd, eager kernels), counting each call of a compiled graph."""
    from torch._dynamo.backends.registry import lookup_backend

    GRAPH_CALLS["graphs"] += 1
    compiled = lookup_backend("aot_eager")(graph, example_inputs, **kwargs)

    def run(*args):
        GRAPH_CALLS["calls"] += 1
        return compiled(*args)

    return run


def compare_compiled(cfg, dist, batches: list) -> dict:
    """Two tasks from one seed, eager and compiled, each trained 2 steps on the same micro-batches."""
    from torch._dynamo import register_backend
    from torch._dynamo.utils import counters

    register_backend(counting_aot_eager)
    results = {}
    for compiled in (False, True):
        cfg.model.compile, cfg.model.compile_backend = compiled, "counting_aot_eager"
        torch.manual_seed(cfg.seed)
        task, _, accumulation, _ = build_diffusion_task(cfg, dist)
        GRAPH_CALLS.clear()
        losses = [task.train_step(batches[i * accumulation:(i + 1) * accumulation], i)["loss"].item()
                  for i in range(2)]
        unet = task.engine.module.unet
        results[compiled] = {"losses": losses, "calls": GRAPH_CALLS["calls"], "graphs": GRAPH_CALLS["graphs"],
                             "weights": [p.detach().clone() for p in task.engine.module.parameters()],
                             "blocks": len(unet.input_blocks) + 1 + len(unet.output_blocks),
                             "forwards": 2 * accumulation}
        task.engine.destroy()
    eager, comp = results[False], results[True]
    return {"eager_losses": eager["losses"], "compiled_losses": comp["losses"], "eager_calls": eager["calls"],
            "graph_calls": comp["calls"], "graphs": comp["graphs"], "blocks": comp["blocks"],
            "forwards": comp["forwards"], "graph_breaks": sum(counters["graph_break"].values()),
            "max_weight_diff": max((a - b).abs().max().item() for a, b in zip(eager["weights"], comp["weights"]))}


def main() -> None:
    cache, run_dir, mode, stage = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    dist = env.setup("gloo")
    never = 10**6
    cfg = compose([f"data.train_shards=[{cache}]", "data.micro_batch_size=2",
                   f"data.global_batch_size={4 * dist.world_size}", f"deepspeed.zero_stage={stage}",
                   f"trainer.max_steps={never}", f"trainer.log_every_steps={never}", "trainer.sample_every_steps=0",
                   f"checkpoint.every_steps={never}", f"checkpoint.signal_check_steps={3 if mode == 'nonfinite' else never}",
                   "checkpoint.save_at_end=false", "trainer.max_nonfinite_steps=2", f"run_dir={run_dir}"])
    if mode == "compile":
        from ldmscale.data.loader import build_loader

        it = iter(build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=cfg.seed, rank=0, world_size=1))
        env.print0(json.dumps(compare_compiled(cfg, dist, [next(it) for _ in range(4)])))
        env.teardown()
        return
    torch.manual_seed(cfg.seed)
    task, loader, accumulation, _ = build_diffusion_task(cfg, dist)
    trainer, batches = trainer_and_batches(task, loader, cfg, dist, run_dir, accumulation, 3 * accumulation)
    result: dict = {"accumulation": accumulation}
    if mode == "syncs":
        counter = count_host_syncs(trainer, batches, accumulation)
        measured = dict(counter.counts)
        with counter, HostReadCounter(counter.counts):
            task.engine.grad_norm()  # an ldmscale .item(): proves the counter sees ldmscale's frames
        probe = {k: v for k, v in counter.counts.items() if k not in measured or measured[k] != v}
        result.update(steps=trainer.step - 1, counts=measured, probe=probe)
    else:
        params = lambda: [p.detach().clone() for p in task.engine.module.parameters()]  # noqa: E731
        fit(trainer, batches[:accumulation])
        before, ema_before = params(), [s.clone() for s in task.ema.shadow]
        bad = [dict(b, latents=torch.full_like(b["latents"], float("nan"))) if dist.rank == dist.world_size - 1
               else b for b in batches[accumulation:2 * accumulation]]
        fit(trainer, bad)  # step 2: NaN on the last rank only; no check yet (checks at steps 3, 6, ...)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, params()))
        ema_unchanged = all(torch.equal(a, b) for a, b in zip(ema_before, task.ema.shadow))
        in_a_row_before = trainer.nonfinite_in_a_row
        fit(trainer, batches[:accumulation])  # step 3: finite, trains; the check sees one skipped step
        moved = not all(torch.equal(a, b) for a, b in zip(before, params()))
        counted = (trainer.nonfinite_total, trainer.nonfinite_in_a_row)
        error = ""
        try:
            fit(trainer, bad * 3)  # steps 4-6 NaN: the check at step 6 sees 3 in a row ≥ 2 and stops
        except NonFiniteLossError as exc:
            error = str(exc)
        result.update(unchanged=unchanged, ema_unchanged=ema_unchanged, moved_after=moved,
                      in_a_row_before_check=in_a_row_before, counted_at_step3=counted,
                      stopped_at=trainer.step, error=error[:200])
    env.print0(json.dumps(result))
    task.engine.destroy()
    env.teardown()


if __name__ == "__main__":
    main()
