"""The cached record (what one sample stores, in which dtype), its tar encoding, and the manifest schema.

One cached sample is two tar members:
  {key}.json  metadata (caption, class, boxes, original size, crop box, bucket, text length) and the
              layout of the tensors in the .bin member;
  {key}.bin   raw little-endian bytes of: KL moments (mean ‖ logvar) or VQ pre-quantisation latent
              [M,h,w] in `latent_dtype`; text tokens [n,D] with n = min(length+1, context_length) in
              `text_dtype` (never the padding); the pooled text embedding [D]; then, for the concat
              tasks, the derived inputs in `latent_dtype` (ldmscale.data.conditioning: SR `low_res`,
              inpainting `inpaint_mask` and `masked_moments`).
Each output shard has a sidecar `{name}.idx.npy` (int64 [n, 3]: byte offset, byte length, bucket
index of every sample) so the loader reads any sample with one seek, and a per-shard result file
`_results/{name}.json`; manifest.json is assembled from those.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch

FORMAT_NAME = "ldmscale-cache"
FORMAT_VERSION = 1
RESULTS_DIR = "_results"
MANIFEST = "manifest.json"
INDEX_SUFFIX = ".idx.npy"

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
    meta = json.loads(members["json"])
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


class RecordWriter:
    """Appends records to an open tar and remembers each one's (byte offset, byte length, bucket)."""

    def __init__(self, fileobj: io.BufferedWriter):
        self.tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.index: list[tuple[int, int, int]] = []
        self.keys: set[str] = set()

    def write(self, record: CachedRecord, bucket_index: int, latent_dtype: str, text_dtype: str) -> None:
        key = safe_key(record.key)
        if key in self.keys:  # duplicate keys in the input would merge two samples into one
            suffix = 1
            while f"{key}_{suffix}" in self.keys:
                suffix += 1
            key = f"{key}_{suffix}"
        self.keys.add(key)
        start = self.tar.offset
        for ext, payload in encode_record(record, latent_dtype, text_dtype).items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            self.tar.addfile(info, io.BytesIO(payload))
        self.index.append((start, self.tar.offset - start, bucket_index))

    def close(self) -> np.ndarray:
        self.tar.close()
        return np.asarray(self.index, dtype=np.int64).reshape(-1, 3)


def parse_tar_span(span: bytes) -> tuple[str, dict[str, bytes]]:
    """Parse the members of one sample read from (offset, length) of the index: (key, {ext: bytes})."""
    members: dict[str, bytes] = {}
    key = ""
    pos = 0
    view = memoryview(span)
    while pos + 512 <= len(span):
        header = span[pos: pos + 512]
        if header.count(0) == 512:
            break
        name = header[0:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        if prefix:
            name = f"{prefix}/{name}"
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        stem, _, ext = name.rpartition("/")[2].partition(".")
        key = key or stem
        members[ext] = bytes(view[pos + 512: pos + 512 + size])
        pos += 512 + (size + 511) // 512 * 512
    if not members:
        raise ValueError("no tar members in the span (index and shard disagree)")
    return key, members


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardResult:
        data = dict(data)
        data["latent_stats"] = LatentStats(**data.get("latent_stats", {}))
        return cls(**data)


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
        "shards": [
            {k: v for k, v in r.to_json().items() if k not in ("spec", "latent_stats")} for r in results
        ],
        "totals": {"read": sum(r.read for r in results), "written": sum(r.written for r in results),
                   "skipped": dict(sorted(skipped.items())), "bucket_counts": bucket_counts,
                   "bytes": sum(r.bytes for r in results)},
        **spec,
        "latent_stats": stats.summary(),
    }
