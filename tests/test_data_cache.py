"""The cache job survives SIGKILL at any point: a re-run yields exactly the expected samples, once each."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from _data_helpers import config, encoders

from ldmscale.data.cache import run_cache_job
from ldmscale.data.cache_format import read_index, read_record
from ldmscale.data.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]


def _cached_keys(folder: Path) -> list[str]:
    keys = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")]
    return keys


def test_sigkill_then_rerun_gives_exactly_the_expected_samples(tmp_path):
    write_shards(tmp_path / "raw", 48, resolution=32, shard_size=8, progress=False)
    out = tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "tools" / "cache_latents.py"),
           f"cache.input={tmp_path}/raw/shapes-{{000000..000005}}.tar", f"cache.output={out}",
           "cache.batch_size=4", "cache.progress=false", "cache.device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill at a random point: after a random number of finished shards, plus a random delay
        # (which lands in encoding, tar writing, the index/tar renames or the result write).
        target = random.randrange(0, 3)  # leave shards unfinished so the kill lands mid-job
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            results = list((out / "_results").glob("*.json")) if (out / "_results").exists() else []
            if len(results) >= target and (results or any(out.glob(".shapes-*.tmp-*"))):
                break
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 0.05))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = len(list((out / "_results").glob("*.json"))) if (out / "_results").exists() else 0
    assert not (out / "manifest.json").exists() and done_before < 6, "the job finished before the kill; the test did not interrupt it"

    cfg = config()
    cfg.cache.input, cfg.cache.output, cfg.cache.batch_size = f"{tmp_path}/raw", str(out), 4
    manifest = run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache, encoders=encoders())
    keys = _cached_keys(out)
    assert sorted(keys) == [f"{i:09d}" for i in range(48)]  # every sample once: no duplicates, none lost
    assert manifest["totals"] == {"read": 48, "written": 48, "skipped": {}, "bucket_counts": [48],
                                  "bytes": manifest["totals"]["bytes"]}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial/temporary files
    # Every indexed span parses back to its own sample.
    shards = {s["name"]: s for s in manifest["shards"]}
    for shard in sorted(out.glob("*.tar")):
        with open(shard, "rb") as f:
            index = read_index(f, shards[shard.name]["index_span"], str(shard))
            spans = [read_record(f, row, str(shard)).key for row in index]
        assert len(spans) == 8 and len(set(spans)) == 8
