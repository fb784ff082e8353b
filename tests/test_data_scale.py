"""The cached loader at scale: start-up reads manifests only, shard indexes are read lazily, the window
shuffle keeps each batch within one window, and cached shards stay plain webdataset tars."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from _data_helpers import cached_synthetic, config

from ldmscale.data.cache_format import decode_sample
from ldmscale.data.loader import (
    CacheMismatchError,
    ShardTable,
    build_loader,
    epoch_plan,
    plan_batches,
)

_OPENED: list[str] = []
_WATCH: list[str] = []  # path prefixes whose opens are recorded


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _WATCH and isinstance(args[0], str) and args[0].startswith(_WATCH[0]):
        _OPENED.append(args[0])


sys.addaudithook(_record_opens)  # audit hooks cannot be removed; it records only while _WATCH is set


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """48 synthetic samples in 12 shards of 4, cached once for the module."""
    return cached_synthetic(tmp_path_factory.mktemp("scale"), 48, 4)


def _loader(cache, window, mbs=2, rank=0, world_size=1, seed=0):
    cfg = config(train_shards=[str(cache)], micro_batch_size=mbs, shuffle_window=window)
    return build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=seed, rank=rank, world_size=world_size)


def _shard_of(loader, ids):
    return {loader.table.locate(int(i))[0] for i in ids}


def test_start_up_reads_the_manifest_only_and_the_first_batch_only_its_window(cache):
    _OPENED.clear()
    _WATCH[:] = [str(cache)]
    try:
        loader = _loader(cache, window=3)
        assert len(loader) == 24 and _OPENED == [str(cache / "manifest.json")]
        _OPENED.clear()
        batch = next(iter(loader))
        opened_first = list(_OPENED)
        epoch = [batch] + list(iter(loader))  # the rest of the epoch (a fresh iterator restarts at position 1)
    finally:
        _WATCH.clear()
    window_shards = {loader.table.paths[j] for j in loader.plan(0).shards[:3]}
    # Before the first batch: only shards of the first window, each opened once (index and samples).
    assert 1 <= len(opened_first) <= 2 and len(set(opened_first)) == len(opened_first)
    assert set(opened_first) <= window_shards
    assert len(epoch) == 24


def test_window_shuffle_keeps_each_batch_in_its_window(cache):
    loader = _loader(cache, window=3)
    plan = loader.plan(0)
    batches = list(iter(loader))
    windows = [set(plan.shards[w * 3:(w + 1) * 3].tolist()) for w in range(4)]
    assert sorted(j for w in windows for j in w) == list(range(12))  # the windows partition the shards
    per_window = np.diff(plan.window_start).tolist()
    assert per_window == [6, 6, 6, 6]
    position = 0
    for w, n in enumerate(per_window):  # windows are consumed in order, each batch within its window
        for batch in batches[position: position + n]:
            assert _shard_of(loader, batch["sample_ids"]) <= windows[w]
        position += n
    ids = [i for b in batches for i in b["sample_ids"].tolist()]
    assert sorted(ids) == list(range(48))  # every sample once
    # Another epoch permutes the shards (other windows) and the samples within them.
    assert not np.array_equal(loader.plan(1).shards, plan.shards)
    # A window of every shard is a global shuffle: some batch mixes shards that a 3-shard window separates.
    wide = _loader(cache, window=12)
    mixed = [b for b in wide if not any(_shard_of(wide, b["sample_ids"]) <= w for w in windows)]
    assert mixed


def test_window_plan_properties_at_many_shards():
    """Ranks disjoint with equal batch counts, one bucket per batch, drop bounded per window."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 40, size=(500, 4))
    table = ShardTable([f"s{i}" for i in range(500)], counts, np.zeros((500, 2), np.int64),
                       np.zeros(500, np.int32), [(1, 1)] * 4, [])
    bucket_of = np.concatenate([np.repeat(np.arange(4), c) for c in counts])  # ids are bucket-major per shard
    for window, world in ((7, 8), (64, 3), (500, 1)):
        plan = epoch_plan(counts, table.source, (), seed=3, epoch=1, micro_batch_size=16, world_size=world,
                          window=window)
        rows = plan_batches(plan, table)
        assert rows.shape == (plan.num_batches, 16) and plan.num_batches % world == 0
        flat = rows.ravel()
        assert len(np.unique(flat)) == flat.size
        assert all(len(set(bucket_of[r].tolist())) == 1 for r in rows)
        num_windows = -(-500 // window)
        assert counts.sum() - flat.size < num_windows * 4 * 16 + world * 16


def test_cached_shard_is_a_plain_webdataset_tar(cache):
    loader = _loader(cache, window=12)
    shard = loader.table.paths[0]
    samples = list(wds.WebDataset(shard, shardshuffle=False))
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [["bin", "json"]] * 4
    records = [decode_sample(s) for s in samples]
    ids = [loader.table.first_id[0] + loader.table.bucket_start[0, 0] + k for k in range(4)]
    for plain, indexed in zip(records, loader.read_samples(ids), strict=True):
        assert plain.key == indexed.key and plain.meta == indexed.meta
        assert torch.equal(plain.moments, indexed.moments) and torch.equal(plain.text_tokens, indexed.text_tokens)


def test_old_cache_format_is_refused_naming_the_manifest(cache, tmp_path):
    old = json.loads((cache / "manifest.json").read_text())
    old["version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(CacheMismatchError, match=f"{tmp_path}/manifest.json is cache format version 1"):
        _loader(tmp_path, window=4)
