"""ldmscale.runs: the one weights reader (never unpickles code) and the stage-1 run resolution."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldmscale.runs import autoencoder_path, read_weights


def test_read_weights_reads_safetensors_torch_and_ldm_checkpoints(tmp_path):
    state = {"a": torch.arange(3.0), "b.c": torch.ones(2, 2)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "sd.ckpt")  # LDM/SD layout
    for name in ("w.safetensors", "w.pt", "sd.ckpt"):
        got = read_weights(tmp_path / name)
        assert sorted(got) == ["a", "b.c"] and all(torch.equal(got[k], state[k]) for k in state), name


class Payload:
    """Any class: unpickling it would run code from the file's choosing."""


def test_read_weights_never_unpickles_code_and_names_the_setting(tmp_path):
    torch.save({"a": torch.zeros(1), "hook": Payload()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="eval.clip_weights=.*weights-only"):
        read_weights(tmp_path / "pickled.pt", what="eval.clip_weights")
    with pytest.raises(FileNotFoundError, match="conditioner.text_weights"):
        read_weights(tmp_path / "missing.pt", what="conditioner.text_weights")


def test_an_unfinished_stage1_run_says_how_to_get_its_export(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="re-running the same command"):
        autoencoder_path(tmp_path / "run")
    assert autoencoder_path(tmp_path / "elsewhere") == tmp_path / "elsewhere"  # other paths pass through

