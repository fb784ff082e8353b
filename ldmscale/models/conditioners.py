"""Conditioners: the frozen open_clip text encoder, class and layout embedders, concat (SR/inpaint)
inputs, and classifier-free-guidance dropout (`drop_conditions`) / unconditional inputs (`null_conditions`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

# The tiny text tower tests and the CPU demo use: open_clip's TextTransformer with FIXED random weights.
TINY_TEXT_MODEL = "ldmscale-tiny-text"
TINY_TEXT_SEED = 20220101
TINY_TEXT_CFG: dict[str, Any] = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
TINY_TEXT_EMBED_DIM = 64


@dataclass
class TextEncoding:
    """Output of `TextEncoder.encode`."""

    tokens: torch.Tensor  # [B, L, D] per-token embeddings (cross-attention context)
    pooled: torch.Tensor  # [B, P] projected EOT embedding
    lengths: torch.Tensor  # [B] long: tokens up to and including EOT

    @property
    def mask(self) -> torch.Tensor:
        """[B, L] bool, True for real tokens (SOT..EOT)."""
        positions = torch.arange(self.tokens.shape[1], device=self.lengths.device)
        return positions[None] < self.lengths[:, None]


def _build_tiny_text_tower():
    import open_clip
    from open_clip.model import _build_text_tower

    # fork_rng: the same weights in every process, whatever the caller's global RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_TEXT_SEED)
        tower = _build_text_tower(TINY_TEXT_EMBED_DIM, open_clip.CLIPTextCfg(**TINY_TEXT_CFG))
    return tower, dict(embed_dim=TINY_TEXT_EMBED_DIM, text_cfg=dict(TINY_TEXT_CFG), seed=TINY_TEXT_SEED)


class TextEncoder(nn.Module):
    """Frozen open_clip text tower: captions → token embeddings (last or penultimate layer) + pooled."""

    def __init__(self, model_name: str = TINY_TEXT_MODEL, weights: Optional[str] = None, layer: str = "last",
                 context_length: int = 77, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        import open_clip

        if layer not in ("last", "penultimate"):
            raise ValueError(f"conditioner.text_layer={layer!r} is not one of ['last', 'penultimate']")
        self.model_name, self.layer, self.weights_path = model_name, layer, weights
        if model_name == TINY_TEXT_MODEL:
            tower, arch = _build_tiny_text_tower()
            if weights:
                from ldmscale.runs import read_weights

                state = read_weights(weights, what="conditioner.text_weights")
                state = {k[len("text."):] if k.startswith("text.") else k: v for k, v in state.items()}
                tower.load_state_dict(state)
            self.tokenizer = open_clip.tokenize
        else:
            if model_name not in open_clip.list_models():
                raise ValueError(f"conditioner.text_model={model_name!r} is not an open_clip model "
                                 f"(known: {', '.join(open_clip.list_models()[:8])}, ...)")
            model = open_clip.create_model(model_name, pretrained=weights, device="cpu")
            arch = open_clip.get_model_config(model_name)
            if hasattr(model, "visual"):
                model.visual = None  # only the text tower is needed
            tower = model.text if hasattr(model, "text") else model
            self.tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
        self.tower = tower
        self.arch = arch
        self.context_length = context_length
        text_cfg = arch["text_cfg"]
        self.num_layers = int(text_cfg.get("layers", 12))
        self.width = int(text_cfg.get("width", 512))
        self.pooled_dim = int(arch["embed_dim"])
        self.tower.requires_grad_(False).eval()
        self.to(device=device, dtype=dtype)

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # frozen: dropout stays off

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.tower.parameters()).device

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer")
        ids = self.tokenizer(list(captions)) if self.model_name != TINY_TEXT_MODEL else \
            self.tokenizer(list(captions), context_length=self.context_length)
        return ids.to(self.device)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> TextEncoding:
        index = self.num_layers - (2 if self.layer == "penultimate" else 1)
        if hasattr(self.tower, "text_projection") and hasattr(self.tower, "transformer") and \
                hasattr(self.tower, "visual"):  # an open_clip CLIP (text tower at top level)
            out = self.tower.forward_intermediates(text=ids, text_indices=[index], normalize=False,
                                                   normalize_intermediates=True)
        else:  # an open_clip TextTransformer
            out = self.tower.forward_intermediates(ids, indices=[index], normalize_intermediates=True,
                                                   output_fmt="NLC")
        tokens = out["text_intermediates"][0]  # ln_final applied (SD2's penultimate recipe)
        lengths = ids.argmax(dim=-1) + 1  # EOT has the largest id in CLIP's vocabulary
        return TextEncoding(tokens=tokens, pooled=out["text_features"], lengths=lengths.long())

    def encode(self, captions: list[str]) -> TextEncoding:
        """captions → TextEncoding(tokens [B,77,D], pooled [B,P], lengths [B])."""
        return self.encode_ids(self.tokenize(captions))

    def forward(self, captions: list[str]) -> TextEncoding:
        return self.encode(captions)

    def fingerprint(self) -> dict[str, Any]:
        """Identity of what this encoder computes: architecture, layer, sha256 of the weights, dtype.

        The cache manifest stores it; training and sampling refuse a cache made by another encoder."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.tower.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return dict(model=self.model_name, arch=json.loads(json.dumps(self.arch, default=str)), layer=self.layer,
                    context_length=self.context_length, width=self.width, weights_sha256=digest.hexdigest(),
                    dtype=str(self.dtype).replace("torch.", ""))


def build_text_encoder(cond_cfg, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> TextEncoder:
    """The frozen text encoder named by a `ConditionerConfig` (text_model, text_weights, text_layer)."""
    return TextEncoder(cond_cfg.text_model, weights=cond_cfg.text_weights, layer=cond_cfg.text_layer,
                       context_length=cond_cfg.context_length, device=device, dtype=dtype)


class ClassEmbedder(nn.Module):
    """Learned class embedding with one extra row: the null class (id = num_classes) for CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        # -1 is accepted as an alias of the null class
        labels = torch.where(class_labels < 0, torch.full_like(class_labels, self.num_classes), class_labels)
        return self.embedding(labels)


class LayoutEncoder(nn.Module):
    """Layout-to-image conditioning (LDM sec. 4.3.1): boxes + class tokens → transformer → context tokens."""

    def __init__(self, num_classes: int, dim: int = 64, context_dim: int = 64, depth: int = 2, heads: int = 4,
                 max_boxes: int = 8):
        super().__init__()
        self.num_classes, self.max_boxes = num_classes, max_boxes
        self.class_embedding = nn.Embedding(num_classes + 1, dim)  # last row: padding / null box
        # The class and box features are summed, so they must start at the same scale: at nn.Embedding's
        # N(0, 1) the class vector is ~5x the box MLP's output and the boxes are learned far more slowly
        # (measured: a demo layout model followed classes but ignored where the boxes were).
        nn.init.normal_(self.class_embedding.weight, std=dim**-0.5)
        self.box_proj = nn.Sequential(nn.Linear(4 * 8, dim), nn.SiLU(), nn.Linear(dim, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.register_buffer("freqs", 2.0 ** torch.arange(4) * torch.pi, persistent=False)

    def forward(self, boxes: torch.Tensor, box_classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """boxes [B,N,4] in [0,1], box_classes [B,N] (-1 = padding) → (context [B,N,D], mask [B,N])."""
        padding = box_classes < 0
        classes = torch.where(padding, torch.full_like(box_classes, self.num_classes), box_classes)
        angles = boxes[..., None] * self.freqs  # [B,N,4,4] Fourier features of the coordinates
        fourier = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(2)  # [B,N,32]
        h = self.class_embedding(classes) + self.box_proj(fourier)
        h = self.norm(self.transformer(h))  # padding boxes are attended too: an all-padding layout stays finite
        return self.proj_out(h), ~padding


def rasterize_boxes(boxes: torch.Tensor, box_classes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """boxes [B,N,4] in [0,1] (padding: class -1) → [B,1,h,w]: the fraction of each cell any box covers."""
    height, width = size
    ys = torch.arange(height + 1, device=boxes.device, dtype=boxes.dtype) / height  # cell edges
    xs = torch.arange(width + 1, device=boxes.device, dtype=boxes.dtype) / width
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))  # [B,N,1]
    cover_x = (torch.minimum(x1, xs[1:]) - torch.maximum(x0, xs[:-1])).clamp(min=0) * width  # [B,N,w]
    cover_y = (torch.minimum(y1, ys[1:]) - torch.maximum(y0, ys[:-1])).clamp(min=0) * height  # [B,N,h]
    cover = cover_y[..., :, None] * cover_x[..., None, :]  # [B,N,h,w]
    cover = cover * (box_classes >= 0)[..., None, None].to(cover.dtype)
    return cover.amax(dim=1, keepdim=True) if cover.shape[1] else cover.new_zeros(boxes.shape[0], 1, height, width)


def upsample_low_res(low_res: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Super-resolution concat conditioning: bicubic-upsample the low-res input to the latent size."""
    return F.interpolate(low_res, size=size, mode="bicubic", align_corners=False)


def inpaint_concat(mask: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
    """Inpainting concat conditioning: mask [B,1,H,W] (resized to the latent) ‖ masked-image latent."""
    mask = F.interpolate(mask.float(), size=masked_latents.shape[-2:], mode="nearest")
    return torch.cat([mask, masked_latents], dim=1)


def _null_like(cond: dict[str, torch.Tensor], kind: str, num_classes: Optional[int]) -> dict[str, torch.Tensor]:
    null: dict[str, torch.Tensor] = {}
    if kind == "text":
        if "context" in cond:
            null["context"] = torch.zeros_like(cond["context"])
        if "context_mask" in cond:
            null["context_mask"] = torch.ones_like(cond["context_mask"])  # keep attention finite
        if "pooled" in cond:
            null["pooled"] = torch.zeros_like(cond["pooled"])
    elif kind == "class":
        if "class_labels" in cond:
            null["class_labels"] = torch.full_like(cond["class_labels"], -1 if num_classes is None else num_classes)
    elif kind == "layout":
        if "box_classes" in cond:
            null["box_classes"] = torch.full_like(cond["box_classes"], -1)
        if "boxes" in cond:
            null["boxes"] = torch.zeros_like(cond["boxes"])
    elif kind not in ("sr", "inpaint", "none"):
        raise ValueError(f"conditioner.kind={kind!r} is not one of text, class, layout, sr, inpaint, none")
    return null


def null_conditions(cond: dict[str, torch.Tensor], kind: str,
                    num_classes: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The unconditional input for CFG sampling: text → zero context (mask all-True), class → null id
    (`num_classes`, or -1 which the class embedder maps to it), layout → all boxes padding. Concat kept."""
    out = dict(cond)
    out.update(_null_like(cond, kind, num_classes))
    return out


def drop_conditions(cond: dict[str, torch.Tensor], kind: str, rate: float,
                    generator: Optional[torch.Generator] = None,
                    num_classes: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Classifier-free-guidance dropout: replace each sample's condition by the null one with prob. `rate`."""
    if rate <= 0 or kind in ("sr", "inpaint", "none"):
        return dict(cond)
    null = _null_like(cond, kind, num_classes)
    if not null:
        return dict(cond)
    first = next(iter(null.values()))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    drop = torch.rand(first.shape[0], generator=generator, device=gen_device) < rate  # [B]
    out = dict(cond)
    for key, null_value in null.items():
        keep = drop.to(null_value.device).view(-1, *([1] * (null_value.dim() - 1)))
        out[key] = torch.where(keep, null_value, cond[key])
    return out
