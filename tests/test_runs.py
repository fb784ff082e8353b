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



def test_a_stage1_run_dir_loads_as_its_autoencoder(tmp_path):
    import json

    from ldmscale.config import compose, save_resolved
    from ldmscale.models import build_autoencoder, save_autoencoder
    from ldmscale.runs import load
    from ldmscale.stage1 import EXPORT_DIR, LATENT_SCALE_FILE

    cfg = compose(["+experiment=ae_demo", "stage=autoencoder", f"run_dir={tmp_path / 'ae'}"])
    save_resolved(cfg, tmp_path / "ae")
    torch.manual_seed(3)
    trained = build_autoencoder(cfg.autoencoder)
    save_autoencoder(trained, tmp_path / "ae" / EXPORT_DIR)
    (tmp_path / "ae" / LATENT_SCALE_FILE).write_text(json.dumps({"scale_factor": 1.0, "shift_factor": 0.0}))
    run = load(tmp_path / "ae")
    assert run.denoiser is None and run.cfg.stage == "autoencoder"
    loaded = run.autoencoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())


def test_our_folder_export_loads_its_extras_and_config_and_takes_key_overrides(tmp_path):
    """`--format ldmscale`: U-Net + run_config.json + denoiser_extras (the layout encoder) load as the
    trained denoiser without --config; -o key.path=value changes its config, config groups are refused."""
    import json

    from ldmscale.config import ConfigError, compose, to_dict
    from ldmscale.models import build_denoiser, save_unet
    from ldmscale.models.interop import save_tensors
    from ldmscale.runs import DENOISER_EXTRAS, RUN_CONFIG, load

    cfg = compose(["+experiment=demo_layout"])
    torch.manual_seed(1)
    trained = build_denoiser(cfg.model, cfg.conditioner)
    extras = {k: v for k, v in trained.state_dict().items() if not k.startswith("unet.")}
    assert extras, "a layout denoiser has trainable parts outside the U-Net"
    save_unet(trained.unet, tmp_path / "folder", "ldmscale")
    save_tensors({k: v.contiguous() for k, v in extras.items()}, tmp_path / "folder" / DENOISER_EXTRAS)
    (tmp_path / "folder" / RUN_CONFIG).write_text(json.dumps(to_dict(cfg), default=str))

    with pytest.warns(UserWarning, match="autoencoder.weights is not set"):
        run = load(tmp_path / "folder", overrides=["diffusion.num_sampling_steps=3"])
    assert run.cfg.conditioner.kind == "layout" and run.cfg.diffusion.num_sampling_steps == 3
    got = run.denoiser.state_dict()
    assert all(torch.equal(got[k], v) for k, v in trained.state_dict().items())
    with pytest.raises(ConfigError, match="only key.path=value"):
        load(tmp_path / "folder", overrides=["model=tiny"])
