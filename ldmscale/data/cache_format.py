"""The cached record (what one sample stores, in which dtype), its tar encoding, and the manifest schema.

A cached shard is a plain webdataset tar (written by webdataset's TarWriter; `webdataset.WebDataset`
reads its samples). One cached sample is two tar members:
  {key}.json  metadata (caption, class, boxes, original size, crop box, bucket, text length) and the
              layout of the tensors in the .bin member;
  {key}.bin   raw little-endian bytes of: KL moments (mean ‖ logvar) or VQ pre-quantisation latent
              [M,h,w] in `latent_dtype`; text tokens [n,D] with n = min(length+1, context_length) in
              `text_dtype` (never the padding); the pooled text embedding [D]; then, for the concat
              tasks, the derived inputs in `latent_dtype` (ldmscale.data.conditioning: SR `low_res`,
              inpainting `inpaint_mask` and `masked_moments`).
The shard's last member, `__index__/offsets.npy`, is its index: int64 [n, 5] (bucket index, and the byte
offset and size of the .bin and .json data of every sample, in file order, as tarfile wrote them), so the
loader reads any sample with one seek and one read, like wids' indexed access. webdataset
skips `__*__/` members, so plain readers see only the samples. Each shard's manifest entry carries its
per-bucket sample counts and the index member's (offset, bytes): the loader plans an epoch from the
manifest alone and reads a shard's index only when it is about to read that shard.
A per-shard result file `_results/{name}.json` is written by the job; manifest.json is assembled from those.

Version 2 (this layout) replaced version 1's `{name}.idx.npy` sidecars; the loader refuses version 1
caches with a message naming their manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import tarfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import numpy as np
import torch
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext

FORMAT_NAME = "ldmscale-cache"
FORMAT_VERSION = 2
RESULTS_DIR = "_results"
MANIFEST = "manifest.json"
INDEX_KEY = "__index__/offsets"  # + ".npy"; webdataset skips `__*__/` members when it reads samples

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def dtype_name(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} must be one of {list(DTYPES)}")
    return dtype


def tensor_to_bytes(tensor: torch.Tensor, dtype: str) -> bytes:
    t = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    # bf16 has no numpy dtype: move the raw 16-bit words through int16.
    view = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
    return view.numpy().tobytes()


def tensor_from_bytes(payload: bytes | memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    n = math.prod(shape)
    if len(payload) != n * _ITEMSIZE[dtype]:
        raise ValueError(f"tensor of shape {shape} in {dtype} needs {n * _ITEMSIZE[dtype]} bytes, got {len(payload)}")
    raw = torch.frombuffer(bytearray(payload), dtype=torch.int16 if _ITEMSIZE[dtype] == 2 else torch.float32)
    return raw.view(DTYPES[dtype]).reshape(shape)


@dataclass
class CachedRecord:
    """One cached sample as tensors + metadata (see the module docstring for the byte layout)."""

    key: str
    moments: torch.Tensor  # [M, h, w]
    text_tokens: Optional[torch.Tensor] = None  # [n, D], n = min(length + 1, context_length)
    text_pooled: Optional[torch.Tensor] = None  # [D]
    text_length: int = 0  # real token count reported by the text encoder
    meta: dict[str, Any] = field(default_factory=dict)  # caption, class_id, boxes, crop, bucket, ...
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # derived concat inputs (low_res, ...)


def encode_record(record: CachedRecord, latent_dtype: str, text_dtype: str) -> dict[str, bytes]:
    """The record's tar members {ext: bytes}."""
    parts: list[bytes] = []
    layout: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, tensor, dtype in (("moments", record.moments, latent_dtype),
                                ("text_tokens", record.text_tokens, text_dtype),
                                ("text_pooled", record.text_pooled, text_dtype),
                                *((name, t, latent_dtype) for name, t in sorted(record.extras.items()))):
        if tensor is None:
            continue
        payload = tensor_to_bytes(tensor, dtype)
        layout[name] = {"dtype": dtype, "shape": list(tensor.shape), "offset": offset, "nbytes": len(payload)}
        parts.append(payload)
        offset += len(payload)
    meta = dict(record.meta, text_length=int(record.text_length), tensors=layout)
    return {"json": json.dumps(meta, separators=(",", ":")).encode(), "bin": b"".join(parts)}


def decode_record(key: str, members: dict[str, bytes]) -> CachedRecord:
    """Inverse of `encode_record`."""
    meta = json.loads(bytes(members["json"]))
    key = meta.pop("key", key)  # the record's own key (read by index, without its member names)
    layout = meta.pop("tensors")
    blob = memoryview(members["bin"])
    tensors = {name: tensor_from_bytes(blob[spec["offset"]: spec["offset"] + spec["nbytes"]], spec["dtype"], spec["shape"])
               for name, spec in layout.items()}
    moments, tokens, pooled = (tensors.pop(name, None) for name in ("moments", "text_tokens", "text_pooled"))
    return CachedRecord(key, moments, tokens, pooled, int(meta.pop("text_length", 0)), meta, tensors)


def safe_key(key: str) -> str:
    """A tar-safe member stem: no dots or slashes (they would split the key), short enough for USTAR."""
    clean = key.replace("/", "_").replace(".", "_")
    return clean if len(clean) <= 90 else hashlib.sha1(clean.encode()).hexdigest()


# Columns of a shard's index (int64 [n, 5], one row per sample in file order).
INDEX_COLUMNS = ("bucket", "bin_offset", "bin_bytes", "json_offset", "json_bytes")


class RecordWriter:
    """Appends records to a shard through webdataset's TarWriter and remembers where tarfile put each
    member's bytes; `close` appends that index as the shard's last member."""

    def __init__(self, fileobj: io.BufferedWriter):
        # Fixed mtime/owner so a re-run writes byte-identical shards.
        self.tar = TarWriter(fileobj, encoder=False, mtime=0, mode=0o644, user="ldmscale", group="ldmscale")
        self.index: list[tuple[int, ...]] = []
        self.keys: set[str] = set()

    def _append(self, sample: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """Write one webdataset sample; returns {ext: (data offset, bytes)} of its members."""
        stream = self.tar.tarstream
        position = stream.offset
        self.tar.write(sample)
        where = {}
        for info in stream.members:  # the members tarfile just wrote, with the header it wrote for each
            data = position + len(info.tobuf(stream.format, stream.encoding, stream.errors))
            where[base_plus_ext(info.name)[1]] = (data, info.size)
            position = data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if position != stream.offset:
            raise RuntimeError(f"tar layout mismatch after {sample['__key__']}: {position} != {stream.offset}")
        stream.members.clear()  # tarfile keeps every TarInfo otherwise: O(samples) memory
        return where

    def write(self, record: CachedRecord, bucket_index: int, latent_dtype: str, text_dtype: str) -> None:
        key = safe_key(record.key)
        if key in self.keys:  # duplicate keys in the input would merge two samples into one
            suffix = 1
            while f"{key}_{suffix}" in self.keys:
                suffix += 1
            key = f"{key}_{suffix}"
        self.keys.add(key)
        record = dataclasses.replace(record, meta=dict(record.meta, key=key))
        where = self._append({"__key__": key, **encode_record(record, latent_dtype, text_dtype)})
        self.index.append((bucket_index, *where["bin"], *where["json"]))

    def close(self) -> tuple[np.ndarray, list[int]]:
        """(index [n, 5], [offset, bytes] of the index member's data)."""
        index = np.asarray(self.index, dtype=np.int64).reshape(-1, len(INDEX_COLUMNS))
        buffer = io.BytesIO()
        np.save(buffer, index)
        where = self._append({"__key__": INDEX_KEY, "npy": buffer.getvalue()})
        self.tar.close()
        return index, list(where["npy"])


def read_index(f: io.BufferedReader, span: tuple[int, int] | list[int], where: str) -> np.ndarray:
    """A shard's index (int64 [n, 5], INDEX_COLUMNS) from its manifest entry's (offset, bytes)."""
    f.seek(int(span[0]))
    try:
        index = np.load(io.BytesIO(f.read(int(span[1]))))
    except ValueError as exc:
        raise ValueError(f"{where}: no index at byte {span[0]} ({exc}); the shard was rewritten after its "
                         "manifest: re-run the cache job") from None
    if index.ndim != 2 or index.shape[1] != len(INDEX_COLUMNS):
        raise ValueError(f"{where}: index of shape {index.shape}, expected [n, {len(INDEX_COLUMNS)}]")
    return index


def read_record(f: io.BufferedReader, row: np.ndarray, where: str) -> CachedRecord:
    """One cached record from its index row: one read covering both members' bytes."""
    _, bin_offset, bin_bytes, json_offset, json_bytes = (int(v) for v in row)
    start, end = min(bin_offset, json_offset), max(bin_offset + bin_bytes, json_offset + json_bytes)
    f.seek(start)
    span = memoryview(f.read(end - start))
    if len(span) != end - start:
        raise ValueError(f"{where} is shorter than its index says (bytes {start}..{end})")
    members = {"bin": span[bin_offset - start: bin_offset - start + bin_bytes],
               "json": span[json_offset - start: json_offset - start + json_bytes]}
    return decode_record("", members)  # type: ignore[arg-type]


def decode_sample(sample: dict[str, Any]) -> CachedRecord:
    """A webdataset sample of a cached shard ({"__key__", "json", "bin"}, e.g. from webdataset.WebDataset)."""
    return decode_record(sample["__key__"], sample)


# ---------------------------------------------------------------------------- latent statistics
@dataclass
class LatentStats:
    """Mergeable per-channel sums of the latent distribution (mean of E[z], E[z²] over pixels)."""

    count: int = 0  # latent pixels per channel
    sum: list[float] = field(default_factory=list)
    sum_sq: list[float] = field(default_factory=list)

    def update(self, mean: torch.Tensor, var: Optional[torch.Tensor] = None) -> None:
        """Add latents [B,C,h,w]; with the posterior variance, E[z²] = mean² + var (exact, no sampling)."""
        mean = mean.double()
        second = mean.square() if var is None else mean.square() + var.double()
        s, sq = mean.sum(dim=(0, 2, 3)).tolist(), second.sum(dim=(0, 2, 3)).tolist()
        if not self.sum:
            self.sum, self.sum_sq = [0.0] * len(s), [0.0] * len(s)
        self.sum = [a + b for a, b in zip(self.sum, s)]
        self.sum_sq = [a + b for a, b in zip(self.sum_sq, sq)]
        self.count += mean.shape[0] * mean.shape[2] * mean.shape[3]

    def update_moments(self, moments: torch.Tensor, kind: str) -> None:
        """The encoder's moments [B,C',h,w]: KL (mean ‖ logvar, logvar clamped as when sampling) or VQ latents."""
        if kind == "kl":
            mean, logvar = moments.chunk(2, dim=1)
            self.update(mean, logvar.clamp(-30.0, 20.0).exp())
        else:
            self.update(moments)

    def merge(self, other: LatentStats) -> LatentStats:
        if not other.count:
            return self
        if not self.count:
            return LatentStats(other.count, list(other.sum), list(other.sum_sq))
        return LatentStats(self.count + other.count, [a + b for a, b in zip(self.sum, other.sum)],
                           [a + b for a, b in zip(self.sum_sq, other.sum_sq)])

    def summary(self) -> dict[str, Any]:
        """Per-channel mean/std and the suggested scale (1/global std, as SD's 0.18215) and shift."""
        if not self.count:
            return {}
        mean = [s / self.count for s in self.sum]
        std = [math.sqrt(max(sq / self.count - m * m, 0.0)) for sq, m in zip(self.sum_sq, mean)]
        g_mean = sum(mean) / len(mean)
        g_second = sum(self.sum_sq) / (self.count * len(mean))
        g_std = math.sqrt(max(g_second - g_mean * g_mean, 1e-12))
        return {"count": self.count, "mean": mean, "std": std, "global_mean": g_mean, "global_std": g_std,
                "scale_factor": 1.0 / g_std, "shift_factor": g_mean}


# ---------------------------------------------------------------------------- results & manifest
@dataclass
class ShardResult:
    """What caching one input shard produced; written to _results/{name}.json, merged into the manifest.

    `read` = written + sum(skipped): shard-level failures (unreadable_shard, truncated_tar) count one each.
    """

    name: str
    input_url: str
    complete: bool = False  # the output shard and its index exist; a re-run skips it
    read: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    bucket_counts: list[int] = field(default_factory=list)  # per bucket index
    latent_stats: LatentStats = field(default_factory=LatentStats)
    spec: dict[str, Any] = field(default_factory=dict)  # encoders, buckets, dtypes (must agree across shards)
    seconds: float = 0.0
    bytes: int = 0
    index_span: list[int] = field(default_factory=list)  # [offset, bytes] of the shard's index member

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardResult:
        data = dict(data)
        data["latent_stats"] = LatentStats(**data.get("latent_stats", {}))
        return cls(**data)


# A shard's manifest entry: its result without the spec (once at the top) and its latent sums (merged).
_MANIFEST_SHARD_KEYS = tuple(f.name for f in fields(ShardResult) if f.name not in ("spec", "latent_stats"))


def build_manifest(results: list[ShardResult]) -> dict[str, Any]:
    """Merge per-shard results into the manifest; every shard must come from the same spec."""
    if not results:
        raise ValueError("no shard results to assemble a manifest from")
    results = sorted(results, key=lambda r: r.name)
    specs = [r for r in results if r.spec]
    if not specs:
        raise ValueError("no shard result carries the encoder spec (every shard failed?)")
    spec = specs[0].spec
    for r in specs[1:]:
        if r.spec != spec:
            diff = sorted(k for k in set(spec) | set(r.spec) if spec.get(k) != r.spec.get(k))
            raise ValueError(
                f"shard {r.name} was cached with a different spec than {specs[0].name} (keys {diff}); "
                "remove one of them or cache into a separate folder"
            )
    skipped: dict[str, int] = {}
    stats = LatentStats()
    bucket_counts = [0] * len(spec["buckets"])
    for r in results:
        for reason, n in r.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        stats = stats.merge(r.latent_stats)
        for i, n in enumerate(r.bucket_counts):
            bucket_counts[i] += n
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "shards": [{k: getattr(r, k) for k in _MANIFEST_SHARD_KEYS} for r in results],
        "totals": {"read": sum(r.read for r in results), "written": sum(r.written for r in results),
                   "skipped": dict(sorted(skipped.items())), "bucket_counts": bucket_counts,
                   "bytes": sum(r.bytes for r in results)},
        **spec,
        "latent_stats": stats.summary(),
    }
