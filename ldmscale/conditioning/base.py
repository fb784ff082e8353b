"""The Conditioning base class: everything one conditioning kind decides, with the defaults of `none`.

A kind is built from the `conditioner` config section (`kind_for(cfg.conditioner)`) and answers, in one
place: what the cache job derives per sample, how records collate into a batch, its CFG null input and
training-time drop, what it hands the denoiser and which U-Net widths that implies, example inputs for the
FLOP count, and the inputs it takes at sampling time (Python API and CLI flags).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

# latent moments [B,M,h,w] → scaled latents [B,C,h,w] (the loader's sampling + scale/shift, one generator)
ToLatents = Callable[[Tensor], Tensor]


@dataclass
class Derived:
    """What the cache stores for one sample besides its latent (fields of `CachedRecord`)."""

    text_tokens: Optional[Tensor] = None  # [n, D] real tokens only
    text_pooled: Optional[Tensor] = None  # [P]
    text_length: int = 0
    extras: dict[str, Tensor] = field(default_factory=dict)  # more tensors (stored in the latent dtype)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able values (e.g. token ids)


@dataclass
class SamplingConditions:
    """Everything a sampler needs for one batch besides x_T."""

    cond: dict[str, Tensor] = field(default_factory=dict)
    uncond: Optional[dict[str, Tensor]] = None
    inpaint_mask: Optional[Tensor] = None  # RePaint-style blending (models without concat inputs)
    inpaint_latents: Optional[Tensor] = None


@dataclass
class SamplingContext:
    """What a kind may use to turn user inputs into conditions at sampling time."""

    rows: Tensor  # indices of this batch's images in the per-image inputs
    latent_hw: tuple[int, int]
    image_hw: tuple[int, int]  # pixels
    device: torch.device
    text_encoder: Any = None
    autoencoder: Optional[nn.Module] = None
    denoiser: Optional[nn.Module] = None
    generator: Optional[torch.Generator] = None


def latents_of(autoencoder: nn.Module, pixels: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Pixels in [-1, 1] → the scaled latent space the denoiser works in."""
    moments = autoencoder.encode_moments(pixels)
    return autoencoder.scale_latents(autoencoder.latent_from_moments(moments.float(), generator=generator))


class Conditioning:
    """Unconditional: nothing cached, nothing collated, nothing to guide; the U-Net self-attends only."""

    name = "none"
    cond_keys: tuple[str, ...] = ()  # batch keys the denoiser consumes (the trainer moves these)
    needs_caption = False  # the cache job skips samples without a caption
    # Sampling: per-image inputs of `generate(...)` this kind requires, and its CLI flags
    # [(flag, argparse kwargs)]; flags shared by several kinds are declared identically.
    sampling_inputs: tuple[str, ...] = ()
    cli_flags: tuple[tuple[str, dict[str, Any]], ...] = ()

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self._frozen: Optional[nn.Module] = None

    # ------------------------------------------------------------------ frozen encoders
    def build_frozen(self, device: torch.device | str = "cpu") -> Optional[nn.Module]:
        """The frozen encoder(s) the cache job, the online path and sampling run (None: none needed)."""
        return None

    def frozen(self, device: torch.device | str = "cpu") -> Optional[nn.Module]:
        """`build_frozen`, built once per kind object (training-time encoding of cached token ids)."""
        if self._frozen is None:
            self._frozen = self.build_frozen(device)
        return self._frozen

    # ------------------------------------------------------------------ cache
    def cache_spec(self, frozen: Optional[nn.Module], cache_cfg: Any) -> Optional[dict[str, Any]]:
        """What the cache derives and with which encoder (stored in the manifest; must agree across shards)."""
        return None

    def check_cache(self, cached: Optional[dict[str, Any]]) -> list[str]:
        """Problems (one line each) if a cache made with spec `cached` cannot train this config."""
        return []

    def derive(self, pixels: Tensor, keys: Sequence[str], captions: Sequence[str], frozen: Optional[nn.Module],
               autoencoder: nn.Module, spec: Optional[dict[str, Any]], seed: int) -> list[Derived]:
        """Per sample of a bucket batch (pixels [B,3,H,W] in [-1,1]), what the cache stores for this kind."""
        return [Derived() for _ in keys]

    # ------------------------------------------------------------------ collation
    def collate(self, records: Sequence[Any], latents: Tensor, to_latents: ToLatents) -> dict[str, Any]:
        """Cached records of one bucket → this kind's batch entries (the loader adds latents, keys, ...)."""
        return {}

    def prepare(self, cond: dict[str, Any]) -> dict[str, Any]:
        """Training process, before the CFG drop: e.g. run frozen towers on cached token ids."""
        return cond

    # ------------------------------------------------------------------ classifier-free guidance
    @property
    def guidable(self) -> bool:
        """Whether this kind has a null input to guide against (concat inputs are never dropped)."""
        return False

    def null(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """The entries of `cond` that its unconditional version replaces (CFG's uncond)."""
        return {}

    def drop(self, cond: dict[str, Tensor], rate: float, generator: Optional[torch.Generator] = None
             ) -> dict[str, Tensor]:
        """Training-time CFG dropout: each sample's condition becomes the null one with probability `rate`."""
        null = self.null(cond)
        if rate <= 0 or not null:
            return dict(cond)
        return replace_rows(cond, null, drop_mask(next(iter(null.values())).shape[0], rate, generator))

    # ------------------------------------------------------------------ the denoiser
    def concat_channels(self, model_cfg: Any) -> int:
        """Channels the caller concatenates onto x_t (cond['concat'])."""
        return 0

    def configure_unet(self, model_cfg: Any, kwargs: dict[str, Any]) -> dict[str, nn.Module]:
        """Adjust the U-Net's constructor `kwargs` for this kind (raise naming both numbers on a width
        mismatch with model.*) and return the trainable conditioning modules {attribute: module}."""
        kwargs["context_dim"] = None  # nothing to cross-attend to: the transformers self-attend only
        kwargs["num_classes"] = None
        if model_cfg.adm_in_channels:
            raise ValueError(f"model.adm_in_channels={model_cfg.adm_in_channels} but conditioner.kind="
                             f"{self.name!r} gives no vector conditioning (0 channels)")
        return {}

    def denoiser_inputs(self, denoiser: nn.Module, x_t: Tensor, cond: dict[str, Tensor]
                        ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """cond → (x_t with any concat channels, context [B,L,D], context_mask [B,L], y [B,...])."""
        return self.with_concat(denoiser, x_t, cond), None, None, None

    @staticmethod
    def with_concat(denoiser: nn.Module, x_t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        channels = getattr(denoiser, "concat_channels", 0)
        if not channels:
            return x_t
        if "concat" not in cond:
            raise ValueError(f"conditioner.kind={denoiser.kind!r} needs cond['concat'] [B,{channels},h,w]")
        return torch.cat([x_t, cond["concat"].to(x_t.dtype)], dim=1)

    def example_cond(self, model_cfg: Any, batch: int, latent_hw: tuple[int, int], image_hw: tuple[int, int],
                     device: torch.device | str) -> dict[str, Tensor]:
        """One denoiser call's cond at this size, for FLOP counting and shape checks."""
        concat = self.concat_channels(model_cfg)
        return {"concat": torch.zeros(batch, concat, *latent_hw, device=device)} if concat else {}

    # ------------------------------------------------------------------ sampling
    def sampling_conditions(self, inputs: dict[str, Any], ctx: SamplingContext) -> SamplingConditions:
        """User inputs (rows `ctx.rows` of each per-image input) → the batch's conditions. Any kind can be
        inpainted by RePaint-style latent blending when inputs hold `image` and `mask`."""
        out = SamplingConditions(self.sampling_cond(inputs, ctx))
        image, mask = inputs.get("image"), inputs.get("mask")
        if (image is None) != (mask is None):
            raise ValueError("inpainting needs both --image and --mask")
        if image is not None:
            if ctx.autoencoder is None:
                raise ValueError("inpainting needs the autoencoder to encode --image")
            import torch.nn.functional as F

            fill = mask[ctx.rows].to(ctx.device).float()  # 1 = generate
            with torch.no_grad():
                out.inpaint_latents = latents_of(ctx.autoencoder, image[ctx.rows].to(ctx.device), ctx.generator)
            out.inpaint_mask = F.interpolate(fill, size=ctx.latent_hw, mode="nearest")
        return out

    def sampling_cond(self, inputs: dict[str, Any], ctx: SamplingContext) -> dict[str, Tensor]:
        """This kind's cond entries for the batch (sampling_conditions adds blending inputs)."""
        return {}

    def cli_inputs(self, args: Any, height: int, width: int) -> dict[str, Any]:
        """Parsed CLI flags → keyword inputs of `generate`."""
        return {}

    def grid_inputs(self, prompts: Sequence[str]) -> Optional[dict[str, Any]]:
        """`generate` inputs of the trainer's sample grid, one image per prompt slot (None: no grid, as
        the kind needs per-image inputs the config does not hold)."""
        return None if self.sampling_inputs else {"num_images": len(prompts)}

    def missing_inputs(self, inputs: dict[str, Any]) -> list[str]:
        return [name for name in self.sampling_inputs if inputs.get(name) is None]


def drop_mask(batch: int, rate: float, generator: Optional[torch.Generator]) -> Tensor:
    """[B] bool, True with probability `rate` (on the generator's device)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(batch, generator=generator, device=device) < rate


def replace_rows(cond: dict[str, Tensor], null: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """cond with `null`'s entries swapped in where rows [B] is True."""
    out = dict(cond)
    for key, null_value in null.items():
        where = rows.to(null_value.device).view(-1, *([1] * (null_value.dim() - 1)))
        out[key] = torch.where(where, null_value, cond[key])
    return out
