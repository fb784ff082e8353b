"""The conditioning networks: frozen open_clip text towers (one, or SDXL's pair), class and layout embedders,
the concat inputs of SR/inpainting and SDXL's size/crop embedding. What a conditioning *kind* means
(cache, collation, CFG null/drop, denoiser inputs, sampling inputs) lives in `ldmscale.conditioning`."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Tiny text towers with FIXED random weights (no pretrained weights offline): the CPU demo and tests use them.
# Each: open_clip text config, projection width, seed, activation. The two `sdxl` ones stand for SDXL's pair:
# CLIP ViT-L/14 (QuickGELU, OpenAI) and OpenCLIP ViT-bigG/14 (GELU), at small widths.
TINY_TEXT_MODEL = "ldmscale-tiny-text"
TINY_TEXT_SEED = 20220101
TINY_TEXT_CFG: dict[str, Any] = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
TINY_TEXT_EMBED_DIM = 64
TINY_TEXT_MODELS: dict[str, dict[str, Any]] = {
    TINY_TEXT_MODEL: dict(text_cfg=TINY_TEXT_CFG, embed_dim=TINY_TEXT_EMBED_DIM, seed=TINY_TEXT_SEED),
    "ldmscale-tiny-clip-l": dict(text_cfg=dict(TINY_TEXT_CFG, width=32, layers=3), embed_dim=32, seed=20230726,
                                 quick_gelu=True),
    "ldmscale-tiny-bigg": dict(text_cfg=dict(TINY_TEXT_CFG, width=48, layers=3), embed_dim=40, seed=20230727),
}


def text_tower_arch(model_name: str) -> dict[str, Any]:
    """{embed_dim, text_cfg, quick_gelu} of a tiny or open_clip text tower, from its config alone (no weights)."""
    if model_name in TINY_TEXT_MODELS:
        arch = TINY_TEXT_MODELS[model_name]
        return dict(embed_dim=arch["embed_dim"], text_cfg=dict(arch["text_cfg"]),
                    quick_gelu=bool(arch.get("quick_gelu", False)), seed=arch["seed"])
    import open_clip

    arch = open_clip.get_model_config(model_name)
    if arch is None:
        raise ValueError(f"conditioner text model {model_name!r} is neither a tiny tower "
                         f"({', '.join(TINY_TEXT_MODELS)}) nor an open_clip model "
                         f"(known: {', '.join(open_clip.list_models()[:8])}, ...)")
    return dict(embed_dim=int(arch["embed_dim"]), text_cfg=dict(arch["text_cfg"]),
                quick_gelu=bool(arch.get("quick_gelu", False)))


def _build_text_tower(arch: dict[str, Any]) -> nn.Module:
    import open_clip
    from open_clip.model import _build_text_tower as build

    text_cfg = open_clip.CLIPTextCfg(**arch["text_cfg"])
    if "seed" not in arch:
        return build(arch["embed_dim"], text_cfg, quick_gelu=arch["quick_gelu"])
    # fork_rng: the same weights in every process, whatever the caller's global RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(arch["seed"])
        return build(arch["embed_dim"], text_cfg, quick_gelu=arch["quick_gelu"])


# HF transformers' CLIPTextModel names (SDXL's `conditioner.embedders.0.transformer.*`, diffusers'
# text_encoder/ and text_encoder_2/) → open_clip's TextTransformer names. transformers >= 5 saves a plain
# CLIPTextModel without the `text_model.` prefix (WithProjection keeps it): both spellings are read.
_HF_BARE = ("embeddings.", "encoder.layers.", "final_layer_norm.")
_HF_RENAME = (("text_model.embeddings.token_embedding.", "token_embedding."),
              ("text_model.final_layer_norm.", "ln_final."), (".self_attn.out_proj.", ".attn.out_proj."),
              (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
              (".mlp.fc2.", ".mlp.c_proj."), ("text_model.encoder.layers.", "transformer.resblocks."))


def open_clip_text_state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel(WithProjection) state dict → open_clip TextTransformer keys (q/k/v fused, projection
    transposed); exact, so the same weights give the same hidden states."""
    state = {f"text_model.{k}" if k.startswith(_HF_BARE) else k: v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
            continue
        match = re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if match:
            continue  # fused below
        for src, dst in _HF_RENAME:
            key = key.replace(src, dst)
        out[key] = value
    layers = {int(m.group(1)) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        for part in ("weight", "bias"):
            parts = [state.get(f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{part}") for p in "qkv"]
            if all(p is not None for p in parts):
                out[f"transformer.resblocks.{i}.attn.in_proj_{part}"] = torch.cat(parts)  # type: ignore[arg-type]
    return out


def hf_text_state_from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `open_clip_text_state_from_hf` (tests write SDXL layouts with it)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif match := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            for name, part in zip("qkv", value.chunk(3)):
                out[f"text_model.encoder.layers.{match.group(1)}.self_attn.{name}_proj.{match.group(2)}"] = part
        elif key != "attn_mask":
            for dst, src in reversed(_HF_RENAME):
                key = key.replace(src, dst)
            out[key] = value
    return out


def text_tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any text-tower state dict (open_clip tower, full open_clip CLIP, `text.`-prefixed, or HF CLIP) → the
    open_clip TextTransformer's keys."""
    if any(k.startswith(("text_model.", *_HF_BARE)) for k in state):
        return open_clip_text_state_from_hf(state)
    state = {k[len("text."):] if k.startswith("text.") else k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}


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


def _weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class TextEncoder(nn.Module):
    """Frozen open_clip text tower: captions → token embeddings (last or penultimate layer) + pooled."""

    def __init__(self, model_name: str = TINY_TEXT_MODEL, weights: Optional[str] = None, layer: str = "last",
                 context_length: int = 77, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, final_norm: bool = True,
                 state: Optional[dict[str, torch.Tensor]] = None):
        """final_norm: apply ln_final to the penultimate tokens (SD2's recipe; SDXL's towers do not).
        state: weights in any `text_tower_state` layout (instead of a `weights` file)."""
        super().__init__()
        import open_clip

        if layer not in ("last", "penultimate"):
            raise ValueError(f"conditioner.text_layer={layer!r} is not one of ['last', 'penultimate']")
        self.model_name, self.layer, self.weights_path, self.final_norm = model_name, layer, weights, final_norm
        self.arch = text_tower_arch(model_name)
        self.tower = _build_text_tower(self.arch)
        if weights:
            state = _load_state_dict(weights)
        text_cfg = self.arch["text_cfg"]
        self.num_layers = int(text_cfg.get("layers", 12))
        self.width = int(text_cfg.get("width", 512))
        self.pooled_dim = int(self.arch["embed_dim"])
        if state is not None:
            state = text_tower_state(state)
            if "text_projection" not in state and self.tower.text_projection is not None:
                # transformers' CLIPTextModel (SDXL's ViT-L: text_encoder/, embedders.0) has no projection:
                # its pooled output is the final-normed EOT state, and no random projection may be left in
                self.tower.text_projection = None
                self.pooled_dim = self.width
            self.tower.load_state_dict(state)
        self.tokenizer = open_clip.tokenize
        self.context_length = context_length
        self.tower.requires_grad_(False).eval()
        if not any(p.is_meta for p in self.tower.parameters()):
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
        """captions → token ids [B, context_length] (open_clip's BPE: SOT … EOT, zero padding)."""
        return self.tokenizer(list(captions), context_length=self.context_length).to(self.device)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> TextEncoding:
        index = self.num_layers - (2 if self.layer == "penultimate" else 1)
        out = self.tower.forward_intermediates(ids.to(self.device), indices=[index],
                                               normalize_intermediates=self.final_norm, output_fmt="NLC")
        tokens = out["text_intermediates"][0]  # SD2's penultimate: ln_final applied; SDXL's: not
        lengths = ids.argmax(dim=-1) + 1  # EOT has the largest id in CLIP's vocabulary
        return TextEncoding(tokens=tokens, pooled=out["text_features"], lengths=lengths.long().to(tokens.device))

    def encode(self, captions: list[str]) -> TextEncoding:
        """captions → TextEncoding(tokens [B,77,D], pooled [B,P], lengths [B])."""
        return self.encode_ids(self.tokenize(captions))

    def forward(self, captions: list[str]) -> TextEncoding:
        return self.encode(captions)

    def fingerprint(self) -> dict[str, Any]:
        """Identity of what this encoder computes: architecture, layer, sha256 of the weights, dtype.

        The cache manifest stores it; training and sampling refuse a cache made by another encoder."""
        arch = {k: v for k, v in self.arch.items() if k != "quick_gelu" or v}
        out = dict(model=self.model_name, arch=json.loads(json.dumps(arch, default=str)), layer=self.layer,
                   context_length=self.context_length, width=self.width, weights_sha256=_weights_digest(self.tower),
                   dtype=str(self.dtype).replace("torch.", ""))
        if not self.final_norm:
            out["final_norm"] = False
        return out


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from ldmscale.runs import read_weights  # the one reader of weights files (never unpickles code)

    return read_weights(path, what="conditioner text weights")


def build_text_encoder(cond_cfg, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> TextEncoder:
    """The frozen text encoder named by a `ConditionerConfig` (text_model, text_weights, text_layer)."""
    return TextEncoder(cond_cfg.text_model, weights=cond_cfg.text_weights, layer=cond_cfg.text_layer,
                       context_length=cond_cfg.context_length, device=device, dtype=dtype)


# ---------------------------------------------------------------------------- SDXL: two towers + micro-conditioning
SGM_TOWER_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
DIFFUSERS_TOWER_FOLDERS = ("text_encoder", "text_encoder_2")


def sdxl_tower_states(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The two text towers' weights from SDXL's sgm single file (`conditioner.embedders.{0,1}.*`) or a
    diffusers folder (`text_encoder/`, `text_encoder_2/`), each in the layout it was written in."""
    path = Path(path)
    if path.is_dir():
        states = []
        for sub in DIFFUSERS_TOWER_FOLDERS:
            folder = path / sub
            files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
            if not files:
                raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weights (diffusers SDXL layout)")
            state: dict[str, torch.Tensor] = {}
            for file in files:
                state.update(_load_state_dict(str(file)))
            states.append(state)
        return states[0], states[1]
    state = _load_state_dict(str(path))
    towers = [{k[len(p):]: v for k, v in state.items() if k.startswith(p)} for p in SGM_TOWER_PREFIXES]
    if not all(towers):
        raise KeyError(f"{path}: not an SDXL sgm checkpoint (no keys under {' / '.join(SGM_TOWER_PREFIXES)})")
    return towers[0], towers[1]


class SDXLTextEncoder(nn.Module):
    """SDXL's frozen text pair: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, penultimate hidden states (no final
    LayerNorm) concatenated per token, and bigG's pooled projected embedding (sgm FrozenOpenCLIPEmbedder2)."""

    def __init__(self, model_1: str, model_2: str, *, weights: Optional[str] = None,
                 weights_2: Optional[str] = None, context_length: int = 77,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        """weights: an sgm single file or diffusers folder holding both towers, or tower 1's own file (then
        weights_2 is tower 2's)."""
        super().__init__()
        states: tuple[Any, Any] = (None, None)
        if weights and (Path(weights).is_dir() or _is_sgm_file(weights)):
            states = sdxl_tower_states(weights)
        elif weights or weights_2:
            states = (_load_state_dict(weights) if weights else None, _load_state_dict(weights_2) if weights_2 else None)
        common = dict(layer="penultimate", context_length=context_length, device=device, dtype=dtype, final_norm=False)
        self.first = TextEncoder(model_1, state=states[0], **common)  # type: ignore[arg-type]
        self.second = TextEncoder(model_2, state=states[1], **common)  # type: ignore[arg-type]
        self.context_length = context_length
        self.widths = (self.first.width, self.second.width)
        self.width = sum(self.widths)
        self.pooled_dim = self.second.pooled_dim

    def train(self, mode: bool = True) -> SDXLTextEncoder:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.first.device

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """One id sequence serves both towers: they share CLIP's BPE vocabulary (only padding differs, and
        causal attention keeps padding from changing the real tokens)."""
        return self.first.tokenize(captions)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> TextEncoding:
        first, second = self.first.encode_ids(ids), self.second.encode_ids(ids)
        tokens = torch.cat([first.tokens, second.tokens.to(first.tokens)], dim=-1)  # [B,L,768+1280]
        return TextEncoding(tokens=tokens, pooled=second.pooled, lengths=first.lengths)

    def encode(self, captions: list[str]) -> TextEncoding:
        return self.encode_ids(self.tokenize(captions))

    def forward(self, captions: list[str]) -> TextEncoding:
        return self.encode(captions)

    def fingerprint(self) -> dict[str, Any]:
        return {"towers": [self.first.fingerprint(), self.second.fingerprint()]}


def _is_sgm_file(path: str) -> bool:
    if not Path(path).is_file():
        return False
    from ldmscale.runs import weight_names

    return any(k.startswith(SGM_TOWER_PREFIXES[0]) for k in weight_names(path, what="conditioner text weights"))


def size_embedding(values: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """SDXL micro-conditioning: [B, n] numbers (sizes, crop offsets) → [B, n*dim], each number a sinusoidal
    embedding (sgm ConcatTimestepEmbedderND: cos first, max period 10^4)."""
    from ldmscale.models.unet import timestep_embedding

    batch, count = values.shape
    return timestep_embedding(values.reshape(-1), dim).reshape(batch, count * dim)


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


def null_conditions(cond: dict[str, torch.Tensor], kind: str,
                    num_classes: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The unconditional input for CFG sampling of a `kind` model (its registry entry decides; concat kept)."""
    from ldmscale.conditioning import kind_named

    return {**cond, **kind_named(kind, num_classes=num_classes or 0).null(cond)}


def drop_conditions(cond: dict[str, torch.Tensor], kind: str, rate: float,
                    generator: Optional[torch.Generator] = None,
                    num_classes: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Classifier-free-guidance dropout of a `kind` model: each sample's condition becomes the null one
    with probability `rate` (per embedder where the kind has several)."""
    from ldmscale.conditioning import kind_named

    return kind_named(kind, num_classes=num_classes or 0).drop(cond, rate, generator)
