"""CLIP score (Hessel et al. 2021, scaled as torchmetrics reports it): 100 · max(cos(image, text), 0),
with an open_clip model from local weights (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# A tiny CLIP with FIXED random weights (seeded), as the demo's text tower: tests and the CPU demo's plumbing.
TINY_CLIP_MODEL = "ldmscale-tiny-clip"
TINY_CLIP_SEED = 20220102


def _tiny_clip() -> nn.Module:
    import open_clip

    from ldmscale.models.conditioners import TINY_TEXT_CFG, TINY_TEXT_EMBED_DIM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_CLIP_SEED)
        return open_clip.CLIP(TINY_TEXT_EMBED_DIM, open_clip.CLIPVisionCfg(layers=2, width=64, head_width=16,
                                                                            patch_size=8, image_size=32),
                              open_clip.CLIPTextCfg(**TINY_TEXT_CFG))


class CLIPScorer(nn.Module):
    """Frozen open_clip model: (images in [-1, 1], prompts) → per-image CLIP score [B] (float64).

    Images are resized (shorter side, bicubic, antialiased) to the model's input size, centre-cropped and
    normalised with the model's mean/std, as open_clip's own eval transform does for PIL images."""

    def __init__(self, model_name: str, weights: Optional[str | Path] = None, key: str = "eval.clip_weights"):
        super().__init__()
        import open_clip

        from ldmscale.runs import read_weights

        if model_name == TINY_CLIP_MODEL:
            model = _tiny_clip()
            self.tokenizer = open_clip.tokenize
        else:
            if model_name not in open_clip.list_models():
                raise ValueError(f"eval.clip_model={model_name!r} is not an open_clip model "
                                 f"(known: {', '.join(open_clip.list_models()[:8])}, ...)")
            if not weights:
                raise ValueError(f"eval.clip_model={model_name!r} needs {key}=PATH (open_clip_pytorch_model.bin "
                                 "or .safetensors): weights cannot be downloaded here")
            model = open_clip.create_model(model_name, pretrained=None, device="cpu")
            self.tokenizer = open_clip.get_tokenizer(model_name)
        if weights:
            model.load_state_dict(read_weights(weights, what=key))
        self.model = model.eval().requires_grad_(False)
        self.model_name = model_name
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("mean", torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1),
                             persistent=False)

    def train(self, mode: bool = True) -> CLIPScorer:
        return super().train(False)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] → the model's normalised input [B,3,h,w]."""
        x = (pixels.float().clamp(-1, 1) + 1) / 2
        scale = max(self.size[0] / x.shape[-2], self.size[1] / x.shape[-1])
        resized = (max(self.size[0], round(x.shape[-2] * scale)), max(self.size[1], round(x.shape[-1] * scale)))
        x = F.interpolate(x, size=resized, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (resized[0] - self.size[0]) // 2, (resized[1] - self.size[1]) // 2
        x = x[..., top:top + self.size[0], left:left + self.size[1]]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(prompts)} prompts")
        device = self.mean.device
        image = F.normalize(self.model.encode_image(self.preprocess(pixels.to(device))).float(), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(device)).float(), dim=-1)
        return (100 * (image * text).sum(-1)).clamp_min(0).double()  # [B]
