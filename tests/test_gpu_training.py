"""GPU: real bf16 training steps of the tiny model through the DeepSpeed engine (NCCL), and the
gpu_check tool's CPU path (the same code, gloo) so it stays runnable where there is no GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.test_training_dist import ROOT, dist_env

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
def test_tiny_model_bf16_steps_through_the_engine_on_gpu():
    args = gpu_check.build_parser().parse_args(
        ["--device", "cuda", "--preset", "tiny", "--resolution", "32", "--micro-batch", "8", "--steps", "6",
         "--warmup", "2", "--zero-stage", "2", "--precision", "bf16", "optim.lr=1e-3"])
    cfg = gpu_check.build_config(args)
    report = gpu_check.train_check(cfg, steps=6, warmup=2, device=torch.device("cuda", 0))
    assert report["ok"] and report["backend"] == "nccl" and report["precision"] == "bf16"
    assert report["images_per_sec"] > 0 and 0 < report["mfu"] < 1
    assert sum(report["losses"][-3:]) < sum(report["losses"][:3])  # the same batch: the loss must fall


@pytest.mark.gpu
@cuda
def test_sdpa_takes_the_flash_path_on_gpu():
    report = gpu_check.sdpa_flash_check(torch.device("cuda", 0), torch.bfloat16)
    assert report["ok"], report


def test_sdpa_check_runs_on_cpu():
    report = gpu_check.sdpa_flash_check(torch.device("cpu"), torch.float32, tokens=64, heads=2, head_dim=16)
    assert report["cross_attention_flash"] in (True, False)  # CPU has its own flash kernel in recent torch
    if report["self_attention_flash"]:
        assert report["flash_vs_math_max_abs"] < 1e-4


def test_gpu_check_cpu_path_trains_and_reports(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--preset", "tiny",
           "--resolution", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--zero-stage", "2",
           "--precision", "fp32", "--json", str(out)]
    proc = subprocess.run(cmd, env=dist_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert "img/s" in proc.stdout and "MFU" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    import json

    report = json.loads(out.read_text())
    train = report["train"]
    assert train["backend"] == "gloo" and train["zero_stage"] == 2 and len(train["losses"]) == 3
    assert train["images_per_sec"] > 0 and train["mfu"] > 0 and train["flops_per_image_fwd"] > 0
    assert proc.returncode == (0 if report["sdpa"]["ok"] else 1), proc.stdout
