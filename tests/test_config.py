"""The config tree composes, validates and fails with the key's path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from ldmscale.config import CONF_DIR, Config, ConfigError, compose, save_resolved

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_default_is_demo():
    cfg = compose()
    assert isinstance(cfg, Config)
    assert cfg.name == "demo"
    assert cfg.run_dir == "runs/demo"  # interpolation resolved


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose([f"+experiment={experiment}"])
    assert isinstance(cfg, Config)
    assert cfg.data.global_batch_size % cfg.data.micro_batch_size == 0


def test_public_keys_override():
    cfg = compose(["run_dir=/tmp/x", "seed=7", "trainer.max_steps=3", "trainer.log_every_steps=1",
                   "checkpoint.every_steps=2", "deepspeed.zero_stage=2", "data.micro_batch_size=4",
                   "data.global_batch_size=8"])
    assert (cfg.run_dir, cfg.seed, cfg.trainer.max_steps, cfg.trainer.log_every_steps) == ("/tmp/x", 7, 3, 1)
    assert (cfg.checkpoint.every_steps, cfg.deepspeed.zero_stage) == (2, 2)
    assert (cfg.data.micro_batch_size, cfg.data.global_batch_size) == (4, 8)


def test_unknown_key_names_full_path():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.max_stepz=3"])
    assert "trainer.max_stepz" in str(err.value.__cause__ or err.value)


def test_wrong_type_names_full_path():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.max_steps=lots"])
    assert "trainer.max_steps" in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize(
    "override, key",
    [("deepspeed.precision=fp8", "deepspeed.precision"), ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
     ("data.global_batch_size=33", "data.global_batch_size"), ("diffusion.prediction_type=score", "diffusion.prediction_type")],
)
def test_bad_value_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([override])


def test_resolved_config_saved(tmp_path):
    cfg = compose([f"run_dir={tmp_path}"])
    path = save_resolved(cfg, tmp_path)
    saved = json.loads(path.read_text())
    assert saved["run_dir"] == str(tmp_path)
    assert saved["model"]["preset"] == cfg.model.preset
    assert (tmp_path / "config.yaml").is_file()


def test_cli_prints_config_from_any_directory(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "ldmscale.train", "--cfg", "job"], cwd=tmp_path,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: demo" in out.stdout and "zero_stage:" in out.stdout
