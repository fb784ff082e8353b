"""python -m ldmscale.sample: a checkpoint + prompts / class ids / boxes / low-res image / mask -> PNGs.

Writes OUT/grid.png, OUT/images/NNNNNN.png (one per image) and OUT/settings.json (everything needed to
reproduce the images: checkpoint, weights (EMA or raw), sampler settings, per-image seeds, conditions).
Image i always uses seed `seed + i`, so the same command gives the same images whatever --batch-size.

The library entry point is `generate(...)`; the CLI only loads models (`load_models`) and writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ldmscale.conditioning import Conditioning, SamplingConditions, SamplingContext, kind_named
from ldmscale.conditioning.kinds import IMAGE_FLAGS, image_inputs
from ldmscale.config import Config, DiffusionConfig
from ldmscale.diffusion.samplers import generators_for_seeds, guided_model_fn, randn, sample
from ldmscale.diffusion.schedules import Schedule

# ---------------------------------------------------------------------------- conditions
Conditions = SamplingConditions  # the name callers of build_conditions know


def conditioning_of(cond_kind: str | Conditioning, denoiser: Optional[nn.Module] = None,
                    num_classes: Optional[int] = None) -> Conditioning:
    """The kind object: given, the denoiser's own (built from its config), or the named kind's defaults."""
    if isinstance(cond_kind, Conditioning):
        return cond_kind
    own = getattr(denoiser, "conditioning", None)
    if isinstance(own, Conditioning) and own.name == cond_kind:
        return own
    return kind_named(cond_kind, num_classes=num_classes or 0)


def build_conditions(cond_kind: str | Conditioning, index: Sequence[int], *, latent_hw: tuple[int, int],
                     device: torch.device, text_encoder: Any = None, autoencoder: Optional[nn.Module] = None,
                     denoiser: Optional[nn.Module] = None, num_classes: Optional[int] = None,
                     need_uncond: bool = False, generator: Optional[torch.Generator] = None,
                     image_hw: Optional[tuple[int, int]] = None, **inputs: Any) -> Conditions:
    """Conditions of the images `index` (rows of the per-image `inputs`: prompts, class_labels, boxes, ...)
    for a denoiser of `cond_kind`; the kind decides what they become."""
    conditioning = conditioning_of(cond_kind, denoiser, num_classes)
    factor = getattr(autoencoder, "downsample_factor", 1) if autoencoder is not None else 1
    ctx = SamplingContext(torch.as_tensor(list(index), dtype=torch.long), latent_hw,
                          image_hw or (latent_hw[0] * factor, latent_hw[1] * factor), device, text_encoder,
                          autoencoder, denoiser, generator)
    out = conditioning.sampling_conditions(inputs, ctx)
    if need_uncond:
        out.uncond = {**out.cond, **conditioning.null(out.cond)}
    return out


# ---------------------------------------------------------------------------- generate
@dataclass
class Generation:
    images: Tensor  # [N, 3, H, W] float32 in [0, 1]
    latents: Tensor  # [N, C, h, w] the sampled (scaled) latents
    seeds: list[int]
    settings: dict[str, Any]


def _count(conditioning: Conditioning, num_images: Optional[int], inputs: dict[str, Any]) -> int:
    given = {name: len(value) for name, value in inputs.items()
             if value is not None and _per_image(conditioning, name, value)}
    if len(set(given.values())) > 1:
        raise ValueError(f"per-image inputs disagree on the number of images: {given}")
    if given:
        return next(iter(given.values()))
    if num_images is None:
        if conditioning.sampling_inputs:
            raise ValueError(f"conditioner.kind={conditioning.name!r} needs its inputs "
                             f"({', '.join(conditioning.sampling_inputs)})")
        return 1
    return num_images


# Inputs with one entry per image whatever the kind (image/mask: RePaint blending works for any kind).
PER_IMAGE = ("prompts", "class_labels", "boxes", "box_classes", "low_res", "image", "mask")


def _per_image(conditioning: Conditioning, name: str, value: Any) -> bool:
    """A kind's `sampling_inputs` and PER_IMAGE hold one entry per image; any other input (e.g. SDXL's
    original_size) is per image only when it has a batch axis ([N, 2]), else it applies to every image."""
    if name in PER_IMAGE or name in conditioning.sampling_inputs:
        return True
    return torch.as_tensor(value).dim() >= 2


def _repeat(value: Any, times: int) -> Any:
    if value is None or times == 1:
        return value
    if isinstance(value, Tensor):
        return value.repeat_interleave(times, dim=0)
    return [item for item in value for _ in range(times)]


def generate(denoiser: nn.Module, autoencoder: Optional[nn.Module], text_encoder: Any,
             cond_kind: str | Conditioning, *, diffusion_cfg: DiffusionConfig,
             prompts: Optional[Sequence[str]] = None,
             class_labels: Optional[Sequence[int] | Tensor] = None, boxes: Optional[Tensor] = None,
             box_classes: Optional[Tensor] = None, low_res: Optional[Tensor] = None,
             image: Optional[Tensor] = None, mask: Optional[Tensor] = None, num_images: Optional[int] = None,
             images_per_condition: int = 1, seed: int = 0, seeds: Optional[Sequence[int]] = None,
             height: int = 32, width: int = 32,
             sampler: Optional[str] = None, num_steps: Optional[int] = None,
             guidance_scale: Optional[float] = None, guidance_rescale: Optional[float] = None,
             eta: Optional[float] = None, karras_sigmas: Optional[bool] = None,
             timestep_spacing: Optional[str] = None, trained_ucg_rate: Optional[float] = None,
             num_classes: Optional[int] = None, batch_size: int = 8, progress: bool = True,
             device: Optional[torch.device | str] = None, **kind_inputs: Any) -> Generation:
    """Sample images from a stage-2 denoiser and decode them; image i uses seed `seed + i` (or `seeds[i]`).

    cond_kind: a kind name or its `Conditioning` (the denoiser's own is used when the names agree).
    Sampler settings default to `diffusion_cfg` (sampler, num_sampling_steps, guidance_scale, ...).
    height/width are in pixels and need not be the training size (the U-Net is convolutional).
    Inpainting (image [N,3,H,W] in [-1,1], mask [N,1,H,W], 1 = generate) goes through the concat input of
    an `inpaint` model, or through RePaint-style latent blending for any other model. kind_inputs: further
    inputs a kind takes (e.g. sdxl: original_size, crop_top_left, target_size as (h, w) / [N, 2]).
    """
    conditioning = conditioning_of(cond_kind, denoiser, num_classes)
    device = torch.device(device) if device is not None else next(denoiser.parameters()).device
    sampler = sampler or diffusion_cfg.sampler
    num_steps = num_steps or diffusion_cfg.num_sampling_steps
    if guidance_scale is None:  # the config's default: drop it quietly where it cannot apply
        guidance_scale = diffusion_cfg.guidance_scale
        unguidable = not conditioning.guidable or (trained_ucg_rate is not None and trained_ucg_rate <= 0)
        if unguidable and guidance_scale != 1.0:
            warnings.warn(f"diffusion.guidance_scale={guidance_scale} ignored: a {conditioning.name!r} model "
                          f"trained with ucg_rate={trained_ucg_rate} has no unconditional mode; sampling with "
                          "scale 1.0", stacklevel=2)
            guidance_scale = 1.0
    elif not conditioning.guidable and guidance_scale != 1.0:
        raise ValueError(f"guidance_scale={guidance_scale}: conditioner.kind={conditioning.name!r} has nothing to "
                         "guide (concat inputs are never dropped in training); use 1.0")
    guidance_rescale = diffusion_cfg.guidance_rescale if guidance_rescale is None else guidance_rescale
    eta = diffusion_cfg.eta if eta is None else eta
    karras_sigmas = diffusion_cfg.karras_sigmas if karras_sigmas is None else karras_sigmas
    timestep_spacing = timestep_spacing or diffusion_cfg.timestep_spacing
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, dtype=torch.long)
    inputs = dict(prompts=prompts, class_labels=class_labels, boxes=boxes, box_classes=box_classes,
                  low_res=low_res, image=image, mask=mask, **kind_inputs)
    n_cond = _count(conditioning, num_images, inputs)
    inputs = {k: _repeat(v, images_per_condition) if v is not None and _per_image(conditioning, k, v) else v
              for k, v in inputs.items()}
    total = n_cond * images_per_condition

    factor = getattr(autoencoder, "downsample_factor", 1) if autoencoder is not None else 1
    if height % factor or width % factor:
        raise ValueError(f"height={height} and width={width} must be multiples of the autoencoder's "
                         f"downsample factor {factor}")
    latent_hw = (height // factor, width // factor)
    channels = getattr(autoencoder, "latent_channels", None) or denoiser.unet.out_channels
    schedule = Schedule.from_config(diffusion_cfg.schedule)
    if seeds is None:
        seeds = [seed + i for i in range(total)]
    elif len(seeds) != total:
        raise ValueError(f"got {len(seeds)} seeds for {total} images")
    seeds = [int(s) for s in seeds]

    denoiser.eval()
    all_latents, all_images = [], []
    batches = range(0, total, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"sampling {total} image(s)", unit="batch")
    for start in batches:
        index = list(range(start, min(start + batch_size, total)))
        generators = generators_for_seeds([seeds[i] for i in index])
        x_T = randn((len(index), channels, *latent_hw), generators, device)
        conditions = build_conditions(
            conditioning, index, latent_hw=latent_hw, device=device, text_encoder=text_encoder,
            autoencoder=autoencoder, denoiser=denoiser, need_uncond=guidance_scale != 1.0,
            generator=torch.Generator().manual_seed(seeds[index[0]]), image_hw=(height, width), **inputs)
        blended = conditions.inpaint_mask is not None
        model_fn = guided_model_fn(denoiser, conditions.cond, conditions.uncond, guidance_scale, guidance_rescale,
                                   trained_ucg_rate=trained_ucg_rate)
        with torch.no_grad():
            latents = sample(model_fn, x_T, sampler=sampler, num_steps=num_steps, schedule=schedule,
                             prediction_type=diffusion_cfg.prediction_type, eta=eta, generator=generators,
                             timestep_spacing=timestep_spacing, karras_sigmas=karras_sigmas,
                             inpaint_mask=conditions.inpaint_mask, inpaint_latents=conditions.inpaint_latents,
                             progress=progress)
            if autoencoder is not None:
                pixels = autoencoder.decode(autoencoder.unscale_latents(latents)).float()
            else:
                pixels = latents[:, :3]
        all_latents.append(latents.cpu())
        all_images.append(((pixels.clamp(-1, 1) + 1) / 2).cpu())

    settings = dict(cond_kind=conditioning.name, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                    guidance_rescale=guidance_rescale, eta=eta, karras_sigmas=karras_sigmas,
                    timestep_spacing=timestep_spacing, prediction_type=diffusion_cfg.prediction_type,
                    schedule=dict(vars(diffusion_cfg.schedule)), seed=seed, seeds=seeds, height=height,
                    width=width, latent_size=list(latent_hw), num_images=total,
                    images_per_condition=images_per_condition,
                    prompts=list(inputs["prompts"]) if inputs["prompts"] is not None else None,
                    class_ids=inputs["class_labels"].tolist() if inputs["class_labels"] is not None else None,
                    inpainting=("blend" if blended else "concat") if image is not None else None,
                    **{k: v.tolist() if isinstance(v, Tensor) else v for k, v in kind_inputs.items()})
    return Generation(torch.cat(all_images), torch.cat(all_latents), seeds, settings)


# ---------------------------------------------------------------------------- loading
@dataclass
class LoadedModels:
    cfg: Config
    denoiser: nn.Module
    autoencoder: Optional[nn.Module]
    text_encoder: Any


def _read_config(path: Path) -> Config:
    from omegaconf import OmegaConf

    from ldmscale.config import to_object

    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = json.loads(path.read_text()) if path.suffix == ".json" else OmegaConf.to_container(OmegaConf.load(path))
    return to_object(OmegaConf.create(raw))


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


def load_run_dir(run_dir: Path, ema: bool = True, overrides: Sequence[str] = ()) -> LoadedModels:
    """THE hook for training run directories: config + consolidated (EMA or raw) denoiser + encoders.

    1. run_dir/export/denoiser_ema.safetensors (denoiser.safetensors for raw weights), if exported there
       (`python tools/export_checkpoint.py RUN --out RUN/export/denoiser_ema.safetensors`): read directly;
    2. otherwise `ldmscale.checkpoint.load_run_models(run_dir, ema=ema)` (training module), which
       consolidates the latest DeepSpeed checkpoint offline -> (cfg, denoiser, autoencoder, text_encoder).
    """
    weights = run_dir / "export" / ("denoiser_ema.safetensors" if ema else "denoiser.safetensors")
    if not weights.is_file():
        try:
            from ldmscale.checkpoint import load_run_models  # type: ignore[attr-defined]
        except ImportError as err:
            raise FileNotFoundError(
                f"{run_dir} has no exported weights {weights}, and this ldmscale has no "
                "ldmscale.checkpoint.load_run_models to consolidate its checkpoint; export the run "
                f"(tools/export_checkpoint.py {run_dir} --out {weights})") from err
        cfg, denoiser, autoencoder, text_encoder = load_run_models(run_dir, ema=ema, overrides=list(overrides))
        return LoadedModels(cfg, denoiser, autoencoder, text_encoder)
    from ldmscale.config import apply_overrides
    from ldmscale.models import build_denoiser

    cfg = apply_overrides(_read_config(run_dir / "config.json"), list(overrides))
    denoiser = build_denoiser(dataclasses.replace(cfg.model, weights=None), cfg.conditioner)
    _load_state(denoiser, weights, ema)
    return LoadedModels(cfg, denoiser, None, None)


def _read_state(path: Path, ema: bool) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in (("ema", "model_ema", "state_dict", "model") if ema else ("model", "state_dict")):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def _load_state(denoiser: nn.Module, path: Path, ema: bool) -> None:
    """A Denoiser state dict (our export) or a bare U-Net one."""
    state = _read_state(path, ema)
    target = denoiser if any(k.startswith("unet.") for k in state) else denoiser.unet
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the configured denoiser: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}; check --config / model overrides")


def is_run_dir(path: Path) -> bool:
    """A training run directory: config.json holds a resolved Config (not a model export's config)."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and "diffusion" in data and "model" in data


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


def load_models(checkpoint: str | Path, *, ema: bool = True, config: Optional[str | Path] = None,
                overrides: Sequence[str] = (), device: torch.device | str = "cpu") -> LoadedModels:
    """A run directory, our export, or any U-Net format `ldmscale.models` loads -> all sampling models.

    The config comes from the run directory, from --config, from a config.json beside the weights, or from
    composing `overrides` (as `python -m ldmscale.train OVERRIDES` would). A diffusers pipeline folder also
    supplies the process (scheduler config) and, unless autoencoder.weights is set, the VAE.
    """
    from ldmscale.config import apply_overrides, compose
    from ldmscale.models import build_autoencoder, build_denoiser

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    pipeline_vae: Optional[str] = None
    if is_run_dir(path) and config is None:
        loaded = load_run_dir(path, ema, overrides)
        cfg, denoiser = loaded.cfg, loaded.denoiser
        if loaded.autoencoder is not None:
            text_encoder = loaded.text_encoder
            if text_encoder is not None and hasattr(text_encoder, "to"):
                text_encoder = text_encoder.to(device)
            return LoadedModels(cfg, denoiser.to(device).eval(), loaded.autoencoder.to(device).eval(),
                                text_encoder)
    else:
        # The model's own config (given, beside the weights, or carried by the export), then -o settings;
        # only a bare checkpoint is described by composing the overrides as `ldmscale.train` would.
        own = (_read_config(Path(config)) if config is not None
               else _read_config(path.parent / "config.json") if path.is_file() and is_run_dir(path.parent)
               else config_of_export(path))
        cfg = apply_overrides(own, list(overrides)) if own is not None else compose(list(overrides))
        if path.is_file() and path.suffix in (".safetensors", ".pt", ".pth") and \
                any(key.startswith("unet.") for key in _read_state(path, ema)):
            denoiser = build_denoiser(cfg.model, cfg.conditioner)  # our consolidated Denoiser export
            _load_state(denoiser, path, ema)
        elif path.is_dir() and (path / RUN_CONFIG).is_file():  # our folder export: U-Net + extras (layout)
            from ldmscale.models.interop import load_unet_weights

            denoiser = build_denoiser(dataclasses.replace(cfg.model, weights=None), cfg.conditioner)
            load_unet_weights(denoiser.unet, path)
            if (path / DENOISER_EXTRAS).is_file():
                unexpected = denoiser.load_state_dict(_read_state(path / DENOISER_EXTRAS, ema), strict=False)[1]
                if unexpected:
                    raise ValueError(f"{path / DENOISER_EXTRAS}: {unexpected[:5]} do not fit the configured denoiser")
        else:
            denoiser = _denoiser_from_unet_checkpoint(path, cfg)
        if path.is_dir():
            cfg.diffusion = diffusion_from_scheduler_config(path, cfg.diffusion)
            if not cfg.autoencoder.weights and (path / "vae").is_dir():
                pipeline_vae = cfg.autoencoder.weights = str(path)
    if cfg.autoencoder.weights:
        from ldmscale.models import load_autoencoder

        # the latent scaling the denoiser was trained with: the run's config, or the pipeline's VAE config
        scaling = {} if pipeline_vae else dict(scale_factor=cfg.autoencoder.scale_factor,
                                               shift_factor=cfg.autoencoder.shift_factor)
        autoencoder = load_autoencoder(cfg.autoencoder.weights, **scaling).to(device).eval()
    else:
        warnings.warn("autoencoder.weights is not set: decoding with a randomly initialised (seed 0) "
                      "autoencoder; set autoencoder.weights (or -o autoencoder.weights=PATH) for real images",
                      stacklevel=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # only matters for an untrained autoencoder: the same one in every call
            autoencoder = build_autoencoder(cfg.autoencoder).to(device).eval()
    text_encoder = denoiser.conditioning.build_frozen(device)
    return LoadedModels(cfg, denoiser.to(device).eval(), autoencoder, text_encoder)


def to_uint8(images: Tensor) -> Any:
    """[N, 3, H, W] in [0, 1] -> uint8 numpy [N, H, W, 3], as the saved PNGs hold them."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: Tensor) -> list[Any]:
    """[N, 3, H, W] in [0, 1] -> PIL images."""
    from PIL import Image

    return [Image.fromarray(array) for array in to_uint8(images)]


def generate_from_run(checkpoint: str | Path, prompts: Optional[Sequence[str]] = None, *,
                      seeds: Optional[Sequence[int]] = None, seed: int = 0, ema: bool = True,
                      batch_size: int = 8, device: Optional[torch.device | str] = None,
                      progress: bool = True, **kwargs: Any) -> list[Any]:
    """A run directory (or any checkpoint `load_models` reads) + prompts -> PIL images, one per prompt.

    Sampler settings and the image size come from the run's config unless given in kwargs (see generate).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = load_models(checkpoint, ema=ema, device=device)
    cfg = models.cfg
    kwargs.setdefault("height", cfg.data.resolution)
    kwargs.setdefault("width", cfg.data.resolution)
    generation = generate(models.denoiser, models.autoencoder, models.text_encoder, models.denoiser.conditioning,
                          diffusion_cfg=cfg.diffusion, prompts=prompts, seeds=seeds, seed=seed,
                          trained_ucg_rate=cfg.conditioner.ucg_rate, batch_size=batch_size,
                          progress=progress, device=device, **kwargs)
    return to_pil(generation.images)


# ---------------------------------------------------------------------------- files
def save_outputs(generation: Generation, out_dir: str | Path, extra_settings: dict[str, Any]) -> Path:
    """grid.png, images/NNNNNN.png and settings.json under out_dir (written image by image)."""
    from torchvision.utils import make_grid

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(to_pil(generation.images)):
        name = f"images/{i:06d}.png"
        img.save(out / name)
        files.append(name)
    nrow = max(1, math.ceil(math.sqrt(len(generation.images))))
    to_pil(make_grid(generation.images, nrow=nrow, padding=2)[None])[0].save(out / "grid.png")
    settings = {**generation.settings, **extra_settings, "files": files, "grid": "grid.png"}
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldmscale.sample", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run dir, our export, LDM/SD file or diffusers folder")
    p.add_argument("--config", help="config.json/yaml of the model (default: the run dir's or beside the file)")
    p.add_argument("--override", "-o", action="append", default=[], help="config override, e.g. model=tiny")
    p.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    from ldmscale.conditioning import KINDS

    added: set[str] = set()
    for flag, kwargs in [f for cls in KINDS.values() for f in cls.cli_flags] + list(IMAGE_FLAGS):
        if flag not in added:  # each kind's sampling inputs; flags shared by kinds are declared identically
            p.add_argument(flag, **kwargs)
            added.add(flag)
    p.add_argument("--num-images", type=int, help="images per condition (unconditional: total)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp_2m", "euler", "euler_a"])
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--guidance-rescale", type=float)
    p.add_argument("--eta", type=float)
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigmas (dpmpp_2m, euler)")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, help="pixels (default: data.resolution)")
    p.add_argument("--width", type=int, help="pixels (default: data.resolution)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = build_parser().parse_args(argv)
    started = time.time()
    models = load_models(args.checkpoint, ema=not args.raw, config=args.config, overrides=args.override,
                         device=args.device)
    cfg, conditioning = models.cfg, models.denoiser.conditioning
    height = args.height or cfg.data.resolution
    width = args.width or cfg.data.resolution
    inputs = {**conditioning.cli_inputs(args, height, width), **image_inputs(args, height, width)}
    unconditional = not conditioning.sampling_inputs and "image" not in inputs
    generation = generate(
        models.denoiser, models.autoencoder, models.text_encoder, conditioning, diffusion_cfg=cfg.diffusion,
        num_images=args.num_images if unconditional else None,
        images_per_condition=1 if unconditional else (args.num_images or 1), seed=args.seed, height=height,
        width=width, sampler=args.sampler, num_steps=args.steps, guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale, eta=args.eta, karras_sigmas=args.karras,
        timestep_spacing=args.spacing, trained_ucg_rate=cfg.conditioner.ucg_rate, batch_size=args.batch_size,
        progress=not args.no_progress, device=args.device, **inputs)
    out = save_outputs(generation, args.out, dict(checkpoint=str(args.checkpoint), weights="raw" if args.raw else "ema",
                                                  config=args.config, overrides=args.override,
                                                  seconds=round(time.time() - started, 3)))
    print(f"wrote {len(generation.images)} image(s) to {out} (grid.png, images/, settings.json)")
    return out


if __name__ == "__main__":
    main()
