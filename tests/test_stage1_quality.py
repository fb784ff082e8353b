"""Stage-1 quality (slow): a shortened ae_demo run must clearly beat the mean-image baseline, and
ae_vq_f4 must reach its target (>= 26 dB, >= 50% codebook usage) by step 1000 of its shipped 1500.

The timed targets (ae_demo >= 30 dB in 3 min, KL-f4 64 px >= 31 dB in 10 min on 2 idle cores) are
measured with tools/stage1_quality.py; these runs are cut to a fixed number of steps so they are
deterministic and do not depend on how busy the machine is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ldmscale import evaluation
from ldmscale.data.pixels import PixelShardDataset
from ldmscale.data.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]


def _quality_tool():
    spec = importlib.util.spec_from_file_location("stage1_quality", ROOT / "tools" / "stage1_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shards32(tmp_path_factory):
    root = tmp_path_factory.mktemp("q32")
    write_shards(root / "train", 4000, resolution=32, shard_size=1000, progress=False)
    write_shards(root / "val", 128, resolution=32, shard_size=128, start_index=10**6, progress=False)
    return root


def mean_image_psnr(root: Path) -> float:
    """The baseline: every held-out image 'reconstructed' as the mean training image."""
    train = torch.stack(list(PixelShardDataset([str(root / "train" / "shapes-000000.tar")], 32)))
    val = torch.stack(list(PixelShardDataset([str(root / "val" / "shapes-000000.tar")], 32)))
    return float(evaluation.psnr(val, train.mean(0, keepdim=True).expand_as(val)).mean())


@pytest.mark.slow
def test_shortened_ae_demo_beats_the_baseline(shards32, tmp_path):
    baseline = mean_image_psnr(shards32)
    final = run_quality(shards32, tmp_path, "ae_demo", steps=600)
    assert final["psnr"] > baseline + 6.0, (final, baseline)


@pytest.mark.slow
def test_ae_vq_f4_meets_the_issue_target(shards32, tmp_path):
    """>= 26 dB with >= 50% of the codebook in use by step 1000 (31.5 dB, 65% in use measured here; the
    usage climbs to ~99% by the recipe's step 1500)."""
    final = run_quality(shards32, tmp_path, "ae_vq_f4", steps=1000)
    assert final["psnr"] >= 26.0 and final["codebook_usage"] >= 0.5, final


def run_quality(root: Path, tmp_path: Path, experiment: str, steps: int) -> dict:
    result = _quality_tool().main([
        "--experiment", experiment, "--train", str(root / "train" / "shapes-{000000..000003}.tar"),
        "--val", str(root / "val" / "shapes-000000.tar"), "--max-steps", str(steps),
        "--eval-every-steps", str(steps), "--threads", "2", "--out", str(tmp_path / "curve.json")])
    final = result["curve"][-1]
    assert final["step"] == steps
    return final
