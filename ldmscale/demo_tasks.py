"""What the demo pipeline measures for each task, on images generated from the trained run (EMA weights).

The task is the conditioner: text → prompt adherence, none → one clean shape, class → class adherence,
layout → box IoU, sr → PSNR over bicubic, inpaint → masked-region PSNR over a mean fill. Every input is
fixed: seeds 0..N-1, and held-out images (synthetic indices from 10^8 on, never in the training shards).
Each evaluator returns (scores for eval.json, a one-line summary, images for the grid).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ldmscale.config import Config
from ldmscale.data import synthetic
from ldmscale.data.conditioning import box_mask, low_res_of
from ldmscale.evaluation import psnr
from ldmscale.inference import to_uint8

HELD_OUT_START = 10**8  # the pipeline's validation shards start here too
GRID_COLUMNS = 12


def held_out_images(cfg: Config, count: int) -> tuple[list[synthetic.ShapeSpec], torch.Tensor]:
    """Specs and pixels [N,3,H,W] in [-1,1] of `count` held-out synthetic images."""
    specs = [synthetic.draw_spec(cfg.seed, HELD_OUT_START + i) for i in range(count)]
    arrays = np.stack([np.asarray(synthetic.render(s, cfg.data.resolution)) for s in specs])
    return specs, torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1


def mean_fill(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting baseline: every masked pixel gets the mean colour of the image's visible pixels."""
    keep = 1 - mask
    mean = (pixels * keep).flatten(2).sum(2) / keep.flatten(2).sum(2).clamp_min(1)  # [N,3]
    return pixels * keep + mean[:, :, None, None] * mask


class TaskEvaluator:
    """Generates the evaluation images of one run and scores them."""

    def __init__(self, cfg: Config, models: Any, batch_size: int):
        self.cfg, self.models, self.batch_size = cfg, models, batch_size
        self.count = len(synthetic.eval_prompts()) * cfg.pipeline.eval_seeds_per_prompt
        self.images: torch.Tensor | None = None  # every generated image [N,3,H,W] in [0,1], for FID / CLIP
        self.prompts: list[str] | None = None  # their prompts (text task), for the CLIP score

    def generate(self, **inputs: Any) -> torch.Tensor:
        from ldmscale.inference import SampleInputs, SamplingSettings, generate

        settings = SamplingSettings(seeds=list(range(self.count)), batch_size=self.batch_size,
                                    # nothing to guide: these kinds never drop a condition
                                    guidance_scale=None if self.models.denoiser.conditioning.guidable else 1.0)
        self.images = generate(self.models, SampleInputs(**inputs), settings).images
        self.prompts = list(inputs["prompts"]) if "prompts" in inputs else None
        return self.images

    def run(self) -> tuple[dict[str, Any], str, list[torch.Tensor]]:
        name = self.cfg.conditioner.kind
        if name not in EVALUATORS:
            raise ValueError(f"the demo has no evaluation for conditioner.kind={name!r} (known: {sorted(EVALUATORS)})")
        return EVALUATORS[name](self)

    def eval_text(self) -> tuple[dict[str, Any], str, list[torch.Tensor]]:
        per_prompt = self.cfg.pipeline.eval_seeds_per_prompt
        asked = [prompt for prompt in synthetic.eval_prompts() for _ in range(per_prompt)]
        images = self.generate(prompts=[synthetic.caption(*a) for a in asked])
        scores = synthetic.score_adherence(list(to_uint8(images)), asked, holdout=self.cfg.pipeline.holdout)
        held = scores["held_out"]
        summary = (f"prompt adherence on {scores['num_images']} images (chance in brackets): "
                   f"colour {scores['colour']:.1%} ({scores['chance']['colour']:.0%}), "
                   f"shape {scores['shape']:.1%} ({scores['chance']['shape']:.0%}), "
                   f"position {scores['position']:.1%} ({scores['chance']['position']:.0%}); held-out pair(s) "
                   f"{', '.join(scores['held_out_pairs']) or '-'}: "
                   + ", ".join(f"{k} {v:.0%}" for k, v in held.items() if v is not None))
        return scores, summary, [images[::per_prompt]]

    def eval_none(self) -> tuple[dict[str, Any], str, list[torch.Tensor]]:
        images = self.generate(num_images=self.count)
        scores = synthetic.score_unconditional(list(to_uint8(images)))
        return scores, (f"unconditional: {scores['clean_single_shape']:.1%} of {self.count} samples hold exactly "
                        "one clean shape"), [images[:72]]

    def eval_class(self) -> tuple[dict[str, Any], str, list[torch.Tensor]]:
        classes = [i % synthetic.NUM_CLASSES for i in range(self.count)]
        images = self.generate(class_labels=classes)
        scores = synthetic.score_classes(list(to_uint8(images)), classes)
        return scores, (f"class adherence on {self.count} images: {scores['class']:.1%} (chance "
                        f"{scores['chance']['class']:.1%}); colour {scores['colour']:.1%}, shape "
                        f"{scores['shape']:.1%}"), [images[:72]]

    def eval_layout(self) -> tuple[dict[str, Any], str, list[torch.Tensor]]:
        specs, _ = held_out_images(self.cfg, self.count)
        # One box per image, padded to max_boxes as in training (the layout encoder sees the padding tokens).
        boxes = torch.zeros(self.count, self.cfg.conditioner.max_boxes, 4)
        classes = torch.full((self.count, self.cfg.conditioner.max_boxes), -1, dtype=torch.long)
        boxes[:, 0] = torch.tensor([s.bbox for s in specs], dtype=torch.float32)
        classes[:, 0] = torch.tensor([s.class_id for s in specs])
        images = self.generate(boxes=boxes, box_classes=classes)
        scores = synthetic.score_layout(list(to_uint8(images)), [s.bbox for s in specs], [s.class_id for s in specs])
        return scores, (f"layout: {scores['iou_at_least_0.5']:.1%} of {self.count} samples have IoU ≥ 0.5 with "
                        f"their box (mean IoU {scores['mean_iou']:.2f}); class {scores['class']:.1%}"), [images[:72]]

    def eval_sr(self) -> tuple[dict[str, Any], str, list[torch.Tensor]]:
        _, target = held_out_images(self.cfg, self.count)
        low_res = low_res_of(target, self.cfg.conditioner.sr_factor)
        images = self.generate(low_res=low_res) * 2 - 1
        bicubic = F.interpolate(low_res, size=target.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
        with torch.no_grad():  # the first stage's own reconstruction bounds what any latent model can reach
            ae = self.models.autoencoder
            recon = ae.decode(ae.latent_from_moments(ae.encode_moments(target), generator=torch.Generator().manual_seed(0)))
        scores = {"psnr": psnr(target, images).mean().item(), "bicubic_psnr": psnr(target, bicubic).mean().item(),
                  "autoencoder_psnr": psnr(target, recon).mean().item(), "num_images": self.count}
        scores["gain_db"] = scores["psnr"] - scores["bicubic_psnr"]
        summary = (f"4x super-resolution on {self.count} held-out images: PSNR {scores['psnr']:.2f} dB vs bicubic "
                   f"{scores['bicubic_psnr']:.2f} dB ({scores['gain_db']:+.2f} dB; autoencoder ceiling "
                   f"{scores['autoencoder_psnr']:.2f} dB)")
        return scores, summary, [(t[:GRID_COLUMNS] + 1) / 2 for t in (bicubic, images, target)]

    def eval_inpaint(self) -> tuple[dict[str, Any], str, list[torch.Tensor]]:
        _, target = held_out_images(self.cfg, self.count)
        grid = self.models.autoencoder.downsample_factor
        height, width = target.shape[-2:]
        mask = torch.stack([box_mask(np.random.default_rng([self.cfg.seed, i, 12]), height, width, grid)
                            for i in range(self.count)])
        images = self.generate(image=target, mask=mask) * 2 - 1
        baseline = mean_fill(target, mask)
        scores = {"masked_psnr": psnr(target, images, mask=mask).mean().item(),
                  "mean_fill_psnr": psnr(target, baseline, mask=mask).mean().item(),
                  "mask_fraction": mask.mean().item(), "num_images": self.count}
        scores["gain_db"] = scores["masked_psnr"] - scores["mean_fill_psnr"]
        summary = (f"inpainting on {self.count} held-out images: masked-region PSNR {scores['masked_psnr']:.2f} dB "
                   f"vs mean fill {scores['mean_fill_psnr']:.2f} dB ({scores['gain_db']:+.2f} dB)")
        shown = target * (1 - mask)  # the input: the masked image (masked pixels at mid grey)
        return scores, summary, [(t[:GRID_COLUMNS] + 1) / 2 for t in (shown, images, target)]


# What the demo measures for each conditioning kind (a plain dict, as ldmscale.conditioning.KINDS).
EVALUATORS = {"text": TaskEvaluator.eval_text, "none": TaskEvaluator.eval_none, "class": TaskEvaluator.eval_class,
              "layout": TaskEvaluator.eval_layout, "sr": TaskEvaluator.eval_sr,
              "inpaint": TaskEvaluator.eval_inpaint}
