"""The ONE way to open what a user points at: a training run directory (stage 1 or 2, EMA or raw weights),
our export, a diffusers folder or an LDM/SD checkpoint → `Run`; and the one reader of weights files."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ldmscale.config import Config, DiffusionConfig

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def read_weights(path: str | Path, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """A weights file → its state dict, on CPU. Never unpickles code (principle 15): safetensors, or a torch
    file loaded with weights_only=True. An LDM/SD `.ckpt` ({"state_dict": ..., "global_step": ...}) gives
    its "state_dict". `what` names the setting the path came from, for the error message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}={str(path)!r}: no such file (safetensors, or a torch state dict)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled code, or not a torch file at all
        raise ValueError(f"{what}={str(path)!r} cannot be read weights-only (tensors only, no pickled "
                         f"objects): {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what}={str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def _unwrap(state: dict[str, Any], ema: bool) -> dict[str, torch.Tensor]:
    """Training-script checkpoints nest the weights: prefer the EMA ones when asked."""
    for key in (("ema", "model_ema", "model") if ema else ("model",)):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


# ---------------------------------------------------------------------------- what a path is
@dataclass
class Run:
    """Everything sampling, evaluation and export need from a model, in eval mode on one device."""

    cfg: Config
    denoiser: Optional[nn.Module]  # None for a stage-1 run
    autoencoder: Optional[nn.Module]
    text_encoder: Any = None  # the conditioning kind's frozen encoder (text towers), or None


def read_config(path: str | Path) -> Config:
    """A resolved Config from config.json (a run's, or our export's) or a YAML file."""
    from omegaconf import OmegaConf

    from ldmscale.config import to_object

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = json.loads(path.read_text()) if path.suffix == ".json" else OmegaConf.to_container(OmegaConf.load(path))
    return to_object(OmegaConf.create(raw))


def is_run_dir(path: str | Path) -> bool:
    """A training run directory: config.json holds a resolved Config (not a model export's config)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and "diffusion" in data and "model" in data


def run_checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run's checkpoints are: run_dir itself (if it holds checkpoints), its checkpoint.dir, or ./checkpoints.

    checkpoint.dir is saved resolved against the run's own working directory, so a leading cfg.run_dir
    is re-rooted at `run_dir` (the run folder may have been moved or be read from elsewhere).
    """
    from ldmscale.checkpoint import LATEST, META, complete_tags

    run_dir = Path(run_dir)

    def holds_checkpoints(folder: Path) -> bool:
        return (folder / LATEST).is_file() or bool(complete_tags(folder))

    if holds_checkpoints(run_dir):
        return run_dir
    candidates = []
    if (run_dir / "config.json").is_file():
        saved = json.loads((run_dir / "config.json").read_text())
        ckpt_dir, saved_run = Path(saved["checkpoint"]["dir"]), Path(saved["run_dir"])
        if ckpt_dir.is_relative_to(saved_run):
            candidates.append(run_dir / ckpt_dir.relative_to(saved_run))
        candidates.append(ckpt_dir)
    candidates.append(run_dir / "checkpoints")
    for candidate in candidates:
        if holds_checkpoints(candidate):
            return candidate
    raise FileNotFoundError(f"no complete checkpoint ('latest' or step_*/{META}) in any of {[str(c) for c in candidates]}")


def autoencoder_path(path: str | Path) -> Path:
    """A stage-1 run directory → its exported autoencoder folder; other paths pass through unchanged."""
    from ldmscale.latent_scale import SCALE_FILE as LATENT_SCALE_FILE
    from ldmscale.latent_scale import STAGE1_EXPORT as EXPORT_DIR

    path = Path(path)
    if (path / EXPORT_DIR).is_dir() and (path / LATENT_SCALE_FILE).is_file():
        return path / EXPORT_DIR
    if (path / "checkpoints").is_dir() and not (path / EXPORT_DIR).is_dir():
        raise FileNotFoundError(
            f"{path} is a stage-1 run without {path / EXPORT_DIR}: it is written when the run reaches "
            "trainer.max_steps (re-running the same command resumes and writes it)")
    return path


_DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_DIFFUSERS_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def diffusion_from_scheduler_config(path: Path, diffusion: DiffusionConfig) -> DiffusionConfig:
    """Take the process of a diffusers pipeline folder (scheduler/scheduler_config.json) into `diffusion`."""
    file = path / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return diffusion
    sched = json.loads(file.read_text())
    if sched.get("beta_schedule") not in _DIFFUSERS_BETAS or sched.get("trained_betas"):
        raise ValueError(f"{file}: beta_schedule={sched.get('beta_schedule')!r} is not one of "
                         f"{sorted(_DIFFUSERS_BETAS)}")
    out = dataclasses.replace(diffusion, schedule=dataclasses.replace(diffusion.schedule))
    out.schedule.beta_schedule = _DIFFUSERS_BETAS[sched["beta_schedule"]]
    out.schedule.beta_start = sched.get("beta_start", out.schedule.beta_start)
    out.schedule.beta_end = sched.get("beta_end", out.schedule.beta_end)
    out.schedule.num_train_timesteps = sched.get("num_train_timesteps", out.schedule.num_train_timesteps)
    out.schedule.zero_terminal_snr = bool(sched.get("rescale_betas_zero_snr", False))
    out.prediction_type = _DIFFUSERS_PREDICTION.get(sched.get("prediction_type", "epsilon"), out.prediction_type)
    out.timestep_spacing = sched.get("timestep_spacing", out.timestep_spacing)
    return out


def _denoiser_from_unet_checkpoint(path: Path, cfg: Config) -> nn.Module:
    """A bare U-Net in any format `ldmscale.models.interop` reads, wrapped as a Denoiser of cfg's kind."""
    import dataclasses as dc

    from ldmscale.conditioning import kind_for
    from ldmscale.models import Denoiser
    from ldmscale.models.interop import load_unet

    conditioning = kind_for(cfg.conditioner)
    unet = load_unet(path)
    trained = conditioning.configure_unet(dc.replace(cfg.model, in_channels=unet.in_channels,
                                                     context_dim=unet.context_dim,
                                                     adm_in_channels=unet.adm_in_channels), {})
    if trained:
        raise ValueError(f"{path} is a bare U-Net, but a {conditioning.name!r} model also needs its trained "
                         f"{', '.join(trained)}: pass the run directory or the exported denoiser state dict")
    num_classes = cfg.conditioner.num_classes if unet.num_classes else None
    return Denoiser(unet, conditioning.name, None, num_classes, unet.in_channels - unet.out_channels,
                    conditioning=conditioning)


def build_models(cfg: Config, device: torch.device | str = "cpu") -> Run:
    """The models a stage-2 config names, in eval mode: an untrained denoiser (the caller loads weights),
    the autoencoder (cfg.autoencoder.weights, else a seed-0 random one, as the cache job's) and the text
    encoder."""
    from ldmscale.models import build_denoiser

    model_cfg = dataclasses.replace(cfg.model, weights=None)  # the checkpoint supersedes the initial weights
    denoiser = build_denoiser(model_cfg, cfg.conditioner)
    text_encoder = denoiser.conditioning.build_frozen(device)  # the kind's frozen encoder (text towers), or None
    return Run(cfg, denoiser.to(device).eval(), _configured_autoencoder(cfg, False, device), text_encoder)


def _load_denoiser_state(denoiser: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """A Denoiser state dict (our export, a consolidated checkpoint) or a bare U-Net one."""
    target = denoiser if any(k.startswith("unet.") for k in state) else denoiser.unet
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{where} does not fit the configured denoiser: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}; check --config / model overrides")


def _run_dir_denoiser(run_dir: Path, ema: bool, tag: Optional[str]) -> dict[str, torch.Tensor]:
    """A stage-2 run's weights: its latest (or `tag`) DeepSpeed checkpoint consolidated offline (any ZeRO
    stage and world size); a run without checkpoints, its export run_dir/export/denoiser[_ema].safetensors."""
    from ldmscale.checkpoint import load_run_weights

    exported = run_dir / "export" / ("denoiser_ema.safetensors" if ema else "denoiser.safetensors")
    try:
        run_checkpoint_dir(run_dir)
    except FileNotFoundError as err:
        if tag is None and exported.is_file():
            return read_weights(exported)
        raise FileNotFoundError(f"{run_dir}: no exported weights {exported} and {err}") from err
    return load_run_weights(run_dir, ema=ema, tag=tag)[0]


RUN_CONFIG = "run_config.json"  # beside a `--format ldmscale` export: the run's resolved config
DENOISER_EXTRAS = "denoiser_extras.safetensors"  # beside it too: trainable parts outside the U-Net (layout)


def config_of_export(path: Path) -> Optional[Config]:
    """The training config an export carries: a flat .safetensors' metadata, or RUN_CONFIG in our folder."""
    from omegaconf import OmegaConf

    from ldmscale.config import to_object

    raw = None
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get("config")
        raw = json.loads(text) if text else None
    elif (path / RUN_CONFIG).is_file():
        raw = json.loads((path / RUN_CONFIG).read_text())
    if not raw:
        return None
    cfg = to_object(OmegaConf.create(raw))
    if path.is_dir() and (path / "autoencoder").is_dir():  # exported --with-autoencoder: use that copy
        cfg.autoencoder = dataclasses.replace(cfg.autoencoder, weights=str(path / "autoencoder"))
    return cfg


def load(checkpoint: str | Path, *, ema: bool = True, config: Optional[str | Path] = None,
         overrides: Sequence[str] = (), tag: Optional[str] = None, device: torch.device | str = "cpu") -> Run:
    """Open what a user points at → Run (in eval mode on `device`):

    - a stage-2 training run directory (EMA or raw weights; `tag` picks a checkpoint, default latest);
    - a stage-1 run directory or any autoencoder `ldmscale.models.load_autoencoder` reads: Run with the
      autoencoder only (denoiser None) when it holds no U-Net;
    - our denoiser export (`.safetensors`/`.pt`, keys `unet.*`; its config in the metadata), our folder
      export (`--format ldmscale`: U-Net, RUN_CONFIG, DENOISER_EXTRAS), a bare U-Net in any format
      `ldmscale.models.interop` reads, a diffusers pipeline folder (its scheduler and VAE too), an LDM/SD
      checkpoint.

    The config is the model's own (the run directory's, `config`, a config.json beside the weights, or the
    one an export carries) with `overrides` (key.path=value) applied; only a bare checkpoint is described by
    composing `overrides` (as `python -m ldmscale.train OVERRIDES` would).
    """
    from ldmscale.config import apply_overrides, compose
    from ldmscale.models import build_denoiser, load_autoencoder

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    pipeline_vae = False
    if is_run_dir(path) and config is None:
        cfg = apply_overrides(read_config(path / "config.json"), list(overrides))
        if cfg.stage == "autoencoder":
            return Run(cfg, None, load_autoencoder(autoencoder_path(path)).to(device).eval())
        run = build_models(cfg, device)
        _load_denoiser_state(run.denoiser, _run_dir_denoiser(path, ema, tag), str(path))
        return run
    own = (read_config(config) if config is not None
           else read_config(path.parent / "config.json") if path.is_file() and is_run_dir(path.parent)
           else config_of_export(path))
    cfg = apply_overrides(own, list(overrides)) if own is not None else compose(list(overrides))
    state = _unwrap(read_weights(path), ema) if path.is_file() and path.suffix in WEIGHT_SUFFIXES else {}
    if any(key.startswith("unet.") for key in state):  # our consolidated Denoiser export
        denoiser = build_denoiser(dataclasses.replace(cfg.model, weights=None), cfg.conditioner)
        _load_denoiser_state(denoiser, state, str(path))
    elif path.is_dir() and (path / RUN_CONFIG).is_file():  # our folder export: U-Net + extras (layout)
        from ldmscale.models.interop import load_unet_weights

        denoiser = build_denoiser(dataclasses.replace(cfg.model, weights=None), cfg.conditioner)
        load_unet_weights(denoiser.unet, path)
        if (path / DENOISER_EXTRAS).is_file():
            extras = read_weights(path / DENOISER_EXTRAS, what=str(path / DENOISER_EXTRAS))
            unexpected = denoiser.load_state_dict(extras, strict=False)[1]
            if unexpected:
                raise ValueError(f"{path / DENOISER_EXTRAS}: {unexpected[:5]} do not fit the configured denoiser")
    else:
        denoiser = _denoiser_from_unet_checkpoint(path, cfg)
    if path.is_dir():
        cfg.diffusion = diffusion_from_scheduler_config(path, cfg.diffusion)
        if not cfg.autoencoder.weights and (path / "vae").is_dir():
            cfg.autoencoder.weights, pipeline_vae = str(path), True
    text_encoder = denoiser.conditioning.build_frozen(device)
    return Run(cfg, denoiser.to(device).eval(), _configured_autoencoder(cfg, pipeline_vae, device), text_encoder)


def _configured_autoencoder(cfg: Config, pipeline_vae: bool, device: torch.device | str) -> nn.Module:
    """cfg.autoencoder.weights with the latent scaling the denoiser was trained with (the run's config, or a
    diffusers pipeline's VAE config); unset, a seed-0 random autoencoder, loudly."""
    from ldmscale.models import build_autoencoder, load_autoencoder

    if cfg.autoencoder.weights:
        scaling = {} if pipeline_vae else dict(scale_factor=cfg.autoencoder.scale_factor,
                                               shift_factor=cfg.autoencoder.shift_factor)
        return load_autoencoder(autoencoder_path(cfg.autoencoder.weights), **scaling).to(device).eval()
    warnings.warn("autoencoder.weights is not set: decoding with a randomly initialised (seed 0) "
                  "autoencoder; set autoencoder.weights (or -o autoencoder.weights=PATH) for real images",
                  stacklevel=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # only matters for an untrained autoencoder: the same one in every call
        return build_autoencoder(cfg.autoencoder).to(device).eval()
