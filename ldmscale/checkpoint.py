"""Checkpoints: when to save, what goes in them, the atomic "latest" pointer, retention and resume.

Layout under `checkpoint.dir` (default RUN_DIR/checkpoints):

    step_00000100/<engine>/...      DeepSpeed's own shards, one folder per engine (e.g. "denoiser")
    step_00000100/client_rank0.pt   per-rank state: step, images seen, loader position, RNG, task (EMA) state
    step_00000100/meta.json         written last by rank 0: step, world size, ZeRO stage, resolved config,
                                    and the size and CRC-32 of every other file (read back from disk)
    latest                          the tag of the newest COMPLETE checkpoint (atomic rename)
    ema_snapshots/                  ema.kind=power: fp16 EMA snapshots (ema.py); retention leaves them

Every file is loaded as data (torch.load weights_only=True; DeepSpeed's few plain classes are allow-listed in
distributed/engine.py): a run directory from someone else never executes code. A checkpoint is verified
against its checksums before it is trusted; resume falls back to the newest one that verifies.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import warnings
import zlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as tdist

from ldmscale.config import CheckpointConfig
from ldmscale.runs import CheckpointError, load_data, read_weights, write_weights  # the weights-file layer

LATEST = "latest"
META = "meta.json"
_CHUNK = 16 << 20  # checksum read size: large sequential reads, bounded memory


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
    """Every generator's state as tensors and plain Python values (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
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
        """(save, stop) as agreed by all ranks: a signal delivered to one rank is honoured by all.

        Collective, with a host sync when there are several ranks: the trainer calls it on its sync steps
        only (Trainer.should_sync). Under NCCL the flags travel through the GPU."""
        if not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
            return self.save, self.stop
        device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" \
            else torch.device("cpu")
        flags = torch.tensor([float(self.save), float(self.stop)], device=device)
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        save, stop = flags.tolist()
        return bool(save), bool(stop)

    def clear(self) -> None:
        self.save = False


# One per process, so launch/slurm.py (submitit's checkpoint()) can reach it.
SAVE_REQUEST = SaveRequest()


# ---------------------------------------------------------------------------- integrity
def file_checksum(path: str | Path, *, sync: bool = False) -> dict[str, int]:
    """Size and CRC-32 of a file as it is on disk (zlib's CRC-32: about twice sha256's speed; the files are GBs)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        if sync:  # the bytes checksummed are the bytes a crash leaves behind
            os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": crc}


def _checkpoint_files(step_dir: Path) -> list[str]:
    return sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                  if p.is_file() and p.name != META and not p.name.startswith("."))


def _gather(obj: Any) -> list[Any]:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    tdist.all_gather_object(out, obj)
    return out


def verify(step_dir: str | Path, meta: dict[str, Any], *, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with the checkpoint's files (missing, truncated, corrupted); [] if all verify.

    `share=(rank, world)` checks every world-th file only, so ranks split the reading.
    """
    step_dir = Path(step_dir)
    expected: dict[str, dict[str, int]] = meta.get("files") or {}
    rank, world = share
    problems = []
    for rel in sorted(expected)[rank::world]:
        path, want = step_dir / rel, expected[rel]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {want['bytes']} were written (truncated?)")
        elif file_checksum(path)["crc32"] != want["crc32"]:
            problems.append(f"{path} fails its CRC-32 check (corrupted)")
    return problems


# ---------------------------------------------------------------------------- finding checkpoints
def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag `latest` names, or None without the file (the folder it names may be gone)."""
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def read_meta(ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    path = Path(ckpt_dir) / tag / META
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing: checkpoint {tag} is incomplete") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is malformed ({err}): checkpoint {tag} is damaged") from err


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    """step_* folders holding meta.json (written last), oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.glob("step_*") if (p / META).is_file())


def candidate_tags(ckpt_dir: str | Path) -> tuple[list[str], list[str]]:
    """(complete checkpoints to try, best first; warnings). `latest`'s target, then older ones; newest
    first when `latest` is missing or names a folder that is gone.

    A complete checkpoint after `latest` whose meta.json is younger than `latest` was saved after it was
    last moved: a crash between the two writes. It is tried first. One older than `latest` was abandoned
    (`latest` moved back by hand, or a resume from an older one): it is not."""
    tags = complete_tags(ckpt_dir)
    latest, notes = latest_tag(ckpt_dir), []
    if latest in tags:
        moved = (Path(ckpt_dir) / LATEST).stat().st_mtime_ns
        unpointed = [t for t in tags if t > latest and (Path(ckpt_dir) / t / META).stat().st_mtime_ns > moved]
        if unpointed:
            notes.append(f"{Path(ckpt_dir) / unpointed[-1]} is complete and was saved after {LATEST} "
                         f"({latest!r}) last moved (a crash between the two writes): trying it first")
        return [t for t in reversed(tags) if t <= (unpointed[-1] if unpointed else latest)], notes
    if latest is not None:
        notes.append(f"{Path(ckpt_dir) / LATEST} names {latest!r}, which is missing or incomplete")
    elif tags:
        notes.append(f"{Path(ckpt_dir) / LATEST} is missing, but complete checkpoints exist")
    return list(reversed(tags)), notes


def find_verified(ckpt_dir: str | Path, *, warn: Any = None) -> tuple[str | None, list[str]]:
    """(newest checkpoint that verifies, or None if there are no complete ones; warnings).

    Collective when a process group is up: ranks split the reading and agree on the result. A complete
    checkpoint that fails is skipped with a warning naming it; when none verifies this raises rather
    than let the run start over (and retention delete the evidence).
    """
    rank, world = _rank_world()
    tags, notes = candidate_tags(ckpt_dir)
    failed = []
    for tag in tags:
        try:
            meta = read_meta(ckpt_dir, tag)
            problems = verify(Path(ckpt_dir) / tag, meta, share=(rank, world))
            if "files" not in meta:
                notes.append(f"{Path(ckpt_dir) / tag} has no checksums (an older ldmscale wrote it): not verified")
        except CheckpointError as err:
            problems = [str(err)]
        problems = [p for part in _gather(problems) for p in part]
        if not problems:
            if failed:
                notes.append(f"resuming from {Path(ckpt_dir) / tag}, the newest checkpoint that verifies")
            return tag, notes
        failed.append(f"{Path(ckpt_dir) / tag}: " + "; ".join(problems[:3]))
        notes.append(f"skipping checkpoint {failed[-1]}")
    if failed:
        raise CheckpointError("no checkpoint verifies, so the run stops instead of starting over: "
                              + " | ".join(failed) + ". Restore the files, or move the checkpoints away to "
                              "start afresh")
    partial = sorted(p.name for p in Path(ckpt_dir).glob("step_*")) if Path(ckpt_dir).is_dir() else []
    if partial:
        notes.append(f"{ckpt_dir}: ignoring incomplete checkpoints {partial} (no {META}): starting afresh")
    return None, notes


def _warn(notes: list[str]) -> None:
    for note in notes:
        if _rank_world()[0] == 0:
            warnings.warn(f"[ldmscale] {note}", stacklevel=3)


# ---------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves every `every_steps`, at the end and on request; resumes from the newest verified one."""

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
        """Collective: every rank writes its shards; 'latest' moves only once all ranks' files are on disk
        and checksummed; only then are older checkpoints pruned."""
        rank, world = _rank_world()
        tag = tag_for(step)
        step_dir = self.dir / tag
        if step == self.last_saved_step and (step_dir / META).is_file():
            return step_dir  # this very state is saved (e.g. a stop request right after a periodic save)
        if rank == 0 and step_dir.exists():  # a half-written one from a crash at this step, or a stale one
            shutil.rmtree(step_dir)
        _barrier()
        step_dir.mkdir(parents=True, exist_ok=True)
        for name, engine in engines.items():
            engine.save(str(step_dir), tag=name, client_state={"step": step})
        torch.save(client_state, step_dir / f"client_rank{rank}.pt")
        _barrier()  # every rank's files are written
        files = _checkpoint_files(step_dir)
        checksums = {rel: file_checksum(step_dir / rel, sync=True) for rel in files[rank::world]}
        merged = {k: v for part in _gather(checksums) for k, v in part.items()}
        if rank == 0:
            full_meta = dict(meta, step=step, world_size=world, engines=sorted(engines),
                             zero_stage={n: e.zero_stage for n, e in engines.items()}, files=merged)
            _write_atomic(step_dir / META, json.dumps(full_meta, indent=2, default=str))
            _write_atomic(self.dir / LATEST, tag)
            self._prune(keep=tag)
        _barrier()
        self.last_saved_step = step
        return step_dir

    def _prune(self, keep: str) -> None:
        """Keep the newest `keep_last` up to the new one (which is complete and checksummed from disk).

        Checkpoints after `keep` belong to a history this run abandoned (it resumed from an older one):
        they go, so a later fallback cannot pick them, and so do that history's post-hoc EMA snapshots
        (which a reconstruction would otherwise mix in). Folders without meta.json are never touched here
        (a crash mid-save leaves one; the next save at that step replaces it).
        """
        from ldmscale.ema import SNAPSHOT_DIR, list_snapshots

        tags = complete_tags(self.dir)
        newer = [t for t in tags if t > keep]
        older = [t for t in tags if t < keep]
        excess = len(older) + 1 - max(1, self.cfg.keep_last)
        for old in newer + older[: max(0, excess)]:
            shutil.rmtree(self.dir / old, ignore_errors=True)
        if (self.dir / SNAPSHOT_DIR).is_dir():
            step = int(keep.removeprefix("step_"))
            for snapshot in list_snapshots(self.dir / SNAPSHOT_DIR):
                if snapshot.step > step:
                    snapshot.path.unlink(missing_ok=True)

    def resume_tag(self) -> str | None:
        """Collective: the newest checkpoint that verifies (None to start afresh); see find_verified."""
        if not self.cfg.resume:
            return None
        tag, notes = find_verified(self.dir)
        _warn(notes)
        return tag

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
            try:
                engine.load(str(self.dir / tag), tag=name)
            except (AssertionError, FileNotFoundError, KeyError) as err:  # DeepSpeed's bare asserts
                raise CheckpointError(f"rank {rank}: loading engine {name!r} from {self.dir / tag} failed: "
                                      f"{type(err).__name__}: {err}") from err
        path = self.dir / tag / f"client_rank{rank}.pt"
        if not path.is_file():
            raise CheckpointError(f"rank {rank}: {path} is missing")
        return load_data(path)


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Initialise `module` from a consolidated file (safetensors or torch); names must match exactly.

    A folder (our "ldmscale" export or a diffusers unet) initialises the U-Net of a Denoiser.
    """
    path = Path(path)
    if path.is_dir() and hasattr(module, "unet"):
        from ldmscale.models.interop import load_unet_weights

        load_unet_weights(module.unet, path)
        return

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
    if tag is None:
        tag, notes = find_verified(ckpt_dir)
        _warn(notes)
        if tag is None:
            raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint (no step_*/{META})")
    meta = read_meta(ckpt_dir, tag)
    problems = verify(ckpt_dir / tag, meta)
    if problems:
        raise CheckpointError(f"{ckpt_dir / tag} does not verify: " + "; ".join(problems))
    if engine not in meta["engines"]:
        raise KeyError(f"{ckpt_dir / tag} has engines {meta['engines']}, not {engine!r}")
    state = consolidate_state_dict(str(ckpt_dir / tag), engine, int(meta["zero_stage"][engine]))
    if ema:
        files = [ckpt_dir / tag / f"client_rank{r}.pt" for r in range(int(meta["world_size"]))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"EMA partitions missing: {absent}")
        partitions = [_ema_state(load_data(f), engine, f) for f in files]
        state = {**state, **assemble_partitions(partitions, {k: v.shape for k, v in state.items()})}
    return state, meta


def write_weights_export(state: dict[str, torch.Tensor], out: str | Path, *, weights: str, step: int,
                         source: str | Path, config: dict[str, Any]) -> Path:
    """The flat safetensors export that sampling, evaluation and checkpoint.load_weights_only read: a
    Denoiser state dict, with metadata naming the weights (ema, raw, ...), the step, the run and its config."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"weights": weights, "step": str(step), "source": str(Path(source).resolve()),
            "config": json.dumps(config, default=str)}
    write_weights({k: v.contiguous() for k, v in state.items()}, out, metadata=info)
    return out
