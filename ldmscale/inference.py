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

from ldmscale.diffusion.samplers import generators_for_seeds, guided_model_fn, randn, sample
from ldmscale.diffusion.schedules import Schedule

if TYPE_CHECKING:
    from ldmscale.runs import Run

COND_KINDS = ("text", "class", "layout", "sr", "inpaint", "none")
UNGUIDABLE = ("sr", "inpaint", "none")  # concat inputs are never dropped in training: nothing to guide


# ---------------------------------------------------------------------------- conditions
def _null_conditions(cond: dict[str, Tensor], kind: str, num_classes: Optional[int]) -> dict[str, Tensor]:
    from ldmscale.models.conditioners import null_conditions

    return null_conditions(cond, kind, num_classes)


def _latents_of(autoencoder: nn.Module, pixels: Tensor, generator: torch.Generator) -> Tensor:
    """Pixels in [-1, 1] -> the scaled latent space the denoiser works in."""
    moments = autoencoder.encode_moments(pixels)
    latents = autoencoder.latent_from_moments(moments.float(), generator=generator)
    return autoencoder.scale_latents(latents)


@dataclass
class Conditions:
    """Everything sample() needs for one batch besides x_T."""

    cond: dict[str, Tensor] = field(default_factory=dict)
    uncond: Optional[dict[str, Tensor]] = None
    inpaint_mask: Optional[Tensor] = None  # RePaint-style blending (models without concat inputs)
    inpaint_latents: Optional[Tensor] = None


def build_conditions(cond_kind: str, index: Sequence[int], *, latent_hw: tuple[int, int],
                     device: torch.device, text_encoder: Any = None, autoencoder: Optional[nn.Module] = None,
                     denoiser: Optional[nn.Module] = None, prompts: Optional[Sequence[str]] = None,
                     class_labels: Optional[Tensor] = None, boxes: Optional[Tensor] = None,
                     box_classes: Optional[Tensor] = None, low_res: Optional[Tensor] = None,
                     image: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                     num_classes: Optional[int] = None, need_uncond: bool = False,
                     generator: Optional[torch.Generator] = None) -> Conditions:
    """Conditions of the images `index` (rows of the per-image inputs) for a denoiser of `cond_kind`."""
    import torch.nn.functional as F

    from ldmscale.models.conditioners import inpaint_concat, upsample_low_res

    rows = torch.as_tensor(list(index), dtype=torch.long)
    cond: dict[str, Tensor] = {}
    if cond_kind == "text":
        if text_encoder is None or prompts is None:
            raise ValueError("conditioner.kind='text' needs a text encoder and --prompt")
        with torch.no_grad():
            encoding = text_encoder.encode([prompts[i] for i in index])
        cond = {"context": encoding.tokens.to(device), "context_mask": encoding.mask.to(device),
                "pooled": encoding.pooled.to(device)}
    elif cond_kind == "class":
        if class_labels is None:
            raise ValueError("conditioner.kind='class' needs --class-ids")
        cond = {"class_labels": class_labels[rows].to(device)}
    elif cond_kind == "layout":
        if boxes is None or box_classes is None:
            raise ValueError("conditioner.kind='layout' needs --boxes")
        cond = {"boxes": boxes[rows].to(device), "box_classes": box_classes[rows].to(device)}
    elif cond_kind == "sr":
        if low_res is None:
            raise ValueError("conditioner.kind='sr' needs --low-res")
        cond = {"concat": upsample_low_res(low_res[rows].to(device), latent_hw)}
    elif cond_kind not in ("inpaint", "none"):
        raise ValueError(f"conditioner.kind={cond_kind!r} is not one of {list(COND_KINDS)}")

    out = Conditions(cond)
    if (image is None) != (mask is None):
        raise ValueError("inpainting needs both --image and --mask")
    concat_channels = getattr(denoiser, "concat_channels", 0)
    if cond_kind == "inpaint" and image is None:
        raise ValueError("conditioner.kind='inpaint' needs --image and --mask")
    if image is not None:
        if autoencoder is None:
            raise ValueError("inpainting needs the autoencoder to encode --image")
        pixels, fill = image[rows].to(device), mask[rows].to(device).float()  # fill: 1 = generate
        with torch.no_grad():
            if cond_kind == "inpaint" and concat_channels:
                # LDM inpainting: the model sees the mask and the latent of the masked image (concat).
                masked = _latents_of(autoencoder, pixels * (1 - fill), generator)
                cond["concat"] = inpaint_concat(fill, masked)
            else:
                out.inpaint_latents = _latents_of(autoencoder, pixels, generator)
                out.inpaint_mask = F.interpolate(fill, size=latent_hw, mode="nearest")
    if need_uncond:
        out.uncond = _null_conditions(cond, cond_kind, num_classes)
    return out


# ---------------------------------------------------------------------------- generate
@dataclass
class Generation:
    images: Tensor  # [N, 3, H, W] float32 in [0, 1]
    latents: Tensor  # [N, C, h, w] the sampled (scaled) latents
    seeds: list[int]
    settings: dict[str, Any]


def _count(cond_kind: str, num_images: Optional[int], **inputs: Any) -> int:
    given = {name: len(value) for name, value in inputs.items() if value is not None}
    if len(set(given.values())) > 1:
        raise ValueError(f"per-image inputs disagree on the number of images: {given}")
    if given:
        return next(iter(given.values()))
    if num_images is None:
        if cond_kind != "none":
            raise ValueError(f"conditioner.kind={cond_kind!r} needs its inputs (prompts, class ids, ...)")
        return 1
    return num_images


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


def cycled_inputs(kind: str, indices: Sequence[int], *, prompts: Sequence[str] = (),
                  num_classes: int = 0) -> SampleInputs:
    """The inputs of images `indices` of a fixed set (sample grids, evaluation): prompt i mod P, class i mod C."""
    if kind == "text":
        return SampleInputs(prompts=[prompts[i % len(prompts)] for i in indices])
    if kind == "class":
        return SampleInputs(class_labels=[i % max(1, num_classes) for i in indices])
    if kind == "none":
        return SampleInputs(num_images=len(indices))
    raise ValueError(f"conditioner.kind={kind!r} needs per-image inputs (boxes, low-res or masked images): a "
                     "fixed prompt/class set cannot make them; evaluate it on held-out inputs")


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


def _guidance_scale(settings: SamplingSettings, models: Run) -> float:
    """The asked scale; the config's default is dropped quietly (with a warning) where it cannot apply."""
    kind, ucg_rate = models.cfg.conditioner.kind, models.cfg.conditioner.ucg_rate
    if settings.guidance_scale is not None:
        if kind in UNGUIDABLE and settings.guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={settings.guidance_scale}: conditioner.kind={kind!r} has nothing to "
                             "guide (concat inputs are never dropped in training); use 1.0")
        return settings.guidance_scale
    scale = models.cfg.diffusion.guidance_scale
    if (kind in UNGUIDABLE or ucg_rate <= 0) and scale != 1.0:
        warnings.warn(f"diffusion.guidance_scale={scale} ignored: a {kind!r} model trained with ucg_rate={ucg_rate} "
                      "has no unconditional mode; sampling with scale 1.0", stacklevel=3)
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
    diffusion_cfg, cond_kind = cfg.diffusion, cfg.conditioner.kind
    num_classes = cfg.conditioner.num_classes or None
    denoiser, autoencoder = models.denoiser, models.autoencoder
    device = torch.device(device) if device is not None else next(denoiser.parameters()).device
    sampler = settings.sampler or diffusion_cfg.sampler
    num_steps = settings.num_steps or diffusion_cfg.num_sampling_steps
    guidance_scale = _guidance_scale(settings, models)
    guidance_rescale = diffusion_cfg.guidance_rescale if settings.guidance_rescale is None else settings.guidance_rescale
    eta = diffusion_cfg.eta if settings.eta is None else settings.eta
    karras_sigmas = diffusion_cfg.karras_sigmas if settings.karras_sigmas is None else settings.karras_sigmas
    timestep_spacing = settings.timestep_spacing or diffusion_cfg.timestep_spacing
    height, width = settings.height or cfg.data.resolution, settings.width or cfg.data.resolution
    class_labels = None if inputs.class_labels is None else torch.as_tensor(inputs.class_labels, dtype=torch.long)

    n_cond = _count(cond_kind, inputs.num_images, prompts=inputs.prompts, class_labels=class_labels,
                    boxes=inputs.boxes, low_res=inputs.low_res, image=inputs.image)
    per = inputs.images_per_condition
    prompts, class_labels, boxes, box_classes, low_res, image, mask = (
        _repeat(v, per) for v in (inputs.prompts, class_labels, inputs.boxes, inputs.box_classes, inputs.low_res,
                                  inputs.image, inputs.mask))
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
            cond_kind, index, latent_hw=latent_hw, device=device, text_encoder=models.text_encoder,
            autoencoder=autoencoder, denoiser=denoiser, prompts=prompts, class_labels=class_labels, boxes=boxes,
            box_classes=box_classes, low_res=low_res, image=image, mask=mask, num_classes=num_classes,
            need_uncond=guidance_scale != 1.0, generator=torch.Generator().manual_seed(seeds[index[0]]))
        model_fn = guided_model_fn(denoiser, conditions.cond, conditions.uncond, guidance_scale, guidance_rescale,
                                   trained_ucg_rate=cfg.conditioner.ucg_rate)
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

    record = dict(cond_kind=cond_kind, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                  guidance_rescale=guidance_rescale, eta=eta, karras_sigmas=karras_sigmas,
                  timestep_spacing=timestep_spacing, prediction_type=diffusion_cfg.prediction_type,
                  schedule=dict(vars(diffusion_cfg.schedule)), seed=settings.seed, seeds=seeds, height=height,
                  width=width, latent_size=list(latent_hw), num_images=total, images_per_condition=per,
                  prompts=list(prompts) if prompts is not None else None,
                  class_ids=class_labels.tolist() if class_labels is not None else None,
                  inpainting=("concat" if cond_kind == "inpaint" else "blend") if image is not None else None,
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
