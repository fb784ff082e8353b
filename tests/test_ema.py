"""Power-function EMA (EDM2) and post-hoc EMA: closed form, reconstruction, snapshots, ranks × ZeRO, resume."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ldmscale.checkpoint import Checkpointer, load_run_weights
from ldmscale.config import CheckpointConfig, Config, ConfigError, validate
from ldmscale.ema import (
    SNAPSHOT_DIR,
    PartitionedEMA,
    PowerEMA,
    gamma_to_sigma_rel,
    list_snapshots,
    reconstruct,
    sigma_rel_to_gamma,
    solve_posthoc_coefficients,
)
from tests.test_training_dist import ROOT, losses, run_ok, torchrun_cmd


def test_sigma_rel_to_gamma_matches_edm2():
    # EDM2 (Sec. 3.1): σ_rel = 0.05 ↔ γ ≈ 16.97 and σ_rel = 0.10 ↔ γ ≈ 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.08, 0.25):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-10)
    with pytest.raises(ValueError, match="sigma_rel=0.3"):
        sigma_rel_to_gamma(0.3)


def _walk(module: nn.Module, steps: int, seed: int = 0):
    """Yield after each of `steps` random-walk (with drift) updates of `module`'s parameters."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen) + 0.003)
        yield t


def test_power_ema_matches_its_closed_form():
    """After t updates the EMA is Σ_τ w_τ θ_τ, w_τ = (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1) (float64 reference)."""
    torch.manual_seed(0)
    module = nn.Linear(5, 3)
    sigma_rels = [0.05, 0.10, 0.2]
    ema = PowerEMA(module, sigma_rels)
    history = []
    for step in _walk(module, 60):
        history.append({n: p.detach().double().clone() for n, p in module.named_parameters()})
        ema.update(step)
        if step + 1 in (1, 7, 60):
            t = step + 1
            for profile, sigma_rel in enumerate(sigma_rels):
                g1 = sigma_rel_to_gamma(sigma_rel) + 1
                weights = [(tau ** g1 - (tau - 1) ** g1) / t ** g1 for tau in range(1, t + 1)]
                got = ema.full_state_dict(profile)
                for name in got:
                    expected = sum(w * h[name] for w, h in zip(weights, history))
                    torch.testing.assert_close(got[name].double(), expected, rtol=1e-5, atol=1e-6)
    assert ema.num_updates == 60


def _train_power_ema(snapshot_dir, steps: int, every: int, sigma_rels=(0.05, 0.10)):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 4))
    ema = PowerEMA(module, list(sigma_rels), snapshot_every_steps=every, snapshot_dir=snapshot_dir,
                   final_step=steps)
    probe = PowerEMA(module, [0.03, 0.07])  # tracked directly, not snapshotted: what post-hoc must reach
    for step in _walk(module, steps):
        ema.update(step)
        probe.update(step)
    return ema, probe


def test_reconstructing_a_tracked_sigma_rel_gives_the_tracked_ema(tmp_path):
    ema, probe = _train_power_ema(tmp_path, steps=300, every=40)
    snapshots = list_snapshots(tmp_path)
    assert [s.step for s in snapshots[::2]] == [40, 80, 120, 160, 200, 240, 280, 300]  # and the last step
    assert {s.sigma_rel for s in snapshots} == {0.05, 0.10}
    assert all(v.dtype == torch.float16 for v in load_file(str(snapshots[0].path)).values())
    step, rebuilt = reconstruct(tmp_path, [0.05, 0.10, 0.07])
    assert step == 300
    for profile, sigma_rel in enumerate((0.05, 0.10)):
        tracked = ema.full_state_dict(profile)
        for name, value in tracked.items():  # fp16 snapshots: half an fp16 ulp plus float32 sums
            torch.testing.assert_close(rebuilt[sigma_rel][name], value, rtol=1e-3, atol=1e-4)
    # An untracked σ_rel between the two: close to an EMA tracked with it directly, far closer than
    # the two tracked profiles are to each other.
    direct, tracked_gap = probe.full_state_dict(1), ema.full_state_dict(0)
    other = ema.full_state_dict(1)
    error = max((rebuilt[0.07][n] - direct[n]).abs().max().item() for n in direct)
    gap = max((tracked_gap[n] - other[n]).abs().max().item() for n in direct)
    assert error < 0.02 * gap, (error, gap)


def test_posthoc_coefficients_pick_a_tracked_profile_and_sum_to_one():
    steps, sigmas = [100, 100, 200, 200, 300, 300], [0.05, 0.1] * 3
    coefficients = solve_posthoc_coefficients(steps, sigmas, [300, 300, 300], [0.05, 0.1, 0.07])
    assert coefficients.shape == (6, 3)
    assert coefficients.sum(axis=0) == pytest.approx([1, 1, 1])
    assert coefficients[:, 0] == pytest.approx([0, 0, 0, 0, 1, 0], abs=1e-8)
    assert coefficients[:, 1] == pytest.approx([0, 0, 0, 0, 0, 1], abs=1e-8)


def test_reconstruct_needs_a_snapshot_at_the_step(tmp_path):
    _train_power_ema(tmp_path, steps=50, every=20)
    with pytest.raises(ValueError, match="no snapshot at step 30"):
        reconstruct(tmp_path, [0.05], step=30)
    step, rebuilt = reconstruct(tmp_path, [0.06], step=40)  # an earlier snapshot step is fine
    assert step == 40 and set(rebuilt) == {0.06}
    with pytest.raises(FileNotFoundError, match="ema.kind=power"):
        reconstruct(tmp_path / "none", [0.05])


def _snapshotting_run(tmp_path, keep_last: int) -> Checkpointer:
    """6 steps of a power EMA snapshotting every 2, with a checkpoint after each step."""
    checkpointer = Checkpointer(CheckpointConfig(keep_last=keep_last), tmp_path)
    module = nn.Linear(4, 4)
    ema = PowerEMA(module, [0.05, 0.10], snapshot_every_steps=2, snapshot_dir=tmp_path / SNAPSHOT_DIR)
    for step in _walk(module, 6):
        ema.update(step)
        checkpointer.save(step + 1, {}, {"task": {"ema": ema.state_dict()}}, {})
    return checkpointer


def test_snapshots_survive_checkpoint_retention(tmp_path):
    """Snapshots live beside the step_* folders: pruning old checkpoints never deletes them."""
    _snapshotting_run(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000006"]
    assert [s.step for s in list_snapshots(tmp_path / SNAPSHOT_DIR)] == [2, 2, 4, 4, 6, 6]


def test_resuming_from_an_older_checkpoint_drops_the_abandoned_snapshots_at_the_next_save(tmp_path):
    """Snapshots after the step a run resumed from belong to the abandoned history: the next save removes
    them with that history's checkpoints, so a reconstruction never mixes two histories."""
    checkpointer = _snapshotting_run(tmp_path, keep_last=5)
    (tmp_path / "latest").write_text("step_00000003")  # rolled back by hand after a divergence
    assert checkpointer.resume_tag() == "step_00000003"
    checkpointer.save(4, {}, {}, {})  # the new history's next save
    assert [s.step for s in list_snapshots(tmp_path / SNAPSHOT_DIR)] == [2, 2, 4, 4]  # 4: rewritten next
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [f"step_0000000{i}" for i in (2, 3, 4)]


def test_power_ema_state_round_trips_and_refuses_a_different_setup():
    module = nn.Linear(4, 4)
    ema = PowerEMA(module, [0.05, 0.10])
    for step in _walk(module, 5):
        ema.update(step)
    state = ema.state_dict()
    assert state["shadow"] is state["shadows"][0]  # the live profile, stored once
    fresh = PowerEMA(module, [0.05, 0.10])
    fresh.load_state_dict(state)
    for mine, saved in zip(fresh.shadows, ema.shadows):
        assert all(torch.equal(a, b) for a, b in zip(mine, saved))
    with pytest.raises(ValueError, match="ema.sigma_rels"):
        PowerEMA(module, [0.05]).load_state_dict(state)
    with pytest.raises(ValueError, match="ema.kind=power"):
        PartitionedEMA(module, 0.9).load_state_dict(state)


def test_a_skipped_step_leaves_every_profile_as_it_is():
    """The trainer passes applied=0 (a device tensor) for a skipped step; 1 must equal the plain update."""
    module = nn.Linear(4, 4)
    ema, twin = PowerEMA(module, [0.05, 0.10]), PowerEMA(module, [0.05, 0.10])
    walk = _walk(module, 4)
    for step in range(3):
        next(walk)
        ema.update(step, applied=torch.tensor(1.0))
        twin.update(step)
    before = [[s.clone() for s in shadow] for shadow in ema.shadows]
    next(walk)
    ema.update(3, applied=torch.tensor(0.0))
    assert all(torch.equal(a, b) for old, new in zip(before, ema.shadows) for a, b in zip(old, new))
    for mine, theirs in zip(ema.shadows[:1], twin.shadows[:1]):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))  # identical up to the skipped step


@pytest.mark.parametrize("key,value,message", [
    ("kind", "karras", "ema.kind='karras'"),
    ("sigma_rels", [0.05, 0.4], "ema.sigma_rels holds 0.4"),
    ("sigma_rels", [], "ema.sigma_rels is empty"),
    ("posthoc_sigma_rels", [0.0], "ema.posthoc_sigma_rels holds 0.0"),
    ("snapshot_every_steps", -1, "ema.snapshot_every_steps=-1"),
])
def test_bad_ema_config_names_the_key(key, value, message):
    cfg = Config()
    cfg.ema.kind = "power"
    setattr(cfg.ema, key, value)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        validate(cfg)


# ---------------------------------------------------------------------------- 1 vs 2 ranks, ZeRO-2/3, resume
def _run(run_dir, stage: int, ranks: int, *extra) -> None:
    cmd = torchrun_cmd("power_ema_train.py", run_dir, stage, 12, *extra)
    cmd[cmd.index("--nproc_per_node") + 1] = str(ranks)
    run_ok(cmd)


def _snapshots(run_dir) -> dict[str, tuple[dict[str, str], dict[str, torch.Tensor]]]:
    out = {}
    for snapshot in list_snapshots(run_dir / "checkpoints" / SNAPSHOT_DIR):
        with safe_open(str(snapshot.path), framework="pt") as f:
            out[snapshot.path.name] = (f.metadata(), load_file(str(snapshot.path)))
    return out


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("power_ema")
    runs = {}
    for ranks, stage in ((1, 2), (2, 2), (2, 3)):
        runs[ranks, stage] = root / f"ranks{ranks}_zero{stage}"
        _run(runs[ranks, stage], stage, ranks)
    return runs


@pytest.mark.slow
def test_one_and_two_ranks_under_zero2_and_zero3_write_the_same_snapshots(straight_runs):
    reference = _snapshots(straight_runs[1, 2])
    names = [f"step_{s:08d}-sigma_rel_{r:.4f}.safetensors" for s in (3, 6, 9, 12) for r in (0.05, 0.10)]
    assert sorted(reference) == sorted(names)
    for key in ((2, 2), (2, 3)):
        other = _snapshots(straight_runs[key])
        assert sorted(other) == sorted(reference), key
        for name, (meta, tensors) in reference.items():
            assert other[name][0] == meta
            assert sorted(other[name][1]) == sorted(tensors)
            for param, value in tensors.items():  # gradients summed in another order: ≤ 1 fp16 rounding
                torch.testing.assert_close(other[name][1][param], value, rtol=1e-3, atol=1e-5,
                                           msg=f"{key} {name} {param}")


@pytest.mark.slow
def test_resume_with_power_ema_is_bit_identical(straight_runs, tmp_path):
    straight = straight_runs[2, 3]
    resumed = tmp_path / "resumed"
    _run(resumed, 3, 2, 6)  # saves and stops after step 6 (as on SIGTERM)
    assert (resumed / "checkpoints" / "latest").read_text() == "step_00000006"
    assert not (resumed / "reference.pt").exists()
    _run(resumed, 3, 2)  # the same command resumes from step 6
    assert losses(resumed) == losses(straight)
    got, expected = _snapshots(resumed), _snapshots(straight)
    assert sorted(got) == sorted(expected)
    for name, (meta, tensors) in expected.items():
        assert got[name][0] == meta
        assert all(torch.equal(got[name][1][k], v) for k, v in tensors.items()), name
    a, b = torch.load(resumed / "reference.pt"), torch.load(straight / "reference.pt")
    for mine, theirs in zip(a["profiles"], b["profiles"]):
        assert all(torch.equal(mine[k], v) for k, v in theirs.items())


@pytest.mark.slow
def test_posthoc_tool_and_demo_eval_on_a_real_run(tmp_path):
    """The tiny text-to-image model, 1 rank, ema.kind=power → tools/posthoc_ema.py → python -m ldmscale.sample,
    and the demo's post-hoc evaluation (one score set per σ_rel)."""
    from ldmscale.pipeline import Pipeline
    from ldmscale.runs import read_config
    from tests._train_helpers import make_cached_shards
    from tests.test_training_export import train_cmd

    run = tmp_path / "unet"  # where the demo pipeline keeps its stage-2 run
    run_ok(train_cmd(run, make_cached_shards(tmp_path), ranks=1, **{
        "ema.kind": "power", "ema.sigma_rels": "[0.05,0.1]", "ema.snapshot_every_steps": 5,
        "ema.posthoc_sigma_rels": "[0.05,0.2]", "pipeline.eval_seeds_per_prompt": 1}), timeout=400)
    snapshots = list_snapshots(run / "checkpoints" / SNAPSHOT_DIR)
    assert sorted({s.step for s in snapshots}) == [5, 10, 12]  # every 5 steps and the last
    run_ok([sys.executable, str(ROOT / "tools" / "posthoc_ema.py"), str(run), "--sigma-rel", "0.05", "0.08"])
    exports = {s: run / "export" / f"denoiser_ema_sigma_rel_{s:.4f}.safetensors" for s in (0.05, 0.08)}
    live, _ = load_run_weights(run, ema=True)  # the first tracked profile, fp32
    raw, _ = load_run_weights(run, ema=False)
    rebuilt = load_file(str(exports[0.05]))
    assert sorted(rebuilt) == sorted(raw)
    for name, value in live.items():
        torch.testing.assert_close(rebuilt[name], value, rtol=1e-3, atol=1e-4, msg=name)
    with safe_open(str(exports[0.08]), framework="pt") as f:
        assert f.metadata()["weights"] == "posthoc_ema:0.08" and f.metadata()["step"] == "12"
    out = tmp_path / "samples"
    run_ok([sys.executable, "-m", "ldmscale.sample", "--checkpoint", str(exports[0.08]), "--config",
            str(run / "config.json"), "--prompt", "a red circle in the top left", "--steps", "2",
            "--out", str(out), "--no-progress"])
    assert (out / "grid.png").is_file()

    cfg = read_config(run / "config.json")
    cfg.run_dir = str(tmp_path)
    results = Pipeline(cfg, []).evaluate_posthoc_ema(cfg, "cpu")
    assert sorted(results) == ["0.05", "0.2"]
    for scores in results.values():
        assert scores["num_images"] == 72 and 0 <= scores["shape"] <= 1
