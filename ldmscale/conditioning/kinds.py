"""The paper's conditioning kinds: text (one open_clip tower), class, layout, super-resolution, inpainting."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ldmscale.conditioning.base import (
    Conditioning,
    Derived,
    SamplingConditions,
    SamplingContext,
    ToLatents,
    latents_of,
)
from ldmscale.data import conditioning as derived_inputs

PROMPT_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--prompt", dict(action="append", help="text prompt (repeat for several)")),
    ("--prompts-file", dict(help="one prompt per line")),
)
TEXT_MODES = ("embeddings", "tokens")




# ---------------------------------------------------------------------------- text
class TextConditioning(Conditioning):
    """Captions through a frozen open_clip tower → cross-attention context (+ pooled as vector `y` when the
    U-Net has adm_in_channels). The cache stores the real tokens' embeddings, or only their ids
    (`cache.text=tokens`: the tower then runs in the training process)."""

    name = "text"
    cond_keys = ("context", "context_mask", "pooled", "text_ids")
    needs_caption = True
    sampling_inputs = ("prompts",)
    cli_flags = PROMPT_FLAGS
    # Config fields that decide what the tower computes (the cache's text fingerprint).
    fingerprint_keys = ("kind", "text_model", "text_layer", "context_length")

    @property
    def guidable(self) -> bool:
        return True

    def build_frozen(self, device: torch.device | str = "cpu") -> nn.Module:
        from ldmscale.models.conditioners import build_text_encoder

        return build_text_encoder(self.cfg, device=device)

    def widths(self) -> tuple[int, int]:
        """(token width, pooled width) of the configured tower(s), from their configs alone."""
        from ldmscale.models.conditioners import text_tower_arch

        arch = text_tower_arch(self.cfg.text_model)
        return int(arch["text_cfg"]["width"]), int(arch["embed_dim"])

    def weights_sources(self) -> list[tuple[str, Optional[str], str]]:
        """(config key, path, diffusers pipeline part) of each weights source the tower(s) load."""
        return [("conditioner.text_weights", self.cfg.text_weights, "text_encoder")]

    # -- cache
    def cache_spec(self, frozen: Optional[nn.Module], cache_cfg: Any) -> dict[str, Any]:
        from ldmscale.data.cache import _jsonable, weights_source_fingerprint
        from ldmscale.data.cache_format import dtype_name

        mode = getattr(cache_cfg, "text", "embeddings")
        if mode not in TEXT_MODES:
            raise ValueError(f"cache.text={mode!r} is not one of {list(TEXT_MODES)}")
        assert frozen is not None
        return {"text": {
            "mode": mode, "config": {k: getattr(self.cfg, k) for k in self.fingerprint_keys},
            "fingerprint": _jsonable(frozen.fingerprint()),
            "weights": [{"weights_source": weights_source_fingerprint(path, part)}
                        for _, path, part in self.weights_sources()],
            "context_length": self.cfg.context_length, "width": int(frozen.width),
            "dtype": dtype_name(cache_cfg.text_dtype) if mode == "embeddings" else "int"}}

    def check_cache(self, manifest: dict[str, Any]) -> list[str]:
        text = manifest.get("text")
        if not text:
            return [f"conditioner.kind={self.name} but the cache holds no text (cache with this conditioner)"]
        now, cached = {k: getattr(self.cfg, k) for k in self.fingerprint_keys}, text.get("config", {})
        problems = [f"conditioner.{k}: cache {cached.get(k)!r} vs config {now[k]!r}"
                    for k in sorted(now) if now[k] != cached.get(k)]
        from ldmscale.data.cache import weights_mismatch

        for (key, path, part), cached_source in zip(self.weights_sources(), text.get("weights") or []):
            problems += filter(None, [weights_mismatch(key, path, cached_source, part)])
        return problems

    def derive(self, pixels: Tensor, keys: Sequence[str], captions: Sequence[str], frozen: Optional[nn.Module],
               autoencoder: nn.Module, spec: Optional[dict[str, Any]], seed: int) -> list[Derived]:
        assert frozen is not None
        context_length = self.cfg.context_length
        ids = frozen.tokenize(list(captions))
        lengths = torch.clamp(ids.argmax(dim=-1) + 1, min=1, max=min(context_length, ids.shape[1])).cpu()
        if spec is not None and spec["text"]["mode"] == "tokens":  # ids only: a few hundred bytes
            return [Derived(text_length=int(n), meta={"text_ids": ids[i, : int(n)].tolist()})
                    for i, n in enumerate(lengths)]
        encoding = frozen.encode_ids(ids)
        tokens, pooled = encoding.tokens.float().cpu(), encoding.pooled.float().cpu()
        # only the real rows (SOT, caption, EOT): padding is never stored
        return [Derived(text_tokens=tokens[i, : int(n)], text_pooled=pooled[i], text_length=int(n))
                for i, n in enumerate(lengths)]

    # -- collation
    def collate(self, records: Sequence[Any], latents: Tensor, to_latents: ToLatents) -> dict[str, Any]:
        context_length = self.cfg.context_length
        if "text_ids" in records[0].meta:
            ids = torch.zeros(len(records), context_length, dtype=torch.long)
            for i, r in enumerate(records):
                row = r.meta["text_ids"][:context_length]
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            return {"text_ids": ids}
        width = records[0].text_tokens.shape[-1]
        context = torch.zeros(len(records), context_length, width)
        mask = torch.zeros(len(records), context_length, dtype=torch.bool)
        for i, r in enumerate(records):
            n = min(r.text_tokens.shape[0], context_length)
            context[i, :n] = r.text_tokens[:n]
            mask[i, :n] = True
        return {"context": context, "context_mask": mask,
                "pooled": torch.stack([r.text_pooled for r in records]).float()}

    def encode_ids(self, ids: Tensor) -> dict[str, Tensor]:
        """Token ids [B,L] → the batch entries the cache would have stored (padding rows zeroed)."""
        frozen = self.frozen(ids.device)
        encoding = frozen.encode_ids(ids.to(frozen.device))
        mask = encoding.mask.to(ids.device)
        context = encoding.tokens.float().to(ids.device) * mask[..., None]
        return {"context": context, "context_mask": mask, "pooled": encoding.pooled.float().to(ids.device)}

    def prepare(self, cond: dict[str, Any]) -> dict[str, Any]:
        if "text_ids" not in cond:
            return cond
        out = {k: v for k, v in cond.items() if k != "text_ids"}
        out.update(self.encode_ids(cond["text_ids"]))
        return out

    # -- CFG: zero context (mask all-True keeps attention finite), zero pooled
    def null(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        null: dict[str, Tensor] = {}
        if "context" in cond:
            null["context"] = torch.zeros_like(cond["context"])
        if "context_mask" in cond:
            null["context_mask"] = torch.ones_like(cond["context_mask"])
        if "pooled" in cond:
            null["pooled"] = torch.zeros_like(cond["pooled"])
        return null

    # -- denoiser
    def configure_unet(self, model_cfg: Any, kwargs: dict[str, Any]) -> dict[str, nn.Module]:
        width, pooled = self.widths()
        if model_cfg.context_dim is not None and model_cfg.context_dim != width:
            raise ValueError(f"model.context_dim={model_cfg.context_dim} but conditioner.text_model="
                             f"{self.cfg.text_model!r} gives {width}-wide tokens")
        if model_cfg.adm_in_channels and model_cfg.adm_in_channels != pooled:
            raise ValueError(f"model.adm_in_channels={model_cfg.adm_in_channels} but conditioner.text_model="
                             f"{self.cfg.text_model!r} gives a {pooled}-wide pooled vector")
        return {}

    def denoiser_inputs(self, denoiser: nn.Module, x_t: Tensor, cond: dict[str, Tensor]
                        ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        y = cond.get("pooled") if denoiser.unet.adm_in_channels is not None else None
        return self.with_concat(denoiser, x_t, cond), cond.get("context"), cond.get("context_mask"), y

    def example_cond(self, model_cfg: Any, batch: int, latent_hw: tuple[int, int], image_hw: tuple[int, int],
                     device: torch.device | str) -> dict[str, Tensor]:
        cond = super().example_cond(model_cfg, batch, latent_hw, image_hw, device)
        if model_cfg.context_dim:
            cond["context"] = torch.zeros(batch, self.cfg.context_length, model_cfg.context_dim, device=device)
        if model_cfg.adm_in_channels:
            cond["pooled"] = torch.zeros(batch, model_cfg.adm_in_channels, device=device)
        return cond

    # -- sampling
    def sampling_cond(self, inputs: dict[str, Any], ctx: SamplingContext) -> dict[str, Tensor]:
        if ctx.text_encoder is None or inputs.get("prompts") is None:
            raise ValueError(f"conditioner.kind={self.name!r} needs a text encoder and --prompt")
        with torch.no_grad():
            encoding = ctx.text_encoder.encode([inputs["prompts"][i] for i in ctx.rows.tolist()])
        return {"context": encoding.tokens.to(ctx.device), "context_mask": encoding.mask.to(ctx.device),
                "pooled": encoding.pooled.to(ctx.device)}

    def grid_inputs(self, prompts: Sequence[str]) -> Optional[dict[str, Any]]:
        return {"prompts": list(prompts)}

    def cli_inputs(self, args: Any, height: int, width: int) -> dict[str, Any]:
        prompts = list(args.prompt or [])
        if args.prompts_file:
            prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        return {"prompts": prompts or None}


# ---------------------------------------------------------------------------- class
class ClassConditioning(Conditioning):
    """Class labels → the U-Net's label embedding, with one extra row: the null class (id num_classes)."""

    name = "class"
    cond_keys = ("class_labels",)
    sampling_inputs = ("class_labels",)
    cli_flags = (("--class-ids", dict(help="comma-separated class ids, e.g. 0,3,7")),)

    @property
    def guidable(self) -> bool:
        return True

    @property
    def null_id(self) -> int:
        return self.cfg.num_classes if self.cfg.num_classes > 0 else -1  # -1: the embedder's alias of null

    def collate(self, records: Sequence[Any], latents: Tensor, to_latents: ToLatents) -> dict[str, Any]:
        return {"class_labels": torch.tensor([r.meta["class_id"] for r in records], dtype=torch.long)}

    def null(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"class_labels": torch.full_like(cond["class_labels"], self.null_id)} if "class_labels" in cond else {}

    def configure_unet(self, model_cfg: Any, kwargs: dict[str, Any]) -> dict[str, nn.Module]:
        if self.cfg.num_classes <= 0:
            raise ValueError("conditioner.kind='class' needs conditioner.num_classes > 0")
        kwargs["num_classes"], kwargs["adm_in_channels"] = self.cfg.num_classes + 1, None  # + null class
        kwargs["context_dim"] = None
        return {}

    def denoiser_inputs(self, denoiser: nn.Module, x_t: Tensor, cond: dict[str, Tensor]
                        ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        labels = cond["class_labels"]
        y = torch.where(labels < 0, torch.full_like(labels, self.cfg.num_classes), labels)
        return self.with_concat(denoiser, x_t, cond), None, None, y

    def example_cond(self, model_cfg: Any, batch: int, latent_hw: tuple[int, int], image_hw: tuple[int, int],
                     device: torch.device | str) -> dict[str, Tensor]:
        return {"class_labels": torch.zeros(batch, dtype=torch.long, device=device)}

    def sampling_cond(self, inputs: dict[str, Any], ctx: SamplingContext) -> dict[str, Tensor]:
        if inputs.get("class_labels") is None:
            raise ValueError("conditioner.kind='class' needs --class-ids")
        return {"class_labels": torch.as_tensor(inputs["class_labels"], dtype=torch.long)[ctx.rows].to(ctx.device)}

    def grid_inputs(self, prompts: Sequence[str]) -> Optional[dict[str, Any]]:
        return {"class_labels": torch.arange(len(prompts)) % max(1, self.cfg.num_classes)}

    def cli_inputs(self, args: Any, height: int, width: int) -> dict[str, Any]:
        return {"class_labels": [int(c) for c in args.class_ids.split(",")] if args.class_ids else None}


# ---------------------------------------------------------------------------- layout
class LayoutConditioning(Conditioning):
    """Boxes + box classes → a trained layout encoder → cross-attention tokens (LDM sec. 4.3.1); optionally
    also the boxes' coverage map concatenated onto x_t (`layout_raster`)."""

    name = "layout"
    cond_keys = ("boxes", "box_classes")
    sampling_inputs = ("boxes",)
    cli_flags = (("--boxes", dict(help="JSON (or file): per image a list of [x0,y0,x1,y1,class] in [0,1]")),)

    @property
    def guidable(self) -> bool:
        return True

    def collate(self, records: Sequence[Any], latents: Tensor, to_latents: ToLatents) -> dict[str, Any]:
        max_boxes = self.cfg.max_boxes
        boxes = torch.zeros(len(records), max_boxes, 4)
        classes = torch.full((len(records), max_boxes), -1, dtype=torch.long)
        for i, r in enumerate(records):
            for j, (box, cls) in enumerate(zip(r.meta["boxes"][:max_boxes], r.meta["box_classes"][:max_boxes])):
                boxes[i, j] = torch.tensor(box)
                classes[i, j] = cls
        return {"boxes": boxes, "box_classes": classes}

    def null(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:  # every box padding
        null: dict[str, Tensor] = {}
        if "box_classes" in cond:
            null["box_classes"] = torch.full_like(cond["box_classes"], -1)
        if "boxes" in cond:
            null["boxes"] = torch.zeros_like(cond["boxes"])
        return null

    def configure_unet(self, model_cfg: Any, kwargs: dict[str, Any]) -> dict[str, nn.Module]:
        from ldmscale.models.conditioners import LayoutEncoder

        if self.cfg.num_classes <= 0 or not model_cfg.context_dim:
            raise ValueError("conditioner.kind='layout' needs conditioner.num_classes > 0 and model.context_dim")
        if self.cfg.layout_raster:
            if model_cfg.in_channels not in (model_cfg.out_channels, model_cfg.out_channels + 1):
                raise ValueError(f"model.in_channels={model_cfg.in_channels}: conditioner.layout_raster adds one "
                                 f"channel to {model_cfg.out_channels} latent channels")
            kwargs["in_channels"] = model_cfg.out_channels + 1
        return {"layout_encoder": LayoutEncoder(self.cfg.num_classes, dim=self.cfg.layout_dim,
                                                context_dim=model_cfg.context_dim, max_boxes=self.cfg.max_boxes)}

    def denoiser_inputs(self, denoiser: nn.Module, x_t: Tensor, cond: dict[str, Tensor]
                        ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        from ldmscale.models.conditioners import rasterize_boxes

        context, mask = denoiser.layout_encoder(cond["boxes"], cond["box_classes"])
        if self.cfg.layout_raster:  # CFG's null layout (all padding) rasterizes to zeros
            raster = rasterize_boxes(cond["boxes"].float(), cond["box_classes"], tuple(x_t.shape[-2:]))
            x_t = torch.cat([x_t, raster.to(x_t.dtype)], dim=1)
        mask = mask | ~mask.any(dim=1, keepdim=True)  # an all-padding layout (CFG null) attends to all boxes
        return x_t, context, mask, None

    def example_cond(self, model_cfg: Any, batch: int, latent_hw: tuple[int, int], image_hw: tuple[int, int],
                     device: torch.device | str) -> dict[str, Tensor]:
        return {"boxes": torch.full((batch, self.cfg.max_boxes, 4), 0.5, device=device),
                "box_classes": torch.zeros(batch, self.cfg.max_boxes, dtype=torch.long, device=device)}

    def sampling_cond(self, inputs: dict[str, Any], ctx: SamplingContext) -> dict[str, Tensor]:
        if inputs.get("boxes") is None or inputs.get("box_classes") is None:
            raise ValueError("conditioner.kind='layout' needs --boxes")
        return {"boxes": inputs["boxes"][ctx.rows].to(ctx.device),
                "box_classes": inputs["box_classes"][ctx.rows].to(ctx.device)}

    def cli_inputs(self, args: Any, height: int, width: int) -> dict[str, Any]:
        if not args.boxes:
            return {}
        boxes, classes = parse_boxes(args.boxes)
        return {"boxes": boxes, "box_classes": classes}


def parse_boxes(spec: str) -> tuple[Tensor, Tensor]:
    """JSON (inline or a file): one list per image of [x0, y0, x1, y1, class] boxes in [0, 1]."""
    import json

    text = Path(spec).read_text() if Path(spec).is_file() else spec
    layouts = json.loads(text)
    if not isinstance(layouts, list) or not all(isinstance(layout, list) for layout in layouts):
        raise ValueError(f"--boxes must be a JSON list (one per image) of [x0, y0, x1, y1, class] lists: {spec!r}")
    width = max(1, max(len(layout) for layout in layouts))
    boxes = torch.zeros(len(layouts), width, 4)
    classes = torch.full((len(layouts), width), -1, dtype=torch.long)
    for i, layout in enumerate(layouts):
        for j, box in enumerate(layout):
            if len(box) != 5:
                raise ValueError(f"--boxes image {i} box {j}: expected [x0, y0, x1, y1, class], got {box}")
            boxes[i, j] = torch.tensor(box[:4], dtype=torch.float32)
            classes[i, j] = int(box[4])
    return boxes, classes


# ---------------------------------------------------------------------------- concat kinds (never dropped)
class _ConcatConditioning(Conditioning):
    """Inputs derived from the image by the cache job and concatenated onto x_t."""

    cond_keys = ("concat",)

    def derived_spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def cache_spec(self, frozen: Optional[nn.Module], cache_cfg: Any) -> dict[str, Any]:
        return {"concat": self.derived_spec()}

    def check_cache(self, manifest: dict[str, Any]) -> list[str]:
        need = self.derived_spec()
        if manifest.get("concat") != need:
            return [f"conditioner.kind={self.name} needs derived inputs {need} but the cache holds "
                    f"{manifest.get('concat')} (cache with the same conditioner settings)"]
        return []

    def derive(self, pixels: Tensor, keys: Sequence[str], captions: Sequence[str], frozen: Optional[nn.Module],
               autoencoder: nn.Module, spec: Optional[dict[str, Any]], seed: int) -> list[Derived]:
        extras = derived_inputs.derive(pixels, keys, self.derived_spec(), autoencoder, seed)
        return [Derived(extras=e) for e in extras]

    def configure_unet(self, model_cfg: Any, kwargs: dict[str, Any]) -> dict[str, nn.Module]:
        concat = self.concat_channels(model_cfg)
        expected = model_cfg.out_channels + concat
        if model_cfg.in_channels not in (model_cfg.out_channels, expected):
            raise ValueError(f"model.in_channels={model_cfg.in_channels} but conditioner.kind={self.name!r} "
                             f"concatenates {concat} channels onto {model_cfg.out_channels} latent channels: "
                             f"expected {expected}")
        kwargs["in_channels"], kwargs["context_dim"] = expected, None
        return {}


class SRConditioning(_ConcatConditioning):
    """Super-resolution: the bicubic-upsampled low-res image concatenated onto x_t."""

    name = "sr"
    sampling_inputs = ("low_res",)
    cli_flags = (("--low-res", dict(nargs="+", help="low-resolution image(s) for super-resolution")),)

    def derived_spec(self) -> dict[str, Any]:
        return derived_inputs.sr_spec(self.cfg.sr_factor)

    def concat_channels(self, model_cfg: Any) -> int:
        return self.cfg.concat_channels or 3

    def collate(self, records: Sequence[Any], latents: Tensor, to_latents: ToLatents) -> dict[str, Any]:
        from ldmscale.models.conditioners import upsample_low_res

        low_res = torch.stack([r.extras["low_res"] for r in records]).float()
        return {"concat": upsample_low_res(low_res, latents.shape[-2:])}

    def sampling_cond(self, inputs: dict[str, Any], ctx: SamplingContext) -> dict[str, Tensor]:
        from ldmscale.models.conditioners import upsample_low_res

        if inputs.get("low_res") is None:
            raise ValueError("conditioner.kind='sr' needs --low-res")
        return {"concat": upsample_low_res(inputs["low_res"][ctx.rows].to(ctx.device), ctx.latent_hw)}

    def cli_inputs(self, args: Any, height: int, width: int) -> dict[str, Any]:
        if not args.low_res:
            return {}
        return {"low_res": torch.stack([load_image(p) for p in args.low_res]) * 2 - 1}


class InpaintConditioning(_ConcatConditioning):
    """Inpainting: the mask and the masked image's latent concatenated onto x_t."""

    name = "inpaint"
    sampling_inputs = ("image",)

    def derived_spec(self) -> dict[str, Any]:
        return derived_inputs.inpaint_spec()

    def concat_channels(self, model_cfg: Any) -> int:
        return self.cfg.concat_channels or model_cfg.out_channels + 1

    def collate(self, records: Sequence[Any], latents: Tensor, to_latents: ToLatents) -> dict[str, Any]:
        from ldmscale.models.conditioners import inpaint_concat

        masked = to_latents(torch.stack([r.extras["masked_moments"] for r in records]).float())
        return {"concat": inpaint_concat(torch.stack([r.extras["inpaint_mask"] for r in records]), masked)}

    def sampling_conditions(self, inputs: dict[str, Any], ctx: SamplingContext) -> SamplingConditions:
        if inputs.get("image") is None or inputs.get("mask") is None:
            raise ValueError("conditioner.kind='inpaint' needs --image and --mask")
        if not getattr(ctx.denoiser, "concat_channels", 0):
            return super().sampling_conditions(inputs, ctx)  # a bare U-Net: blending
        from ldmscale.models.conditioners import inpaint_concat

        if ctx.autoencoder is None:
            raise ValueError("inpainting needs the autoencoder to encode --image")
        pixels, fill = inputs["image"][ctx.rows].to(ctx.device), inputs["mask"][ctx.rows].to(ctx.device).float()
        with torch.no_grad():  # LDM inpainting: the model sees the mask and the latent of the masked image
            masked = latents_of(ctx.autoencoder, pixels * (1 - fill), ctx.generator)
        return SamplingConditions({"concat": inpaint_concat(fill, masked)})


# ---------------------------------------------------------------------------- image files (CLI)
IMAGE_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--image", dict(nargs="+", help="image(s) to inpaint (any kind: RePaint blending; inpaint: concat)")),
    ("--mask", dict(nargs="+", help="mask image(s): white = generate")),
)


def load_image(path: str, size: Optional[tuple[int, int]] = None, gray: bool = False) -> Tensor:
    """An image file → [3,H,W] (or [1,H,W] gray) in [0, 1], resized to size (h, w) if given."""
    from PIL import Image

    img = Image.open(path).convert("L" if gray else "RGB")
    if size is not None:
        img = img.resize((size[1], size[0]), Image.NEAREST if gray else Image.BICUBIC)
    array = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return array[None] if gray else array.permute(2, 0, 1)


def image_inputs(args: Any, height: int, width: int) -> dict[str, Any]:
    """--image/--mask → {image [N,3,H,W] in [-1,1], mask [N,1,H,W] (1 = generate)} for any kind."""
    if not (args.image or args.mask):
        return {}
    if not (args.image and args.mask) or len(args.image) != len(args.mask):
        raise SystemExit("--image and --mask need the same number of files")
    image = torch.stack([load_image(p, (height, width)) for p in args.image]) * 2 - 1
    mask = (torch.stack([load_image(p, (height, width), gray=True) for p in args.mask]) > 0.5).float()
    return {"image": image, "mask": mask}


__all__ = ["TextConditioning", "ClassConditioning", "LayoutConditioning", "SRConditioning", "InpaintConditioning",
           "IMAGE_FLAGS", "image_inputs", "load_image", "parse_boxes"]
