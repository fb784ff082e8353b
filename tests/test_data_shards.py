"""URL expansion, metadata predicates, and every kind of bad input counted under its reason."""

from __future__ import annotations

import json

import pytest
from _data_helpers import config, encoders, good, png, write_tar

from ldmscale.data.cache import CacheJobError, run_cache_job
from ldmscale.data.shards import (
    SkipCounter,
    expand_urls,
    iter_tar_samples,
    parse_predicate,
    parse_sources,
    shard_name,
    split_by_node,
    split_by_worker,
)


def test_expand_urls(tmp_path):
    assert expand_urls("/d/a-{000..002}.tar") == ["/d/a-000.tar", "/d/a-001.tar", "/d/a-002.tar"]
    assert expand_urls(["/d/x.tar::/d/y-{0..1}.tar"]) == ["/d/x.tar", "/d/y-0.tar", "/d/y-1.tar"]
    pipe = "pipe:aws s3 cp s3://bucket/laion-{00..01}.tar -"
    assert expand_urls(pipe) == ["pipe:aws s3 cp s3://bucket/laion-00.tar -", "pipe:aws s3 cp s3://bucket/laion-01.tar -"]
    assert shard_name("pipe:aws s3 cp s3://bucket/laion-00.tar -") == "laion-00.tar"
    for name in ("b.tar", "a.tar"):
        write_tar(tmp_path / name, [good("k")])
    assert expand_urls(str(tmp_path)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_urls(str(tmp_path / "nothing*.tar"))
    sources = parse_sources(["/d/a-{0..3}.tar", "/e/b.tar"], [3.0, 1.0])
    assert [len(s.urls) for s in sources] == [4, 1] and sources[0].weight == 3.0
    with pytest.raises(ValueError, match="shard_weights"):
        parse_sources(["/d/a.tar"], [1.0, 2.0])
    urls = [f"u{i}" for i in range(7)]
    assert split_by_node(urls, 1, 3) == ["u1", "u4"]
    assert split_by_worker(urls, 0, 2) == ["u0", "u2", "u4", "u6"]


def test_predicates():
    assert parse_predicate("aesthetic >= 5")({"aesthetic": 5.2})
    assert not parse_predicate("aesthetic >= 5")({"aesthetic": "4.9"})
    assert not parse_predicate("pwatermark < 0.5")({"pwatermark": None})  # null fails
    assert not parse_predicate("pwatermark < 0.5")({})  # missing fails
    assert parse_predicate("language == 'en'")({"language": "en"})
    assert parse_predicate("info.nsfw != 'NSFW'")({"info": {"nsfw": "UNLIKELY"}})
    with pytest.raises(ValueError, match="KEY OP VALUE"):
        parse_predicate("aesthetic => 5")


def test_pipe_and_unreadable_urls(tmp_path):
    path = write_tar(tmp_path / "p.tar", [good("a"), good("b")])
    skips = SkipCounter()
    assert [s["__key__"] for s in iter_tar_samples(f"pipe:cat {path}", skips)] == ["a", "b"]
    assert list(iter_tar_samples("pipe:exit 3", skips)) == []
    assert list(iter_tar_samples(str(tmp_path / "missing.tar"), skips)) == []
    assert skips.as_dict() == {"unreadable_shard": 2}


def test_every_bad_input_is_counted_under_its_reason(tmp_path):
    raw = tmp_path / "raw"
    ok = json.dumps({"aesthetic": 6.0}).encode()
    samples = [
        good("ok0", aesthetic=6.0), good("ok1", aesthetic=6.0),
        {"__key__": "corrupt", "png": png(32, 32)[:60] + b"\x00" * 40, "txt": b"a corrupt png", "json": ok},
        {"__key__": "html", "jpg": b"<html><body>404 not found</body></html>", "txt": b"error page", "json": ok},
        {"__key__": "empty", "png": b"", "txt": b"zero-byte image", "json": ok},
        {"__key__": "nocap", "png": png(32, 32), "json": ok},
        {"__key__": "nocap2", "png": png(32, 32), "txt": b"   ", "json": ok},
        good("small", 8, 8, aesthetic=6.0), good("small2", 12, 40, aesthetic=6.0),
        good("wide", 160, 20, aesthetic=6.0),
        good("ugly", aesthetic=3.0), good("pretty", aesthetic=6.0),
        {"__key__": "noimage", "txt": b"caption without an image", "json": ok},
        {"__key__": "badjson", "png": png(32, 32), "txt": b"x", "json": b"{not json"},
        {"__key__": "jsoncap", "png": png(32, 32), "json": json.dumps({"caption": "from json", "aesthetic": 9}).encode()},
    ]
    write_tar(raw / "mixed-000000.tar", samples)
    full = write_tar(tmp_path / "full.tar", [good(f"t{i}", aesthetic=6.0) for i in range(4)]).read_bytes()
    # t0 = png, txt, json members (3 x 1024 bytes); cut 100 bytes into t1's image data.
    (raw / "mixed-000001.tar").write_bytes(full[: 3 * 1024 + 512 + 100])
    cfg = config(min_size=16, max_aspect_ratio=4.0, filters=["aesthetic >= 5"])
    cfg.cache.input = f"{raw}/mixed-{{000000..000001}}.tar :: {tmp_path}/missing-000002.tar"
    cfg.cache.output = str(tmp_path / "cache")
    cfg.cache.max_failure_rate = 1.0
    manifest = run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache, encoders=encoders())
    skipped = manifest["totals"]["skipped"]
    assert skipped == {
        "bad_json": 1, "corrupt_image": 1, "empty_member": 1, "extreme_aspect": 1, "filtered": 1,
        "missing_caption": 2, "missing_image": 1, "not_an_image": 1, "too_small": 2, "truncated_tar": 1,
        "unreadable_shard": 1,
    }
    by_shard = {s["name"]: s for s in manifest["shards"]}
    assert by_shard["mixed-000000.tar"]["written"] == 4  # ok0, ok1, pretty, jsoncap
    assert by_shard["mixed-000001.tar"]["complete"] and by_shard["mixed-000001.tar"]["written"] == 1  # t0
    assert not by_shard["missing-000002.tar"]["complete"]
    assert manifest["totals"]["read"] == manifest["totals"]["written"] + sum(skipped.values()) == 5 + 13
    assert any("html" in e for e in by_shard["mixed-000000.tar"]["skip_examples"]["not_an_image"])
    # Over the threshold the job fails loudly; complete shards are not redone, the unreadable one is retried.
    cfg.cache.max_failure_rate = 0.5
    with pytest.raises(CacheJobError, match="max_failure_rate") as info:
        run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache, encoders=encoders())
    assert "unreadable_shard=1" in str(info.value)
