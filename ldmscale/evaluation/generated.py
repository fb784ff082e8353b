"""FID and CLIP score of generated images, split over ranks: image i (seed `eval.seed + i`) is made by rank
i mod world_size, and feature sums all-reduce, so any number of ranks gives the single-rank numbers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as tdist

from ldmscale.config import Config, EvalConfig
from ldmscale.evaluation.clip_score import TINY_CLIP_MODEL, CLIPScorer
from ldmscale.evaluation.fid import (
    FeatureStats,
    InceptionFeatures,
    frechet_distance,
    load_stats,
    resolve_inception_weights,
)

# images_of(indices) → pixels [len(indices), 3, H, W] in [-1, 1] of those evaluation images
ImagesOf = Callable[[list[int]], torch.Tensor]


def eval_prompts(cfg: EvalConfig, fallback: Sequence[str] = ()) -> list[str]:
    """The fixed prompt set: eval.prompts_file, else eval.prompts, else `fallback` (trainer.sample_prompts)."""
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"eval.prompts_file={cfg.prompts_file!r}: no such file (one prompt a line)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = list(cfg.prompts) or list(fallback)
    if not prompts:
        raise ValueError("eval.prompts (or eval.prompts_file) is empty: a text model needs prompts to evaluate")
    return prompts


def _rank_world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


class SampleEvaluator:
    """The networks and reference statistics of one evaluation setup (built once, reused every time)."""

    def __init__(self, cfg: EvalConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        weights = resolve_inception_weights(cfg.inception_weights)
        self.inception = InceptionFeatures(weights).to(device) if weights is not None else None
        self.reference = load_stats(cfg.reference_stats) if cfg.reference_stats else None
        use_clip = bool(cfg.clip_weights) or cfg.clip_model == TINY_CLIP_MODEL
        self.clip = CLIPScorer(cfg.clip_model, cfg.clip_weights).to(device) if use_clip else None

    @property
    def enabled(self) -> bool:
        return self.inception is not None or self.clip is not None

    def evaluate(self, images_of: ImagesOf, num_images: int, *, prompts: Optional[Sequence[str]] = None,
                 batch_size: Optional[int] = None) -> dict[str, Any]:
        """Collective over all ranks. `prompts[i]` is image i's prompt (CLIP score only with prompts).

        Returns {"num_images", "fid" (with reference stats), "clip_score" (with prompts and a CLIP model),
        "stats": FeatureStats of the generated images (when the Inception is available)}."""
        rank, world = _rank_world()
        batch_size = batch_size or self.cfg.batch_size
        stats = FeatureStats() if self.inception is not None else None
        clip_sums = torch.zeros(2, dtype=torch.float64)  # Σ score, count
        mine = list(range(rank, num_images, world))
        for lo in range(0, len(mine), batch_size):
            indices = mine[lo:lo + batch_size]
            pixels = images_of(indices)
            if stats is not None:
                stats.update(self.inception(pixels))
            if self.clip is not None and prompts is not None:
                scores = self.clip(pixels, [prompts[i] for i in indices]).cpu()
                clip_sums += torch.stack([scores.sum(), torch.tensor(float(len(indices)), dtype=torch.float64)])
        out: dict[str, Any] = {"num_images": num_images}
        if stats is not None:
            out["stats"] = stats.all_reduce()
            if self.reference is not None:
                out["fid"] = frechet_distance(*stats.mean_cov(), *self.reference)
        if self.clip is not None and prompts is not None:
            if world > 1:
                tdist.all_reduce(clip_sums)
            out["clip_score"] = float(clip_sums[0] / clip_sums[1].clamp_min(1))
        return out


def model_images(models: Any, cfg: Config, prompts: Sequence[str] = ()) -> ImagesOf:
    """images_of for a stage-2 model: image i has seed eval.seed + i and condition i (cycled_inputs)."""
    from ldmscale.inference import SamplingSettings, cycled_inputs, generate

    def images_of(indices: list[int]) -> torch.Tensor:
        inputs = cycled_inputs(models.denoiser.conditioning, indices, prompts)
        settings = SamplingSettings(seeds=[cfg.eval.seed + i for i in indices], num_steps=cfg.eval.num_steps or None,
                                    batch_size=len(indices), progress=False)
        return generate(models, inputs, settings).images * 2 - 1

    return images_of


def evaluate_models(models: Any, cfg: Config, evaluator: SampleEvaluator,
                    num_images: Optional[int] = None) -> dict[str, Any]:
    """Collective: FID / CLIP score of `num_images` (default eval.num_images) images from `models`."""
    takes_prompts = "prompts" in models.denoiser.conditioning.sampling_inputs  # text, sdxl
    prompts = eval_prompts(cfg.eval, cfg.trainer.sample_prompts) if takes_prompts else []
    num_images = num_images or cfg.eval.num_images
    per_image = [prompts[i % len(prompts)] for i in range(num_images)] if prompts else None
    return evaluator.evaluate(model_images(models, cfg, prompts), num_images, prompts=per_image)


class LoopEvaluation:
    """In-loop evaluation of the EMA weights every eval.every_steps, on all ranks (metrics eval/fid,
    eval/clip_score); the networks and reference statistics are built on first use."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._models: Any = None
        self._evaluator: Optional[SampleEvaluator] = None

    def __call__(self, ema: Any, step: int) -> dict[str, float]:
        from ldmscale.runs import build_models

        weights = ema.full_state_dict()  # collective: every rank gets the full EMA weights
        if self._models is None:
            device = next(iter(weights.values())).device
            self._models = build_models(self.cfg, device=device)
            self._evaluator = SampleEvaluator(self.cfg.eval, device)
        assert self._evaluator is not None
        if not self._evaluator.enabled:
            return {}
        self._models.denoiser.load_state_dict(weights, strict=False)  # trainable parameters; buffers as built
        result = evaluate_models(self._models, self.cfg, self._evaluator)
        return {f"eval/{k}": v for k, v in result.items() if k in ("fid", "clip_score")}
