"""A Hydra multirun through hydra/launcher=submitit_slurm runs as ONE SLURM array."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]


def test_hydra_sweep_over_two_values_is_one_array(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ldmscale.train", "-m", "hydra/launcher=submitit_slurm",
           "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}/multirun",
           f"run_dir={tmp_path}/runs/seed${{seed}}", "seed=11,12"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the launcher waits for the jobs
    for seed in (11, 12):  # each sweep job ran the entry point with its own value
        saved = json.loads((tmp_path / "runs" / f"seed{seed}" / "config.json").read_text())
        assert saved["seed"] == seed
    submissions = list((tmp_path / "multirun" / ".submitit").glob("*/*_submission.sh"))
    array_ids = {p.name.split("_")[0] for p in submissions}
    assert len(array_ids) == 1, submissions
    script = submissions[0].read_text()
    assert "#SBATCH --array=0-1" in script, script
    array_id = array_ids.pop()
    deadline = time.monotonic() + 15  # sacct lags squeue by a few seconds
    while True:
        states = subprocess.run(["sacct", "-n", "-X", "-P", "-j", f"{array_id}_0,{array_id}_1", "-o", "State"],
                                capture_output=True, text=True).stdout.split()
        if states == ["COMPLETED"] * 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert states == ["COMPLETED"] * 2, states
