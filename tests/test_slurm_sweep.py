"""A Hydra multirun through hydra/launcher=submitit_slurm runs as ONE SLURM array, each sweep point
training (the real entry point) in its own run dir by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldmscale.checkpoint import latest_tag
from tests._train_helpers import make_cached_shards

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]


def test_hydra_sweep_over_two_values_is_one_array(tmp_path):
    cache = make_cached_shards(tmp_path / "data", num_shards=2, per_shard=8)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_SILENT="true",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions"))
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, "-m", "ldmscale.train", "-m", "stage=diffusion", "hydra/launcher=submitit_slurm",
           "hydra.launcher.timeout_min=60", "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={sweep}",
           f"data.train_shards=[{cache}]", "data.micro_batch_size=4", "data.global_batch_size=4",
           "trainer.max_steps=2", "trainer.log_every_steps=1", "logger=disabled", "logger.progress_bar=false",
           "seed=11,12"]  # no run_dir given: each sweep job gets its own
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the launcher waits for the jobs
    for num, seed in enumerate((11, 12)):  # each sweep job trained with its own value in its own folder
        run_dir = sweep / str(num)
        saved = json.loads((run_dir / "config.json").read_text())
        assert (saved["seed"], saved["run_dir"]) == (seed, str(run_dir))
        assert latest_tag(run_dir / "checkpoints") == "step_00000002"  # its own checkpoint, from step 0
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "runs").exists()  # nothing in the single-run default folder
    submissions = list((sweep / ".submitit").glob("*/*_submission.sh"))
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
