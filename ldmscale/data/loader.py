"""Training batches from the latent cache (or, online, straight from raw shards through the encoders).

Design of the cached loader (memory and start-up grow with shards, not samples; exact resume; no DDP hang):
- Start-up reads the manifest of each cache folder only: its complete shards and their per-bucket
  sample counts (a `ShardTable`, O(shards)). No shard or index file is opened until a batch needs it.
- A sample is named by (shard, bucket, k): the k-th sample of that bucket in that shard. Its byte
  offset comes from the shard's index member, read lazily by the worker about to read the shard.
- An epoch's plan is a pure function of (seed, epoch, shard counts, micro_batch_size, world_size,
  window): each source's shards are permuted (and repeated or cut to its mixture weight, in whole
  shards), the sources are interleaved in proportion, and the sequence is cut into windows of
  `data.shuffle_window` shards. Within a window, each bucket's samples are permuted and cut into
  one-bucket batches (a remainder < micro_batch_size per bucket and window is dropped), and the
  window's batches are permuted. Batches per window follow from the counts alone, so the epoch length
  is known at start-up. The windows' batches in order are the global sequence, cut to a multiple of
  world_size; rank r takes global batches r, r+W, r+2W, ... So ranks are disjoint and get the same
  number of batches.
- Dataloader worker k of n builds the rank's batches k, k+n, ... (computing only the windows they
  fall in); torch's loader returns them round-robin, i.e. in plan order, so the sequence does not
  depend on the number of workers.
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
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from ldmscale.conditioning import kind_for, kind_named
from ldmscale.data.cache import autoencoder_config_fingerprint, latent_layout, weights_mismatch
from ldmscale.data.cache_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    CachedRecord,
    read_index,
    read_record,
)
from ldmscale.data.shards import expand_urls
from ldmscale.data.transforms import resolve_buckets


class CacheMismatchError(ValueError):
    """The cache was made with other encoders/buckets/latent shape than the training config expects."""


# ---------------------------------------------------------------------------- the shard table
@dataclass
class ShardTable:
    """Every cached shard of the training set, from the manifests alone: O(shards), never O(samples)."""

    paths: list[str]
    counts: np.ndarray  # int64 [S, num_buckets] samples per bucket
    index_span: np.ndarray  # int64 [S, 2] offset and bytes of each shard's index member
    source: np.ndarray  # int32 [S] index of its data.train_shards entry
    buckets: list[tuple[int, int]]
    manifests: list[dict[str, Any]]  # without their per-shard lists

    def __post_init__(self) -> None:
        totals = self.counts.sum(axis=1)
        self.first_id = np.concatenate([[0], np.cumsum(totals)[:-1]]).astype(np.int64)  # global sample ids
        self.bucket_start = np.cumsum(self.counts, axis=1) - self.counts  # [S, nb] bucket-major ordinal

    def __len__(self) -> int:
        return int(self.counts.sum())

    def locate(self, sample_id: int) -> tuple[int, int]:
        """Global sample id → (shard, bucket-major ordinal within the shard)."""
        shard = int(np.searchsorted(self.first_id, sample_id, side="right")) - 1
        return shard, int(sample_id - self.first_id[shard])


def find_manifest(entry: str) -> Path:
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


class ShardEntry(NamedTuple):
    """What the loader keeps of a manifest's shard entry."""

    name: str
    complete: bool
    written: int
    bucket_counts: list[int]
    index_span: list[int]


def _compact(entry: dict[str, Any]) -> Any:
    # json calls this for every object, innermost first: each shard entry shrinks to a ShardEntry as soon as
    # it is parsed (200k entries with their skip reports would otherwise hold ~1 KB each at once).
    if "bucket_counts" in entry and "complete" in entry and "name" in entry:
        return ShardEntry(entry["name"], entry["complete"], entry["written"], entry["bucket_counts"],
                          entry.get("index_span", []))
    return entry


def read_manifest(path: Path) -> dict[str, Any]:
    """A cache manifest ("shards" as ShardEntry tuples), refused with its path when not this format version."""
    manifest = json.loads(path.read_text(), object_hook=_compact)
    if manifest.get("format") != FORMAT_NAME:
        raise CacheMismatchError(f"{path} is not an {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CacheMismatchError(
            f"{path} is cache format version {manifest.get('version')}, this ldmscale reads version {FORMAT_VERSION} "
            "(per-bucket counts in the manifest, each shard's index inside the shard): re-run "
            "tools/cache_latents.py into a new folder")
    return manifest


def build_table(train_shards: Sequence[str]) -> ShardTable:
    """The shard table of `data.train_shards` (cache folders, or URL patterns of cached shards)."""
    if not train_shards:
        raise ValueError("data.train_shards is empty: give the cache folder(s) written by tools/cache_latents.py")
    paths: list[str] = []
    counts: list[list[int]] = []
    spans: list[list[int]] = []
    sources: list[int] = []
    manifests: list[dict[str, Any]] = []
    buckets: Optional[list[tuple[int, int]]] = None
    for source, entry in enumerate(train_shards):
        manifest_path = find_manifest(entry)
        manifest = read_manifest(manifest_path)
        shards = manifest.pop("shards")
        manifests.append(manifest)
        src_buckets = [tuple(b) for b in manifest["buckets"]]
        if buckets is None:
            buckets = src_buckets  # type: ignore[assignment]
        elif src_buckets != buckets:
            raise CacheMismatchError(f"{manifest_path} has buckets {src_buckets}, another source {buckets}")
        complete = {s.name: s for s in shards if s.complete}
        del shards
        folder = manifest_path.parent
        if os.path.isdir(entry):
            names = sorted(complete)
        else:
            names = [Path(u).name for u in expand_urls(entry)]
            missing = [n for n in names if n not in complete]
            if missing:
                raise FileNotFoundError(f"shards {missing[:5]} of {entry!r} are not complete in {manifest_path}")
        for name in names:
            shard = complete[name]
            if shard.written == 0:
                continue
            if sum(shard.bucket_counts) != shard.written or len(shard.index_span) != 2:
                raise CacheMismatchError(f"{manifest_path}: shard {name} has bucket counts {shard.bucket_counts} "
                                         f"for {shard.written} samples or no index span")
            paths.append(str(folder / name))
            counts.append(shard.bucket_counts)
            spans.append(shard.index_span)
            sources.append(source)
    if not paths:
        raise ValueError(f"no cached samples in data.train_shards={list(train_shards)}")
    return ShardTable(paths, np.asarray(counts, np.int64), np.asarray(spans, np.int64), np.asarray(sources, np.int32),
                      list(buckets or []), manifests)


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
def epoch_shards(totals: np.ndarray, source: np.ndarray, weights: Sequence[float], *, seed: int,
                 epoch: int) -> np.ndarray:
    """The epoch's shard sequence (shard indices; a shard repeats when its source is upsampled).

    Each source's shards are permuted; with weights, a source is repeated (new permutation each pass)
    or cut to its share of all samples, to the nearest whole shard. Sources are interleaved by each
    shard's midpoint as a fraction of its source's epoch, so every stretch of the epoch mixes them in
    proportion.
    """
    num_sources = int(source.max()) + 1 if source.size else 0
    total = int(totals.sum())
    w = np.asarray(weights, dtype=np.float64) if weights else None
    picks, keys, owners = [], [], []
    for s in range(num_sources):
        own = np.flatnonzero((source == s) & (totals > 0))
        if own.size == 0:
            continue
        target = total * w[s] / w.sum() if w is not None else float(totals[own].sum())
        chosen, have, rep = [], 0, 0
        while have < target:
            order = np.random.default_rng([seed, epoch, 1, s, rep]).permutation(own)
            cum = have + np.cumsum(totals[order])
            # Stop at the shard whose end is nearest the target (whole shards only).
            stop = int(np.searchsorted(cum, target))
            if stop < order.size and cum[stop] - target > target - (cum[stop - 1] if stop else have):
                stop -= 1
            take = order[: stop + 1] if stop < order.size else order
            chosen.append(take)
            have = int(cum[len(take) - 1]) if len(take) else have
            rep += 1
            if len(take) < order.size:
                break
        seq = np.concatenate(chosen) if chosen else own[:0]
        n = totals[seq]
        picks.append(seq)
        keys.append((np.cumsum(n) - n / 2) / max(have, 1))
        owners.append(np.full(seq.size, s))
    if not picks:
        return np.zeros(0, np.int64)
    seq, key, owner = np.concatenate(picks), np.concatenate(keys), np.concatenate(owners)
    return seq[np.lexsort((owner, key))].astype(np.int64)


@dataclass
class EpochPlan:
    """One epoch's shard sequence cut into windows, and how many batches each window gives (O(shards))."""

    seed: int
    epoch: int
    micro_batch_size: int
    world_size: int
    window: int
    shards: np.ndarray  # int64 [C] shard index of each position in the sequence
    window_bucket_batches: np.ndarray  # int64 [num_windows, num_buckets] full batches per bucket
    window_start: np.ndarray  # int64 [num_windows + 1] first global batch of each window
    num_batches: int  # global batches used (a multiple of world_size)

    def batches_per_rank(self) -> int:
        return self.num_batches // self.world_size


def epoch_plan(counts: np.ndarray, source: np.ndarray, weights: Sequence[float], *, seed: int, epoch: int,
               micro_batch_size: int, world_size: int, window: int) -> EpochPlan:
    """The epoch's plan from per-shard per-bucket counts [S, num_buckets] (see the module docstring)."""
    shards = epoch_shards(counts.sum(axis=1), source, weights, seed=seed, epoch=epoch)
    starts = np.arange(0, shards.size, window)
    per_window = np.add.reduceat(counts[shards], starts, axis=0) if shards.size else counts[:0]
    bucket_batches = per_window // micro_batch_size
    window_start = np.concatenate([[0], np.cumsum(bucket_batches.sum(axis=1))]).astype(np.int64)
    usable = int(window_start[-1]) // world_size * world_size
    return EpochPlan(seed, epoch, micro_batch_size, world_size, window, shards, bucket_batches, window_start, usable)


@dataclass
class WindowBatches:
    """The batches of one window: for each, its bucket and its samples as (shard, bucket-major ordinal)."""

    bucket: np.ndarray  # int64 [B]
    shard: np.ndarray  # int64 [B, micro_batch_size]
    ordinal: np.ndarray  # int64 [B, micro_batch_size]


def window_batches(plan: EpochPlan, table: ShardTable, w: int) -> WindowBatches:
    """Window w's batches in order: each bucket's samples permuted and cut, then the batches permuted."""
    mbs = plan.micro_batch_size
    members = plan.shards[w * plan.window: (w + 1) * plan.window]
    buckets, shards, ordinals = [], [], []
    for b in np.flatnonzero(plan.window_bucket_batches[w]):
        n = table.counts[members, b]
        total = int(n.sum())
        shard = np.repeat(members, n)
        # k-th sample of bucket b in its shard → bucket-major ordinal within the shard
        k = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
        ordinal = table.bucket_start[shard, b] + k
        order = np.random.default_rng([plan.seed, plan.epoch, 2, w, int(b)]).permutation(total)
        full = int(plan.window_bucket_batches[w, b]) * mbs
        shards.append(shard[order[:full]].reshape(-1, mbs))
        ordinals.append(ordinal[order[:full]].reshape(-1, mbs))
        buckets.append(np.full(full // mbs, b))
    if not buckets:
        return WindowBatches(np.zeros(0, np.int64), np.zeros((0, mbs), np.int64), np.zeros((0, mbs), np.int64))
    order = np.random.default_rng([plan.seed, plan.epoch, 3, w]).permutation(sum(len(x) for x in buckets))
    return WindowBatches(np.concatenate(buckets)[order], np.concatenate(shards)[order], np.concatenate(ordinals)[order])


def plan_batches(plan: EpochPlan, table: ShardTable) -> np.ndarray:
    """Every used batch of the epoch as global sample ids [num_batches, B] (for tests and small data)."""
    if plan.num_batches == 0:
        return np.zeros((0, plan.micro_batch_size), np.int64)
    rows = [table.first_id[wb.shard] + wb.ordinal
            for wb in (window_batches(plan, table, w) for w in range(len(plan.window_start) - 1))]
    return np.concatenate(rows)[: plan.num_batches]


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
    """Reads samples by (shard, bucket-major ordinal): a shard's index member is read when the shard is
    first needed, and kept with the shard's open file in a small LRU (one reader per worker)."""

    def __init__(self, table: ShardTable, max_open: int = 64):
        self.table, self.max_open = table, max_open
        self.open: OrderedDict[int, tuple[Any, np.ndarray]] = OrderedDict()

    def _shard(self, shard: int) -> tuple[Any, np.ndarray]:
        entry = self.open.get(shard)
        if entry is not None:
            self.open.move_to_end(shard)
            return entry
        path = self.table.paths[shard]
        f = open(path, "rb")
        index = read_index(f, self.table.index_span[shard], path)
        found = np.bincount(index[:, 0], minlength=self.table.counts.shape[1])
        if not np.array_equal(found, self.table.counts[shard]):
            f.close()
            raise CacheMismatchError(f"{path}: its index has {found.tolist()} samples per bucket, the manifest says "
                                     f"{self.table.counts[shard].tolist()} (re-run the cache job)")
        # bucket-major order: row i is the sample with bucket-major ordinal i
        entry = self.open[shard] = (f, index[np.argsort(index[:, 0], kind="stable")])
        if len(self.open) > self.max_open:
            self.open.popitem(last=False)[1][0].close()
        return entry

    def read(self, shard: int, ordinal: int) -> CachedRecord:
        f, rows = self._shard(shard)
        return read_record(f, rows[ordinal], self.table.paths[shard])

    def close(self) -> None:
        for f, _ in self.open.values():
            f.close()
        self.open.clear()


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
    window: int = 64


class _EpochBatches(torch.utils.data.IterableDataset):
    """The rank's batches of one epoch from `start` on; worker k of n builds batches start+k, start+k+n, ..."""

    def __init__(self, table: ShardTable, plan: EpochPlan, settings: _Settings, start: int):
        super().__init__()
        self.table, self.plan, self.s, self.start = table, plan, settings, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        s, t, plan = self.s, self.table, self.plan
        reader = _ShardReader(t, max_open=max(64, 2 * plan.window))
        current: tuple[int, Optional[WindowBatches]] = (-1, None)
        try:
            for local in range(self.start + worker, plan.batches_per_rank(), num_workers):
                position = s.rank + local * s.world_size
                w = int(np.searchsorted(plan.window_start, position, side="right")) - 1
                if current[0] != w:  # only the windows this worker's batches fall in are computed
                    current = (w, window_batches(plan, t, w))
                batches = current[1]
                row = position - int(plan.window_start[w])
                shards, ordinals = batches.shard[row], batches.ordinal[row]  # type: ignore[union-attr]
                records = [reader.read(int(j), int(k)) for j, k in zip(shards, ordinals)]
                generator = torch.Generator().manual_seed(batch_seed(s.seed, plan.epoch, position))
                batch = collate_records(records, kind=s.kind, conditioning=s.conditioning,
                                        scale_factor=s.scale_factor, shift_factor=s.shift_factor, generator=generator)
                batch["sample_ids"] = torch.from_numpy(t.first_id[shards] + ordinals)
                yield batch
        finally:
            reader.close()


class Loader:
    """Iterable of training batches with set_epoch/state_dict/load_state_dict (see the module docstring).

    Iterating yields the rest of the current epoch; when an epoch is exhausted the loader moves on
    to the next one, so `for batch in loader` twice runs two epochs.
    """

    def __init__(self, table: ShardTable, settings: _Settings, num_workers: int = 0, prefetch_factor: int = 2):
        self.table, self.settings = table, settings
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.epoch, self.position = 0, 0
        self._plan: Optional[EpochPlan] = None

    def plan(self, epoch: Optional[int] = None) -> EpochPlan:
        """The epoch's plan (the current one is kept: O(shards))."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan is not None and self._plan.epoch == epoch:
            return self._plan
        s, t = self.settings, self.table
        plan = epoch_plan(t.counts, t.source, s.weights, seed=s.seed, epoch=epoch, micro_batch_size=s.micro_batch_size,
                          world_size=s.world_size, window=s.window)
        if epoch == self.epoch:
            self._plan = plan
        return plan

    def batches_in_epoch(self, epoch: Optional[int] = None) -> int:
        """Batches this rank gets in `epoch` (the same on every rank)."""
        return self.plan(epoch).batches_per_rank()

    def __len__(self) -> int:
        return self.batches_in_epoch()

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        s = self.settings
        return {"epoch": self.epoch, "position": self.position, "seed": s.seed, "world_size": s.world_size,
                "micro_batch_size": s.micro_batch_size, "num_samples": len(self.table), "shuffle_window": s.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.settings
        for key, now in (("seed", s.seed), ("world_size", s.world_size), ("micro_batch_size", s.micro_batch_size),
                         ("num_samples", len(self.table)), ("shuffle_window", s.window)):
            if state.get(key, now if key == "shuffle_window" else None) != now:
                raise ValueError(
                    f"loader state has {key}={state.get(key)} but this run has {key}={now}: the batch "
                    "sequence cannot be resumed exactly (call set_epoch to start the next epoch instead)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def read_samples(self, sample_ids: Sequence[int]) -> list[CachedRecord]:
        """The cached records of global sample ids (as in a batch's "sample_ids")."""
        reader = _ShardReader(self.table)
        try:
            return [reader.read(*self.table.locate(int(i))) for i in sample_ids]
        finally:
            reader.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = _EpochBatches(self.table, self.plan(), self.settings, self.position)
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
    from ldmscale.latent_scale import decide

    scale = decide(ae_cfg, data_cfg)  # already in ae_cfg when it came from config.to_object
    if data_cfg.shuffle_window <= 0:
        raise ValueError(f"data.shuffle_window={data_cfg.shuffle_window} must be a positive number of shards")
    settings = _Settings(seed, rank, world_size, data_cfg.micro_batch_size, tuple(data_cfg.shard_weights),
                         ae_cfg.kind, kind_for(cond_cfg), scale.scale_factor, scale.shift_factor,
                         data_cfg.shuffle_window)
    loader = Loader(table, settings, data_cfg.num_workers, data_cfg.prefetch_factor)
    if len(loader) == 0:
        raise ValueError(
            f"{len(table)} cached samples give no full batch of data.micro_batch_size={data_cfg.micro_batch_size} "
            f"per rank at world_size={world_size}")
    return loader
