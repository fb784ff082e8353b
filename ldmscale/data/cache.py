"""The offline cache job: raw shards → KL moments / VQ latents + text embeddings, one output shard per input.

`cache_shard` is the unit of work (one input shard, independent of every other), so a SLURM array
task can call it for its shards and `assemble_manifest` can merge the results afterwards; no two
tasks ever write the same file. Every file appears under a temporary name and is renamed when
complete, and a shard counts as done only once its result file exists, so a SIGKILL at any point
leaves nothing half-written and a re-run redoes exactly the unfinished shards.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ldmscale.data.cache_format import (
    MANIFEST,
    RESULTS_DIR,
    CachedRecord,
    LatentStats,
    RecordWriter,
    ShardResult,
    build_manifest,
    dtype_name,
)
from ldmscale.data.shards import SampleFilter, SkipCounter, expand_urls, iter_decoded, shard_name
from ldmscale.data.transforms import Bucket, nearest_bucket, resize_crop, resolve_buckets, transform_boxes


class CacheJobError(RuntimeError):
    """The cache job cannot finish correctly (too many failures, inconsistent spec, ...)."""


# Skip reasons that make a whole shard incomplete (retried on re-run) rather than dropping samples.
SHARD_FAILURES = ("unreadable_shard", "stream_failed")


# ---------------------------------------------------------------------------- encoders & fingerprints
@dataclass
class Encoders:
    """The frozen encoders the job runs: the autoencoder and the conditioning kind's (e.g. text towers)."""

    autoencoder: torch.nn.Module
    text_encoder: Optional[Any] = None  # the kind's frozen encoder (`Conditioning.build_frozen`), if any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def resolve_device(device: str, worker: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", worker % max(1, torch.cuda.device_count()))
    return torch.device(device)


def build_encoders(ae_cfg: Any, cond_cfg: Any, device: str | torch.device = "cpu") -> Encoders:
    """Build the frozen encoders from their config sections (the same builders training uses)."""
    from ldmscale.models.autoencoder import build_autoencoder

    device = torch.device(device) if isinstance(device, str) else device
    # Without trained weights the init is seeded, so every worker process (and a later re-run)
    # encodes with the same network and the per-shard fingerprints agree.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        autoencoder = build_autoencoder(ae_cfg).eval().requires_grad_(False).to(device)
    from ldmscale.conditioning import kind_for

    frozen = kind_for(cond_cfg).build_frozen(device)
    if isinstance(frozen, torch.nn.Module):
        frozen = frozen.eval().requires_grad_(False).to(device)
    return Encoders(autoencoder, frozen, device)


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): identical weights ⇔ identical hash."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update((t.view(torch.uint8) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# Config fields that do not change what the encoder computes (the loader applies scale/shift itself).
AE_FINGERPRINT_EXCLUDE = ("scale_factor", "shift_factor", "weights")


def autoencoder_config_fingerprint(ae_cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(ae_cfg).items() if k not in AE_FINGERPRINT_EXCLUDE}


def text_config_fingerprint(cond_cfg: Any) -> dict[str, Any]:
    """The config fields that decide what a text kind's tower(s) compute."""
    from ldmscale.conditioning import kind_for

    return {k: getattr(cond_cfg, k) for k in getattr(kind_for(cond_cfg), "fingerprint_keys", ())}


def weights_file_fingerprint(path: Optional[str]) -> Optional[str]:
    return file_sha256(path) if path and os.path.isfile(path) else None


NO_WEIGHTS = "none (seeded random init)"


def weights_source_fingerprint(path: Optional[str], pipeline_part: str = "vae") -> str:
    """Which weights an encoder was built from, for every kind of source: none (the seeded init), a file
    (an export, an LDM/SD checkpoint) or a folder (a stage-1 run directory, our export, a diffusers folder;
    of a diffusers pipeline only `pipeline_part`), as a sha256 of the bytes that are loaded."""
    if not path:
        return NO_WEIGHTS
    if os.path.isfile(path):
        return f"file sha256:{file_sha256(path)}"
    if not os.path.isdir(path):
        return f"missing: {path}"
    from ldmscale.runs import autoencoder_path

    folder = autoencoder_path(path)
    if (folder / "model_index.json").is_file() and (folder / pipeline_part).is_dir():
        folder = folder / pipeline_part
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder).as_posix()}:{file_sha256(str(file))}\n".encode())
    return f"folder sha256:{digest.hexdigest()}"


def weights_mismatch(key: str, path: Optional[str], cached: dict[str, Any], pipeline_part: str = "vae"
                     ) -> Optional[str]:
    """A one-line problem if `path` (config key `key`) is not the weights source the cache was made from."""
    if "weights_source" not in cached:  # a cache from before sources were fingerprinted: files only
        if path and weights_file_fingerprint(path) != cached.get("weights_file_sha256"):
            return f"{key}={path!r} has another sha256 than the weights the cache was made with"
        return None
    now = weights_source_fingerprint(path, pipeline_part)
    if now != cached["weights_source"]:
        return f"{key}={path!r}: the cache was made from {cached['weights_source']}, this config gives {now}"
    return None


def latent_layout(ae_cfg: Any) -> dict[str, Any]:
    """Channels M of the stored tensor and the spatial downsampling, from the config alone."""
    channels = 2 * ae_cfg.embed_dim if ae_cfg.kind == "kl" else ae_cfg.embed_dim
    return {"kind": ae_cfg.kind, "channels": channels, "embed_dim": ae_cfg.embed_dim,
            "downsample_factor": 2 ** (len(ae_cfg.ch_mult) - 1)}


# ---------------------------------------------------------------------------- the per-shard spec
@dataclass(frozen=True)
class CacheSpec:
    """Everything `cache_shard` needs besides the encoders; `fingerprint` must agree across shards."""

    buckets: tuple[Bucket, ...]
    rules: SampleFilter
    random_crop: bool
    random_flip: bool
    batch_size: int
    latent_dtype: str
    text_dtype: str
    context_length: int
    seed: int
    fingerprint: dict[str, Any]
    conditioning: Any = None  # the kind (ldmscale.conditioning): what is derived per sample besides latents
    read_timeout_s: float = 0.0  # a stream silent this long is killed (not in the fingerprint: no effect on output)

    @classmethod
    def build(cls, data_cfg: Any, cond_cfg: Any, ae_cfg: Any, cache_cfg: Any, encoders: Encoders,
              seed: int = 0) -> CacheSpec:
        buckets = tuple(resolve_buckets(data_cfg))
        layout = latent_layout(ae_cfg)
        real_ds = getattr(encoders.autoencoder, "downsample_factor", layout["downsample_factor"])
        for h, w in buckets:
            if h % real_ds or w % real_ds:
                raise ValueError(f"bucket {h}x{w} is not divisible by the autoencoder's downsampling {real_ds}")
        from ldmscale.conditioning import kind_for

        conditioning = kind_for(cond_cfg)
        ae_dtype = str(next(encoders.autoencoder.parameters()).dtype).removeprefix("torch.")
        rules = SampleFilter.from_config(data_cfg, require_caption=conditioning.needs_caption)
        fingerprint = {
            "encoders": {
                "autoencoder": {"config": autoencoder_config_fingerprint(ae_cfg),
                                "weights_sha256": weights_hash(encoders.autoencoder),
                                "weights_file_sha256": weights_file_fingerprint(ae_cfg.weights),
                                "weights_source": weights_source_fingerprint(ae_cfg.weights),
                                "dtype": ae_dtype},
            },
            "resolution": data_cfg.resolution,
            "buckets": [list(b) for b in buckets],
            "latent": dict(layout, downsample_factor=real_ds, dtype=dtype_name(cache_cfg.latent_dtype)),
            "transform": {"random_crop": data_cfg.random_crop, "random_flip": data_cfg.random_flip,
                          "min_size": rules.min_size, "max_aspect_ratio": rules.max_aspect_ratio,
                          "max_pixels": rules.max_pixels, "max_caption_bytes": rules.max_caption_bytes,
                          "filters": list(data_cfg.filters), "seed": seed},
            "conditioning": cond_cfg.kind,
            # the kind's own entries (text encoder fingerprint, derived concat inputs, ...)
            **(conditioning.cache_spec(encoders.text_encoder, cache_cfg) or {}),
        }
        if cache_cfg.batch_size <= 0:
            raise ValueError(f"cache.batch_size={cache_cfg.batch_size} must be positive")
        return cls(buckets, rules,
                   data_cfg.random_crop, data_cfg.random_flip, cache_cfg.batch_size,
                   cache_cfg.latent_dtype, cache_cfg.text_dtype, cond_cfg.context_length, seed, fingerprint,
                   conditioning, cache_cfg.read_timeout_s)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------- encoding a batch
@dataclass
class _Pending:
    pixels: torch.Tensor
    caption: str
    meta: dict[str, Any]
    key: str


def _encode_batch(items: list[_Pending], encoders: Encoders, spec: CacheSpec
                  ) -> tuple[list[CachedRecord], torch.Tensor]:
    with torch.inference_mode():
        pixels = torch.stack([it.pixels for it in items]).to(encoders.device)
        moments = encoders.autoencoder.encode_moments(pixels).float().cpu()  # [B,M,h,w]
        derived = spec.conditioning.derive(pixels, [it.key for it in items], [it.caption for it in items],
                                           encoders.text_encoder, encoders.autoencoder, spec.fingerprint, spec.seed)
    records = [CachedRecord(it.key, moments[i], d.text_tokens, d.text_pooled, d.text_length, {**it.meta, **d.meta},
                            d.extras) for i, (it, d) in enumerate(zip(items, derived))]
    return records, moments


# ---------------------------------------------------------------------------- one shard
def result_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / RESULTS_DIR / f"{name}.json"


# A result file names its spec by hash; the spec itself (encoders, buckets, ...: most of a result's bytes)
# is stored once in _results/_specs/, so assembling 200k results parses 200k small files, not 200k specs.
SPECS_DIR = "_specs"


def _spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def write_result(output_dir: str | Path, result: ShardResult, durable: bool = True) -> None:
    """_results/{name}.json (atomically), with its spec stored once under _results/_specs/.
    `durable=False` skips the fsync (benchmarks fabricating 200k results)."""
    data = result.to_json()
    spec = data.pop("spec")
    if spec:
        data["spec_sha256"] = digest = _spec_hash(spec)
        spec_file = Path(output_dir) / RESULTS_DIR / SPECS_DIR / f"{digest}.json"
        if not spec_file.is_file():
            spec_file.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(spec_file, lambda f: f.write(json.dumps(spec, indent=1)), "w", durable)
    _atomic_write(result_path(output_dir, result.name), lambda f: f.write(json.dumps(data, indent=1)), "w", durable)


def _parse_result(output_dir: str | Path, text: str, specs: dict[str, dict[str, Any]]) -> ShardResult:
    data = json.loads(text)
    digest = data.pop("spec_sha256", None)
    if digest is not None:
        if digest not in specs:
            specs[digest] = json.loads((Path(output_dir) / RESULTS_DIR / SPECS_DIR / f"{digest}.json").read_text())
        data["spec"] = specs[digest]
    return ShardResult.from_json(data)


def load_result(output_dir: str | Path, name: str) -> Optional[ShardResult]:
    results, _ = load_results(output_dir, [name])
    return results[0] if results else None


def is_complete(output_dir: str | Path, name: str) -> bool:
    return not incomplete_shards(output_dir, [name])


def incomplete_shards(output_dir: str | Path, names: Sequence[str],
                      results: Optional[list[ShardResult]] = None) -> list[str]:
    """The names among `names` without a complete result and output shard (each result read once)."""
    missing: list[str] = []
    if results is None:
        results, missing = load_results(output_dir, names)
    return missing + [r.name for r in results if not (r.complete and os.path.isfile(os.path.join(output_dir, r.name)))]


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb", durable: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_stale_tmp(output_dir: Path, name: str) -> None:
    for stale in glob.glob(str(output_dir / f".{name}.tmp-*")):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass


def cache_shard(input_url: str, output_dir: str | Path, encoders: Encoders, spec: CacheSpec,
                progress: Optional[Callable[[int], None]] = None) -> ShardResult:
    """Cache one input shard into `output_dir/<same name>`; returns (and records) what happened.

    A shard whose result says complete is skipped (its stored result is returned), so re-running a
    job or an array task is cheap and idempotent. A previous result made with another spec (other
    encoders, buckets, dtypes) is an error, never silently mixed.
    """
    output_dir = Path(output_dir)
    name = shard_name(input_url)
    previous = load_result(output_dir, name)
    if previous is not None and previous.spec and previous.spec != spec.fingerprint:
        raise CacheJobError(
            f"{output_dir / name} was cached with a different spec (encoders/buckets/dtypes); "
            f"cache into a new folder or delete {output_dir} first"
        )
    if previous is not None and previous.complete and (output_dir / name).is_file():
        return previous
    (output_dir / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(output_dir, name)
    start = time.perf_counter()
    skips = SkipCounter()
    stats = LatentStats()
    bucket_counts = [0] * len(spec.buckets)
    read = 0
    pending: dict[int, list[_Pending]] = {}
    shard_seed = zlib.crc32(name.encode())
    tmp_tar = output_dir / f".{name}.tmp-{os.getpid()}"

    def count_read() -> None:
        nonlocal read
        read += 1

    with open(tmp_tar, "wb") as fileobj:
        writer = RecordWriter(fileobj)

        def flush(bucket: int) -> None:
            items = pending.pop(bucket, [])
            if not items:
                return
            try:
                records, moments = _encode_batch(items, encoders, spec)
            except Exception as exc:  # an encoder failure is counted per sample, never fatal
                for it in items:
                    skips.add("encode_error", f"{input_url}:{it.key}: {type(exc).__name__}: {exc}")
                return
            stats.update_moments(moments, spec.fingerprint["latent"]["kind"])
            for record in records:
                writer.write(record, bucket, spec.latent_dtype, spec.text_dtype)
            bucket_counts[bucket] += len(records)
            if progress is not None:
                progress(len(items))

        for ordinal, sample in enumerate(iter_decoded([input_url], spec.rules, skips, on_read=count_read,
                                                      read_timeout_s=spec.read_timeout_s)):
            bucket = nearest_bucket(sample.image.height, sample.image.width, spec.buckets)
            # Random crops/flips are seeded per sample so a re-run writes byte-identical shards.
            rng = np.random.default_rng([spec.seed, shard_seed, ordinal])
            pixels, crop = resize_crop(sample.image, spec.buckets[bucket], random_crop=spec.random_crop,
                                       flip=spec.random_flip, rng=rng)
            boxes, box_classes = transform_boxes(sample.boxes, sample.box_classes, crop)
            meta = {"caption": sample.caption, "class_id": sample.class_id, "boxes": boxes,
                    "box_classes": box_classes, "original_size": list(crop.original_size),
                    "crop_box": list(crop.crop_box), "crop_top_left": list(crop.crop_top_left),
                    "bucket": list(crop.bucket), "flipped": crop.flipped,
                    "source": f"{sample.url}:{sample.key}"}
            pending.setdefault(bucket, []).append(_Pending(pixels, sample.caption, meta, sample.key))
            if len(pending[bucket]) >= spec.batch_size:
                flush(bucket)
        for bucket in sorted(pending):
            flush(bucket)
        index, index_span = writer.close()
        fileobj.flush()
        os.fsync(fileobj.fileno())
    # A shard that could not be read to its end (unreadable, failed or stalled stream) is never complete:
    # its output is dropped, its failure is counted once, and a re-run retries it.
    failed = next((r for r in SHARD_FAILURES if skips.counts.get(r)), None)
    if failed is not None:
        tmp_tar.unlink()
        result = ShardResult(name=name, input_url=input_url, complete=False, read=1, skipped={failed: 1},
                             skip_examples={failed: skips.examples[failed]}, bucket_counts=[0] * len(spec.buckets),
                             spec=spec.fingerprint, seconds=time.perf_counter() - start)
    else:
        written = int(index.shape[0])
        result = ShardResult(
            name=name, input_url=input_url, complete=True, read=written + skips.total, written=written,
            skipped=skips.as_dict(), skip_examples=skips.examples, bucket_counts=bucket_counts,
            latent_stats=stats, spec=spec.fingerprint, seconds=time.perf_counter() - start,
            bytes=tmp_tar.stat().st_size, index_span=index_span,
        )
        os.replace(tmp_tar, output_dir / name)
    write_result(output_dir, result)
    return result


# ---------------------------------------------------------------------------- manifest
def load_results(output_dir: str | Path, names: Sequence[str]) -> tuple[list[ShardResult], list[str]]:
    """The stored results of `names` (one read each), and the names that have none yet."""
    results, missing = [], []
    specs: dict[str, dict[str, Any]] = {}
    folder = os.path.join(output_dir, RESULTS_DIR)
    for name in names:
        try:
            with open(os.path.join(folder, f"{name}.json")) as f:
                text = f.read()
        except FileNotFoundError:
            missing.append(name)
            continue
        results.append(_parse_result(output_dir, text, specs))
    return results, missing


def write_manifest(output_dir: str | Path, results: list[ShardResult]) -> dict[str, Any]:
    """manifest.json from shard results, written atomically (compact: at 200k shards it is tens of MB)."""
    manifest = build_manifest(results)
    _atomic_write(Path(output_dir) / MANIFEST, lambda f: f.write(json.dumps(manifest, separators=(",", ":"))), "w")
    return manifest


def assemble_manifest(output_dir: str | Path, names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Merge `_results/*.json` (or only `names`) into manifest.json, written atomically; returns it."""
    output_dir = Path(output_dir)
    if names is None:
        names = sorted(p.name[: -len(".json")] for p in (output_dir / RESULTS_DIR).glob("*.json"))
    results, missing = load_results(output_dir, names)
    if missing:
        raise CacheJobError("shards without a result file (not cached yet): "
                            f"{[str(result_path(output_dir, n)) for n in missing[:5]]}")
    return write_manifest(output_dir, results)


def check_failure_rate(manifest: dict[str, Any], max_failure_rate: float) -> None:
    totals = manifest["totals"]
    skipped = sum(totals["skipped"].values())
    rate = skipped / max(1, totals["read"])
    if rate > max_failure_rate:
        reasons = ", ".join(f"{k}={v}" for k, v in totals["skipped"].items())
        raise CacheJobError(
            f"{skipped} of {totals['read']} samples failed ({rate:.1%} > cache.max_failure_rate="
            f"{max_failure_rate:.1%}): {reasons}. Examples are in {RESULTS_DIR}/*.json 'skip_examples'."
        )


# ---------------------------------------------------------------------------- the local job
_WORKER: dict[str, Any] = {}


def _worker_init(configs: tuple, device: str, seed: int, queue: Any, counter: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, counter[1])))
    with counter[0].get_lock():
        worker = counter[0].value
        counter[0].value += 1
    data_cfg, cond_cfg, ae_cfg, cache_cfg = configs
    encoders = build_encoders(ae_cfg, cond_cfg, resolve_device(device, worker))
    _WORKER.update(encoders=encoders, spec=CacheSpec.build(data_cfg, cond_cfg, ae_cfg, cache_cfg, encoders, seed),
                   queue=queue)


def _worker_run(args: tuple[str, str]) -> dict[str, Any]:
    url, output_dir = args
    queue = _WORKER["queue"]
    return cache_shard(url, output_dir, _WORKER["encoders"], _WORKER["spec"], progress=queue.put).to_json()


def run_cache_job(data_cfg: Any, cond_cfg: Any, ae_cfg: Any, cache_cfg: Any, *, seed: int = 0,
                  encoders: Optional[Encoders] = None) -> dict[str, Any]:
    """Cache every shard of `cache_cfg.input` into `cache_cfg.output` with N local workers; returns the manifest.

    Raises CacheJobError when the failure rate exceeds `cache_cfg.max_failure_rate`.
    """
    from tqdm import tqdm

    if not cache_cfg.input:
        raise CacheJobError("cache.input is empty: give raw shard URLs, e.g. cache.input='/data/raw-{000000..000099}.tar'")
    if not cache_cfg.output:
        raise CacheJobError("cache.output is empty: give the folder for the cached shards")
    urls = expand_urls(cache_cfg.input)
    names = [shard_name(u) for u in urls]
    dupes = sorted(n for n, count in Counter(names).items() if count > 1)
    if dupes:
        raise CacheJobError(f"input shards share output names {dupes[:5]}: one output shard per input name")
    output_dir = Path(cache_cfg.output)
    output_dir.mkdir(parents=True, exist_ok=True)
    redo = set(incomplete_shards(output_dir, names))
    todo = [u for u, n in zip(urls, names) if n in redo]
    done_before = len(urls) - len(todo)
    bar = tqdm(total=None, desc=f"caching {len(todo)}/{len(urls)} shards", unit="img",
               disable=not cache_cfg.progress, dynamic_ncols=True, file=sys.stderr)
    start = time.perf_counter()
    written = 0
    failed: list[str] = []

    def on_result(result: ShardResult) -> None:
        nonlocal written
        written += result.written
        if not result.complete:
            failed.append(result.name)
        bar.set_postfix(shards=f"{done_before + len(on_result.seen) + 1}/{len(urls)}",  # type: ignore[attr-defined]
                        skipped=sum(result.skipped.values()))
        on_result.seen.append(result.name)  # type: ignore[attr-defined]

    on_result.seen = []  # type: ignore[attr-defined]
    if cache_cfg.num_workers <= 1 or len(todo) <= 1:
        if encoders is None:
            encoders = build_encoders(ae_cfg, cond_cfg, resolve_device(cache_cfg.device))
        spec = CacheSpec.build(data_cfg, cond_cfg, ae_cfg, cache_cfg, encoders, seed)
        for url in todo:
            on_result(cache_shard(url, output_dir, encoders, spec, progress=bar.update))
    else:
        _run_pool(todo, output_dir, (data_cfg, cond_cfg, ae_cfg, cache_cfg), cache_cfg, seed, bar, on_result)
    bar.close()
    manifest = assemble_manifest(output_dir, names)
    elapsed = time.perf_counter() - start
    _print_summary(manifest, written, elapsed, done_before, failed, ae_cfg)
    check_failure_rate(manifest, cache_cfg.max_failure_rate)
    return manifest


def _run_pool(todo: list[str], output_dir: Path, configs: tuple, cache_cfg: Any, seed: int, bar: Any,
              on_result: Callable[[ShardResult], None]) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fresh interpreters: no forked CUDA/OpenMP state
    queue = ctx.Queue()
    workers = min(cache_cfg.num_workers, len(todo))
    counter = (ctx.Value("i", 0), workers)
    stop = threading.Event()

    def drain() -> None:  # progress messages from the workers → the bar (samples/s)
        while not stop.is_set() or not queue.empty():
            try:
                bar.update(queue.get(timeout=0.1))
            except Exception:
                continue

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        with ctx.Pool(workers, initializer=_worker_init,
                      initargs=(configs, cache_cfg.device, seed, queue, counter)) as pool:
            for data in pool.imap_unordered(_worker_run, [(u, str(output_dir)) for u in todo]):
                on_result(ShardResult.from_json(data))
    finally:
        stop.set()
        thread.join(timeout=5)


def _print_summary(manifest: dict[str, Any], written_now: int, elapsed: float, done_before: int,
                   failed: list[str], ae_cfg: Any) -> None:
    from ldmscale.latent_scale import describe_cache_estimate

    totals = manifest["totals"]
    lines = [
        f"[cache] {len(manifest['shards'])} shards ({done_before} already complete), "
        f"{written_now} samples cached now in {elapsed:.1f} s ({written_now / max(elapsed, 1e-9):.1f} samples/s)",
        f"[cache] totals: read={totals['read']} written={totals['written']} "
        f"skipped={sum(totals['skipped'].values())} bytes/sample="
        f"{totals['bytes'] / max(1, totals['written']):.0f}",
    ]
    for reason, n in totals["skipped"].items():
        lines.append(f"[cache]   skipped {reason}: {n}")
    stats = manifest.get("latent_stats") or {}
    if stats:
        lines.append(f"[cache] {describe_cache_estimate(stats, ae_cfg)}")
    if failed:
        lines.append(f"[cache] unreadable shards (retried on re-run): {failed[:5]}")
    print("\n".join(lines), flush=True)


__all__ = [
    "CacheJobError", "CacheSpec", "Encoders", "assemble_manifest", "build_encoders", "cache_shard",
    "check_failure_rate", "incomplete_shards", "is_complete", "latent_layout", "load_results", "run_cache_job", "weights_hash",
    "write_manifest",
]
