"""The paper's other tasks, shortened: each demo_* experiment learns enough to beat its baseline.

One shortened stage 1 (shards + autoencoder) is shared: each task's run directory starts with those two
pipeline steps marked done, so the pipeline runs the rest — the task's cache, U-Net and evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["logger.wandb_mode=disabled", "pipeline.num_train_samples=4000", "pipeline.shard_size=1000",
         "pipeline.num_val_samples=64", "pipeline.eval_seeds_per_prompt=1",
         "pipeline.autoencoder_overrides=['trainer.max_steps=600','trainer.sample_every_steps=300']",
         "trainer.max_steps=400", "checkpoint.every_steps=200", "trainer.sample_every_steps=0"]

# Fixed here and never loosened to make a test pass. Baselines: an untrained model gives ~1% clean shapes
# and 1/18 classes; a model that ignores the layout lands in the box's quadrant 1 time in 4 (IoU 0
# elsewhere); bicubic upsampling and a mean-colour fill are the SR and inpainting baselines.
TARGETS = {
    "uncond": ("clean_single_shape", 0.50),
    "class": ("class", 0.30),
    "layout": ("iou_at_least_0.5", 0.50),
    "sr4": ("gain_db", 0.0),
    "inpaint": ("gain_db", 0.0),
}
# SR must get fine detail right to beat bicubic at all (400 steps: -0.24 dB; 1,000: +3.4 dB), and inpainting
# had a thin margin at 400 (+1.1 dB): both train longer.
STEPS = {"sr4": 1000, "inpaint": 700}


def _run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "ldmscale.train", f"run_dir={run_dir}", *SHORT, *overrides]
    return subprocess.run(cmd, env=env, cwd=run_dir.parent, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """Synthetic shards + a shortened autoencoder, via the demo pipeline itself (uncond: nothing to cache
    but latents); its first two steps are what every task shares."""
    base = tmp_path_factory.mktemp("stage1") / "run"
    proc = _run(base, "+experiment=demo_uncond", "trainer.max_steps=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return base


def _task_dir(stage1: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("data", "autoencoder"):
        shutil.copytree(stage1 / name, run_dir / name, symlinks=True)
    for marker in (".done-1", ".done-2"):
        shutil.copy(stage1 / marker, run_dir / marker)
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("task", list(TARGETS))
def test_shortened_task_beats_its_baseline(task, stage1, tmp_path):
    run_dir = _task_dir(stage1, tmp_path)
    proc = _run(run_dir, f"+experiment=demo_{task}", f"trainer.max_steps={STEPS.get(task, 400)}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "stage 1: autoencoder: done earlier, skipped" in proc.stdout
    scores = json.loads((run_dir / "eval.json").read_text())
    metric, threshold = TARGETS[task]
    assert scores["num_images"] == 72
    assert scores[metric] > threshold, scores
    assert (run_dir / "samples.png").is_file()
