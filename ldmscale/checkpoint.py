"""Checkpoints: when to save, what goes in them, the atomic "latest" pointer, retention and resume.

Layout under `checkpoint.dir` (default RUN_DIR/checkpoints):

    step_00000100/<engine>/...      DeepSpeed's own shards, one folder per engine (e.g. "denoiser")
    step_00000100/client_rank0.pt   per-rank state: step, images seen, loader position, RNG, task (EMA) state
    step_00000100/meta.json         written last by rank 0: step, world size, ZeRO stage, resolved config
    latest                          the tag of the newest COMPLETE checkpoint (atomic rename)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as tdist

from ldmscale.config import CheckpointConfig

LATEST = "latest"
META = "meta.json"


class _Engine(Protocol):
    zero_stage: int

    def save(self, save_dir: str, tag: str, client_state: dict[str, Any] | None = None) -> None: ...
    def load(self, load_dir: str, tag: str) -> dict[str, Any]: ...


def _rank_world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- save on request
class SaveRequest:
    """A flag set from a signal handler (or submitit's checkpoint()); the loop acts at the next step."""

    def __init__(self) -> None:
        self.save = False
        self.stop = False

    def request(self, *, stop: bool) -> None:
        self.save = True
        self.stop = self.stop or stop

    def install(self) -> None:
        """SIGUSR1: save and go on; SIGTERM: save and stop (preemption)."""

        def on_usr1(signum: int, frame: Any) -> None:
            self.request(stop=False)

        def on_term(signum: int, frame: Any) -> None:
            self.request(stop=True)

        try:
            signal.signal(signal.SIGUSR1, on_usr1)
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (e.g. some notebook runners): requests via request()
            pass

    def agreed(self) -> tuple[bool, bool]:
        """(save, stop) as agreed by all ranks: a signal delivered to one rank is honoured by all."""
        flags = torch.tensor([float(self.save), float(self.stop)])
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def clear(self) -> None:
        self.save = False


# One per process, so launch/slurm.py (submitit's checkpoint()) can reach it.
SAVE_REQUEST = SaveRequest()


# ---------------------------------------------------------------------------- finding checkpoints
def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (Path(ckpt_dir) / tag / META).is_file():
        raise FileNotFoundError(
            f"{path} points at {tag!r} but {Path(ckpt_dir) / tag / META} is missing: the checkpoint was "
            "deleted by hand; point 'latest' at an existing step_* folder or remove it to start afresh"
        )
    return tag


def read_meta(ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / tag / META).read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.glob("step_*") if (p / META).is_file())


# ---------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves every `every_steps`, at the end and on request; resumes from the latest complete one."""

    def __init__(self, cfg: CheckpointConfig, ckpt_dir: str | Path | None = None,
                 request: SaveRequest = SAVE_REQUEST):
        self.cfg = cfg
        self.dir = Path(ckpt_dir or cfg.dir)
        self.request = request
        self.last_saved_step = -1

    def should_save(self, step: int) -> bool:
        return step % self.cfg.every_steps == 0

    def save(self, step: int, engines: dict[str, _Engine], client_state: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """Collective: every rank writes its shards; 'latest' moves only once all ranks are done."""
        rank, world = _rank_world()
        tag = tag_for(step)
        step_dir = self.dir / tag
        if rank == 0 and step_dir.exists():  # a half-written one from a crash at this step
            shutil.rmtree(step_dir)
        _barrier()
        step_dir.mkdir(parents=True, exist_ok=True)
        for name, engine in engines.items():
            engine.save(str(step_dir), tag=name, client_state={"step": step})
        torch.save(client_state, step_dir / f"client_rank{rank}.pt")
        _barrier()  # every rank's files are on disk
        if rank == 0:
            full_meta = dict(meta, step=step, world_size=world, engines=sorted(engines),
                             zero_stage={n: e.zero_stage for n, e in engines.items()})
            _write_atomic(step_dir / META, json.dumps(full_meta, indent=2, default=str))
            _write_atomic(self.dir / LATEST, tag)
            self._prune(keep=tag)
        _barrier()
        self.last_saved_step = step
        return step_dir

    def _prune(self, keep: str) -> None:
        tags = [t for t in complete_tags(self.dir) if t != keep]
        excess = len(tags) + 1 - max(1, self.cfg.keep_last)
        for old in tags[: max(0, excess)]:
            shutil.rmtree(self.dir / old, ignore_errors=True)

    def resume_tag(self) -> str | None:
        return latest_tag(self.dir) if self.cfg.resume else None

    def load(self, tag: str, engines: dict[str, _Engine]) -> dict[str, Any]:
        """Restore engines and return this rank's client state; a world-size change fails with the fix."""
        rank, world = _rank_world()
        meta = read_meta(self.dir, tag)
        if meta["world_size"] != world:
            raise RuntimeError(
                f"{self.dir / tag} was saved by {meta['world_size']} ranks and this run has {world}: ZeRO "
                "optimizer partitions cannot be re-split. To go on with a new world size, consolidate the "
                f"weights (python tools/export_checkpoint.py {self.dir} --raw --out W.safetensors) "
                "and start a new run with checkpoint.load_weights_only=W.safetensors "
                "(the optimizer state restarts; or relaunch with the old world size)"
            )
        for name, engine in engines.items():
            engine.load(str(self.dir / tag), tag=name)
        state = torch.load(self.dir / tag / f"client_rank{rank}.pt", map_location="cpu", weights_only=False)
        return state


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Initialise `module` from a consolidated file (safetensors or torch); names must match exactly.

    A folder (our "ldmscale" export or a diffusers unet) initialises the U-Net of a Denoiser.
    """
    path = Path(path)
    if path.is_dir() and hasattr(module, "unet"):
        from ldmscale.models.interop import load_unet_weights

        load_unet_weights(module.unet, path)
        return
    from ldmscale.runs import read_weights

    state = read_weights(path, what="checkpoint.load_weights_only")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{path}: missing keys {missing[:5]}..., unexpected keys {unexpected[:5]}...")


# ---------------------------------------------------------------------------- offline: run dir → weights
def _ema_state(client: dict[str, Any], engine: str, where: Path) -> dict[str, Any]:
    task = client.get("task") or {}
    state = task.get("ema") if engine not in task else (task[engine] or {}).get("ema")
    if state is None:
        raise KeyError(f"{where} holds no EMA state for {engine!r} (ema.enabled was false?): use the raw "
                       "weights (ema=False / --raw)")
    return state


def load_run_weights(run_dir: str | Path, *, ema: bool = True, engine: str = "denoiser",
                     tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 state dict of `engine`, meta.json) from a run's latest (or `tag`) checkpoint, offline.

    Raw weights come from DeepSpeed's shards (engine.consolidate_state_dict); EMA weights are
    reassembled from every rank's partition in client_rank*.pt and replace the trainable parameters
    (buffers and frozen parameters come from the raw weights).
    """
    from ldmscale.distributed.engine import consolidate_state_dict
    from ldmscale.ema import assemble_partitions
    from ldmscale.runs import run_checkpoint_dir

    ckpt_dir = run_checkpoint_dir(run_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag / META).is_file():
        raise FileNotFoundError(f"{ckpt_dir}: checkpoint {tag!r} is missing or incomplete (no {META})")
    meta = read_meta(ckpt_dir, tag)
    if engine not in meta["engines"]:
        raise KeyError(f"{ckpt_dir / tag} has engines {meta['engines']}, not {engine!r}")
    state = consolidate_state_dict(str(ckpt_dir / tag), engine, int(meta["zero_stage"][engine]))
    if ema:
        files = [ckpt_dir / tag / f"client_rank{r}.pt" for r in range(int(meta["world_size"]))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"EMA partitions missing: {absent}")
        partitions = [_ema_state(torch.load(f, map_location="cpu", weights_only=False), engine, f) for f in files]
        state = {**state, **assemble_partitions(partitions, {k: v.shape for k, v in state.items()})}
    return state, meta
