"""The cached loader: one bucket per batch, rank/worker splits, exact resume, fingerprint refusal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _data_helpers import cached_synthetic, config, encoders, good, write_tar

from ldmscale.data.cache import run_cache_job
from ldmscale.data.loader import CacheMismatchError, build_loader, epoch_plan, plan_batches
from ldmscale.data.synthetic import write_shards


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """44 synthetic samples in uneven shards (10, 10, 10, 10, 4), cached once for the module."""
    return cached_synthetic(tmp_path_factory.mktemp("loader"), 44, 10)


def _cfg(cache, **data):
    cfg = config(train_shards=[str(cache)], micro_batch_size=4, **data)
    return cfg


def _run(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def test_batch_format_and_latent_sampling(cache):
    cfg = _cfg(cache)
    cfg.autoencoder.scale_factor, cfg.autoencoder.shift_factor = 0.5, 0.1
    loader = build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=3, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["latents"].shape == (4, 4, 8, 8) and batch["latents"].dtype == torch.float32
    assert batch["context"].shape == (4, 77, 64) and batch["context_mask"].dtype == torch.bool
    assert batch["pooled"].shape == (4, 64) and len(batch["captions"]) == 4
    # Text is re-padded: the mask marks SOT..EOT, the padding is exactly zero.
    lengths = batch["context_mask"].sum(1)
    ids = encoders().text_encoder.tokenize(batch["captions"])
    assert torch.equal(lengths, ids.argmax(-1) + 1)
    assert torch.all(batch["context"][~batch["context_mask"]] == 0)
    # The latent is drawn from the cached moments exactly as the autoencoder does, then scaled.
    from ldmscale.data.loader import batch_seed

    records = loader.read_samples(batch["sample_ids"].tolist())
    moments = torch.stack([r.moments for r in records]).float()
    gen = torch.Generator().manual_seed(batch_seed(3, 0, 0))
    expected = (encoders().autoencoder.latent_from_moments(moments, generator=gen) - 0.1) * 0.5
    torch.testing.assert_close(batch["latents"], expected)


def test_two_ranks_two_workers_see_every_sample_once(cache):
    cfg = _cfg(cache, num_workers=2)
    seen, lengths = [], []
    for rank in range(2):
        loader = build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=0, rank=rank, world_size=2)
        batches = _run(loader)
        lengths.append(len(batches))
        seen += [i for b in batches for i in b["sample_ids"].tolist()]
    assert lengths == [5, 5]  # 44 // 4 = 11 batches → 10 used, equal per rank
    assert len(seen) == len(set(seen)) == 40 and set(seen) <= set(range(44))
    # The order does not depend on the number of workers.
    cfg0 = _cfg(cache, num_workers=0)
    ref = _run(build_loader(cfg0.data, cfg0.conditioner, cfg0.autoencoder, seed=0, rank=1, world_size=2))
    cfg2 = _cfg(cache, num_workers=2)
    got = _run(build_loader(cfg2.data, cfg2.conditioner, cfg2.autoencoder, seed=0, rank=1, world_size=2))
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a["sample_ids"], b["sample_ids"]) and torch.equal(a["latents"], b["latents"])


def _shard_table(bucket, source, shard_size, num_buckets=3):
    """Per-sample buckets/sources → the loader's ShardTable (shards of `shard_size` within each source)."""
    from ldmscale.data.loader import ShardTable

    counts, sources, sample_bucket = [], [], []
    for s in np.unique(source):
        own = bucket[source == s]
        for lo in range(0, own.size, shard_size):
            part = own[lo: lo + shard_size]
            counts.append(np.bincount(part, minlength=num_buckets))
            sources.append(s)
            sample_bucket.append(np.sort(part, kind="stable"))  # ids are bucket-major within a shard
    table = ShardTable([f"s{i}" for i in range(len(counts))], np.asarray(counts, np.int64),
                       np.zeros((len(counts), 2), np.int64), np.asarray(sources, np.int32),
                       [(1, 1)] * num_buckets, [])
    return table, np.concatenate(sample_bucket), np.repeat(table.source, table.counts.sum(1))


def _plan(table, weights=(), **kw):
    plan = epoch_plan(table.counts, table.source, weights, **{"window": 1000, **kw})
    return plan_batches(plan, table)


def test_epoch_plan_uneven_counts_and_exact_once():
    rng = np.random.default_rng(0)
    table, bucket, _ = _shard_table(rng.integers(0, 3, size=1001), np.zeros(1001, np.int32), 10)
    for world in (1, 3, 8):
        plan = _plan(table, seed=1, epoch=2, micro_batch_size=16, world_size=world)
        assert plan.shape[0] % world == 0
        flat = plan.ravel()
        assert len(set(flat.tolist())) == flat.size  # nobody sees a sample twice
        assert all(len(set(bucket[row].tolist())) == 1 for row in plan)  # one bucket per batch
        assert 1001 - flat.size < 3 * 16 + world * 16  # only bucket remainders and the rank cut are dropped
    a = _plan(table, seed=1, epoch=2, micro_batch_size=16, world_size=1)
    b = _plan(table, seed=1, epoch=3, micro_batch_size=16, world_size=1)
    assert not np.array_equal(a, b)
    # Weighted mixing: source 1 (101 samples) at weight 3 vs source 0 (900) at weight 1.
    table, _, source = _shard_table(rng.integers(0, 3, size=1001), np.r_[np.zeros(900, np.int32), np.ones(101, np.int32)], 5)
    plan = _plan(table, (1.0, 3.0), seed=0, epoch=0, micro_batch_size=1, world_size=1)
    share = (source[plan.ravel()] == 1).mean()
    assert share == pytest.approx(0.75, abs=0.01)


def test_resume_mid_epoch_reproduces_the_sequence(cache):
    cfg = _cfg(cache, num_workers=2)
    args = (cfg.data, cfg.conditioner, cfg.autoencoder)
    reference = build_loader(*args, seed=7, rank=1, world_size=2)
    full = _run(reference) + _run(reference)  # two epochs uninterrupted
    assert len(full) == 10
    first = build_loader(*args, seed=7, rank=1, world_size=2)
    head = _run(first, 3)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == 3
    resumed = build_loader(*args, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    tail = _run(resumed) + _run(resumed)
    got = head + tail
    assert len(got) == len(full)
    for a, b in zip(full, got, strict=True):
        assert torch.equal(a["sample_ids"], b["sample_ids"])
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["context"], b["context"])
    with pytest.raises(ValueError, match="world_size"):
        build_loader(*args, seed=7, rank=0, world_size=1).load_state_dict(state)


def test_fingerprint_mismatch_is_refused(cache):
    cfg = _cfg(cache)
    build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=0, rank=0, world_size=1)
    other_vae = dataclasses.replace(cfg.autoencoder, ch=64)
    with pytest.raises(CacheMismatchError, match="autoencoder.ch: cache 32 vs config 64"):
        build_loader(cfg.data, cfg.conditioner, other_vae, seed=0, rank=0, world_size=1)
    wider = dataclasses.replace(cfg.autoencoder, embed_dim=8, z_channels=8)
    with pytest.raises(CacheMismatchError, match="latent channels: cache 8 vs config 16"):
        build_loader(cfg.data, cfg.conditioner, wider, seed=0, rank=0, world_size=1)
    penultimate = dataclasses.replace(cfg.conditioner, text_layer="penultimate")
    with pytest.raises(CacheMismatchError, match="conditioner.text_layer"):
        build_loader(cfg.data, penultimate, cfg.autoencoder, seed=0, rank=0, world_size=1)
    bigger = dataclasses.replace(cfg.data, resolution=64)
    with pytest.raises(CacheMismatchError, match="cached buckets"):
        build_loader(bigger, cfg.conditioner, cfg.autoencoder, seed=0, rank=0, world_size=1)


def test_buckets_end_to_end(tmp_path):
    """Images of three aspects land in their nearest bucket; every batch holds one bucket."""
    sizes = {"tall": (20, 60), "square": (40, 40), "wide": (64, 24)}  # (w, h) → nearest of the buckets
    samples = [good(f"{name}{i}", w, h) for i in range(4) for name, (w, h) in sizes.items()]
    write_tar(tmp_path / "raw" / "mix-000000.tar", samples)
    buckets = [[16, 48], [32, 32], [48, 16]]  # h, w
    cfg = config(buckets=buckets, train_shards=[str(tmp_path / "cache")], micro_batch_size=2)
    cfg.cache.input, cfg.cache.output = str(tmp_path / "raw"), str(tmp_path / "cache")
    manifest = run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache, encoders=encoders())
    assert manifest["buckets"] == buckets and manifest["totals"]["bucket_counts"] == [4, 4, 4]
    loader = build_loader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=0, rank=0, world_size=1)
    want = {"wide": (16, 48), "square": (32, 32), "tall": (48, 16)}
    batches = _run(loader)
    assert len(batches) == 6
    for batch in batches:
        h, w = batch["bucket"]
        assert batch["latents"].shape[-2:] == (h // 4, w // 4)
        for key in batch["keys"]:
            assert want[key.rstrip("0123456789")] == (h, w)


def test_online_path_matches_the_cached_batch_format(cache, tmp_path):
    from ldmscale.data.online import OnlineLoader

    write_shards(tmp_path / "raw", 16, resolution=32, shard_size=8, progress=False)
    cfg = config(kind="online", train_shards=[str(tmp_path / "raw")], micro_batch_size=4, shuffle_buffer=4,
                 samples_per_epoch=16)
    loader = OnlineLoader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=0, rank=1, world_size=2,
                          encoders=encoders())
    batches = _run(loader)
    assert len(batches) == 2  # 16 // (4 × 2), whatever the shard sizes
    cached = next(iter(build_loader(*(lambda c: (c.data, c.conditioner, c.autoencoder))(_cfg(cache)),
                                    seed=0, rank=0, world_size=1)))
    for key in ("latents", "context", "context_mask", "pooled"):
        assert batches[0][key].shape == cached[key].shape and batches[0][key].dtype == cached[key].dtype
    # Resume replays to the saved position.
    again = OnlineLoader(cfg.data, cfg.conditioner, cfg.autoencoder, seed=0, rank=1, world_size=2,
                         encoders=encoders())
    again.load_state_dict({"epoch": 0, "position": 1, "seed": 0, "world_size": 2})
    assert torch.equal(next(iter(again))["latents"], batches[1]["latents"])
