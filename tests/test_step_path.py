"""The stage-2 step path: no host syncs of ldmscale's own between logged steps; non-finite steps skipped on
every rank without one, and the run stopped at the next check; model.compile compiles the denoiser that
trains (tests/workers/step_path.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldmscale.distributed.env import free_port
from tests._train_helpers import make_cached_shards

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "step_path.py"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cached_shards(tmp_path_factory.mktemp("step_path"), num_shards=2, per_shard=16)


def run_worker(cache: Path, run_dir: Path, mode: str, stage: int, ranks: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions"))
    args = [str(WORKER), str(cache), str(run_dir), mode, str(stage)]
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    proc = subprocess.run(launcher + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_no_ldmscale_syncs(out: dict) -> None:
    assert out["steps"] == 4 and out["accumulation"] == 2
    ours = {k: v for k, v in out["counts"].items() if k.startswith("ldmscale")}
    assert not ours, f"host syncs from ldmscale's step path over 4 steps: {ours}"
    # The counter does see ldmscale's frames: Engine.grad_norm's .item() (a logged-step call) is attributed.
    assert any(k.startswith("ldmscale:engine.py:grad_norm") for k in out["probe"]), out["probe"]


def test_no_host_syncs_between_logged_steps_zero0(cache, tmp_path):
    _assert_no_ldmscale_syncs(run_worker(cache, tmp_path, "syncs", 0, 1))


@pytest.mark.slow
def test_no_host_syncs_between_logged_steps_zero2_two_ranks(cache, tmp_path):
    _assert_no_ldmscale_syncs(run_worker(cache, tmp_path, "syncs", 2, 2))


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_on_one_rank_skips_everywhere_and_stops_at_the_check(cache, tmp_path, stage):
    out = run_worker(cache, tmp_path, "nonfinite", stage, 2)
    assert out["unchanged"] and out["ema_unchanged"], out  # the NaN step left weights and EMA alone
    assert out["in_a_row_before_check"] == 0  # nothing read on the host before the check step
    assert out["moved_after"] and out["counted_at_step3"] == [1, 0], out  # one skipped, then a good step
    assert out["stopped_at"] == 6 and "3 consecutive non-finite losses" in out["error"], out


@pytest.mark.slow
def test_compile_trains_the_compiled_blocks_and_matches_eager(cache, tmp_path):
    """model.compile=true through build_diffusion_task and DiffusionTask.train_step (backend aot_eager: real
    Dynamo tracing and AOTAutograd without the minutes of CPU codegen; the backend is a config choice)."""
    out = run_worker(cache, tmp_path, "compile", 0, 1)
    assert out["eager_calls"] == 0 and out["graphs"] >= 1, out
    # every U-Net block runs as a compiled graph in every forward of the training step, without graph breaks
    assert out["graph_breaks"] == 0 and out["graph_calls"] == out["blocks"] * out["forwards"], out
    assert out["compiled_losses"] == pytest.approx(out["eager_losses"], rel=1e-5, abs=1e-6), out
    assert out["max_weight_diff"] < 1e-5, out


@pytest.mark.slow
def test_zero3_init_builds_half_the_model_per_rank():
    """ZeRO-3 over 2 ranks: with deepspeed.zero3_init each rank's peak memory while building the denoiser is
    about half the model's fp32 bytes; without it, the whole model (the control that the measure sees it).
    Both builds then train a step."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               MALLOC_MMAP_THRESHOLD_="65536",  # big frees go back to the OS at once: RSS follows live tensors
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions"))
    peaks = {}
    for zero3_init in ("true", "false"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "tests" / "workers" / "zero3_init.py"), zero3_init]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert sorted(r["rank"] for r in ranks) == [0, 1]
        assert all(r["partitioned"] == (zero3_init == "true") and r["loss"] == r["loss"] for r in ranks), ranks
        peaks[zero3_init] = [r["peak"] / r["full"] for r in ranks]
    assert all(0.4 < ratio < 0.65 for ratio in peaks["true"]), peaks  # about half the model per rank
    assert all(ratio > 0.9 for ratio in peaks["false"]), peaks  # the whole model without zero3_init
