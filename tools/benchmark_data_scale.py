"""The data path at LAION scale, without the data: a cache of N shards that are hard links of ONE real
shard (10,000 tiny samples in 4 buckets), with a manifest (and per-shard job results) for all N.

Reports, for rank 0 of --world-size ranks with --workers loader workers:
  (a) start-up: build_loader + first batch, seconds;
  (b) peak RSS of the rank's process and of each worker (VmHWM);
  (c) files of the cache opened before the first batch (in-process, i.e. one worker's path; and the most
      any worker had opened by the time every worker had delivered a batch);
for this checkout at --shards, and for the loader of --baseline-ref (git) at --baseline-shards (the
largest it reaches on this machine), with ratios. It also times (d) the cache job's manifest assembly
from N per-shard result files, locally (assemble_manifest) and as the SLURM array's final job
(ldmscale.launch.cache_array.assemble).

    PYTHONPATH=. python tools/benchmark_data_scale.py --shards 200000 --baseline-shards 1000

Goals (issue #17): start-up <= 30 s, <= 1 GB per process, files before the first batch <= the shards of
the first window (data.shuffle_window), assembly in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = [[64, 64], [64, 128], [128, 64], [96, 96]]
PER_BUCKET = [4000, 2500, 2500, 1000]  # 10,000 samples per shard


# ---------------------------------------------------------------------------- configs (both versions)
def _configs(cache: str, world_size: int, workers: int, window: int):
    import dataclasses

    from ldmscale.config import AutoencoderConfig, ConditionerConfig, DataConfig

    ae_cfg = AutoencoderConfig(ch_mult=[1, 2, 4, 4], embed_dim=4, z_channels=4)  # f8, KL moments [8, h/8, w/8]
    cond_cfg = ConditionerConfig(kind="class")
    data = dict(train_shards=[cache], buckets=BUCKETS, micro_batch_size=32, global_batch_size=32 * world_size,
                num_workers=workers, prefetch_factor=2)
    if "shuffle_window" in {f.name for f in dataclasses.fields(DataConfig)}:
        data["shuffle_window"] = window
    return DataConfig(**data), cond_cfg, ae_cfg


def _spec(data_cfg, cond_cfg, ae_cfg) -> dict:
    from ldmscale.data.cache import autoencoder_config_fingerprint, latent_layout

    return {"encoders": {"autoencoder": {"config": autoencoder_config_fingerprint(ae_cfg), "weights_sha256": "bench",
                                         "weights_file_sha256": None, "dtype": "float32"}, "text": None},
            "resolution": data_cfg.resolution, "buckets": BUCKETS, "latent": dict(latent_layout(ae_cfg), dtype="bf16"),
            "text": None, "transform": {}, "concat": None}


# ---------------------------------------------------------------------------- fabrication
def fabricate(folder: Path, num_shards: int, results_only: bool = False) -> None:
    """One real shard + hard links; manifest.json (and, with results_only, only _results/*.json)."""
    import numpy as np
    import torch

    from ldmscale.data import cache_format as cf

    data_cfg, cond_cfg, ae_cfg = _configs(str(folder), 1, 0, 64)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.tar.src"
    new_format = hasattr(cf, "INDEX_KEY")
    with open(base, "wb") as f:
        writer = cf.RecordWriter(f)
        i = 0
        for b, n in enumerate(PER_BUCKET):
            h, w = BUCKETS[b]
            for _ in range(n):
                meta = {"caption": "a photo", "class_id": i % 10, "boxes": [], "box_classes": [],
                        "original_size": [h, w], "crop_box": [0, 0, w, h], "crop_top_left": [0, 0], "bucket": [h, w],
                        "flipped": False, "source": f"bench:{i:09d}"}
                writer.write(cf.CachedRecord(f"{i:09d}", torch.randn(8, h // 8, w // 8), meta=meta), b, "bf16", "fp16")
                i += 1
        closed = writer.close()
    index, span = closed if new_format else (closed, None)
    if not new_format:
        np.save(folder / "base.idx.src", index)
    size = base.stat().st_size
    spec = _spec(data_cfg, cond_cfg, ae_cfg)
    results = []
    for s in range(num_shards):
        name = f"laion-{s:06d}.tar"
        if not results_only:
            # ext4 allows 65,000 links per file: a fresh copy of the base shard every 60,000 shards
            copy = s // 60_000
            if s % 60_000 == 0 and copy:
                for src in ([base] if new_format else [base, folder / "base.idx.src.npy"]):
                    shutil.copyfile(src, f"{src}.{copy}")
            os.link(f"{base}.{copy}" if copy else base, folder / name)
            if not new_format:
                idx = folder / "base.idx.src.npy"
                os.link(f"{idx}.{copy}" if copy else idx, folder / f"{name}{cf.INDEX_SUFFIX}")
        extra = {"index_span": span} if new_format else {}
        results.append(cf.ShardResult(name, f"pipe:aws s3 cp s3://laion/{name} -", True, len(index), len(index),
                                      bucket_counts=list(PER_BUCKET), spec=spec, seconds=100.0, bytes=size, **extra))
    if results_only:  # what the array tasks leave behind
        from ldmscale.data import cache

        (folder / cf.RESULTS_DIR).mkdir(exist_ok=True)
        for r in results:
            if hasattr(cache, "write_result"):
                cache.write_result(folder, r, durable=False)
            else:  # the baseline's result files: the whole result, spec included
                cache.result_path(folder, r.name).write_text(json.dumps(r.to_json(), indent=1))
        base.unlink()
    else:
        (folder / cf.MANIFEST).write_text(json.dumps(cf.build_manifest(results)))


# ---------------------------------------------------------------------------- the probe (run in a subprocess)
def _status_mb(pid: int | str = "self", field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe(cache: str, rank: int, world_size: int, workers: int, window: int) -> dict:
    """Figures (a)-(c) for the ldmscale on sys.path, in this (fresh) process."""
    log = os.open(os.path.join(tempfile.gettempdir(), f"opens-{os.getpid()}.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
    log_path = f"/proc/self/fd/{log}"
    armed = [False]

    def hook(event: str, args: tuple) -> None:  # forked workers inherit it and the log descriptor
        if armed[0] and event == "open" and isinstance(args[0], str) and args[0].startswith(cache):
            os.write(log, f"{os.getpid()}\t{args[0]}\n".encode())

    sys.addaudithook(hook)
    from ldmscale.data.loader import build_loader

    imported = _status_mb(field="VmRSS")  # torch + ldmscale, before the loader holds anything
    data_cfg, cond_cfg, ae_cfg = _configs(cache, world_size, workers, window)
    armed[0] = True
    start = time.perf_counter()
    loader = build_loader(data_cfg, cond_cfg, ae_cfg, seed=0, rank=rank, world_size=world_size)
    built = time.perf_counter() - start
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    for _ in range(max(0, workers - 1)):  # one batch from every worker
        next(it)
    children = [int(p) for p in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()]
    worker_peaks = [_status_mb(p) for p in children]
    armed[0] = False
    lines = Path(log_path).read_text().splitlines()
    opens: dict[int, int] = {}
    for line in lines:
        pid = int(line.split("\t")[0])
        opens[pid] = opens.get(pid, 0) + 1
    main_opens = opens.pop(os.getpid(), 0)
    del it, loader
    # One worker's path in-process: files opened from the start of iteration to its first batch.
    data0, _, _ = _configs(cache, world_size, 0, window)
    loader0 = build_loader(data0, cond_cfg, ae_cfg, seed=0, rank=rank, world_size=world_size)
    before = len(Path(log_path).read_text().splitlines())
    armed[0] = True
    next(iter(loader0))
    armed[0] = False
    in_process = len(Path(log_path).read_text().splitlines()) - before
    return {"build_s": built, "startup_s": first, "main_peak_mb": _status_mb(), "worker_peak_mb": worker_peaks,
            "import_mb": imported,
            "main_opens": main_opens, "worker_opens_max": max(opens.values(), default=0),
            "first_batch_opens": in_process, "batches_per_rank": len(loader0),
            "samples": len(loader0.table)}


def _run_probe(pythonpath: Path, cache: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(cache), "--world-size", str(args.world_size),
           "--rank", str(args.rank), "--workers", str(args.workers), "--window", str(args.window)]
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed ({pythonpath}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fabricate_with(pythonpath: Path, folder: Path, num_shards: int, results_only: bool = False) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fabricate", str(folder), "--shards", str(num_shards)]
    if results_only:
        cmd.append("--results-only")
    start = time.perf_counter()
    subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(pythonpath)), check=True, timeout=3600)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- (d) manifest assembly
def bench_assembly(folder: Path) -> tuple[float, float, int]:
    """(local assemble_manifest s, SLURM final-job assemble s, manifest bytes) over folder/_results."""
    from ldmscale.config import compose
    from ldmscale.data.cache import assemble_manifest
    from ldmscale.data.cache_format import RESULTS_DIR
    from ldmscale.launch.cache_array import assemble

    names = sorted(p.name[: -len(".json")] for p in (folder / RESULTS_DIR).glob("*.json"))
    for name in names:  # the final job checks that each output shard exists: give it empty ones
        (folder / name).touch()
        (folder / f"{name}.idx.npy").touch()  # the baseline also checks its index sidecars
    start = time.perf_counter()
    assemble_manifest(folder, names)
    local = time.perf_counter() - start
    cfg = compose([f"cache.output={folder}", "cache.max_failure_rate=1.0"])
    start = time.perf_counter()
    assemble(cfg, names)
    array = time.perf_counter() - start
    return local, array, (folder / "manifest.json").stat().st_size


def _assembly_with(pythonpath: Path, folder: Path, num_shards: int) -> tuple[float, float, int]:
    """Fabricate `num_shards` results and time their assembly, with the ldmscale at `pythonpath`."""
    _fabricate_with(pythonpath, folder, num_shards, results_only=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--assemble", str(folder)]
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(pythonpath)), capture_output=True, text=True,
                          timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"assembly failed ({pythonpath}):\n{proc.stderr[-3000:]}")
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))  # type: ignore[return-value]


def _baseline_source(work: Path, ref: str) -> Path:
    """The baseline's ldmscale package (git archive of `ref`), importable from the returned folder."""
    base_src = work / "baseline-src"
    if not base_src.exists():
        base_src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "ldmscale", "conf"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base_src)], input=archive, check=True)
    return base_src


def _report(name: str, figures: dict, shards: int, window: int) -> str:
    peaks = figures["worker_peak_mb"]
    return (f"{name}: {shards:,} shards, {figures['samples']:,} samples, {figures['batches_per_rank']:,} batches/rank\n"
            f"  (a) start-up {figures['startup_s']:.2f} s (build_loader {figures['build_s']:.2f} s + first batch)\n"
            f"  (b) peak RSS: rank process {figures['main_peak_mb']:.0f} MB, workers "
            f"{min(peaks, default=0):.0f}..{max(peaks, default=0):.0f} MB ({len(peaks)} workers); of which "
            f"{figures['import_mb']:.0f} MB is importing torch + ldmscale\n"
            f"  (c) files of the cache opened before the first batch: {figures['main_opens'] + figures['first_batch_opens']}"
            f" = {figures['main_opens']} at build_loader + {figures['first_batch_opens']} by the iteration "
            f"(window: {window} shards); the most any of the {len(peaks)} workers had opened once every worker had "
            f"delivered a batch: {figures['worker_opens_max']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=200_000)
    parser.add_argument("--baseline-shards", type=int, default=1000, help="0: skip the baseline")
    parser.add_argument("--baseline-ref", default="d82cbe8", help="git commit of the loader to compare with")
    parser.add_argument("--assembly-shards", type=int, default=None, help="default: --shards; 0: skip")
    parser.add_argument("--baseline-assembly-shards", type=int, default=20_000, help="0: skip")
    parser.add_argument("--world-size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--fabricate", help=argparse.SUPPRESS)
    parser.add_argument("--results-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--assemble", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, args.rank, args.world_size, args.workers, args.window)))
        return
    if args.assemble:
        print(json.dumps(bench_assembly(Path(args.assemble))))
        return
    if args.fabricate:
        fabricate(Path(args.fabricate), args.shards, args.results_only)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ldmscale-scale-"))
    try:
        assembly_shards = args.shards if args.assembly_shards is None else args.assembly_shards
        if assembly_shards:
            local, array, size = _assembly_with(ROOT, work / "assembly", assembly_shards)
            print(f"(d) manifest assembly from {assembly_shards:,} shard results: local {local:.1f} s, SLURM final "
                  f"job {array:.1f} s; manifest.json {size / 1e6:.0f} MB", flush=True)
            if args.baseline_assembly_shards:
                n = args.baseline_assembly_shards
                old_local, old_array, _ = _assembly_with(_baseline_source(work, args.baseline_ref), work / "old-asm", n)
                print(f"    baseline ({args.baseline_ref}) at {n:,} results: local {old_local:.1f} s, SLURM final job "
                      f"{old_array:.1f} s; per result this/baseline: local "
                      f"{local / assembly_shards / (old_local / n):.2f}x, final job "
                      f"{array / assembly_shards / (old_array / n):.2f}x", flush=True)
        made = _fabricate_with(ROOT, work / "new", args.shards)
        new = _run_probe(ROOT, work / "new", args)
        print(f"[fabricated {args.shards:,} hard-linked shards in {made:.0f} s]")
        print(_report("this loader", new, args.shards, args.window), flush=True)
        if args.baseline_shards:
            base_src = _baseline_source(work, args.baseline_ref)
            _fabricate_with(base_src, work / "old", args.baseline_shards)
            old = _run_probe(base_src, work / "old", args)
            print(_report(f"baseline loader ({args.baseline_ref})", old, args.baseline_shards, args.window))
            per_sample_old = (max(old["main_peak_mb"], *old["worker_peak_mb"]) - old["import_mb"]) / max(1, old["samples"])
            print(f"  ratios this/baseline: start-up {new['startup_s'] / old['startup_s']:.2f}x at "
                  f"{args.shards / args.baseline_shards:.0f}x the shards; peak RSS per process "
                  f"{max(new['main_peak_mb'], *new['worker_peak_mb']) / max(old['main_peak_mb'], *old['worker_peak_mb']):.2f}x; "
                  f"the baseline's {per_sample_old * 2**20:.0f} B/sample above the imports would be "
                  f"{per_sample_old * new['samples'] / 1024:,.0f} GB per process at {new['samples']:,} samples")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
