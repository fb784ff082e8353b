"""python -m ldmscale.sample: a checkpoint + prompts / class ids / boxes / low-res image / mask -> PNGs.

Writes OUT/grid.png, OUT/images/NNNNNN.png (one per image) and OUT/settings.json (everything needed to
reproduce the images: checkpoint, weights (EMA or raw), sampler settings, per-image seeds, conditions).
Image i always uses seed `seed + i`, so the same command gives the same images whatever --batch-size.

A thin CLI: `ldmscale.runs.load` opens the checkpoint, the kind (`ldmscale.conditioning`) reads its flags,
`ldmscale.inference.generate` makes the images.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from ldmscale.conditioning.kinds import IMAGE_FLAGS, image_inputs
from ldmscale.inference import Generation, SampleInputs, SamplingSettings, generate, to_pil
from ldmscale.runs import load


# ---------------------------------------------------------------------------- files
def save_outputs(generation: Generation, out_dir: str | Path, extra_settings: dict[str, Any]) -> Path:
    """grid.png, images/NNNNNN.png and settings.json under out_dir (written image by image)."""
    from torchvision.utils import make_grid

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(to_pil(generation.images)):
        name = f"images/{i:06d}.png"
        img.save(out / name)
        files.append(name)
    nrow = max(1, math.ceil(math.sqrt(len(generation.images))))
    to_pil(make_grid(generation.images, nrow=nrow, padding=2)[None])[0].save(out / "grid.png")
    settings = {**generation.settings, **extra_settings, "files": files, "grid": "grid.png"}
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldmscale.sample", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run dir, our export, LDM/SD file or diffusers folder")
    p.add_argument("--config", help="config.json/yaml of the model (default: the run dir's or beside the file)")
    p.add_argument("--original-config", help="the .yaml shipped with an LDM/SD checkpoint file: its U-Net, first "
                   "stage and diffusion process as the original code reads them")
    p.add_argument("--override", "-o", action="append", default=[], help="config override, e.g. model=tiny")
    p.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    from ldmscale.conditioning import KINDS

    added: set[str] = set()
    for flag, kwargs in [f for cls in KINDS.values() for f in cls.cli_flags] + list(IMAGE_FLAGS):
        if flag not in added:  # each kind's sampling inputs; flags shared by kinds are declared identically
            p.add_argument(flag, **kwargs)
            added.add(flag)
    p.add_argument("--num-images", type=int, help="images per condition (unconditional: total)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp_2m", "euler", "euler_a"])
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--guidance-rescale", type=float)
    p.add_argument("--eta", type=float)
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigmas (dpmpp_2m, euler)")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, help="pixels (default: data.resolution)")
    p.add_argument("--width", type=int, help="pixels (default: data.resolution)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = build_parser().parse_args(argv)
    started = time.time()
    models = load(args.checkpoint, ema=not args.raw, config=args.config, overrides=args.override,
                  device=args.device, original_config=args.original_config)
    cfg, conditioning = models.cfg, models.denoiser.conditioning
    height = args.height or cfg.data.resolution
    width = args.width or cfg.data.resolution
    inputs = {**conditioning.cli_inputs(args, height, width), **image_inputs(args, height, width)}
    unconditional = not conditioning.sampling_inputs and "image" not in inputs
    inputs = SampleInputs.of(inputs, num_images=args.num_images if unconditional else None,
                             images_per_condition=1 if unconditional else (args.num_images or 1))
    settings = SamplingSettings(sampler=args.sampler, num_steps=args.steps, guidance_scale=args.guidance,
                                guidance_rescale=args.guidance_rescale, eta=args.eta, karras_sigmas=args.karras,
                                timestep_spacing=args.spacing, seed=args.seed, height=height, width=width,
                                batch_size=args.batch_size, progress=not args.no_progress)
    generation = generate(models, inputs, settings, device=args.device)
    out = save_outputs(generation, args.out, dict(checkpoint=str(args.checkpoint), weights="raw" if args.raw else "ema",
                                                  config=args.config, original_config=args.original_config,
                                                  overrides=args.override,
                                                  seconds=round(time.time() - started, 3)))
    print(f"wrote {len(generation.images)} image(s) to {out} (grid.png, images/, settings.json)")
    return out


if __name__ == "__main__":
    main()
