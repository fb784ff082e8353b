"""The demo config's first U-Net steps reproduce committed reference losses (a refactor guard).

Any change to the network, the objective, the loader, the engine or the seeding moves these numbers.
A deliberate change regenerates them: LDMSCALE_REGEN_REFERENCE=1 pytest tests/test_reference_losses.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._train_helpers import make_cached_shards

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "assets" / "demo_reference_losses.json"
NUM_STEPS = 6


def _demo_losses(tmp_path: Path) -> list[float]:
    cache = make_cached_shards(tmp_path, num_shards=2, per_shard=64)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    # The demo's own U-Net settings (conf/config.yaml), shortened; one process, fp32, ZeRO-0.
    cmd = [sys.executable, "-m", "ldmscale.train", "stage=diffusion", f"run_dir={run_dir}",
           f"data.train_shards=[{cache}]", f"trainer.max_steps={NUM_STEPS}", "trainer.log_every_steps=1",
           "trainer.sample_every_steps=0", f"checkpoint.every_steps={NUM_STEPS}", "logger.wandb_mode=disabled",
           "logger.progress_bar=false"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_demo_first_steps_match_reference(tmp_path):
    losses = _demo_losses(tmp_path)
    assert len(losses) == NUM_STEPS
    if os.environ.get("LDMSCALE_REGEN_REFERENCE") == "1":
        REFERENCE.write_text(json.dumps({"losses": losses}, indent=2) + "\n")
        pytest.skip(f"regenerated {REFERENCE}")
    reference = json.loads(REFERENCE.read_text())["losses"]
    # fp32 on CPU: kernels may differ across CPUs/BLAS builds in the last bits, never more.
    assert losses == pytest.approx(reference, rel=2e-4, abs=1e-6)
