"""The entry point: dry-run numbers for t2i_1024, and a real 2-rank run on cached synthetic shards."""

import json
import subprocess
import sys

import pytest

from ldmscale.config import compose
from ldmscale.train import dry_run
from tests._train_helpers import make_cached_shards
from tests.test_training_dist import ROOT, dist_env


def test_t2i_1024_dry_run_prints_params_flops_and_memory(capsys):
    report = dry_run(compose(["+experiment=t2i_1024", "dry_run=true"]), world_size=8)
    out = capsys.readouterr().out
    assert 2.4e9 < report["params"] < 2.8e9 and "parameters      2.5" in out
    assert report["flops_per_image"] > 1e12  # several TFLOP per 1024² image
    assert report["accumulation"] == 2048 // (4 * 8)
    mem = report["memory"]
    assert mem[(3, 64)] < mem[(3, 8)] < mem[(2, 8)] and mem[(2, 64)] < mem[(2, 8)]
    assert "ZeRO-3 on  64 GPUs" in out


@pytest.mark.slow
def test_two_rank_zero2_run_logs_metrics_wandb_and_samples(tmp_path):
    cache = make_cached_shards(tmp_path)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29733",
           "-m", "ldmscale.train", "stage=diffusion", f"data.train_shards=[{cache}]", "data.micro_batch_size=8",
           "data.global_batch_size=16", "trainer.max_steps=6", "trainer.log_every_steps=1",
           "trainer.sample_every_steps=6", "trainer.sample_steps=4", "checkpoint.every_steps=3",
           "deepspeed.zero_stage=2", f"run_dir={run_dir}", "logger.wandb_mode=offline", "optim.lr=1e-3",
           "logger.progress_bar=false"]
    proc = subprocess.run(cmd, env=dist_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("loss", "lr", "grad_norm", "images_per_sec", "mfu", "data_wait_frac", "peak_mem_gb"):
        assert all(key in r for r in records), key
    assert records[-1]["mfu"] > 0 and records[-1]["images_seen"] == 6 * 16
    assert (run_dir / "samples" / "step_00000006.png").is_file()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))
    assert list(offline[0].rglob("*.png")), "the sample grid is logged to W&B"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
