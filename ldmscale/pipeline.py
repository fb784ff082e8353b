"""The CPU demo end to end (stage=demo): synthetic shards → stage-1 autoencoder → latent cache → U-Net → eval.

Every step is an ordinary ldmscale job on files in run_dir, composed from the same overrides the demo was
started with, so each can also be run on its own. A finished step leaves a marker and is skipped; a
training step that was interrupted resumes from its latest checkpoint. Re-running the command continues.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ldmscale.config import Config, compose, quote_override_value


def _list_override(key: str, values: list[str]) -> str:
    return f"{key}=[{','.join(quote_override_value(v) for v in values)}]"


def _child(cfg: Config) -> None:
    from ldmscale.train import run

    run(cfg)


def run_in_child(cfg: Config, what: str) -> None:
    """Run a training job in a fresh process: DeepSpeed and the process group start clean each time."""
    process = multiprocessing.get_context("spawn").Process(target=_child, args=(cfg,), name=what)
    process.start()
    try:
        process.join()
    except KeyboardInterrupt:  # the child got the same Ctrl-C and saves nothing half-done
        process.join()
        raise
    if process.exitcode != 0:
        raise RuntimeError(f"{what} failed (exit code {process.exitcode}); re-run the same command to resume")


class Pipeline:
    """The demo's steps in order; each step is skipped once its marker exists."""

    def __init__(self, cfg: Config, overrides: list[str]):
        self.cfg = cfg
        # Stage 1 composes its own experiment (pipeline.autoencoder_experiment); stage 2 keeps the demo's.
        self.experiment = [o for o in overrides if o.startswith("+experiment=")]
        self.overrides = [o for o in overrides if not o.startswith(("stage=", "+experiment="))]
        self.root = Path(cfg.run_dir)
        self.train_dir = self.root / "data" / "train"
        self.val_dir = self.root / "data" / "val"
        self.ae_dir = self.root / "autoencoder"
        self.cache_dir = self.root / "cache"
        self.unet_dir = self.root / "unet"

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [("synthetic shards", self.make_shards), ("stage 1: autoencoder", self.train_autoencoder),
                ("latent + text cache", self.cache), ("stage 2: U-Net", self.train_unet),
                ("samples + prompt adherence", self.evaluate)]

    def run(self) -> dict[str, Any]:
        self.root.mkdir(parents=True, exist_ok=True)
        timings = {}
        for number, (name, step) in enumerate(self.steps(), 1):
            marker = self.root / f".done-{number}"
            if marker.exists():
                print(f"[demo] {number}/5 {name}: done earlier, skipped", flush=True)
                continue
            print(f"[demo] {number}/5 {name}", flush=True)
            start = time.perf_counter()
            step()
            timings[name] = round(time.perf_counter() - start, 1)
            marker.write_text(json.dumps({"seconds": timings[name]}))
        return timings

    # ------------------------------------------------------------------------ steps
    def make_shards(self) -> None:
        from ldmscale.data.synthetic import write_shards

        p, res = self.cfg.pipeline, self.cfg.data.resolution
        write_shards(self.train_dir, p.num_train_samples, res, p.shard_size, seed=self.cfg.seed, holdout=p.holdout)
        # Held-out images for stage-1 PSNR come from another index range of the same generator.
        write_shards(self.val_dir, p.num_val_samples, res, p.shard_size, seed=self.cfg.seed, start_index=10**8)

    def train_shards(self) -> list[str]:
        return [str(p) for p in sorted(self.train_dir.glob("*.tar"))]

    def autoencoder_config(self) -> Config:
        p = self.cfg.pipeline
        return compose([f"+experiment={p.autoencoder_experiment}", *self.overrides, *p.autoencoder_overrides,
                        "stage=autoencoder",
                        f"run_dir={quote_override_value(str(self.ae_dir))}",
                        _list_override("data.train_shards", self.train_shards()),
                        _list_override("ae_loss.eval_shards", [str(p) for p in sorted(self.val_dir.glob("*.tar"))])])

    def train_autoencoder(self) -> None:
        run_in_child(self.autoencoder_config(), "stage-1 autoencoder training")

    def cache(self) -> None:
        from dataclasses import replace

        from ldmscale.data.cache import run_cache_job

        cfg = self.cfg
        cache_cfg = replace(cfg.cache, input=" ".join(self.train_shards()), output=str(self.cache_dir))
        ae_cfg = replace(cfg.autoencoder, weights=str(self.ae_dir), scale_factor=None, shift_factor=None)
        run_cache_job(cfg.data, cfg.conditioner, ae_cfg, cache_cfg, seed=cfg.seed)

    def unet_config(self) -> Config:
        # The latent scale comes with the stage-1 run (its latent_scale.json), as for any user's run.
        cached = [str(p) for p in sorted(self.cache_dir.glob("*.tar"))]
        return compose([*self.experiment, *self.overrides, "stage=diffusion", f"run_dir={quote_override_value(str(self.unet_dir))}",
                        "data.kind=cached", _list_override("data.train_shards", cached),
                        f"autoencoder.weights={quote_override_value(str(self.ae_dir))}"])

    def train_unet(self) -> None:
        run_in_child(self.unet_config(), "stage-2 U-Net training")

    def evaluate(self) -> dict[str, Any]:
        """Generate the task's evaluation images from the EMA weights with fixed seeds, and score them."""
        from ldmscale.demo_tasks import GRID_COLUMNS, TaskEvaluator
        from ldmscale.runs import load

        device = "cuda" if torch.cuda.is_available() else "cpu"
        models = load(self.unet_dir, ema=True, device=device)
        evaluator = TaskEvaluator(models.cfg, models, self.cfg.pipeline.eval_batch_size)
        scores, summary, rows = evaluator.run()
        quality = self.sample_quality(evaluator.images, evaluator.prompts, device)
        if quality:
            summary += "; " + ", ".join(f"{k} {v:.4g}" for k, v in quality.items())
        grid_path = self.root / "samples.png"
        save_grid([im for row in rows for im in row], grid_path, columns=GRID_COLUMNS)
        scores = {"task": models.cfg.conditioner.kind, **scores, **quality, "grid": str(grid_path)}
        print(f"[demo] {summary}", flush=True)
        if models.cfg.ema.enabled and models.cfg.ema.kind == "power":
            scores["posthoc_ema"] = self.evaluate_posthoc_ema(models.cfg, device)
        (self.root / "eval.json").write_text(json.dumps(scores, indent=2))
        return scores

    def sample_quality(self, images: torch.Tensor, prompts: list[str] | None, device: str) -> dict[str, float]:
        """FID of the evaluation images against the held-out images (data/val) and the CLIP score of the text
        task's, when eval.inception_weights / eval.clip_weights (or the tiny CLIP) are set; else nothing."""
        from ldmscale.evaluation import save_stats
        from ldmscale.evaluation.generated import SampleEvaluator
        from ldmscale.evaluation.reference import reference_statistics

        quality = SampleEvaluator(self.cfg.eval, device)
        if not quality.enabled:
            return {}
        if quality.inception is not None and quality.reference is None:
            stats = reference_statistics([str(self.val_dir / "*.tar")], self.cfg.data.resolution, quality.inception)
            quality.reference = stats.mean_cov()
            save_stats(self.root / "fid_reference.npz", *quality.reference, int(stats.count))
        pixels = images * 2 - 1
        result = quality.evaluate(lambda indices: pixels[indices], len(pixels), prompts=prompts)
        return {k: result[k] for k in ("fid", "clip_score") if k in result}

    def evaluate_posthoc_ema(self, cfg: Config, device: str) -> dict[str, Any]:
        """EDM2's post-hoc EMA: the same evaluation for each σ_rel in ema.posthoc_sigma_rels, reconstructed
        from the run's snapshots and exported (RUN_DIR/unet/export/) as tools/posthoc_ema.py would."""
        from ldmscale.demo_tasks import TaskEvaluator
        from ldmscale.ema import export_posthoc
        from ldmscale.runs import load

        results = {}
        for sigma_rel, path in export_posthoc(self.unet_dir, list(cfg.ema.posthoc_sigma_rels)).items():
            models = load(path, config=self.unet_dir / "config.json", device=device)
            scores, summary, _ = TaskEvaluator(models.cfg, models, self.cfg.pipeline.eval_batch_size).run()
            results[f"{sigma_rel:g}"] = {**scores, "export": str(path)}
            print(f"[demo] post-hoc EMA sigma_rel={sigma_rel:g}: {summary}", flush=True)
        return results


def save_grid(images: torch.Tensor | list[torch.Tensor], path: Path, columns: int) -> None:
    """Images [3,H,W] in [0,1] → one PNG, `columns` per row."""
    from PIL import Image

    from ldmscale.inference import to_pil

    tiles = to_pil(torch.stack(list(images)))
    width, height = tiles[0].size
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * width, (i // columns) * height))
    grid.save(path)


# Keys that point at a user's own data or weights: the demo makes its own and would silently ignore them.
USER_DATA_KEYS = ("data.train_shards", "autoencoder.weights", "ae_loss.eval_shards", "cache.input")


def check_no_user_data(overrides: list[str]) -> None:
    """stage=demo writes synthetic shapes and trains its own autoencoder: refuse user data, naming the
    commands that train on it (README "Your own data")."""
    given = [o for o in overrides if o.lstrip("+~").partition("=")[0] in USER_DATA_KEYS]
    if not given:
        return
    experiment = next((o.partition("=")[2] for o in overrides if o.startswith("+experiment=")), "demo")
    raise SystemExit(
        f"stage=demo makes its own synthetic shapes and autoencoder, so {', '.join(given)} would be ignored.\n"
        "For your own data run the steps yourself (README, \"Your own data\"):\n"
        "  python -m ldmscale.train +experiment=ae_photo 'data.train_shards=[DATA/train-{000000..000009}.tar]' \\\n"
        "      'ae_loss.eval_shards=[DATA/val-000000.tar]' run_dir=runs/my_ae          # stage 1 (or reuse one)\n"
        f"  python tools/cache_latents.py +experiment={experiment} 'cache.input=DATA/train-{{000000..000009}}.tar' \\\n"
        "      cache.output=DATA/cache autoencoder.weights=runs/my_ae                  # latents (+ text)\n"
        f"  python -m ldmscale.train +experiment={experiment} stage=diffusion data.kind=cached \\\n"
        "      'data.train_shards=[DATA/cache]' autoencoder.weights=runs/my_ae run_dir=runs/my_ldm  # stage 2")


def run_demo(cfg: Config, overrides: list[str]) -> dict[str, Any]:
    check_no_user_data(overrides)
    timings = Pipeline(cfg, overrides).run()
    print(f"[demo] finished; step times (s): {timings}. Results in {cfg.run_dir}/eval.json, "
          f"{cfg.run_dir}/samples.png", flush=True)
    return timings
