"""Generation from conditions: initial noise per seed, the sampler, classifier-free guidance, decoding.

The one sampling library: `python -m ldmscale.sample` (a thin CLI), the trainer's sample grids and the
evaluation all call `generate(models, inputs, settings)`. Image i always uses seed `settings.seed + i`
(or `settings.seeds[i]`), so the same call gives the same images whatever the batch size.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from ldmscale.conditioning import Conditioning, SamplingConditions, SamplingContext, kind_named
from ldmscale.config import DiffusionConfig
from ldmscale.diffusion.samplers import generators_for_seeds, guided_model_fn, randn, sample
from ldmscale.diffusion.schedules import Schedule

if TYPE_CHECKING:
    from ldmscale.runs import Run



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


@dataclass
class SampleInputs:
    """What to generate: per-image conditions for the model's kind (one row per image), or a count."""

    prompts: Optional[Sequence[str]] = None
    class_labels: Optional[Sequence[int] | Tensor] = None
    boxes: Optional[Tensor] = None  # [N, B, 4] in [0, 1]
    box_classes: Optional[Tensor] = None  # [N, B], -1 = padding
    low_res: Optional[Tensor] = None  # [N, 3, h, w] in [-1, 1] (super-resolution)
    image: Optional[Tensor] = None  # [N, 3, H, W] in [-1, 1] (inpainting) ...
    mask: Optional[Tensor] = None  # ... with [N, 1, H, W], 1 = generate
    num_images: Optional[int] = None  # unconditional models: how many
    images_per_condition: int = 1
    kind_inputs: dict[str, Any] = field(default_factory=dict)  # further inputs a kind takes (sdxl: original_size)

    @classmethod
    def of(cls, inputs: dict[str, Any], **counts: Any) -> SampleInputs:
        """From a dict of named inputs (a kind's cli_inputs / grid_inputs); unknown names are kind inputs."""
        known = {k: v for k, v in inputs.items() if k in cls.__dataclass_fields__}
        return cls(**known, **counts, kind_inputs={k: v for k, v in inputs.items() if k not in known})


def cycled_inputs(conditioning: Conditioning, indices: Sequence[int], prompts: Sequence[str] = ()) -> SampleInputs:
    """Inputs of images `indices` of a fixed set (evaluation): the kind's grid inputs for the prompt list
    cycled over every index (text: prompt i mod P, class: class i mod C, unconditional: a count)."""
    count = max(indices) + 1
    full = conditioning.grid_inputs([prompts[i % len(prompts)] for i in range(count)] if prompts else [""] * count)
    if full is None:
        raise ValueError(f"conditioner.kind={conditioning.name!r} needs per-image inputs (boxes, low-res or masked "
                         "images) that a fixed prompt/class set cannot make: evaluate it on held-out inputs")
    rows = {k: [v[i] for i in indices] if isinstance(v, list) else v[torch.as_tensor(list(indices))]
            for k, v in full.items() if k != "num_images"}
    return SampleInputs.of(rows, **({"num_images": len(indices)} if "num_images" in full else {}))


@dataclass
class SamplingSettings:
    """How to sample. None takes the run's config (diffusion.*, data.resolution for the size)."""

    sampler: Optional[str] = None
    num_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    guidance_rescale: Optional[float] = None
    eta: Optional[float] = None
    karras_sigmas: Optional[bool] = None
    timestep_spacing: Optional[str] = None
    seed: int = 0
    seeds: Optional[Sequence[int]] = None  # per image; overrides seed + i
    height: Optional[int] = None  # pixels; need not be the training size (the U-Net is convolutional)
    width: Optional[int] = None
    batch_size: int = 8
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in Generation.settings as is


def _guidance_scale(settings: SamplingSettings, conditioning: Conditioning, ucg_rate: float,
                    diffusion_cfg: DiffusionConfig) -> float:
    """The asked scale; the config's default is dropped quietly (with a warning) where it cannot apply."""
    if settings.guidance_scale is not None:
        if not conditioning.guidable and settings.guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={settings.guidance_scale}: conditioner.kind={conditioning.name!r} "
                             "has nothing to guide (concat inputs are never dropped in training); use 1.0")
        return settings.guidance_scale
    scale = diffusion_cfg.guidance_scale
    if (not conditioning.guidable or ucg_rate <= 0) and scale != 1.0:
        warnings.warn(f"diffusion.guidance_scale={scale} ignored: a {conditioning.name!r} model trained with "
                      f"ucg_rate={ucg_rate} has no unconditional mode; sampling with scale 1.0", stacklevel=3)
        return 1.0
    return scale


def generate(models: Run, inputs: SampleInputs, settings: Optional[SamplingSettings] = None,
             device: Optional[torch.device | str] = None) -> Generation:
    """Sample images from a stage-2 run's denoiser and decode them (see SampleInputs / SamplingSettings).

    Inpainting goes through the concat input of an `inpaint` model, or through RePaint-style latent
    blending for any other model.
    """
    settings = settings or SamplingSettings()
    cfg = models.cfg
    diffusion_cfg, ucg_rate = cfg.diffusion, cfg.conditioner.ucg_rate
    denoiser, autoencoder = models.denoiser, models.autoencoder
    conditioning = conditioning_of(cfg.conditioner.kind, denoiser, cfg.conditioner.num_classes)
    device = torch.device(device) if device is not None else next(denoiser.parameters()).device
    sampler = settings.sampler or diffusion_cfg.sampler
    num_steps = settings.num_steps or diffusion_cfg.num_sampling_steps
    guidance_scale = _guidance_scale(settings, conditioning, ucg_rate, diffusion_cfg)
    guidance_rescale = diffusion_cfg.guidance_rescale if settings.guidance_rescale is None else settings.guidance_rescale
    eta = diffusion_cfg.eta if settings.eta is None else settings.eta
    karras_sigmas = diffusion_cfg.karras_sigmas if settings.karras_sigmas is None else settings.karras_sigmas
    timestep_spacing = settings.timestep_spacing or diffusion_cfg.timestep_spacing
    height, width = settings.height or cfg.data.resolution, settings.width or cfg.data.resolution
    class_labels = None if inputs.class_labels is None else torch.as_tensor(inputs.class_labels, dtype=torch.long)
    per_image = dict(prompts=inputs.prompts, class_labels=class_labels, boxes=inputs.boxes,
                     box_classes=inputs.box_classes, low_res=inputs.low_res, image=inputs.image, mask=inputs.mask,
                     **inputs.kind_inputs)
    n_cond = _count(conditioning, inputs.num_images, per_image)
    per = inputs.images_per_condition
    per_image = {k: _repeat(v, per) if v is not None and _per_image(conditioning, k, v) else v
                 for k, v in per_image.items()}
    total = n_cond * per

    factor = getattr(autoencoder, "downsample_factor", 1) if autoencoder is not None else 1
    if height % factor or width % factor:
        raise ValueError(f"height={height} and width={width} must be multiples of the autoencoder's "
                         f"downsample factor {factor}")
    latent_hw = (height // factor, width // factor)
    channels = getattr(autoencoder, "latent_channels", None) or denoiser.unet.out_channels
    schedule = Schedule.from_config(diffusion_cfg.schedule)
    if settings.seeds is None:
        seeds = [settings.seed + i for i in range(total)]
    elif len(settings.seeds) != total:
        raise ValueError(f"got {len(settings.seeds)} seeds for {total} images")
    else:
        seeds = [int(s) for s in settings.seeds]

    denoiser.eval()
    all_latents, all_images = [], []
    batches = range(0, total, settings.batch_size)
    if settings.progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"sampling {total} image(s)", unit="batch")
    for start in batches:
        index = list(range(start, min(start + settings.batch_size, total)))
        generators = generators_for_seeds([seeds[i] for i in index])
        x_T = randn((len(index), channels, *latent_hw), generators, device)
        conditions = build_conditions(
            conditioning, index, latent_hw=latent_hw, device=device, text_encoder=models.text_encoder,
            autoencoder=autoencoder, denoiser=denoiser, need_uncond=guidance_scale != 1.0,
            generator=torch.Generator().manual_seed(seeds[index[0]]), image_hw=(height, width), **per_image)
        blended = conditions.inpaint_mask is not None
        model_fn = guided_model_fn(denoiser, conditions.cond, conditions.uncond, guidance_scale, guidance_rescale,
                                   trained_ucg_rate=ucg_rate)
        with torch.no_grad():
            latents = sample(model_fn, x_T, sampler=sampler, num_steps=num_steps, schedule=schedule,
                             prediction_type=diffusion_cfg.prediction_type, eta=eta, generator=generators,
                             timestep_spacing=timestep_spacing, karras_sigmas=karras_sigmas,
                             inpaint_mask=conditions.inpaint_mask, inpaint_latents=conditions.inpaint_latents,
                             progress=settings.progress)
            if autoencoder is not None:
                pixels = autoencoder.decode(autoencoder.unscale_latents(latents)).float()
            else:
                pixels = latents[:, :3]
        all_latents.append(latents.cpu())
        all_images.append(((pixels.clamp(-1, 1) + 1) / 2).cpu())

    record = dict(cond_kind=conditioning.name, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                  guidance_rescale=guidance_rescale, eta=eta, karras_sigmas=karras_sigmas,
                  timestep_spacing=timestep_spacing, prediction_type=diffusion_cfg.prediction_type,
                  schedule=dict(vars(diffusion_cfg.schedule)), seed=settings.seed, seeds=seeds, height=height,
                  width=width, latent_size=list(latent_hw), num_images=total, images_per_condition=per,
                  prompts=list(per_image["prompts"]) if per_image["prompts"] is not None else None,
                  class_ids=per_image["class_labels"].tolist() if per_image["class_labels"] is not None else None,
                  inpainting=("blend" if blended else "concat") if inputs.image is not None else None,
                  **{k: v.tolist() if isinstance(v, Tensor) else v for k, v in inputs.kind_inputs.items()},
                  **settings.extra)
    return Generation(torch.cat(all_images), torch.cat(all_latents), seeds, record)


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
    """A run directory (or anything `ldmscale.runs.load` opens) + prompts -> PIL images, one per prompt.

    Sampler settings and the image size come from the run's config unless given in kwargs (fields of
    SampleInputs or SamplingSettings).
    """
    from ldmscale.runs import load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = load(checkpoint, ema=ema, device=device)
    input_names = {f.name for f in dataclasses.fields(SampleInputs)}
    inputs = SampleInputs(prompts=prompts, **{k: v for k, v in kwargs.items() if k in input_names})
    settings = SamplingSettings(seeds=seeds, seed=seed, batch_size=batch_size, progress=progress,
                                **{k: v for k, v in kwargs.items() if k not in input_names})
    return to_pil(generate(models, inputs, settings, device=device).images)
