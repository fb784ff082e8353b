"""Raw WebDataset input: URL expansion and mixing, rank/worker splits, tar reading, decoding and filters.

Bad input never raises out of this module: every sample that cannot be used is counted in a
`SkipCounter` under a named reason (`REASONS`), so the cache job can report what it dropped.
"""

from __future__ import annotations

import glob
import io
import json
import operator
import os
import re
import subprocess
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Optional

from braceexpand import braceexpand

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")

# Named reasons a sample (or, for the *_shard/*_tar reasons, a shard) is skipped.
REASONS: dict[str, str] = {
    "corrupt_image": "image bytes have a valid signature but do not decode",
    "not_an_image": "the image member holds something else (HTML error page, text, video ...)",
    "missing_image": "the sample has no jpg/jpeg/png/webp member",
    "empty_member": "a member of the sample is zero bytes",
    "missing_caption": "no .txt and no json 'caption' (only when captions are required)",
    "bad_json": "the .json member does not parse as a JSON object",
    "too_small": "the image is below data.min_size on its shorter side",
    "extreme_aspect": "the image aspect ratio exceeds data.max_aspect_ratio",
    "filtered": "a metadata predicate in data.filters is false or the key is missing",
    "truncated_tar": "the shard ends inside a member; the incomplete trailing sample is dropped",
    "unreadable_shard": "the URL cannot be opened or is not a tar file (counted once per shard)",
    "encode_error": "the encoder raised on the sample's batch (counted per sample)",
}


class SkipSample(Exception):
    """A sample cannot be used; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SkipCounter:
    """Counts skipped samples per reason and keeps a few examples of each for the report."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, where: str, n: int = 1) -> None:
        if reason not in REASONS:
            raise KeyError(f"unknown skip reason {reason!r}; known: {sorted(REASONS)}")
        self.counts[reason] += n
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < self.max_examples:
            bucket.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


# ---------------------------------------------------------------------------- URLs
def _split_patterns(urls: str | Sequence[str]) -> list[str]:
    if isinstance(urls, str):
        urls = [urls]
    out = []
    for entry in urls:
        # "::" separates several patterns in one string (webdataset's convention); a pipe: command
        # may contain spaces, so only plain paths are split on whitespace.
        for part in str(entry).split("::"):
            part = part.strip()
            if not part:
                continue
            out.extend([part] if part.startswith("pipe:") else part.split())
    return out


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand URL patterns; a local folder becomes its *.tar files, a glob its matches.

    `pipe:CMD` and `scheme://` URLs are brace-expanded but never touched on disk.
    """
    out: list[str] = []
    for pattern in _split_patterns(urls):
        for url in braceexpand(pattern):
            if url.startswith("pipe:") or "://" in url:
                out.append(url)
            elif os.path.isdir(url):
                found = sorted(glob.glob(os.path.join(url, "*.tar")))
                if not found:
                    raise FileNotFoundError(f"no *.tar shards in folder {url!r}")
                out.extend(found)
            elif any(ch in url for ch in "*?["):
                found = sorted(glob.glob(url))
                if not found:
                    raise FileNotFoundError(f"glob {url!r} matches no files")
                out.extend(found)
            else:
                out.append(url)
    return out


def shard_name(url: str) -> str:
    """The file name a URL points at (also for `pipe:aws s3 cp s3://b/x.tar -`)."""
    if url.startswith("pipe:"):
        tars = [tok for tok in url[5:].split() if tok.endswith(".tar") or ".tar?" in tok]
        if not tars:
            raise ValueError(f"cannot find a *.tar name in pipe command {url!r}")
        url = tars[-1]
    name = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    if not name:
        raise ValueError(f"URL {url!r} has no file name")
    return name


@dataclass(frozen=True)
class Source:
    """One dataset in a mix: its shard URLs and its sampling weight."""

    urls: tuple[str, ...]
    weight: Optional[float] = None  # None: in proportion to its size


def parse_sources(patterns: Sequence[str], weights: Sequence[float] = ()) -> list[Source]:
    """Pair each URL pattern with its weight; weights must be one per pattern, positive."""
    if weights and len(weights) != len(patterns):
        raise ValueError(
            f"data.shard_weights has {len(weights)} entries but data.train_shards has {len(patterns)}"
        )
    sources = []
    for i, pattern in enumerate(patterns):
        weight = float(weights[i]) if weights else None
        if weight is not None and weight <= 0:
            raise ValueError(f"data.shard_weights[{i}]={weight} must be positive")
        sources.append(Source(tuple(expand_urls(pattern)), weight))
    return sources


def split_by_node(urls: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Shards of one rank (round-robin), for streaming paths; the cached loader splits samples instead."""
    return list(urls[rank::world_size])


def split_by_worker(urls: Sequence[str], worker: Optional[int] = None,
                    num_workers: Optional[int] = None) -> list[str]:
    """Shards of one dataloader worker; defaults come from torch's worker info."""
    if worker is None or num_workers is None:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return list(urls[worker::num_workers])


# ---------------------------------------------------------------------------- reading tars
def open_url(url: str) -> IO[bytes]:
    """A readable byte stream: a local file, the stdout of `pipe:CMD`, or fsspec/webdataset gopen."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return _PipeStream(proc, url)
    if "://" in url and not url.startswith("file://"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url.removeprefix("file://"), "rb")


class _PipeStream(io.RawIOBase):
    """stdout of a shell command; a non-zero exit becomes an OSError at the end of the stream."""

    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.proc.stdout.read(len(buffer))  # type: ignore[union-attr]
        if not data:
            rc = self.proc.wait()
            if rc != 0:
                err = self.proc.stderr.read().decode(errors="replace")[-500:]  # type: ignore[union-attr]
                raise OSError(f"{self.url!r} exited with status {rc}: {err}")
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        super().close()


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000001.latent.bin' → ('dir/000001', 'latent.bin'): the key ends at the basename's first dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


def iter_tar_samples(url: str, skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Group a tar's members by key into {"__key__", "__url__", ext: bytes}; never raises on bad input.

    An unreadable URL is counted once as `unreadable_shard`; a tar that ends inside a member yields
    the samples before it and counts the dropped trailing sample as `truncated_tar`.
    """
    try:
        stream = open_url(url)
    except OSError as exc:
        skips.add("unreadable_shard", f"{url}: {exc}")
        return
    current: dict[str, Any] = {}
    started = False
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                started = True
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if not ext or key.rsplit("/", 1)[-1].startswith("."):
                    continue  # hidden files and extension-less members are not sample data
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                if not current:
                    current = {"__key__": key, "__url__": url}
                payload = tar.extractfile(info).read()  # type: ignore[union-attr]
                if len(payload) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is truncated")
                current[ext.lower()] = payload
    except (tarfile.ReadError, EOFError, OSError) as exc:
        if not started and not current:
            skips.add("unreadable_shard", f"{url}: {exc}")
        else:
            skips.add("truncated_tar", f"{url}: {exc}")
        return
    if current:
        yield current


# ---------------------------------------------------------------------------- metadata filters
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt,
}
_PREDICATE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(\S.*?)\s*$")


@dataclass(frozen=True)
class Predicate:
    """`key OP value` on the sample's json metadata; a missing or null key fails the predicate."""

    key: str
    op: str
    value: Any
    text: str

    def __call__(self, meta: dict[str, Any]) -> bool:
        value: Any = meta
        for part in self.key.split("."):
            if not isinstance(value, dict) or part not in value:
                return False
            value = value[part]
        if value is None:
            return False
        if isinstance(self.value, float):
            try:
                value = float(value)
            except (TypeError, ValueError):
                return False
        return bool(_OPS[self.op](value, self.value))


def parse_predicate(text: str) -> Predicate:
    """Parse 'aesthetic >= 5' / "language == 'en'"; numbers compare numerically."""
    match = _PREDICATE.match(text)
    if not match:
        raise ValueError(
            f"data.filters entry {text!r} is not 'KEY OP VALUE' with OP in {list(_OPS)}"
        )
    key, op, raw = match.groups()
    value: Any
    if raw[:1] in "'\"" and raw[-1:] == raw[:1] and len(raw) >= 2:
        value = raw[1:-1]
    else:
        try:
            value = float(raw)
        except ValueError:
            value = raw
    return Predicate(key, op, value, text.strip())


# ---------------------------------------------------------------------------- decoding
_SIGNATURES: tuple[tuple[bytes, int], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0), (b"\xff\xd8\xff", 0), (b"WEBP", 8), (b"GIF8", 0), (b"BM", 0),
    (b"II*\x00", 0), (b"MM\x00*", 0),
)


def looks_like_image(payload: bytes) -> bool:
    return any(payload[at: at + len(sig)] == sig for sig, at in _SIGNATURES)


@dataclass
class RawSample:
    """A decoded, filtered raw sample: RGB image, caption, optional class and boxes, metadata."""

    key: str
    url: str
    image: Any  # PIL.Image.Image in RGB
    caption: str
    class_id: int
    boxes: list[list[float]]  # [[x0, y0, x1, y1]] as fractions of the image
    box_classes: list[int]
    meta: dict[str, Any]


@dataclass(frozen=True)
class SampleFilter:
    """What makes a raw sample usable (built from DataConfig by `from_config`)."""

    min_size: int = 0
    max_aspect_ratio: float = 0.0
    predicates: tuple[Predicate, ...] = ()
    require_caption: bool = True
    max_pixels: int = 0  # 0: no limit
    max_caption_bytes: int = 0  # 0: no limit

    @classmethod
    def from_config(cls, data_cfg: Any, require_caption: bool) -> SampleFilter:
        min_size = data_cfg.resolution // 4 if data_cfg.min_size is None else data_cfg.min_size
        return cls(min_size, data_cfg.max_aspect_ratio, tuple(parse_predicate(p) for p in data_cfg.filters),
                   require_caption, data_cfg.max_pixels, data_cfg.max_caption_bytes)


def cut_caption(caption: str, max_bytes: int) -> str:
    """The caption cut to at most `max_bytes` UTF-8 bytes, never inside a character (0: whole)."""
    if not max_bytes or len(caption) * 4 <= max_bytes:
        return caption
    return caption.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def decode_sample(raw: dict[str, Any], rules: SampleFilter) -> RawSample:
    """Decode one img2dataset-style sample or raise SkipSample with the reason."""
    from PIL import Image

    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    for ext, payload in raw.items():
        if not ext.startswith("__") and isinstance(payload, bytes) and len(payload) == 0:
            raise SkipSample("empty_member", f"{where}.{ext}")
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as exc:
            raise SkipSample("bad_json", f"{where}: {exc}") from None
        if not isinstance(meta, dict):
            raise SkipSample("bad_json", f"{where}: not an object")
    caption = ""
    if "txt" in raw:
        caption = raw["txt"].decode("utf-8", errors="replace").strip()
    if not caption and isinstance(meta.get("caption"), str):
        caption = meta["caption"].strip()
    caption = cut_caption(caption, rules.max_caption_bytes)
    if isinstance(meta.get("caption"), str):  # stored in every record's metadata: cut there too
        meta["caption"] = cut_caption(meta["caption"], rules.max_caption_bytes)
    if rules.require_caption and not caption:
        raise SkipSample("missing_caption", where)
    for predicate in rules.predicates:
        if not predicate(meta):
            raise SkipSample("filtered", f"{where}: {predicate.text}")
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise SkipSample("missing_image", f"{where} has {sorted(k for k in raw if not k.startswith('__'))}")
    payload = raw[ext]
    if not looks_like_image(payload):
        raise SkipSample("not_an_image", f"{where}.{ext} starts with {payload[:16]!r}")
    try:
        image = Image.open(io.BytesIO(payload))
        width, height = image.size  # header only: cheap size/aspect checks before decoding pixels
    except Exception as exc:  # PIL raises many types on garbage
        raise SkipSample("corrupt_image", f"{where}.{ext}: {exc}") from None
    if rules.min_size and min(width, height) < rules.min_size:
        raise SkipSample("too_small", f"{where}: {width}x{height} < {rules.min_size}")
    if rules.max_aspect_ratio and max(width, height) / max(1, min(width, height)) > rules.max_aspect_ratio:
        raise SkipSample("extreme_aspect", f"{where}: {width}x{height}")
    if rules.max_pixels and width * height > rules.max_pixels:  # before decoding: a 12000² PNG is 2 GB
        raise SkipSample("too_many_pixels", f"{where}: {width}x{height} > data.max_pixels={rules.max_pixels}")
    try:
        image.load()
        image = image.convert("RGB")
    except Exception as exc:
        raise SkipSample("corrupt_image", f"{where}.{ext}: {exc}") from None
    class_id = -1
    if "cls" in raw:
        try:
            class_id = int(raw["cls"].decode().strip())
        except ValueError:
            class_id = -1
    if class_id < 0 and isinstance(meta.get("class_id"), int):
        class_id = meta["class_id"]
    boxes, box_classes = _boxes_from_meta(meta, class_id)
    return RawSample(raw["__key__"], raw.get("__url__", ""), image, caption, class_id, boxes,
                     box_classes, meta)


def _boxes_from_meta(meta: dict[str, Any], class_id: int) -> tuple[list[list[float]], list[int]]:
    """Layout boxes: json 'boxes' + 'box_classes', or the synthetic set's single 'bbox' + class."""
    if isinstance(meta.get("boxes"), list):
        boxes = [list(map(float, b)) for b in meta["boxes"]]
        classes = [int(c) for c in meta.get("box_classes", [class_id] * len(boxes))]
        return boxes, classes
    if isinstance(meta.get("bbox"), list) and len(meta["bbox"]) == 4:
        return [list(map(float, meta["bbox"]))], [class_id]
    return [], []


def iter_decoded(urls: Sequence[str], rules: SampleFilter, skips: SkipCounter,
                 on_read: Optional[Callable[[], None]] = None) -> Iterator[RawSample]:
    """Decoded samples of several shards in order; each bad sample is counted, never raised."""
    for url in urls:
        for raw in iter_tar_samples(url, skips):
            if on_read is not None:
                on_read()
            try:
                yield decode_sample(raw, rules)
            except SkipSample as skip:
                skips.add(skip.reason, skip.detail)
