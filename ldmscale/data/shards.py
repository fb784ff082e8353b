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
import signal
import subprocess
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from webdataset.gopen import Pipe, gopen
from webdataset.shardlists import expand_urls as wds_expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, tar_file_iterator

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
    "stream_failed": "the stream exited non-zero, stalled past cache.read_timeout_s or failed mid-shard "
                     "(counted once per shard; the shard stays incomplete and is retried on re-run)",
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
def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand URL patterns with webdataset's rule ("::" separates patterns, then brace expansion); a local
    folder becomes its *.tar files, a glob its matches. Plain paths may also be separated by whitespace
    (a `pipe:` command keeps its spaces). `pipe:CMD` and `scheme://` URLs are never touched on disk.
    """
    out: list[str] = []
    for entry in [urls] if isinstance(urls, str) else urls:
        for url in wds_expand_urls(str(entry)):
            url = url.strip()
            if not url:
                continue
            if url.startswith("pipe:") or "://" in url:
                out.append(url)
                continue
            for path in url.split():
                if os.path.isdir(path):
                    found = sorted(glob.glob(os.path.join(path, "*.tar")))
                    if not found:
                        raise FileNotFoundError(f"no *.tar shards in folder {path!r}")
                    out.extend(found)
                elif any(ch in path for ch in "*?["):
                    found = sorted(glob.glob(path))
                    if not found:
                        raise FileNotFoundError(f"glob {path!r} matches no files")
                    out.extend(found)
                else:
                    out.append(path)
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
    """Shards of one rank (round-robin), for streaming paths; the cached loader splits batches instead."""
    return list(urls[rank::world_size])


def split_by_worker(urls: Sequence[str], worker: Optional[int] = None,
                    num_workers: Optional[int] = None) -> list[str]:
    """Shards of one dataloader worker; defaults come from torch's worker info."""
    if worker is None or num_workers is None:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return list(urls[worker::num_workers])


# ---------------------------------------------------------------------------- reading tars (webdataset)
# Every tar in ldmscale is read here, through webdataset: its tar iterator, its key rule (the key ends at
# the basename's first dot: `img.v2.jpg` is key `img`, member `v2.jpg`), its `pipe:` streams (which raise
# on a non-zero exit) and its handling of `__*__` metadata members.
class StreamError(OSError):
    """A stream failed (non-zero exit, stalled past the read timeout, I/O error): its shard is incomplete."""


class _Watchdog:
    """A stream that is killed when it delivers no byte for `timeout_s` (a stalled `pipe:` would block
    forever); closing it raises StreamError for a stall and webdataset's IOError for a non-zero exit."""

    def __init__(self, stream: Any, url: str, timeout_s: float):
        self.stream, self.url, self.timeout_s = stream, url, timeout_s
        self.last = time.monotonic()
        self.stalled = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def read(self, *args: Any) -> bytes:
        data = self.stream.read(*args)
        self.last = time.monotonic()
        return data

    def _kill(self) -> None:
        proc = getattr(self.stream, "proc", None)  # webdataset's Pipe
        if proc is None:
            self.stream.close()
        elif proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and its children: the blocked read gets EOF

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            if time.monotonic() - self.last > self.timeout_s:
                self.stalled = True
                self._kill()
                return

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        try:
            self.stream.close()  # webdataset's Pipe waits (≤ timeout_s) and raises on a non-zero exit
        except subprocess.TimeoutExpired:
            self.stalled = True
            self._kill()
        except Exception:
            if not self.stalled:
                raise
        if self.stalled:
            raise StreamError(f"{self.url}: no data for {self.timeout_s:g} s (cache.read_timeout_s); killed")


def open_stream(url: str, read_timeout_s: float = 0.0) -> Any:
    """webdataset's stream for a URL (local file, `pipe:CMD` checked for its exit status, a URL scheme),
    watched for stalls when `read_timeout_s` > 0."""
    if read_timeout_s <= 0:
        return gopen(url, "rb")
    if url.startswith("pipe:"):
        # webdataset's gopen_pipe, in its own session so that a stall kills the whole command.
        stream = Pipe(url[5:], mode="rb", shell=True, bufsize=8192, ignore_status=[141], timeout=read_timeout_s,
                      start_new_session=True)
    else:
        stream = gopen(url, "rb")
    return _Watchdog(stream, url, read_timeout_s)


def iter_tar_samples(url: str, skips: SkipCounter, read_timeout_s: float = 0.0) -> Iterator[dict[str, Any]]:
    """webdataset samples {"__key__", "__url__", ext: bytes} of one shard; never raises on bad input.

    An unreadable URL is counted once as `unreadable_shard`. A stream that fails after it started (a
    `pipe:` exiting non-zero, a stall past `read_timeout_s`, a read error) is counted as `stream_failed`:
    the shard cannot be trusted as complete. A tar that ends inside a member yields the samples before it
    and counts the dropped trailing sample as `truncated_tar`.
    """
    try:
        stream = open_stream(url, read_timeout_s)
    except Exception as exc:  # webdataset raises several types for a bad URL
        skips.add("unreadable_shard", f"{url}: {exc}")
        return
    last_member = [""]  # the newest member header read: its key tells whether the current sample ended

    def note(name: str) -> str:
        last_member[0] = name
        return name

    started = False
    failure: list[BaseException] = []

    def until_failure(members: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # End the member stream at the first error, so that webdataset's grouping still hands over the
        # sample before it; that sample is dropped below when the failing member belonged to it.
        try:
            yield from members
        except (tarfile.ReadError, EOFError, OSError, ValueError) as exc:
            failure.append(exc)

    try:
        members = tar_file_expander([{"url": url, "stream": stream}], rename_files=note, eof_value=None)
        for sample in group_by_keys(until_failure(members)):
            if failure and sample["__key__"] == base_plus_ext(last_member[0])[0]:
                break  # the sample the stream broke inside: incomplete
            started = True
            yield sample
    except ValueError as exc:  # webdataset's grouping refuses a member name twice in one sample
        failure.append(exc)
    except GeneratorExit:  # the consumer stopped early: release the stream, whatever its state
        try:
            stream.close()
        except Exception:
            pass
        raise
    try:
        stream.close()
    except Exception as exc:  # a pipe's non-zero exit status, or a stall, surfaces here
        failure.insert(0, exc)
    if not failure:
        return
    first = failure[0]
    if isinstance(first, OSError) and (started or last_member[0]):
        skips.add("stream_failed", f"{url}: {first}")
    elif not started and not last_member[0]:
        skips.add("unreadable_shard", f"{url}: {first}")
    else:
        skips.add("truncated_tar", f"{url}: {first}")


def samples_from_bytes(span: bytes | memoryview, where: str) -> list[dict[str, Any]]:
    """The webdataset samples in a byte span of a tar (whole members, e.g. one indexed sample)."""
    members = tar_file_expander([{"url": where, "stream": io.BytesIO(span)}], eof_value=None)
    return list(group_by_keys(members))


def member_from_bytes(span: bytes | memoryview, where: str) -> tuple[str, bytes]:
    """The (name, bytes) of the one member in a span, also for `__*__/` metadata members (index tables)."""
    for member in tar_file_iterator(io.BytesIO(span), skip_meta=None):
        return member["fname"], member["data"]
    raise ValueError(f"{where}: no tar member in the span")


@dataclass(frozen=True)
class SampleSpan:
    """Where one sample of a local tar lies: its key, byte span (all its members) and member extensions."""

    key: str
    offset: int
    size: int
    exts: tuple[str, ...]


def index_samples(path: str) -> list[SampleSpan]:
    """The sample spans of a local tar, for random access to raw shards (read back with `samples_from_bytes`).

    The headers are read by the standard library (tarfile) and grouped with webdataset's key rule.
    """
    spans: list[SampleSpan] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            key, ext = base_plus_ext(info.name)
            if key is None or not info.isreg():
                continue
            end = info.offset_data + (info.size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE
            last = spans[-1] if spans else None
            if last is not None and last.key == key:
                spans[-1] = SampleSpan(key, last.offset, end - last.offset, (*last.exts, ext.lower()))
            else:
                spans.append(SampleSpan(key, info.offset, end - info.offset, (ext.lower(),)))
    return spans


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
                 on_read: Optional[Callable[[], None]] = None, read_timeout_s: float = 0.0) -> Iterator[RawSample]:
    """Decoded samples of several shards in order; each bad sample is counted, never raised."""
    for url in urls:
        for raw in iter_tar_samples(url, skips, read_timeout_s):
            if on_read is not None:
                on_read()
            try:
                yield decode_sample(raw, rules)
            except SkipSample as skip:
                skips.add(skip.reason, skip.detail)
