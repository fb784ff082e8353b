"""The cache job as a SLURM array equals the local job, and re-submission skips complete shards."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import torch

from ldmscale.config import compose
from ldmscale.data.cache import run_cache_job
from ldmscale.data.synthetic import write_shards
from ldmscale.launch.cache_array import submit_cache_array

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]


def _strip_timings(manifest: dict) -> dict:
    text = json.dumps(manifest, sort_keys=True)
    data = json.loads(text)
    for shard in data["shards"]:
        shard.pop("seconds", None)
    data.pop("totals", None)
    return data


def _assert_same_manifest(got: dict, want: dict) -> None:
    """Equal, but latent statistics only to float accuracy: they are fp64 sums of fp32 encoder outputs,
    and an array task may run the encoder with another thread count than the local job (last-bit
    differences in the convolutions); the cached shards themselves are compared byte for byte."""
    got, want = _strip_timings(got), _strip_timings(want)

    def split(data: dict) -> tuple[dict, list]:
        floats: list = []

        def walk(node):
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v) for v in node]
            if isinstance(node, float):
                floats.append(node)
                return "<float>"
            return node

        return walk(data), floats

    got_shape, got_floats = split(got)
    want_shape, want_floats = split(want)
    assert got_shape == want_shape
    assert got_floats == pytest.approx(want_floats, rel=1e-6, abs=1e-9)


def _submit_cli(*overrides: str) -> re.Match:
    """`tools/cache_latents.py ... launcher=slurm`: submits, prints the array and returns at once."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cache_latents.py"), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    described = re.search(r"submitted cache array (\S+): (\d+) tasks \((\d+) shards already complete, "
                          r"skipped\); manifest job (\d+) runs after them", proc.stdout)
    assert described, proc.stdout
    return described


def test_cache_array_matches_local_and_resubmission_skips(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_shards(tmp_path / "raw", 40, 32, 8, 0, 0, "png", [])  # 5 shards of 8
    base = [f"cache.input={tmp_path}/raw", "cache.progress=false", "cache.device=cpu", "data.resolution=32"]

    local_cfg = compose([*base, f"cache.output={tmp_path}/local"])
    # The array tasks encode single-threaded (cpus_per_task=1); another thread count may round the
    # convolutions differently in the last bit, and bf16 storage can turn that into different bytes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_cache_job(local_cfg.data, local_cfg.conditioner, local_cfg.autoencoder, local_cfg.cache,
                              seed=local_cfg.seed)
    finally:
        torch.set_num_threads(threads)

    logs = tmp_path / "logs"
    slurm = [*base, f"cache.output={tmp_path}/slurm", "launcher=slurm", "launcher.gpus_per_node=0",
             "launcher.cpus_per_task=1", "launcher.shards_per_task=2", "launcher.array_parallelism=2",
             "launcher.timeout_min=60", f"launcher.folder={logs}"]
    first = _submit_cli(*slurm)
    assert not (tmp_path / "slurm" / "manifest.json").exists()  # returned without waiting for the array
    array_id, tasks, skipped, manifest_job = first.groups()
    assert array_id.endswith("_[0-2]") and (tasks, skipped) == ("3", "0")  # ONE array of 3 tasks (2+2+1)
    manifest = submitit.SlurmJob(logs, manifest_job).result()
    _assert_same_manifest(manifest, local)
    for shard in local["shards"]:
        name = shard["name"]
        assert (tmp_path / "slurm" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert json.loads((tmp_path / "slurm" / "manifest.json").read_text()) == manifest

    # Lose one shard's output: re-submitting runs one task for it alone and rebuilds the manifest.
    os.unlink(tmp_path / "slurm" / "shapes-000003.tar")
    cfg = compose(slurm)
    again = submit_cache_array(cfg)
    assert again.skipped_shards == 4 and len(again.tasks) == 1
    assert _strip_timings(again.wait())["shards"][3]["name"] == "shapes-000003.tar"
    assert (tmp_path / "slurm" / "shapes-000003.tar").read_bytes() == (tmp_path / "local" / "shapes-000003.tar").read_bytes()
