"""Unit tests of the DeepSpeed config builder, batch arithmetic, lr schedule and memory estimates."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldmscale.config import DeepSpeedConfig, OptimConfig
from ldmscale.distributed import engine as eng


def test_accumulation_arithmetic_and_message():
    assert eng.gradient_accumulation_steps(256, 8, 4) == 8
    with pytest.raises(eng.BatchArithmeticError, match=r"micro_batch_size=8 × world_size=3 = 24"):
        eng.gradient_accumulation_steps(256, 8, 3)


def test_ds_config_stages_precision_offload_and_extra_merge():
    ds = DeepSpeedConfig(zero_stage=3, precision="bf16", gradient_clipping=0.5, offload_optimizer="cpu",
                         offload_param="nvme", nvme_path="/nvme",
                         extra={"zero_optimization": {"stage3_max_live_parameters": 123}, "foo": 1})
    cfg = eng.build_ds_config(ds, OptimConfig(lr=2e-4), micro_batch_size=4, global_batch_size=64, world_size=8)
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["train_batch_size"] == 64
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_max_live_parameters"] == 123  # deep-merged, not replaced
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["nvme_path"] == "/nvme"
    assert cfg["optimizer"]["params"]["lr"] == 2e-4 and cfg["foo"] == 1 and cfg["gradient_clipping"] == 0.5
    with pytest.raises(ValueError, match="offload_param"):
        eng.build_ds_config(DeepSpeedConfig(zero_stage=2, offload_param="cpu"), OptimConfig(),
                            micro_batch_size=1, global_batch_size=1, world_size=1)


def test_lr_warmup_then_cosine_and_constant():
    f = eng.lr_lambda(OptimConfig(warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1), max_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    g = eng.lr_lambda(OptimConfig(warmup_steps=0, lr_schedule="constant"), max_steps=5)
    assert all(g(s) == 1.0 for s in range(10))


def test_memory_estimates_shrink_with_stage_and_gpus():
    n, layer = 2_600_000_000, 50_000_000
    z2_8 = eng.estimate_model_state_memory(n, layer, zero_stage=2, num_gpus=8)
    z2_64 = eng.estimate_model_state_memory(n, layer, zero_stage=2, num_gpus=64)
    z3_8 = eng.estimate_model_state_memory(n, layer, zero_stage=3, num_gpus=8)
    z3_64 = eng.estimate_model_state_memory(n, layer, zero_stage=3, num_gpus=64)
    # ZeRO-2: 2 bytes of bf16 weights replicated + 18/N bytes partitioned.
    assert z2_8.gpu_bytes == 2 * n + int(18 * n / 8)
    assert z3_64.gpu_bytes < z3_8.gpu_bytes < z2_8.gpu_bytes and z2_64.gpu_bytes < z2_8.gpu_bytes
    assert math.isclose(eng.estimate_model_state_memory(n, layer, zero_stage=0, num_gpus=8).gpu_bytes, 16 * n)


def test_single_rank_engine_skips_the_allreduce_and_trains_as_torch_does(tmp_path):
    """Alone, ZeRO-0 fp32: no gradient all-reduce, and the same weights as torch AdamW with the same
    accumulation (2 micro-batches) and clipping (active: every pre-clip norm is above the limit)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, str(root / "tests" / "workers" / "engine_vs_torch.py")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["allreduce"] is False and out["steps"] == 5
    assert out["min_grad_norm"] > 0.05 and out["moved"] > 1e-3
    assert out["max_abs_diff"] < 1e-6, out
