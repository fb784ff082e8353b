"""Training batches from the latent cache (or, online, straight from raw shards through the encoders).

Design of the cached loader (why it resumes exactly and never hangs DDP):
- The manifest of each cache folder lists its complete shards; every shard has an index sidecar of
  (byte offset, byte length, bucket) per sample. Together they form a global sample table, built
  once per process (24 bytes per sample), so any sample is one seek + one read away.
- An epoch's plan is a pure function of (seed, epoch, table, micro_batch_size, world_size):
  sources are resampled to their weights, samples are shuffled within each bucket and cut into
  one-bucket batches (a bucket's remainder < micro_batch_size is dropped, a different one each
  epoch), the batches are shuffled, and the list is cut to a multiple of world_size; rank r takes
  batches r, r+W, r+2W, ... So ranks are disjoint and get the same number of batches.
- Dataloader worker k of n builds the rank's batches k, k+n, ...; torch's loader returns them
  round-robin, i.e. in plan order, so the sequence does not depend on the number of workers.
- The latent sample of a batch is drawn from its moments with a generator seeded by
  (seed, epoch, global batch position), so it too is independent of workers and of resumption.
- state_dict() is (epoch, batches consumed); a resumed loader rebuilds the plan and starts at the
  next batch, reading nothing that was already consumed.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ldmscale.conditioning import kind_for, kind_named
from ldmscale.data.cache import autoencoder_config_fingerprint, latent_layout, weights_mismatch
from ldmscale.data.cache_format import (
    FORMAT_NAME,
    INDEX_SUFFIX,
    MANIFEST,
    CachedRecord,
    decode_record,
    parse_tar_span,
)
from ldmscale.data.shards import expand_urls
from ldmscale.data.transforms import resolve_buckets


class CacheMismatchError(ValueError):
    """The cache was made with other encoders/buckets/latent shape than the training config expects."""


# ---------------------------------------------------------------------------- the sample table
@dataclass
class SampleTable:
    """Every cached sample of the training set: where it lives and its bucket and source."""

    shard_paths: list[str]
    shard: np.ndarray  # int32 [N] index into shard_paths
    offset: np.ndarray  # int64 [N] byte offset of the sample's first tar header
    length: np.ndarray  # int64 [N] byte length of its members
    bucket: np.ndarray  # int32 [N] index into `buckets`
    source: np.ndarray  # int32 [N] index of its data.train_shards entry
    buckets: list[tuple[int, int]]
    manifests: list[dict[str, Any]]

    def __len__(self) -> int:
        return int(self.shard.shape[0])


def _find_manifest(entry: str) -> Path:
    if os.path.isdir(entry):
        folder = Path(entry)
    else:
        folders = {Path(u).parent for u in expand_urls(entry)}
        if len(folders) != 1:
            raise ValueError(f"data.train_shards entry {entry!r} spans folders {sorted(map(str, folders))}; "
                             "give one entry per cache folder")
        folder = folders.pop()
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {folder} (for {entry!r}): cached shards are read through their manifest "
            "(run tools/cache_latents.py, or ldmscale.data.cache.assemble_manifest for SLURM arrays)"
        )
    return manifest


def build_table(train_shards: Sequence[str]) -> SampleTable:
    """The sample table of `data.train_shards` (cache folders, or URL patterns of cached shards)."""
    if not train_shards:
        raise ValueError("data.train_shards is empty: give the cache folder(s) written by tools/cache_latents.py")
    paths: list[str] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("shard", "offset", "length", "bucket", "source")}
    manifests: list[dict[str, Any]] = []
    buckets: Optional[list[tuple[int, int]]] = None
    for source, entry in enumerate(train_shards):
        manifest_path = _find_manifest(entry)
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT_NAME:
            raise CacheMismatchError(f"{manifest_path} is not an {FORMAT_NAME} manifest")
        manifests.append(manifest)
        src_buckets = [tuple(b) for b in manifest["buckets"]]
        if buckets is None:
            buckets = src_buckets  # type: ignore[assignment]
        elif src_buckets != buckets:
            raise CacheMismatchError(f"{manifest_path} has buckets {src_buckets}, another source {buckets}")
        complete = {s["name"]: s for s in manifest["shards"] if s["complete"]}
        folder = manifest_path.parent
        if os.path.isdir(entry):
            names = sorted(complete)
        else:
            names = [Path(u).name for u in expand_urls(entry)]
            missing = [n for n in names if n not in complete]
            if missing:
                raise FileNotFoundError(f"shards {missing[:5]} of {entry!r} are not complete in {manifest_path}")
        for name in names:
            if complete[name]["written"] == 0:
                continue
            index = np.load(folder / f"{name}{INDEX_SUFFIX}")
            if index.shape[0] != complete[name]["written"]:
                raise CacheMismatchError(
                    f"{folder / name}: index has {index.shape[0]} samples, manifest says {complete[name]['written']}")
            parts["shard"].append(np.full(index.shape[0], len(paths), np.int32))
            parts["offset"].append(index[:, 0])
            parts["length"].append(index[:, 1])
            parts["bucket"].append(index[:, 2].astype(np.int32))
            parts["source"].append(np.full(index.shape[0], source, np.int32))
            paths.append(str(folder / name))
    if not paths:
        raise ValueError(f"no cached samples in data.train_shards={list(train_shards)}")
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return SampleTable(paths, arrays["shard"], arrays["offset"], arrays["length"], arrays["bucket"],
                       arrays["source"], list(buckets or []), manifests)


# ---------------------------------------------------------------------------- safety checks
def check_manifest(manifest: dict[str, Any], data_cfg: Any, cond_cfg: Any, ae_cfg: Any, where: str = "") -> None:
    """Refuse a cache made with other encoders, buckets or latent shape than this config (names the keys)."""
    problems: list[str] = []
    layout = latent_layout(ae_cfg)
    cached_layout = manifest["latent"]
    for key in ("kind", "channels", "embed_dim"):
        if cached_layout.get(key) != layout[key]:
            problems.append(f"latent {key}: cache {cached_layout.get(key)!r} vs config {layout[key]!r}")
    ae_cached = manifest["encoders"]["autoencoder"]
    ae_now = autoencoder_config_fingerprint(ae_cfg)
    diff = sorted(k for k in set(ae_now) | set(ae_cached["config"]) if ae_now.get(k) != ae_cached["config"].get(k))
    if diff:
        problems.append("autoencoder." + ", autoencoder.".join(
            f"{k}: cache {ae_cached['config'].get(k)!r} vs config {ae_now.get(k)!r}" for k in diff))
    problems += filter(None, [weights_mismatch("autoencoder.weights", ae_cfg.weights, ae_cached)])
    problems += kind_for(cond_cfg).check_cache(manifest)
    want = [list(b) for b in resolve_buckets(data_cfg)]
    if want != manifest["buckets"]:
        problems.append(f"data buckets {want} vs cached buckets {manifest['buckets']} (data.resolution/buckets)")
    if problems:
        raise CacheMismatchError(
            f"the latent cache {where} does not match the training config; re-cache or fix the config:\n  - "
            + "\n  - ".join(problems))


# ---------------------------------------------------------------------------- the epoch plan
def epoch_plan(table_bucket: np.ndarray, table_source: np.ndarray, weights: Sequence[float], *, seed: int,
               epoch: int, micro_batch_size: int, world_size: int) -> np.ndarray:
    """All batches of an epoch [T, B] of sample ids, T a multiple of world_size (rank r: rows r::W)."""
    num_sources = int(table_source.max()) + 1 if table_source.size else 0
    ids = np.arange(table_bucket.shape[0], dtype=np.int64)
    if weights:
        w = np.asarray(weights, dtype=np.float64)
        total = ids.shape[0]
        picks = []
        for s in range(num_sources):
            own = ids[table_source == s]
            target = int(round(w[s] / w.sum() * total))
            rng = np.random.default_rng([seed, epoch, 1, s])
            reps = -(-target // max(1, own.shape[0]))
            picks.append(np.concatenate([rng.permutation(own) for _ in range(reps)])[:target] if own.size else own)
        pool = np.concatenate(picks)
    else:
        pool = ids
    batches = []
    pool_bucket = table_bucket[pool]
    for b in np.unique(pool_bucket):
        members = np.random.default_rng([seed, epoch, 2, int(b)]).permutation(pool[pool_bucket == b])
        full = members.shape[0] // micro_batch_size * micro_batch_size
        if full:
            batches.append(members[:full].reshape(-1, micro_batch_size))
    if not batches:
        return np.zeros((0, micro_batch_size), np.int64)
    plan = np.concatenate(batches)
    plan = plan[np.random.default_rng([seed, epoch, 3]).permutation(plan.shape[0])]
    return plan[: plan.shape[0] // world_size * world_size]


def batch_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------- batch assembly
def sample_latents(moments: torch.Tensor, kind: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """KL: mean + std·eps (LDM's DiagonalGaussian, logvar clamped to [-30, 20]); VQ: the latent itself."""
    if kind != "kl":
        return moments
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


def collate_records(records: Sequence[CachedRecord], *, kind: str, cond_kind: str = "none", context_length: int = 77,
                    max_boxes: int = 4, scale_factor: float, shift_factor: float,
                    generator: Optional[torch.Generator], conditioning: Any = None) -> dict[str, Any]:
    """Records of one bucket → the training batch dict (CONTRACTS.md): latents sampled and scaled, plus the
    conditioning kind's entries (`conditioning`, or the kind named `cond_kind` with default settings)."""
    if conditioning is None:
        conditioning = kind_named(cond_kind, context_length=context_length, max_boxes=max_boxes)

    def to_latents(moments: torch.Tensor) -> torch.Tensor:
        return (sample_latents(moments, kind, generator) - shift_factor) * scale_factor

    latents = to_latents(torch.stack([r.moments for r in records]).float())
    batch: dict[str, Any] = {"latents": latents, **conditioning.collate(records, latents, to_latents)}
    batch["captions"] = [r.meta.get("caption", "") for r in records]
    batch["keys"] = [r.key for r in records]
    batch["original_size"] = torch.tensor([r.meta["original_size"] for r in records], dtype=torch.long)
    batch["crop_top_left"] = torch.tensor([r.meta["crop_top_left"] for r in records], dtype=torch.long)
    batch["bucket"] = tuple(records[0].meta["bucket"])
    return batch


class _ShardReader:
    """Reads samples by (shard, offset, length) with a small LRU of open files (one per worker)."""

    def __init__(self, paths: list[str], max_open: int = 64):
        self.paths, self.max_open = paths, max_open
        self.files: OrderedDict[int, Any] = OrderedDict()

    def read(self, shard: int, offset: int, length: int) -> CachedRecord:
        f = self.files.get(shard)
        if f is None:
            f = self.files[shard] = open(self.paths[shard], "rb")
            if len(self.files) > self.max_open:
                self.files.popitem(last=False)[1].close()
        else:
            self.files.move_to_end(shard)
        f.seek(offset)
        span = f.read(length)
        if len(span) != length:
            raise OSError(f"{self.paths[shard]} is shorter than its index says (offset {offset}, length {length})")
        key, members = parse_tar_span(span)
        return decode_record(key, members)


@dataclass(frozen=True)
class _Settings:
    seed: int
    rank: int
    world_size: int
    micro_batch_size: int
    weights: tuple[float, ...]
    kind: str
    conditioning: Any  # the conditioning kind (ldmscale.conditioning): collates its batch entries
    scale_factor: float
    shift_factor: float


class _EpochBatches(torch.utils.data.IterableDataset):
    """The rank's batches of one epoch from `start` on; worker k of n builds batches start+k, start+k+n, ..."""

    def __init__(self, table: SampleTable, settings: _Settings, epoch: int, start: int):
        super().__init__()
        self.table, self.s, self.epoch, self.start = table, settings, epoch, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        s, t = self.s, self.table
        plan = epoch_plan(t.bucket, t.source, s.weights, seed=s.seed, epoch=self.epoch,
                          micro_batch_size=s.micro_batch_size, world_size=s.world_size)
        reader = _ShardReader(t.shard_paths)
        rank_positions = range(s.rank, plan.shape[0], s.world_size)
        for local in range(self.start + worker, len(rank_positions), num_workers):
            position = rank_positions[local]
            records = [reader.read(int(t.shard[i]), int(t.offset[i]), int(t.length[i])) for i in plan[position]]
            generator = torch.Generator().manual_seed(batch_seed(s.seed, self.epoch, position))
            batch = collate_records(records, kind=s.kind, conditioning=s.conditioning, scale_factor=s.scale_factor,
                                    shift_factor=s.shift_factor, generator=generator)
            batch["sample_ids"] = torch.from_numpy(plan[position].copy())
            yield batch


class Loader:
    """Iterable of training batches with set_epoch/state_dict/load_state_dict (see the module docstring).

    Iterating yields the rest of the current epoch; when an epoch is exhausted the loader moves on
    to the next one, so `for batch in loader` twice runs two epochs.
    """

    def __init__(self, table: SampleTable, settings: _Settings, num_workers: int = 0, prefetch_factor: int = 2):
        self.table, self.settings = table, settings
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.epoch, self.position = 0, 0
        self._len_cache: dict[int, int] = {}

    def batches_in_epoch(self, epoch: Optional[int] = None) -> int:
        """Batches this rank gets in `epoch` (the same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._len_cache:
            s, t = self.settings, self.table
            plan = epoch_plan(t.bucket, t.source, s.weights, seed=s.seed, epoch=epoch,
                              micro_batch_size=s.micro_batch_size, world_size=s.world_size)
            self._len_cache[epoch] = plan.shape[0] // s.world_size
        return self._len_cache[epoch]

    def __len__(self) -> int:
        return self.batches_in_epoch()

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        s = self.settings
        return {"epoch": self.epoch, "position": self.position, "seed": s.seed, "world_size": s.world_size,
                "micro_batch_size": s.micro_batch_size, "num_samples": len(self.table)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.settings
        for key, now in (("seed", s.seed), ("world_size", s.world_size), ("micro_batch_size", s.micro_batch_size),
                         ("num_samples", len(self.table))):
            if state.get(key) != now:
                raise ValueError(
                    f"loader state has {key}={state.get(key)} but this run has {key}={now}: the batch "
                    "sequence cannot be resumed exactly (call set_epoch to start the next epoch instead)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = _EpochBatches(self.table, self.settings, self.epoch, self.position)
        if self.num_workers > 0:
            batches: Any = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                pin_memory=torch.cuda.is_available())
        else:
            batches = dataset
        for batch in batches:
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0


def build_loader(data_cfg: Any, cond_cfg: Any, ae_cfg: Any, *, seed: int, rank: int, world_size: int):
    """The training loader named by `data_cfg.kind`: cached (Loader) or online (OnlineLoader)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if data_cfg.kind == "online":
        from ldmscale.data.online import OnlineLoader

        return OnlineLoader(data_cfg, cond_cfg, ae_cfg, seed=seed, rank=rank, world_size=world_size)
    table = build_table(data_cfg.train_shards)
    for entry, manifest in zip(data_cfg.train_shards, table.manifests):
        check_manifest(manifest, data_cfg, cond_cfg, ae_cfg, where=repr(entry))
    if data_cfg.shard_weights and len(data_cfg.shard_weights) != len(data_cfg.train_shards):
        raise ValueError(f"data.shard_weights has {len(data_cfg.shard_weights)} entries, "
                         f"data.train_shards has {len(data_cfg.train_shards)}")
    scale, shift = ae_cfg.scale_factor, ae_cfg.shift_factor
    if data_cfg.use_manifest_scale:
        stats = table.manifests[0].get("latent_stats") or {}
        scale, shift = stats["scale_factor"], stats["shift_factor"]
    settings = _Settings(seed, rank, world_size, data_cfg.micro_batch_size, tuple(data_cfg.shard_weights),
                         ae_cfg.kind, kind_for(cond_cfg), float(scale), float(shift))
    loader = Loader(table, settings, data_cfg.num_workers, data_cfg.prefetch_factor)
    if len(loader) == 0:
        raise ValueError(
            f"{len(table)} cached samples give no full batch of data.micro_batch_size={data_cfg.micro_batch_size} "
            f"per rank at world_size={world_size}")
    return loader
