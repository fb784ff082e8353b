"""SLURM through submitit: the executor built from `cfg.launcher`, and the requeueable training job.

The job runs `ldmscale.train.run(cfg)`, the same entry point torchrun runs; nothing here trains.
On SIGUSR2 (SLURM's warning `signal_delay_s` before the time limit, or a preemption) every task asks
the trainer to save, the trainer stops at the next step boundary once all ranks agree, and task 0
hands over to submitit, which pickles `checkpoint()`'s DelayedSubmission and requeues the job. The
requeued job runs the same config again, and re-running resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from ldmscale.config import Config, LauncherConfig

# submitit's sbatch script asks for `--signal=USR2@signal_delay_s`; preemption sends it too.
STOP_SIGNAL = signal.SIGUSR2


def tasks_per_node(cfg: LauncherConfig) -> int:
    """One task per GPU; one task per node without GPUs unless set explicitly."""
    return cfg.tasks_per_node or max(1, cfg.gpus_per_node)


def executor_parameters(cfg: LauncherConfig) -> dict[str, Any]:
    """The `SlurmExecutor.update_parameters` keywords for `cfg` (unset options are left out)."""
    params: dict[str, Any] = {
        "nodes": cfg.nodes,
        "ntasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": cfg.cpus_per_task,
        "time": cfg.timeout_min,
        "signal_delay_s": cfg.signal_delay_s,
        "job_name": cfg.job_name,
        "array_parallelism": cfg.array_parallelism,
        # A task that dies outright (OOM killer, SIGKILL, a segfault) reports nothing to its peers; srun
        # then ends the others at once instead of leaving them in a collective until NCCL's timeout.
        # submitit's own handlers never exit a non-zero task early, so requeues are unaffected.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    # A GRES request of 0 GPUs still fails on a node without GRES: leave the flag out entirely.
    if cfg.gpus_per_node > 0:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb > 0:
        params["mem"] = f"{cfg.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(cfg, key)
        if value:
            params[key] = value
    if cfg.setup:
        params["setup"] = list(cfg.setup)
    if cfg.additional_parameters:
        params["additional_parameters"] = dict(cfg.additional_parameters)
    return params


def build_executor(cfg: LauncherConfig, folder: str | Path | None = None) -> submitit.SlurmExecutor:
    """A submitit SlurmExecutor for `cfg`; logs go to `folder` (default `cfg.folder`) as %j_%t_log.*."""
    folder = Path(folder or cfg.folder).absolute()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.max_num_timeout)
    executor.update_parameters(**executor_parameters(cfg))
    return executor


# ---------------------------------------------------------------------------- stop requests
def request_save() -> None:
    """Ask the running trainer to save a checkpoint and stop at the next step boundary."""
    from ldmscale.checkpoint import SAVE_REQUEST

    SAVE_REQUEST.request(stop=True)


class _StopOnSignal:
    """Within the block, STOP_SIGNAL only records itself and asks the trainer to save.

    submitit's own handler (checkpoint + requeue on task 0) cannot run inside the signal: saving is a
    collective over all ranks. It is kept and called once the trainer has stopped.
    """

    def __init__(self) -> None:
        self.received = False
        self.submitit_handler: Any = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        print(f"[ldmscale] caught {signal.Signals(signum).name}: saving a checkpoint, then requeueing",
              file=sys.stderr, flush=True)
        self.received = True
        request_save()

    def __enter__(self) -> _StopOnSignal:
        self.submitit_handler = signal.signal(STOP_SIGNAL, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(STOP_SIGNAL, self.submitit_handler)

    def requeue(self) -> None:
        """Hand over to submitit: task 0 pickles checkpoint()'s DelayedSubmission, requeues, exits."""
        if callable(self.submitit_handler):
            self.submitit_handler(STOP_SIGNAL, None)


class TrainingJob(Checkpointable):
    """The submitted callable: run the training entry point; on a stop signal save and requeue."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self) -> Any:
        from ldmscale.distributed import env
        from ldmscale.train import run

        with _StopOnSignal() as stop:
            result = run(self.cfg)
        if stop.received:
            env.teardown()  # every rank leaves the process group before task 0 requeues the job
            stop.requeue()  # task 0 does not return from here
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # By the time submitit calls this (from _StopOnSignal.requeue) the trainer has saved; if it
        # is called from submitit's own handler (the signal came before __call__), nothing trains yet.
        request_save()
        return DelayedSubmission(self, *args, **kwargs)


# ---------------------------------------------------------------------------- submission
def _absolute_run_dir(cfg: Config) -> Config:
    """The job may start in another directory: pin run_dir, checkpoints and logs to absolute paths."""
    run_dir = str(Path(cfg.run_dir).absolute())
    launcher = dataclasses.replace(cfg.launcher, folder=str(Path(cfg.launcher.folder).absolute()))
    checkpoint = dataclasses.replace(cfg.checkpoint, dir=str(Path(cfg.checkpoint.dir).absolute()))
    return dataclasses.replace(cfg, run_dir=run_dir, launcher=launcher, checkpoint=checkpoint)


def describe(job: submitit.Job) -> str:
    """The job id and where its logs are, for the user to copy."""
    return (f"submitted SLURM job {job.job_id}\n"
            f"  stdout: {job.paths.stdout}\n  stderr: {job.paths.stderr}\n"
            f"  watch:  squeue -j {job.job_id}; tail -f {job.paths.stdout}")


class SubmissionError(RuntimeError):
    """sbatch refused the request; the message carries SLURM's own reason and the request."""


def submit(executor: submitit.SlurmExecutor, fn: Callable[..., Any], *args: Any) -> submitit.Job:
    """`executor.submit`, with sbatch's refusal (e.g. no GRES, too many CPUs) raised at once."""
    try:
        return executor.submit(fn, *args)
    except submitit.core.utils.FailedJobError as err:
        request = " ".join(f"--{k}={v}" for k, v in executor.parameters.items() if k != "additional_parameters")
        raise SubmissionError(f"SLURM refused the job ({request}): {err}") from err


def submit_training(cfg: Config) -> submitit.Job:
    """Submit `cfg` as a requeueable training job and return at once."""
    cfg = _absolute_run_dir(cfg)
    # The job calls run() directly, never the dispatch in launch(), so it cannot submit itself again.
    return submit(build_executor(cfg.launcher), TrainingJob(cfg))
