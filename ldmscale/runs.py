"""The ONE way to open what a user points at: a training run directory (stage 1 or 2, EMA or raw weights),
our export, a diffusers folder or an LDM/SD checkpoint → `Run`; and the one reader of weights files."""

from __future__ import annotations

import dataclasses
import json
import pickle
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ldmscale.config import Config, DiffusionConfig

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_torch_load = torch.load  # the real one: engine.py patches torch.load to call load_data while DeepSpeed reads


# ---------------------------------------------------------------------------- the weights-file layer
# Every file of tensors the project reads or writes goes through the functions below (principle 15: a
# checkpoint is data). models/, checkpoint.py and ema.py import them; this module imports only the config.
class CheckpointError(RuntimeError):
    """A checkpoint file or folder that cannot be trusted or read; the message names it."""


def load_data(path: str | Path, *, map_location: Any = "cpu", allowed: Iterable[type] = (), **kwargs: Any) -> Any:
    """torch.load as data only: tensors and plain containers, plus the `allowed` classes; never code.

    A pickle payload, a truncated or corrupt file raises CheckpointError naming the file.
    """
    kwargs.pop("weights_only", None)  # callers inside DeepSpeed pass weights_only=False: overruled
    kwargs.pop("pickle_module", None)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return _torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # torch's weights-only message buries the offending global after a paragraph of advice
        reason = next((line for line in lines if "GLOBAL" in line or "WeightsUnpickler" in line), lines[0])[:300]
        raise CheckpointError(f"{path}: refused to load ({reason}); run-directory files are read as data "
                              "only (weights_only), so a file holding code or a corrupt file stops here") from err


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}={str(path)!r}: no such file (safetensors, or a torch state dict)")
    return path


def read_weights_and_metadata(path: str | Path, *, what: str = "weights") -> tuple[dict[str, Any], dict[str, str]]:
    """A weights file → (state dict on CPU, metadata). Never unpickles code: safetensors, or a torch file
    loaded weights-only. An LDM/SD `.ckpt` ({"state_dict": ..., "global_step": ...}) gives its "state_dict",
    and its other plain entries as metadata (JSON text unless a string), as safetensors keeps strings.
    `what` names the setting the path came from, for the error message."""
    path = _existing(path, what)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), read_metadata(path, what=what)
    try:
        state = load_data(path)
    except CheckpointError as err:  # pickled code, or not a torch file at all
        raise ValueError(f"{what}={str(path)!r} cannot be read weights-only (tensors and plain containers; "
                         f"arbitrary pickles are never loaded): {err}") from err
    metadata: dict[str, str] = {}
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        for key, value in state.items():
            try:
                metadata[key] = value if isinstance(value, str) else json.dumps(value)
            except (TypeError, ValueError):  # tensors, optimiser states: not metadata
                continue
        metadata.pop("state_dict", None)
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what}={str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state, metadata


def read_weights(path: str | Path, *, what: str = "weights") -> dict[str, Any]:
    """A weights file → its state dict, on CPU (see read_weights_and_metadata)."""
    return read_weights_and_metadata(path, what=what)[0]


def read_metadata(path: str | Path, *, what: str = "weights") -> dict[str, str]:
    """A weights file's metadata; for safetensors from the header alone, without reading any tensor."""
    path = _existing(path, what)
    if path.suffix != ".safetensors":
        return read_weights_and_metadata(path, what=what)[1]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def weight_names(path: str | Path, *, what: str = "weights") -> list[str]:
    """The tensor names in a weights file; for safetensors from the header alone."""
    path = _existing(path, what)
    if path.suffix != ".safetensors":
        return list(read_weights(path, what=what))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def write_weights(tensors: dict[str, torch.Tensor], path: str | Path,
                  metadata: Optional[dict[str, str]] = None) -> None:
    """A weights file other people and jobs can read (safetensors' save_file writes 0600): safetensors, or
    for any other suffix a torch file in the LDM layout {"state_dict": ..., **metadata} the original code
    loads. read_weights_and_metadata gives back both."""
    import os

    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)
    else:
        torch.save({"state_dict": tensors, **(metadata or {})}, str(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


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


_ORIGINAL_BETAS = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}  # LDM → ours
_ORIGINAL_PREDICTION = {"eps": "eps", "v": "v", "x0": "x0"}


def diffusion_from_original_config(original: dict[str, Any], diffusion: DiffusionConfig) -> DiffusionConfig:
    """Take the process of an LDM/SD .yaml (model.params: linear_start/end, timesteps, parameterization) into
    `diffusion`. LDM's "linear" schedule interpolates sqrt(beta), which is our (and diffusers') scaled_linear."""
    params = (original.get("model") or {}).get("params") or {}
    schedule = params.get("beta_schedule", "linear")
    if schedule not in _ORIGINAL_BETAS or params.get("given_betas") is not None:
        raise ValueError(f"original config model.params.beta_schedule={schedule!r} is not one of "
                         f"{sorted(_ORIGINAL_BETAS)}")
    parameterization = params.get("parameterization", "eps")
    if parameterization not in _ORIGINAL_PREDICTION:
        raise ValueError(f"original config model.params.parameterization={parameterization!r} is not one of "
                         f"{sorted(_ORIGINAL_PREDICTION)}")
    out = dataclasses.replace(diffusion, schedule=dataclasses.replace(diffusion.schedule))
    out.schedule.beta_schedule = _ORIGINAL_BETAS[schedule]
    out.schedule.beta_start = float(params.get("linear_start", 1e-4))  # LatentDiffusion's defaults
    out.schedule.beta_end = float(params.get("linear_end", 2e-2))
    out.schedule.num_train_timesteps = int(params.get("timesteps", 1000))
    out.schedule.zero_terminal_snr = False
    out.prediction_type = _ORIGINAL_PREDICTION[parameterization]
    return out


def _denoiser_from_unet_checkpoint(path: Path, cfg: Config, original_config: Optional[dict[str, Any]] = None
                                   ) -> nn.Module:
    """A bare U-Net in any format `ldmscale.models.interop` reads, wrapped as a Denoiser of cfg's kind; an
    LDM/SD file's structure from its `original_config` when given."""
    import dataclasses as dc

    from ldmscale.conditioning import kind_for
    from ldmscale.models import Denoiser
    from ldmscale.models.interop import load_unet

    conditioning = kind_for(cfg.conditioner)
    unet = load_unet(path, original_config)
    trained = conditioning.configure_unet(dc.replace(cfg.model, in_channels=unet.in_channels,
                                                     context_dim=unet.context_dim,
                                                     adm_in_channels=unet.adm_in_channels), {})
    if trained:
        raise ValueError(f"{path} is a bare U-Net, but a {conditioning.name!r} model also needs its trained "
                         f"{', '.join(trained)}: pass the run directory or the exported denoiser state dict")
    num_classes = cfg.conditioner.num_classes if unet.num_classes else None
    return Denoiser(unet, conditioning.name, None, num_classes, unet.in_channels - unet.out_channels,
                    conditioning=conditioning)


def _inference_model_config(cfg: Config) -> Any:
    """The denoiser to load weights into: the checkpoint supersedes model.weights, and model.compile is a
    training setting (a sampling run compiling every block would wait minutes before its first image)."""
    return dataclasses.replace(cfg.model, weights=None, compile=False)


def build_models(cfg: Config, device: torch.device | str = "cpu") -> Run:
    """The models a stage-2 config names, in eval mode: an untrained denoiser (the caller loads weights),
    the autoencoder (cfg.autoencoder.weights, else a seed-0 random one, as the cache job's) and the text
    encoder."""
    from ldmscale.models import build_denoiser

    model_cfg = _inference_model_config(cfg)
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
        text = read_metadata(path).get("config")
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
         overrides: Sequence[str] = (), tag: Optional[str] = None, device: torch.device | str = "cpu",
         original_config: Optional[str | Path | dict[str, Any]] = None) -> Run:
    """Open what a user points at → Run (in eval mode on `device`):

    - a stage-2 training run directory (EMA or raw weights; `tag` picks a checkpoint, default latest);
    - a stage-1 run directory or any autoencoder `ldmscale.models.load_autoencoder` reads: Run with the
      autoencoder only (denoiser None) when it holds no U-Net;
    - our denoiser export (`.safetensors`/`.pt`, keys `unet.*`; its config in the metadata), our folder
      export (`--format ldmscale`: U-Net, RUN_CONFIG, DENOISER_EXTRAS), a bare U-Net in any format
      `ldmscale.models.interop` reads, a diffusers pipeline folder (its scheduler and VAE too), an LDM/SD
      checkpoint; with `original_config` (the .yaml shipped with an LDM/SD file) its U-Net, its first stage
      (when the file holds one and autoencoder.weights is unset) and its diffusion process are read as the
      original code would.

    The config is the model's own (the run directory's, `config`, a config.json beside the weights, or the
    one an export carries) with `overrides` (key.path=value) applied; only a bare checkpoint is described by
    composing `overrides` (as `python -m ldmscale.train OVERRIDES` would).
    """
    from ldmscale.config import apply_overrides, compose
    from ldmscale.models import build_denoiser, load_autoencoder

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if original_config is not None and not (path.is_file() and path.suffix in WEIGHT_SUFFIXES):
        raise ValueError(f"original_config (--original-config) is for an LDM/SD checkpoint file; {path} "
                         "carries its own config")
    own_scaling = False  # the autoencoder's latent scale comes with it (pipeline VAE, LDM file + its yaml)
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
    original = None
    if original_config is not None:
        from ldmscale.models.interop import AE_PREFIX, read_original_config

        original = read_original_config(original_config)
        cfg.diffusion = diffusion_from_original_config(original, cfg.diffusion)
        if not cfg.autoencoder.weights and any(key.startswith(AE_PREFIX) for key in state):
            cfg.autoencoder.weights, own_scaling = str(path), True
    if any(key.startswith("unet.") for key in state):  # our consolidated Denoiser export
        denoiser = build_denoiser(_inference_model_config(cfg), cfg.conditioner)
        _load_denoiser_state(denoiser, state, str(path))
    elif path.is_dir() and (path / RUN_CONFIG).is_file():  # our folder export: U-Net + extras (layout)
        from ldmscale.models.interop import load_unet_weights

        denoiser = build_denoiser(_inference_model_config(cfg), cfg.conditioner)
        load_unet_weights(denoiser.unet, path)
        if (path / DENOISER_EXTRAS).is_file():
            extras = read_weights(path / DENOISER_EXTRAS, what=str(path / DENOISER_EXTRAS))
            unexpected = denoiser.load_state_dict(extras, strict=False)[1]
            if unexpected:
                raise ValueError(f"{path / DENOISER_EXTRAS}: {unexpected[:5]} do not fit the configured denoiser")
    else:
        denoiser = _denoiser_from_unet_checkpoint(path, cfg, original)
    if path.is_dir():
        cfg.diffusion = diffusion_from_scheduler_config(path, cfg.diffusion)
        if not cfg.autoencoder.weights and (path / "vae").is_dir():
            cfg.autoencoder.weights, own_scaling = str(path), True
    text_encoder = denoiser.conditioning.build_frozen(device)
    same_file = original is not None and Path(cfg.autoencoder.weights or "") == path
    autoencoder = _configured_autoencoder(cfg, own_scaling, device, original if same_file else None)
    return Run(cfg, denoiser.to(device).eval(), autoencoder, text_encoder)


def _configured_autoencoder(cfg: Config, own_scaling: bool, device: torch.device | str,
                            original_config: Optional[dict[str, Any]] = None) -> nn.Module:
    """cfg.autoencoder.weights with the latent scaling the denoiser was trained with (the run's config, or
    the one that comes with the autoencoder: a diffusers pipeline's VAE config, an LDM/SD file's yaml);
    unset, a seed-0 random autoencoder, loudly."""
    from ldmscale.models import build_autoencoder, load_autoencoder

    if cfg.autoencoder.weights:
        scaling = {} if own_scaling else dict(scale_factor=cfg.autoencoder.scale_factor,
                                              shift_factor=cfg.autoencoder.shift_factor)
        return load_autoencoder(autoencoder_path(cfg.autoencoder.weights), original_config,
                                **scaling).to(device).eval()
    warnings.warn("autoencoder.weights is not set: decoding with a randomly initialised (seed 0) "
                  "autoencoder; set autoencoder.weights (or -o autoencoder.weights=PATH) for real images",
                  stacklevel=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # only matters for an untrained autoencoder: the same one in every call
        return build_autoencoder(cfg.autoencoder).to(device).eval()
