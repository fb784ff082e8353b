"""python -m ldmscale.sample: a checkpoint + prompts / class ids / boxes / low-res image / mask -> PNGs.

Writes OUT/grid.png, OUT/images/NNNNNN.png (one per image) and OUT/settings.json (everything needed to
reproduce the images: checkpoint, weights (EMA or raw), sampler settings, per-image seeds, conditions).
Image i always uses seed `seed + i`, so the same command gives the same images whatever --batch-size.

A thin CLI: `ldmscale.runs.load` opens the checkpoint, `ldmscale.inference.generate` makes the images.
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
from torch import Tensor

from ldmscale.inference import Generation, SampleInputs, SamplingSettings, generate, to_pil
from ldmscale.runs import load


# ---------------------------------------------------------------------------- files
def _load_image(path: str, size: Optional[tuple[int, int]] = None, gray: bool = False) -> Tensor:
    import numpy as np
    from PIL import Image

    img = Image.open(path).convert("L" if gray else "RGB")
    if size is not None:
        img = img.resize((size[1], size[0]), Image.NEAREST if gray else Image.BICUBIC)
    array = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return array[None] if gray else array.permute(2, 0, 1)


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


def _parse_boxes(spec: str) -> tuple[Tensor, Tensor]:
    """JSON (inline or a file): one list per image of [x0, y0, x1, y1, class] boxes in [0, 1]."""
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldmscale.sample", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run dir, our export, LDM/SD file or diffusers folder")
    p.add_argument("--config", help="config.json/yaml of the model (default: the run dir's or beside the file)")
    p.add_argument("--override", "-o", action="append", default=[], help="config override, e.g. model=tiny")
    p.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    p.add_argument("--prompt", action="append", help="text prompt (repeat for several)")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--class-ids", help="comma-separated class ids, e.g. 0,3,7")
    p.add_argument("--boxes", help="JSON (or file): per image a list of [x0,y0,x1,y1,class] in [0,1]")
    p.add_argument("--low-res", nargs="+", help="low-resolution image(s) for super-resolution")
    p.add_argument("--image", nargs="+", help="image(s) to inpaint")
    p.add_argument("--mask", nargs="+", help="mask image(s): white = generate")
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
                  device=args.device)
    cfg, kind = models.cfg, models.cfg.conditioner.kind
    height = args.height or cfg.data.resolution
    width = args.width or cfg.data.resolution
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    boxes = box_classes = low_res = image = mask = None
    if args.boxes:
        boxes, box_classes = _parse_boxes(args.boxes)
    if args.low_res:
        low_res = torch.stack([_load_image(p) for p in args.low_res]) * 2 - 1
    if args.image or args.mask:
        if not (args.image and args.mask) or len(args.image) != len(args.mask):
            raise SystemExit("--image and --mask need the same number of files")
        image = torch.stack([_load_image(p, (height, width)) for p in args.image]) * 2 - 1
        mask = (torch.stack([_load_image(p, (height, width), gray=True) for p in args.mask]) > 0.5).float()
    class_ids = [int(c) for c in args.class_ids.split(",")] if args.class_ids else None
    unconditional = kind == "none" and image is None
    inputs = SampleInputs(prompts=prompts or None, class_labels=class_ids, boxes=boxes, box_classes=box_classes,
                          low_res=low_res, image=image, mask=mask,
                          num_images=args.num_images if unconditional else None,
                          images_per_condition=1 if unconditional else (args.num_images or 1))
    settings = SamplingSettings(sampler=args.sampler, num_steps=args.steps, guidance_scale=args.guidance,
                                guidance_rescale=args.guidance_rescale, eta=args.eta, karras_sigmas=args.karras,
                                timestep_spacing=args.spacing, seed=args.seed, height=height, width=width,
                                batch_size=args.batch_size, progress=not args.no_progress)
    generation = generate(models, inputs, settings, device=args.device)
    out = save_outputs(generation, args.out, dict(checkpoint=str(args.checkpoint), weights="raw" if args.raw else "ema",
                                                  config=args.config, overrides=args.override,
                                                  seconds=round(time.time() - started, 3)))
    print(f"wrote {len(generation.images)} image(s) to {out} (grid.png, images/, settings.json)")
    return out


if __name__ == "__main__":
    main()
