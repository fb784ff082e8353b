"""Against the real local SLURM cluster (slurm/start_test_cluster.sh): training, requeue, refusal."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from ldmscale.config import compose
from ldmscale.launch.slurm import SubmissionError, build_executor, submit, submit_training

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _job_env(monkeypatch):
    # sbatch passes the submitting environment on: the job imports ldmscale (and this test package).
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True).stdout.split()
    return out[0] if out else ""


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.25)


def _train_cfg(run_dir: Path, *extra: str):
    return compose([
        "launcher=slurm", "launcher.gpus_per_node=0", "launcher.tasks_per_node=2", "launcher.cpus_per_task=1",
        "launcher.timeout_min=60", "launcher.signal_delay_s=30", "launcher.max_num_timeout=2",
        f"run_dir={run_dir}", "trainer.max_steps=30", "checkpoint.every_steps=10", *extra,
    ])


def _entry():
    import slurm_tiny_train

    return slurm_tiny_train.run


def test_two_task_job_trains_and_checkpoints(tmp_path):
    job = submit_training(_train_cfg(tmp_path), entry=_entry())
    job.results()  # raises with the job's traceback if any task failed
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["step"] == 30
    assert (tmp_path / "ckpt.pt").exists()


def test_timeout_signal_requeues_and_resumes_exactly(tmp_path):
    reference = submit_training(_train_cfg(tmp_path / "ref"), entry=_entry())
    run_dir = tmp_path / "interrupted"
    job = submit_training(_train_cfg(run_dir), entry=_entry())
    progress = run_dir / "progress.txt"
    _wait(lambda: progress.exists() and int(progress.read_text() or 0) >= 5, 60, "5 training steps")
    job._interrupt(timeout=True)  # USR2 only: what SLURM sends signal_delay_s before the time limit
    _wait(lambda: (run_dir / "final.json").exists(), 120, "the requeued job to finish")
    reference.results()
    _wait(lambda: _sacct_state(job.job_id) == "COMPLETED", 30, "sacct to report COMPLETED")
    starts = [int(s) for s in (run_dir / "starts.txt").read_text().split()]
    assert len(starts) == 2 and starts[0] == 0 and 5 <= starts[1] < 30, starts  # resumed, not restarted
    got = json.loads((run_dir / "final.json").read_text())
    want = json.loads((tmp_path / "ref" / "final.json").read_text())
    assert got == want


@pytest.mark.parametrize("override, message", [
    ("launcher.cpus_per_task=4096", "More processors requested than permitted"),
    ("launcher.gpus_per_node=1", "Invalid generic resource"),
])
def test_impossible_request_fails_at_submit(tmp_path, override, message):
    cfg = compose(["launcher=slurm", "launcher.gpus_per_node=0", f"launcher.folder={tmp_path}", override])
    with pytest.raises(SubmissionError, match=message):
        submit(build_executor(cfg.launcher), print, "never runs")
