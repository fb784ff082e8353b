"""Fault injection: the faults a cluster run meets at 3 a.m., each with its outcome asserted.

Fast tests drive the real Checkpointer/Trainer with a one-file stand-in for a DeepSpeed engine; slow tests
run the real engine under torchrun (2 ranks, gloo) and the real CLIs on a real run directory.
README "Failure behaviour" lists each fault with the test that shows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ldmscale import checkpoint as ckpt
from ldmscale.checkpoint import Checkpointer, CheckpointError, file_checksum, load_data
from ldmscale.config import CheckpointConfig, TrainerConfig
from ldmscale.trainer import NonFiniteLossError, Trainer
from tests.test_training_dist import ROOT, dist_env, torchrun_cmd

MARKER_NAME = "PAYLOAD_RAN"


class Payload:
    """Unpickling this runs a shell command: what a hostile file in a shared run directory would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(path: Path, *, fix_checksum: bool = True) -> Path:
    """Replace `path` with a pickle payload; with fix_checksum the attacker also rewrites meta.json."""
    marker = path.parent / MARKER_NAME
    torch.save({"module": Payload(marker)}, path)
    if fix_checksum:
        step_dir = next(p for p in path.parents if (p / ckpt.META).is_file())
        meta = json.loads((step_dir / ckpt.META).read_text())
        meta["files"][path.relative_to(step_dir).as_posix()] = file_checksum(path)
        (step_dir / ckpt.META).write_text(json.dumps(meta))
    return marker


# ---------------------------------------------------------------------------- fast: files as data
def test_load_data_refuses_a_pickle_payload_and_names_the_file(tmp_path):
    path = tmp_path / "client_rank0.pt"
    marker = plant_payload(path, fix_checksum=False)
    with pytest.raises(CheckpointError, match=rf"{path}: refused to load .*GLOBAL posix.system"):
        load_data(path)
    assert not marker.exists()
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match=str(path)):
        load_data(path)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.save({"rng": ckpt.rng_state()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(load_data(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------------------- fast: integrity and retention
class FileEngine:
    """A stand-in for a DeepSpeed engine under the Checkpointer: one tensor file, loaded as data."""

    zero_stage = 0

    def __init__(self, value: float = 0.0, fail_save: bool = False):
        self.weight = torch.full((1000,), float(value))
        self.fail_save = fail_save

    def save(self, save_dir: str, tag: str, client_state=None) -> None:
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        torch.save({"w": self.weight}, Path(save_dir, tag, "model.pt"))
        if self.fail_save:
            raise OSError("disk full (injected)")

    def load(self, load_dir: str, tag: str) -> dict:
        self.weight = load_data(Path(load_dir, tag, "model.pt"))["w"]
        return {}


def _saved(tmp_path: Path, steps=(1, 2, 3), keep_last: int = 5) -> Checkpointer:
    checkpointer = Checkpointer(CheckpointConfig(keep_last=keep_last), tmp_path / "ckpt")
    for step in steps:
        checkpointer.save(step, {"m": FileEngine(step)}, {"step": step}, {})
    return checkpointer


def _resume(checkpointer: Checkpointer) -> tuple[str | None, float]:
    tag = checkpointer.resume_tag()
    engine = FileEngine()
    state = checkpointer.load(tag, {"m": engine}) if tag else None
    return tag, (state["step"] if state else None)


def test_meta_records_size_and_crc_of_every_file(tmp_path):
    checkpointer = _saved(tmp_path, steps=(1,))
    meta = ckpt.read_meta(checkpointer.dir, "step_00000001")
    assert sorted(meta["files"]) == ["client_rank0.pt", "m/model.pt"]
    for rel, expected in meta["files"].items():
        assert file_checksum(checkpointer.dir / "step_00000001" / rel) == expected


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "meta"])
def test_a_damaged_checkpoint_is_skipped_naming_it_and_the_previous_one_resumes(tmp_path, damage):
    checkpointer = _saved(tmp_path)
    newest = checkpointer.dir / "step_00000003"
    target = newest / "m" / "model.pt"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "delete":
        target.unlink()
    else:
        (newest / ckpt.META).write_text("{not json")
        target = newest / ckpt.META
    with pytest.warns(UserWarning, match=rf"skipping checkpoint {newest}.*{target.name}"):
        assert _resume(checkpointer) == ("step_00000002", 2)


def test_no_checkpoint_verifies_stops_instead_of_starting_over(tmp_path):
    checkpointer = _saved(tmp_path, steps=(1, 2))
    for tag in ("step_00000001", "step_00000002"):
        (checkpointer.dir / tag / "client_rank0.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint verifies.*step_00000002.*step_00000001"):
        checkpointer.resume_tag()
    assert (checkpointer.dir / "step_00000001").is_dir()  # nothing was deleted


def test_missing_latest_resumes_from_the_newest_verified(tmp_path):
    checkpointer = _saved(tmp_path)
    (checkpointer.dir / ckpt.LATEST).unlink()
    with pytest.warns(UserWarning, match="latest is missing"):
        assert _resume(checkpointer) == ("step_00000003", 3)
    (checkpointer.dir / ckpt.LATEST).write_text("step_00000009")  # names a folder deleted by hand
    with pytest.warns(UserWarning, match="names 'step_00000009'"):
        assert _resume(checkpointer) == ("step_00000003", 3)


def test_incomplete_checkpoints_alone_start_afresh_with_a_warning(tmp_path):
    (tmp_path / "ckpt" / "step_00000004").mkdir(parents=True)  # killed during the first save
    with pytest.warns(UserWarning, match="ignoring incomplete checkpoints"):
        assert _resume(Checkpointer(CheckpointConfig(), tmp_path / "ckpt")) == (None, None)


def test_retention_deletes_only_after_the_new_checkpoint_is_on_disk(tmp_path):
    checkpointer = _saved(tmp_path, steps=(1,), keep_last=1)
    with pytest.raises(OSError, match="disk full"):  # a save that dies half-way
        checkpointer.save(2, {"m": FileEngine(2, fail_save=True)}, {"step": 2}, {})
    assert ckpt.latest_tag(checkpointer.dir) == "step_00000001"
    assert _resume(checkpointer) == ("step_00000001", 1)
    checkpointer.save(3, {"m": FileEngine(3)}, {"step": 3}, {})  # keep_last=1: only the new one stays
    assert ckpt.complete_tags(checkpointer.dir) == ["step_00000003"]
    assert not ckpt.verify(checkpointer.dir / "step_00000003", ckpt.read_meta(checkpointer.dir, "step_00000003"))


def test_saving_again_at_the_latest_step_never_removes_it_first(tmp_path):
    checkpointer = _saved(tmp_path, steps=(5,), keep_last=1)
    before = (checkpointer.dir / "step_00000005" / "m" / "model.pt").stat().st_mtime_ns
    resumed = Checkpointer(CheckpointConfig(keep_last=1), checkpointer.dir)
    resumed.last_saved_step = 5  # what Trainer.resume sets
    resumed.save(5, {"m": FileEngine(5, fail_save=True)}, {"step": 5}, {})  # would raise if it wrote
    assert (checkpointer.dir / "step_00000005" / "m" / "model.pt").stat().st_mtime_ns == before


def test_resuming_from_an_older_checkpoint_drops_the_abandoned_newer_ones_at_the_next_save(tmp_path):
    checkpointer = _saved(tmp_path, steps=(2, 4, 6), keep_last=3)
    (checkpointer.dir / ckpt.LATEST).write_text("step_00000002")  # rolled back by hand after a divergence
    assert _resume(checkpointer) == ("step_00000002", 2)
    checkpointer.save(3, {"m": FileEngine(3)}, {"step": 3}, {})
    assert ckpt.complete_tags(checkpointer.dir) == ["step_00000002", "step_00000003"]


def test_a_crash_between_meta_and_latest_resumes_the_newer_checkpoint_and_keeps_it(tmp_path):
    """step 6's meta.json is on disk but `latest` still names step 4 (written before it): step 6 is complete
    and resumes; the next save keeps it. (Moved back by hand, `latest` is younger and wins: test above.)"""
    checkpointer = _saved(tmp_path, steps=(2, 4, 6), keep_last=3)
    latest = checkpointer.dir / ckpt.LATEST
    latest.write_text("step_00000004")
    meta_time = (checkpointer.dir / "step_00000006" / ckpt.META).stat().st_mtime_ns
    os.utime(latest, ns=(meta_time - 10**9, meta_time - 10**9))  # as the save before step 6 left it
    with pytest.warns(UserWarning, match="step_00000006 is complete and was saved after latest"):
        assert _resume(checkpointer) == ("step_00000006", 6)
    checkpointer.save(7, {"m": FileEngine(7)}, {"step": 7}, {})
    assert ckpt.complete_tags(checkpointer.dir) == ["step_00000004", "step_00000006", "step_00000007"]


# ---------------------------------------------------------------------------- fast: non-finite losses
class StreakTask:
    """Finite losses, then non-finite ones from `bad_from` on (the real Trainer counts and stops)."""

    def __init__(self, bad_from: int):
        self.engine, self.bad_from = FileEngine(), bad_from

    def engines(self):
        return {"m": self.engine}

    def train_step(self, micro_batches, step):
        skipped = step + 1 >= self.bad_from
        if not skipped:
            self.engine.weight = self.engine.weight + 1  # weights move only on good steps
        return {"loss": torch.tensor(float("nan") if skipped else 1.0), "skipped": torch.tensor(float(skipped))}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def sample(self, step, out_dir):
        return []


def test_nonfinite_streak_names_the_last_good_step_and_keeps_it(tmp_path):
    loader = [{"x": torch.zeros(2, 1)}] * 100
    checkpointer = Checkpointer(CheckpointConfig(every_steps=4, keep_last=1), tmp_path / "ckpt")
    trainer = Trainer(StreakTask(bad_from=10), loader, TrainerConfig(max_steps=40, max_nonfinite_steps=6, log_every_steps=1000),
                      checkpointer=checkpointer, run_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"steps 10\.\.1[56].*weights are those of step 8.*lower LR"):
        trainer.fit()
    # the checkpoints due at steps 12 (in the streak) were not written; step 8 is latest and kept
    assert ckpt.complete_tags(checkpointer.dir) == ["step_00000008"]
    assert ckpt.latest_tag(checkpointer.dir) == "step_00000008"
    engine = FileEngine()
    checkpointer.load("step_00000008", {"m": engine})
    assert torch.equal(engine.weight, torch.full((1000,), 8.0))  # the weights before the divergence


# ---------------------------------------------------------------------------- slow: fail fast across ranks
def run_timed(cmd: list[str], timeout: float = 240, **env: str) -> tuple[int, str, float | None, float]:
    """(exit code, merged output, time of the first failure line, time of exit), reading lines as they come."""
    proc = subprocess.Popen(cmd, env=dict(dist_env(), **env), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    failed_at: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not failed_at and (line.startswith("FAULT ") or " failed: " in line):
                failed_at.append(float(line.split()[1]) if line.startswith("FAULT ") else time.time())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    ended = time.time()
    reader.join(timeout=10)
    return proc.returncode, "".join(lines), (failed_at[0] if failed_at else None), ended


FAIL_FAST_LIMIT_S = 30


@pytest.mark.slow
@pytest.mark.parametrize("where, stall", [("start", ""), ("step:3", ""), ("step:3", "0:step:3")])
def test_one_rank_failing_ends_the_job_with_its_error(tmp_path, where, stall):
    """Also while the other rank is busy outside any collective (stall): the store-based peer watch ends it."""
    code, out, failed_at, ended = run_timed(torchrun_cmd("toy_train.py", tmp_path / "run", 2, 8),
                                            TOY_FAULT=f"1:{where}", TOY_STALL=stall)
    assert code != 0, out[-3000:]
    assert f"injected fault on rank 1 at {where}" in out and "[ldmscale] rank 1 of 2 failed" in out, out[-3000:]
    assert failed_at is not None and ended - failed_at < FAIL_FAST_LIMIT_S, (ended - failed_at, out[-3000:])
    if stall:
        assert "[ldmscale] rank 0: stopping, rank 1 failed" in out, out[-3000:]
    print(f"fail-fast {where} {stall}: {ended - failed_at:.2f} s from the fault to the job's exit")


@pytest.mark.slow
def test_one_rank_failing_during_resume_ends_the_job_naming_the_file(tmp_path):
    run_dir = tmp_path / "run"
    code, out, _, _ = run_timed(torchrun_cmd("toy_train.py", run_dir, 2, 2, 2))
    assert code == 0, out[-3000:]
    bad = run_dir / "checkpoints" / "step_00000002" / "client_rank1.pt"
    marker = plant_payload(bad)  # checksums rewritten: only rank 1's weights-only load can catch it
    code, out, failed_at, ended = run_timed(torchrun_cmd("toy_train.py", run_dir, 2, 4, 2))
    assert code != 0 and f"{bad}: refused to load" in out and "rank 1 of 2 failed" in out, out[-3000:]
    assert not marker.exists()
    assert failed_at is not None and ended - failed_at < FAIL_FAST_LIMIT_S, (ended - failed_at, out[-3000:])
    print(f"fail-fast resume: {ended - failed_at:.2f} s from the failure to the job's exit")
    bad.unlink()  # the case: a rank's client state is missing (it used to hang both ranks)
    code, out, failed_at, ended = run_timed(torchrun_cmd("toy_train.py", run_dir, 2, 4, 2))
    assert code != 0 and "no checkpoint verifies" in out and f"{bad} is missing" in out, out[-3000:]
    assert failed_at is not None and ended - failed_at < FAIL_FAST_LIMIT_S, (ended - failed_at, out[-3000:])


@pytest.mark.slow
def test_nonfinite_run_stops_and_resumes_from_the_last_good_step_with_a_lower_lr(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tests" / "workers" / "toy_train.py"), *map(str, (run_dir, 1, 12, 3))]
    code, out, _, _ = run_timed(cmd, TOY_NAN_FROM="8", TOY_MAX_NONFINITE="3")
    assert code != 0 and "steps 8..10" in out and "weights are those of step 6" in out, out[-3000:]
    assert ckpt.latest_tag(run_dir / "checkpoints") == "step_00000006"
    first = {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    code, out, _, _ = run_timed(cmd, TOY_LR="1e-3")  # the advice: re-run with a lower LR
    assert code == 0, out[-3000:]
    resumed = {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(resumed) == list(range(1, 13))
    for step in (7, 8, 9, 10):  # same schedule position, a tenth of the LR: the configured LR won
        assert resumed[step] == pytest.approx(first[step] / 10), (step, first, resumed)


# ---------------------------------------------------------------------------- slow: a hostile run directory
def _train(run_dir: Path, cache: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "ldmscale.train", "stage=diffusion", f"data.train_shards=[{cache}]",
            "data.micro_batch_size=8", "data.global_batch_size=8", f"trainer.max_steps={steps}",
            "checkpoint.every_steps=2", "deepspeed.zero_stage=1", f"run_dir={run_dir}",
            "logger.wandb_mode=disabled", "logger.progress_bar=false"]


@pytest.mark.slow
def test_a_payload_in_any_run_directory_file_never_runs_on_resume_sample_or_export(tmp_path):
    """Each file of a real ZeRO-1 checkpoint in turn holds a payload (meta.json's checksums rewritten to
    match, as a careful attacker would): resume, sample and export refuse, naming the file; nothing runs."""
    import shutil

    from tests._train_helpers import make_cached_shards

    cache = make_cached_shards(tmp_path, num_shards=1, per_shard=16)
    clean = tmp_path / "clean"
    code, out, _, _ = run_timed(_train(clean, cache, 2))
    assert code == 0, out[-3000:]
    step_dir = clean / "checkpoints" / "step_00000002"
    files = sorted(p.relative_to(clean) for p in step_dir.rglob("*.pt"))
    assert {p.name for p in files} == {"client_rank0.pt", "mp_rank_00_model_states.pt",
                                       "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    for rel in files:
        run_dir = tmp_path / rel.name
        shutil.copytree(clean, run_dir)
        bad = run_dir / rel
        marker = plant_payload(bad)
        commands = {
            "resume": _train(run_dir, cache, 4),
            "sample": [sys.executable, "-m", "ldmscale.sample", "--checkpoint", str(run_dir), "--prompt", "a",
                       "--steps", "2", "--out", str(tmp_path / "samples"), "--no-progress"],
            "export": [sys.executable, str(ROOT / "tools" / "export_checkpoint.py"), str(run_dir), "--raw",
                       "--out", str(tmp_path / "w.safetensors")],
        }
        for name, cmd in commands.items():
            code, out, _, _ = run_timed(cmd)
            if name == "export" and bad.name == "client_rank0.pt":  # raw weights never read the client state
                assert code == 0, out[-3000:]
            else:
                assert code != 0 and f"{bad}: refused to load" in out, (name, rel, out[-3000:])
            assert not marker.exists(), (name, rel)


# ---------------------------------------------------------------------------- fast: cache fingerprints
def test_cache_fingerprint_covers_run_dirs_exports_and_no_weights(tmp_path):
    """A cache made from one autoencoder source is refused with any other, naming both fingerprints."""
    import dataclasses

    from ldmscale.data.cache import CacheSpec, build_encoders
    from ldmscale.data.loader import CacheMismatchError, check_manifest
    from ldmscale.models import build_autoencoder, save_autoencoder
    from ldmscale.stage1 import EXPORT_DIR, LATENT_SCALE_FILE
    from tests._data_helpers import base_config

    cfg = base_config()
    sources: dict[str, str | None] = {"none": None}
    for seed in (1, 2):  # two stage-1 run directories with different weights
        torch.manual_seed(seed)
        run_dir = tmp_path / f"ae_run{seed}"
        save_autoencoder(build_autoencoder(cfg.autoencoder), run_dir / EXPORT_DIR, "ldmscale")
        (run_dir / LATENT_SCALE_FILE).write_text("{}")
        sources[f"run{seed}"] = str(run_dir)
    exported = next((tmp_path / "ae_run1" / EXPORT_DIR).glob("*.safetensors"))
    sources["export file"] = str(exported)

    def manifest_for(weights):
        ae_cfg = dataclasses.replace(cfg.autoencoder, weights=weights)
        encoders = build_encoders(ae_cfg, cfg.conditioner)
        return CacheSpec.build(cfg.data, cfg.conditioner, ae_cfg, cfg.cache, encoders).fingerprint, ae_cfg

    made = {name: manifest_for(weights) for name, weights in sources.items()}
    fingerprints = {name: m["encoders"]["autoencoder"]["weights_source"] for name, (m, _) in made.items()}
    assert len(set(fingerprints.values())) == 4, fingerprints  # every source is told apart
    for cache_name, (manifest, _) in made.items():
        for config_name, (_, ae_cfg) in made.items():
            if cache_name == config_name:
                check_manifest(manifest, cfg.data, cfg.conditioner, ae_cfg)
                continue
            with pytest.raises(CacheMismatchError, match="autoencoder.weights") as error:
                check_manifest(manifest, cfg.data, cfg.conditioner, ae_cfg)
            assert fingerprints[cache_name] in str(error.value) and fingerprints[config_name] in str(error.value)


# ---------------------------------------------------------------------------- fast: bad inputs
def test_shipped_limits_skip_tiny_extreme_and_huge_images_and_cut_captions():
    import io

    from PIL import Image

    from ldmscale.data.shards import SampleFilter, SkipSample, decode_sample
    from tests._data_helpers import base_config, png

    cfg = base_config()
    rules = SampleFilter.from_config(cfg.data, require_caption=True)
    assert (rules.min_size, rules.max_aspect_ratio, rules.max_pixels, rules.max_caption_bytes) == (
        cfg.data.resolution // 4, 4.0, 50_000_000, 2048)

    def decode(image: bytes, caption: bytes = b"a red square"):
        return decode_sample({"__key__": "k", "__url__": "u.tar", "png": image, "txt": caption}, rules)

    for size, reason in (((1, 1), "too_small"), ((2, 2), "too_small"), ((2000, 40), "extreme_aspect")):
        with pytest.raises(SkipSample) as skip:
            decode(png(*size))
        assert skip.value.reason == reason, size
    huge = io.BytesIO()
    Image.new("1", (12000, 12000)).save(huge, format="PNG")  # 144 MP: 2 GB once decoded as RGB
    with pytest.raises(SkipSample) as skip:
        decode(huge.getvalue())
    assert skip.value.reason == "too_many_pixels" and "data.max_pixels" in skip.value.detail
    caption = ("é" * 60_000).encode()  # 120 KB, 2-byte characters
    kept = decode(png(32, 32), caption).caption
    assert kept == "é" * 1024 and len(kept.encode()) == 2048


# ---------------------------------------------------------------------------- fast: start-up errors
@pytest.mark.parametrize("overrides, message", [
    (["+no_such_key=1"], r"unknown config key\(s\) \['no_such_key'\]"),
    (["+data.no_such=1"], r"unknown config key\(s\) \['data.no_such'\]"),
    (["optim.lr=-1"], "optim.lr=-1.0 must be >= 0"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
])
def test_bad_config_values_fail_naming_the_key(overrides, message):
    from ldmscale.config import ConfigError, compose

    with pytest.raises(ConfigError, match=message):
        compose(overrides)


def test_bad_paths_fail_at_start_naming_the_key(tmp_path, monkeypatch):
    from ldmscale.config import ConfigError, check_paths, compose

    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for overrides, message in (
        (["run_dir=/proc/x"], "run_dir='/proc/x' cannot be created"),
        ([f"checkpoint.dir={a_file}"], f"checkpoint.dir='{a_file}' is a file"),
        ([f"data.train_shards=[{tmp_path}/nope/cache]"], rf"data.train_shards\[0\]='{tmp_path}/nope/cache'"),
        (["+experiment=ae_demo"], r"'data/shapes32' does not exist \(conf/experiment/ae_demo.yaml says how"),
    ):
        cfg = compose([f"run_dir={tmp_path}/run", *overrides])
        with pytest.raises(ConfigError, match=message):
            check_paths(cfg)


def test_an_uncreatable_run_dir_fails_before_hydra_makes_it(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for run_dir, message in (("/proc/x", "run_dir='/proc/x' cannot be created"),
                             (str(a_file), f"run_dir='{a_file}' is a file, not a folder")):
        code, out, _, _ = run_timed([sys.executable, "-m", "ldmscale.train", f"run_dir={run_dir}"], timeout=120)
        assert code != 0 and message in out, out[-2000:]


def test_the_demo_refuses_torchrun_and_dry_run_does_not_run_it(tmp_path):
    cmd = [sys.executable, "-m", "ldmscale.train", f"run_dir={tmp_path}/demo"]
    ranks = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    code, out, _, _ = run_timed(cmd, timeout=120, **ranks)
    assert code != 0 and "not torchrun" in out and not (tmp_path / "demo" / "data").exists(), out[-2000:]
    code, out, _, _ = run_timed([*cmd, "dry_run=true"], timeout=120)
    assert code == 0 and "FLOPs/image" in out and "[demo]" not in out, out[-2000:]
