"""Rank, world size and rendezvous for every launcher (python, torchrun, deepspeed, srun, submitit).

All rank logic lives here: the rest of the code asks `is_main()` or uses `print0`, and never
reads launcher variables itself.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # python | torchrun | deepspeed | srun | submitit

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist such as 'gpu[001-003,7],cpu1' into host names."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                hosts.extend(f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def port_from_job_id(job_id: str) -> int:
    """A rendezvous port every task of one job derives alike, spread over 20000-29999."""
    digest = hashlib.sha1(job_id.encode()).hexdigest()
    return 20000 + int(digest, 16) % 10000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_rank_from_argv(argv: list[str]) -> int | None:
    # The deepspeed launcher passes --local_rank=N (older versions: --local_rank N).
    for i, arg in enumerate(argv):
        if arg.startswith("--local_rank="):
            return int(arg.split("=", 1)[1])
        if arg == "--local_rank" and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


def detect(environ: Mapping[str, str] | None = None, argv: list[str] | None = None) -> DistEnv:
    """Work out this process's place from the launcher's variables, most specific first."""
    environ = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    get = environ.get

    argv_local = _local_rank_from_argv(argv)
    in_slurm_step = "SLURM_PROCID" in environ and ("SLURM_STEP_NUM_TASKS" in environ or "SLURM_NTASKS" in environ)
    if in_slurm_step and "SUBMITIT_EXECUTOR" in environ:
        # A submitit task: sbatch hands on the submitting shell's environment, so RANK/WORLD_SIZE there are
        # stale (e.g. submitted from a process that ran torch.distributed); SLURM's own variables are not.
        launcher = "submitit"
    elif "RANK" in environ and "WORLD_SIZE" in environ:
        # torchrun, the deepspeed launcher (which adds --local_rank), or variables exported by hand.
        launcher = "deepspeed" if argv_local is not None else "torchrun"
    elif in_slurm_step:
        launcher = "srun"
    else:
        launcher = "python"

    if launcher in ("srun", "submitit"):
        rank = int(get("SLURM_PROCID", "0"))
        # A step's own task count: inside an allocation SLURM_NTASKS is the allocation's.
        world_size = int(get("SLURM_STEP_NUM_TASKS", get("SLURM_NTASKS", "1")))
        local_rank = int(get("SLURM_LOCALID", "0"))
        nodes = max(1, int(get("SLURM_JOB_NUM_NODES", get("SLURM_NNODES", "1"))))
        local_world_size = int(get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or max(1, world_size // nodes)
        hosts = expand_nodelist(get("SLURM_JOB_NODELIST", get("SLURM_NODELIST", "127.0.0.1")))
        # SLURM_JOB_ID, not SLURM_ARRAY_JOB_ID: array tasks (sweep points) sharing a node need their
        # own ports, and every task of one array element shares its SLURM_JOB_ID.
        own_addr, own_port = hosts[0] if hosts else "127.0.0.1", port_from_job_id(get("SLURM_JOB_ID", "0"))
        if launcher == "submitit":  # MASTER_* here came from the submitting shell: stale, shared by every job
            master_addr, master_port = own_addr, own_port
        else:  # an sbatch script may set them for its srun on purpose
            master_addr, master_port = get("MASTER_ADDR", own_addr), int(get("MASTER_PORT", own_port))
    elif launcher == "python":
        rank, world_size, local_rank, local_world_size = 0, 1, 0, 1
        master_addr = get("MASTER_ADDR", "127.0.0.1")
        master_port = int(get("MASTER_PORT", 0)) or free_port()
    else:
        rank = int(get("RANK", "0"))
        world_size = int(get("WORLD_SIZE", "1"))
        local_rank = argv_local if argv_local is not None else int(get("LOCAL_RANK", "0"))
        local_world_size = int(get("LOCAL_WORLD_SIZE", "0")) or world_size
        master_addr = get("MASTER_ADDR", "127.0.0.1")
        master_port = int(get("MASTER_PORT", "29500"))
    return DistEnv(rank, world_size, local_rank, local_world_size, master_addr, master_port, launcher)


def export(dist: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Write the torch.distributed/DeepSpeed variables, so no MPI discovery is attempted."""
    environ = os.environ if environ is None else environ
    environ["RANK"] = str(dist.rank)
    environ["WORLD_SIZE"] = str(dist.world_size)
    environ["LOCAL_RANK"] = str(dist.local_rank)
    environ["LOCAL_WORLD_SIZE"] = str(dist.local_world_size)
    environ["MASTER_ADDR"] = dist.master_addr
    environ["MASTER_PORT"] = str(dist.master_port)
    # One thread per rank unless the user chose: oversubscribed ranks run ~2x slower.
    if "OMP_NUM_THREADS" not in environ:
        cores = os.cpu_count() or 1
        environ["OMP_NUM_THREADS"] = str(max(1, cores // max(1, dist.local_world_size)))


_CURRENT: DistEnv | None = None


def setup(backend: str = "auto") -> DistEnv:
    """Detect, export and initialise the default process group (gloo on CPU, nccl on GPU)."""
    global _CURRENT
    import torch
    import torch.distributed as tdist

    dist = detect()
    export(dist)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(dist.local_rank)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size)
        atexit.register(teardown)
    _CURRENT = dist
    if dist.world_size > 1:
        _PEERS.start(dist)
    return dist


class _PeerWatch:
    """Ends this rank as soon as another rank reports a failure through the rendezvous store.

    A peer's death only surfaces at our next collective, and under NCCL that collective may wait out its
    timeout (minutes); a rank busy outside collectives (data loading, a save) would not notice at all,
    and torchrun's SIGTERM is taken as "save and stop". So a failing rank sets a key in the job's
    TCPStore (the launcher's, at MASTER_ADDR:MASTER_PORT) and every rank has a daemon thread blocked on
    that key, on its own store connection (no polling, no load on the store).
    """

    def __init__(self) -> None:
        self.store: Any = None
        self.stopping = threading.Event()

    @staticmethod
    def key() -> str:  # one per torchrun restart round: an old failure must not end a restarted job
        return f"ldmscale/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def _connect(self, dist: DistEnv) -> Any:
        import torch.distributed as tdist

        return tdist.TCPStore(dist.master_addr, dist.master_port, is_master=False,
                              timeout=timedelta(seconds=30), wait_for_workers=False)

    def start(self, dist: DistEnv) -> None:
        try:
            self.store = self._connect(dist)
            watcher = self._connect(dist)
        except Exception:  # no reachable store (an unusual launcher): collectives and the launcher remain
            return
        threading.Thread(target=self._watch, args=(watcher, dist), name="ldmscale-peer-watch", daemon=True).start()

    def _watch(self, store: Any, dist: DistEnv) -> None:
        while not self.stopping.is_set():
            try:
                store.wait([self.key()], timedelta(days=1))
            except Exception:  # a timeout, or the store went away at the end of the job
                if self.stopping.wait(1.0):
                    return
                continue
            if self.stopping.is_set():
                return
            failed = store.get(self.key()).decode()
            sys.stderr.write(f"[ldmscale] rank {dist.rank}: stopping, rank {failed} failed (its error is above)\n")
            sys.stderr.flush()
            os._exit(1)

    def report(self, rank: int) -> None:
        """Tell every peer that `rank` failed; keep the store up a moment in case this process hosts it."""
        self.stopping.set()  # this rank exits on its own
        if self.store is not None:
            try:
                self.store.set(self.key(), str(rank))
                time.sleep(1.0)
            except Exception:
                pass


_PEERS = _PeerWatch()


def teardown() -> None:
    """Destroy the process group after a clean run; skipping this crashed ~4% of runs at exit (SIGABRT).

    Only for the success path: after a failure the barrier would wait for peers that are blocked in a
    collective the failed rank never joins (see fail_fast).
    """
    import torch.distributed as tdist

    _PEERS.stopping.set()  # before the barrier: a peer may leave (and take the store with it) right after
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.barrier()
        except Exception:  # a dead peer must not stop our own clean exit
            pass
        tdist.destroy_process_group()


@contextlib.contextmanager
def fail_fast(dist: DistEnv | None = None) -> Iterator[None]:
    """One rank's exception ends the whole job, now, with that exception printed.

    With several ranks the failed one prints its traceback (prefixed with its rank) and leaves with
    os._exit(1): no teardown barrier, no atexit hook that could wait on peers. Its sockets close, so the
    peers' next collective fails at once (and torchrun/srun stop them too) instead of waiting out the
    process-group timeout. A single process re-raises as usual.
    """
    dist = dist or current()
    try:
        yield
    except BaseException as err:
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise
        if dist.world_size == 1:
            raise
        message = "".join(traceback.format_exception(err))
        sys.stderr.write("".join(f"[rank {dist.rank}] {line}\n" for line in message.rstrip().splitlines()))
        sys.stderr.write(f"[ldmscale] rank {dist.rank} of {dist.world_size} failed: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''} - ending the job\n")
        sys.stderr.flush()
        sys.stdout.flush()
        _PEERS.report(dist.rank)
        os._exit(1)


def current() -> DistEnv:
    return _CURRENT if _CURRENT is not None else detect()


def is_main() -> bool:
    return current().is_main


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)
