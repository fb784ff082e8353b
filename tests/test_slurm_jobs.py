"""Against the real local SLURM cluster (slurm/start_test_cluster.sh): the real training entry point
(ldmscale.train.run: tiny U-Net, cached synthetic shards, ZeRO-2 over gloo) as a 2-task job, timeout
signal → save → requeue → exact resume, and impossible requests refused at submit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from ldmscale.checkpoint import latest_tag, read_meta
from ldmscale.config import compose
from ldmscale.launch.slurm import SubmissionError, build_executor, submit, submit_training
from tests._slurm_helpers import die_or_wait
from tests._train_helpers import make_cached_shards

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 10
EVERY = 4  # periodic saves at 4 and 8: the interrupt (sent after step 2) lands between them


@pytest.fixture(autouse=True)
def _job_env(monkeypatch):
    # sbatch passes the submitting environment on: the job imports ldmscale from this checkout.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cached_shards(tmp_path_factory.mktemp("slurm_cache"))


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True).stdout.split()
    return out[0] if out else ""


def _wait(predicate, timeout: float, what: str, job=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if job is not None and job.state in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
            pytest.fail(f"job {job.job_id} ended {job.state} while waiting for {what}:\n{job.stderr()}")
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def _overrides(run_dir: Path, cache: Path) -> list[str]:
    return [
        "stage=diffusion", "launcher=slurm", "launcher.gpus_per_node=0", "launcher.tasks_per_node=2",
        "launcher.cpus_per_task=1",
        # >= 50 min: below, submitit treats every signal as a timeout (ENVIRONMENT.md pitfalls).
        "launcher.timeout_min=60", "launcher.signal_delay_s=120", "launcher.max_num_timeout=2",
        f"run_dir={run_dir}", f"data.train_shards=[{cache}]", "data.micro_batch_size=8",
        "data.global_batch_size=16", "deepspeed.zero_stage=2", "logger=disabled", "logger.progress_bar=false",
        f"trainer.max_steps={MAX_STEPS}", "trainer.log_every_steps=1", f"checkpoint.every_steps={EVERY}",
    ]


def _steps_and_losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def test_a_task_killed_outright_ends_the_whole_job_at_once(tmp_path):
    cfg = compose(["launcher=slurm", "launcher.gpus_per_node=0", "launcher.tasks_per_node=2",
                   "launcher.cpus_per_task=1", "launcher.timeout_min=60", f"run_dir={tmp_path}"])
    started = time.monotonic()
    job = build_executor(cfg.launcher, tmp_path / "slurm").submit(die_or_wait)
    try:
        _wait(lambda: _sacct_state(job.job_id) not in ("", "PENDING", "RUNNING", "REQUEUED"), 240, "the job to end")
    finally:
        job.cancel(check=False)  # a hung task 0 must not hold the test cluster's CPUs
    elapsed = time.monotonic() - started
    assert _sacct_state(job.job_id) == "FAILED", job.stderr()
    log = job.stderr() or ""  # srun's own lines go to task 0's stderr
    assert "task 1: Killed" in log and "task 0: Killed" in log, log  # killed by srun, not by its own error
    assert elapsed < 120, f"the job took {elapsed:.0f} s: task 0 was left running after task 1 died"
    print(f"a task killed outright: job over {elapsed:.1f} s after submission (task 0 would have slept 300 s)")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> Path:
    """An uninterrupted 2-task run: the first test's subject and the requeue test's reference."""
    run_dir = tmp_path_factory.mktemp("slurm_ref")
    # The user's command: submits, prints the job id and log paths, and returns without waiting.
    proc = subprocess.run([sys.executable, "-m", "ldmscale.train", *_overrides(run_dir, cache)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    submitted = re.search(r"submitted SLURM job (\d+)\n  stdout: (\S+)\n  stderr: (\S+)", proc.stdout)
    assert submitted, proc.stdout
    job_id, stdout, _ = submitted.groups()
    assert Path(stdout) == run_dir / "slurm" / f"{job_id}_0_log.out"
    submitit.SlurmJob(run_dir / "slurm", job_id, tasks=(0, 1)).results()  # raises with a failed task's traceback
    return run_dir


def test_two_task_job_trains_and_checkpoints(reference):
    records = _steps_and_losses(reference)
    assert [s for s, _ in records] == list(range(1, MAX_STEPS + 1))
    ckpts = reference / "checkpoints"
    assert latest_tag(ckpts) == f"step_{MAX_STEPS:08d}"
    meta = read_meta(ckpts, latest_tag(ckpts))
    assert meta["step"] == MAX_STEPS and meta["world_size"] == 2  # both SLURM tasks were ranks of one run
    assert meta["config"]["launcher"]["kind"] == "slurm"
    assert all(loss == loss and loss > 0 for _, loss in records)  # finite, real diffusion losses


def test_timeout_signal_requeues_and_resumes_exactly(reference, cache, tmp_path):
    run_dir = tmp_path / "interrupted"
    job = submit_training(compose(_overrides(run_dir, cache)))
    _wait(lambda: len(_steps_and_losses(run_dir)) >= 2, 180, "2 training steps", job)
    job._interrupt(timeout=True)  # USR2 only: what SLURM sends signal_delay_s before the time limit
    stdout = Path(job.paths.stdout)  # task 0's; submitit logs there, appending across requeues
    _wait(lambda: stdout.exists() and "Exiting gracefully after preemption/timeout" in stdout.read_text(), 120,
          "task 0 to save and requeue the job", job)
    # The first run is over and the requeued one has not started (it waits for its credential to expire).
    stopped_at = len(_steps_and_losses(run_dir))
    assert 2 <= stopped_at < MAX_STEPS, "the signal must land mid-run"
    assert latest_tag(run_dir / "checkpoints") == f"step_{stopped_at:08d}"  # saved on request at the stop
    _wait(lambda: _sacct_state(job.job_id) == "COMPLETED"
          and latest_tag(run_dir / "checkpoints") == f"step_{MAX_STEPS:08d}", 240,
          "the requeued job to finish", job)

    log = stdout.read_text()
    assert log.count("Starting with JobEnvironment") == 2, log[-3000:]  # the first run and the requeued one
    assert "caught SIGUSR2" in Path(job.paths.stderr).read_text()
    got, want = _steps_and_losses(run_dir), _steps_and_losses(reference)
    # Every step logged exactly once: the requeued job resumed at the step where the signal stopped the
    # first one, not from an earlier periodic checkpoint or from scratch ...
    assert [s for s, _ in got] == list(range(1, MAX_STEPS + 1))
    # ... and reproduced the uninterrupted run bit for bit, final loss included.
    assert got == want
    assert read_meta(run_dir / "checkpoints", latest_tag(run_dir / "checkpoints"))["step"] == MAX_STEPS


@pytest.mark.parametrize("override, message", [
    ("launcher.cpus_per_task=4096", "More processors requested than permitted"),
    ("launcher.gpus_per_node=1", "Invalid generic resource"),
])
def test_impossible_request_fails_at_submit(tmp_path, override, message):
    cfg = compose(["launcher=slurm", "launcher.gpus_per_node=0", f"launcher.folder={tmp_path}", override])
    with pytest.raises(SubmissionError, match=message):
        submit(build_executor(cfg.launcher), print, "never runs")
