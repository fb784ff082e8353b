"""SDXL conditioning (Podell et al. 2023): two frozen text towers and size/crop micro-conditioning.

Tokens: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 penultimate hidden states, concatenated per token (768 + 1280
= 2048). Vector y: bigG's pooled projected embedding (1280) ‖ original size (h, w) ‖ crop top-left (top,
left) ‖ target size (h, w), each number a 256-d sinusoidal embedding (1280 + 6·256 = 2816). The cache
stores each sample's original size and the crop it applied (`meta.original_size`, `meta.crop_top_left`);
the target size is the bucket. Each tower is dropped independently for CFG (sgm's per-embedder ucg_rate);
the size/crop numbers are never dropped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ldmscale.conditioning.base import SamplingContext, ToLatents, drop_mask
from ldmscale.conditioning.kinds import TextConditioning

MICRO_KEYS = ("original_size", "crop_top_left", "target_size")
SIZE_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--original-size", dict(nargs=2, type=int, metavar=("H", "W"), help="SDXL: original size (default: H W)")),
    ("--crop-top-left", dict(nargs=2, type=int, metavar=("TOP", "LEFT"), help="SDXL: crop offset (default 0 0)")),
    ("--target-size", dict(nargs=2, type=int, metavar=("H", "W"), help="SDXL: target size (default: H W)")),
)


class SDXLConditioning(TextConditioning):
    """SDXL: dual text towers → 2048-d context, pooled text + size/crop embeddings → 2816-d vector."""

    name = "sdxl"
    cond_keys = ("context", "context_mask", "pooled", "text_ids", *MICRO_KEYS)
    cli_flags = TextConditioning.cli_flags + SIZE_FLAGS
    fingerprint_keys = ("kind", "text_model", "text_model_2", "context_length")

    def build_frozen(self, device: torch.device | str = "cpu") -> nn.Module:
        from ldmscale.models.conditioners import SDXLTextEncoder

        return SDXLTextEncoder(self.cfg.text_model, self.cfg.text_model_2, weights=self.cfg.text_weights,
                               weights_2=self.cfg.text_weights_2, context_length=self.cfg.context_length,
                               device=device)

    def tower_widths(self) -> tuple[int, int]:
        from ldmscale.models.conditioners import text_tower_arch

        return tuple(int(text_tower_arch(m)["text_cfg"]["width"])  # type: ignore[return-value]
                     for m in (self.cfg.text_model, self.cfg.text_model_2))

    def pooled_width(self) -> int:
        from ldmscale.models.conditioners import text_tower_arch

        return int(text_tower_arch(self.cfg.text_model_2)["embed_dim"])

    def widths(self) -> tuple[int, int]:
        return sum(self.tower_widths()), self.pooled_width() + len(MICRO_KEYS) * 2 * self.cfg.size_embed_dim

    def weights_sources(self) -> list[tuple[str, Optional[str], str]]:
        """A diffusers pipeline in text_weights holds both towers (text_encoder/, text_encoder_2/)."""
        first = self.cfg.text_weights
        second = first if first and os.path.isdir(first) and not self.cfg.text_weights_2 else self.cfg.text_weights_2
        return [("conditioner.text_weights", first, "text_encoder"),
                ("conditioner.text_weights_2" if second != first else "conditioner.text_weights", second,
                 "text_encoder_2")]

    # -- collation: text as for `text`, plus the size/crop numbers the cache stored
    def collate(self, records: Sequence[Any], latents: Tensor, to_latents: ToLatents) -> dict[str, Any]:
        batch = super().collate(records, latents, to_latents)
        batch["original_size"] = torch.tensor([r.meta["original_size"] for r in records], dtype=torch.long)
        batch["crop_top_left"] = torch.tensor([r.meta["crop_top_left"] for r in records], dtype=torch.long)
        batch["target_size"] = torch.tensor([r.meta["bucket"] for r in records], dtype=torch.long)
        return batch

    # -- CFG: each tower dropped on its own (zero tokens; tower 2 also zero pooled); sizes kept. The null
    # input for sampling (both towers zero) is TextConditioning.null.
    def drop(self, cond: dict[str, Tensor], rate: float, generator: Optional[torch.Generator] = None
             ) -> dict[str, Tensor]:
        """rate: tower 1's drop rate (conditioner.ucg_rate); tower 2 uses conditioner.ucg_rate_2 if set."""
        rate_2 = rate if self.cfg.ucg_rate_2 is None else self.cfg.ucg_rate_2
        if (rate <= 0 and rate_2 <= 0) or "context" not in cond:
            return dict(cond)
        context, width = cond["context"], self.tower_widths()[0]
        drop_1 = drop_mask(context.shape[0], rate, generator).to(context.device)
        drop_2 = drop_mask(context.shape[0], rate_2, generator).to(context.device)
        first = torch.where(drop_1[:, None, None], torch.zeros_like(context[..., :width]), context[..., :width])
        second = torch.where(drop_2[:, None, None], torch.zeros_like(context[..., width:]), context[..., width:])
        out = dict(cond, context=torch.cat([first, second], dim=-1))
        out["pooled"] = torch.where(drop_2[:, None], torch.zeros_like(cond["pooled"]), cond["pooled"])
        if "context_mask" in cond:  # both towers dropped: an all-zero context, attended in full
            out["context_mask"] = cond["context_mask"] | (drop_1 & drop_2)[:, None]
        return out

    # -- denoiser
    def configure_unet(self, model_cfg: Any, kwargs: dict[str, Any]) -> dict[str, nn.Module]:
        context, vector = self.widths()
        if model_cfg.context_dim != context:
            raise ValueError(f"model.context_dim={model_cfg.context_dim} but conditioner.kind='sdxl' gives "
                             f"{context}-wide tokens ({' + '.join(map(str, self.tower_widths()))} from "
                             f"{self.cfg.text_model!r} and {self.cfg.text_model_2!r})")
        if model_cfg.adm_in_channels != vector:
            raise ValueError(f"model.adm_in_channels={model_cfg.adm_in_channels} but conditioner.kind='sdxl' "
                             f"gives a {vector}-wide vector (pooled text + 6 size/crop numbers x "
                             f"{self.cfg.size_embed_dim})")
        return {}

    def vector(self, cond: dict[str, Tensor]) -> Tensor:
        """pooled [B,P] ‖ emb(original_size) ‖ emb(crop_top_left) ‖ emb(target_size) → [B, P + 6·256]."""
        from ldmscale.models.conditioners import size_embedding

        pooled = cond["pooled"]
        sizes = [size_embedding(cond[key].to(pooled.device), self.cfg.size_embed_dim) for key in MICRO_KEYS]
        return torch.cat([pooled, *(s.to(pooled.dtype) for s in sizes)], dim=1)

    def denoiser_inputs(self, denoiser: nn.Module, x_t: Tensor, cond: dict[str, Tensor]
                        ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        return self.with_concat(denoiser, x_t, cond), cond["context"], cond.get("context_mask"), self.vector(cond)

    def example_cond(self, model_cfg: Any, batch: int, latent_hw: tuple[int, int], image_hw: tuple[int, int],
                     device: torch.device | str) -> dict[str, Tensor]:
        pooled = self.pooled_width()
        size = torch.tensor([list(image_hw)] * batch, device=device)
        return {"context": torch.zeros(batch, self.cfg.context_length, model_cfg.context_dim, device=device),
                "pooled": torch.zeros(batch, pooled, device=device),
                "original_size": size, "crop_top_left": torch.zeros_like(size), "target_size": size}

    # -- sampling: original = target = the requested size, crop (0, 0), unless given
    def sampling_cond(self, inputs: dict[str, Any], ctx: SamplingContext) -> dict[str, Tensor]:
        cond = super().sampling_cond(inputs, ctx)
        defaults = {"original_size": ctx.image_hw, "crop_top_left": (0, 0), "target_size": ctx.image_hw}
        for key in MICRO_KEYS:
            value = torch.as_tensor(inputs.get(key) if inputs.get(key) is not None else defaults[key],
                                    dtype=torch.long)
            value = value.expand(len(ctx.rows), 2) if value.dim() == 1 else value[ctx.rows]
            cond[key] = value.to(ctx.device)
        return cond

    def cli_inputs(self, args: Any, height: int, width: int) -> dict[str, Any]:
        inputs = super().cli_inputs(args, height, width)
        inputs.update({key: getattr(args, key) for key in MICRO_KEYS if getattr(args, key) is not None})
        return inputs
