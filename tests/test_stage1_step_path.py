"""The stage-1 step path (tests/workers/stage1_step_path.py): no host syncs of ldmscale's own between logged
steps, with the GAN on (KL and VQ); a non-finite generator loss on one rank drops both players' steps on
every rank, decided on the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldmscale.data.synthetic import write_shards
from ldmscale.distributed.env import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "stage1_step_path.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage1_step_path")
    write_shards(root, 32, resolution=16, shard_size=16, progress=False)
    return root


def run_worker(shards: Path, run_dir: Path, mode: str, stage: int, ranks: int, kind: str = "kl") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = [str(WORKER), str(shards), str(run_dir), mode, str(stage), kind]
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    proc = subprocess.run(launcher + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_no_host_syncs_between_logged_steps_with_the_gan_on(shards, tmp_path, kind):
    out = run_worker(shards, tmp_path, "syncs", 0, 1, kind)
    assert out["steps"] == 4 and out["accumulation"] == 2, out
    ours = {k: v for k, v in out["counts"].items() if k.startswith("ldmscale")}
    assert not ours, f"host syncs from ldmscale's stage-1 step path over 4 steps: {ours}"


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_on_one_rank_drops_both_players_steps_everywhere(shards, tmp_path, stage):
    out = run_worker(shards, tmp_path, "nonfinite", stage, 2)
    assert out["skipped"] == 1.0, out
    assert out["unchanged"] == {"generator": True, "discriminator": True}, out
    assert out["moved_after"] == {"generator": True, "discriminator": True} and out["finite"], out
