"""The embedded synthetic dataset: coloured shapes with captions, class ids and boxes, as WebDataset shards.

Every sample is a pure function of (seed, index), so shards are byte-identical under the same
seed whatever the shard size, and held-out sets are just another index range.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 190),
    "cyan": (40, 200, 215),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
NUM_CLASSES = len(SHAPES) * len(COLOURS)

_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges keep shapes legible at 32 px


def class_id(shape: str, colour: str) -> int:
    return SHAPES.index(shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(colour)


def class_name(cls: int) -> tuple[str, str]:
    """(shape, colour) of a class id."""
    return SHAPES[cls // len(COLOUR_NAMES)], COLOUR_NAMES[cls % len(COLOUR_NAMES)]


def caption(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} in the {position}"


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows; `bbox` is [x0, y0, x1, y1] as fractions of the image side."""

    shape: str
    colour: str
    position: str
    bbox: tuple[float, float, float, float]
    background: int

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.position)

    @property
    def class_id(self) -> int:
        return class_id(self.shape, self.colour)


def parse_holdout(items: Iterable[str]) -> set[tuple[str, str]]:
    """'blue triangle' → ('blue', 'triangle'); names are checked so a typo cannot hold out nothing."""
    pairs = set()
    for item in items:
        parts = item.split()
        if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
            raise ValueError(
                f"holdout {item!r} must be '<colour> <shape>' with colour in {list(COLOURS)} "
                f"and shape in {list(SHAPES)}"
            )
        pairs.add((parts[0], parts[1]))
    return pairs


def draw_spec(seed: int, index: int, holdout: set[tuple[str, str]] | None = None) -> ShapeSpec:
    """The deterministic content of sample `index`; held-out (colour, shape) pairs are redrawn."""
    rng = np.random.default_rng([seed, index])
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        if not holdout or (colour, shape) not in holdout:
            break
    position = POSITIONS[rng.integers(len(POSITIONS))]
    size = rng.uniform(0.26, 0.40)
    cx = (0.25 if "left" in position else 0.75) + rng.uniform(-0.04, 0.04)
    cy = (0.25 if "top" in position else 0.75) + rng.uniform(-0.04, 0.04)
    bbox = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    background = int(rng.integers(200, 245))
    return ShapeSpec(shape, colour, position, tuple(float(v) for v in bbox), background)


def render(spec: ShapeSpec, resolution: int) -> Image.Image:
    side = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), (spec.background,) * 3)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = (v * side for v in spec.bbox)
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def make_sample(seed: int, index: int, resolution: int, image_format: str = "png",
                holdout: set[tuple[str, str]] | None = None) -> dict[str, bytes]:
    """One WebDataset sample in the img2dataset convention: {key}.png/.jpg, .txt, .json, .cls."""
    spec = draw_spec(seed, index, holdout)
    buffer = io.BytesIO()
    if image_format == "png":
        render(spec, resolution).save(buffer, format="PNG", compress_level=1)
    elif image_format == "jpg":
        render(spec, resolution).save(buffer, format="JPEG", quality=95)
    else:
        raise ValueError(f"image_format={image_format!r} must be 'png' or 'jpg'")
    meta = {
        "caption": spec.caption,
        "width": resolution,
        "height": resolution,
        "shape": spec.shape,
        "colour": spec.colour,
        "position": spec.position,
        "bbox": list(spec.bbox),
        "class_id": spec.class_id,
        "index": index,
    }
    return {
        "__key__": f"{index:09d}".encode(),
        image_format: buffer.getvalue(),
        "txt": spec.caption.encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
        "cls": str(spec.class_id).encode(),
    }


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    # Fixed metadata so the same seed gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_shard(path: Path, samples: Iterable[dict[str, bytes]]) -> int:
    """Write samples to `path` under a temporary name and rename it when complete."""
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"].decode()
            for ext, payload in sample.items():
                if ext != "__key__":
                    _add(tar, f"{key}.{ext}", payload)
            count += 1
    os.replace(tmp, path)
    return count


def shard_ranges(num_samples: int, shard_size: int, start_index: int = 0) -> Iterator[tuple[int, range]]:
    for shard, lo in enumerate(range(0, num_samples, shard_size)):
        yield shard, range(start_index + lo, start_index + min(lo + shard_size, num_samples))


def write_shards(out_dir: str | Path, num_samples: int, resolution: int = 64, shard_size: int = 1000,
                 seed: int = 0, start_index: int = 0, image_format: str = "png",
                 holdout: Sequence[str] = (), progress: bool = True, prefix: str = "shapes") -> list[Path]:
    """Write `num_samples` samples as `{prefix}-NNNNNN.tar`; existing complete shards are kept."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held = parse_holdout(holdout)
    paths = []
    bar = tqdm(total=num_samples, desc=f"synthetic shards → {out}", unit="img", disable=not progress)
    for shard, indices in shard_ranges(num_samples, shard_size, start_index):
        path = out / f"{prefix}-{shard:06d}.tar"
        paths.append(path)
        if not path.exists():
            write_shard(path, (make_sample(seed, i, resolution, image_format, held) for i in indices))
        bar.update(len(indices))
    bar.close()
    return paths


# ---------------------------------------------------------------------------- analysis
# The inverse of `render`: read shape, colour, position and box back from an image, so generated
# samples can be scored for prompt adherence against the words that asked for them.

_SATURATION_THRESHOLD = 60  # every palette colour has max-min ≥ 140; the grey background has 0
# Two geometric features, thresholds set between the values measured on rendered data
# (tests/test_synthetic.py checks them): a triangle's top quarter is much narrower than its bottom
# quarter (ratio ≈ 0.3, others ≈ 1), and fill inside the mask's own box is π/4 for a circle, 1 for a square.
_TAPER_THRESHOLD = 0.6
_FILL_THRESHOLD = 0.9


@dataclass(frozen=True)
class Analysis:
    """What an image shows, as read back by `analyse` (None where nothing was found)."""

    shape: str | None
    colour: str | None
    position: str | None
    bbox: tuple[float, float, float, float] | None
    num_components: int
    fill: float
    taper: float


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Pixels that belong to a shape: saturated colour on a grey background. image: [H,W,3] uint8."""
    pixels = image.astype(np.int16)
    return (pixels.max(-1) - pixels.min(-1)) > _SATURATION_THRESHOLD


def component_sizes(mask: np.ndarray) -> list[int]:
    """Pixel counts of the 4-connected components of a boolean mask, largest first."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    sizes = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, size = [(y, x)], 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        sizes.append(size)
    return sorted(sizes, reverse=True)


def count_components(mask: np.ndarray, min_pixels: int = 4) -> int:
    """4-connected components of at least `min_pixels` pixels (tiny specks are noise, not shapes)."""
    return sum(size >= min_pixels for size in component_sizes(mask))


def analyse(image: np.ndarray) -> Analysis:
    """Read the dominant shape of an [H,W,3] uint8 image."""
    mask = foreground_mask(image)
    if mask.sum() < 4:
        return Analysis(None, None, None, None, 0, 0.0, 0.0)
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    mean_rgb = image[mask].astype(np.float64).mean(0)
    palette = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float64)
    colour = COLOUR_NAMES[int(np.argmin(((palette - mean_rgb) ** 2).sum(-1)))]
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = float(mask.sum() / ((y1 - y0) * (x1 - x0)))
    quarter = max(1, (y1 - y0) // 4)
    top_width = mask[y0:y0 + quarter].sum() / quarter
    bottom_width = mask[y1 - quarter:y1].sum() / quarter
    taper = float(top_width / max(bottom_width, 1e-6))
    shape = "triangle" if taper < _TAPER_THRESHOLD else "square" if fill > _FILL_THRESHOLD else "circle"
    cy, cx = ys.mean() / height, xs.mean() / width
    position = f"{'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}"
    bbox = (x0 / width, y0 / height, x1 / width, y1 / height)
    return Analysis(shape, colour, position, bbox, count_components(mask), fill, taper)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def eval_prompts() -> list[tuple[str, str, str]]:
    """Every (colour, shape, position) once: 72 prompts written for evaluation, held-out pairs included."""
    return [(c, s, p) for s in SHAPES for c in COLOUR_NAMES for p in POSITIONS]


def score_adherence(images: Sequence[np.ndarray], asked: Sequence[tuple[str, str, str]],
                    holdout: Iterable[str] = ()) -> dict:
    """Prompt adherence of generated images: fraction whose colour, shape and position match the prompt.

    `asked` holds (colour, shape, position) per image. Held-out (never trained) colour/shape pairs are
    reported separately, and chance levels are given for comparison.
    """
    held = parse_holdout(holdout)
    rows = []
    for image, (colour, shape, position) in zip(images, asked, strict=True):
        found = analyse(np.asarray(image))
        rows.append({
            "colour": found.colour == colour, "shape": found.shape == shape, "position": found.position == position,
            "held_out": (colour, shape) in held,
        })

    def rate(subset: list[dict], key: str) -> float | None:
        return float(np.mean([r[key] for r in subset])) if subset else None

    seen = [r for r in rows if not r["held_out"]]
    unseen = [r for r in rows if r["held_out"]]
    scores = {key: rate(seen, key) for key in ("colour", "shape", "position")}
    scores["all_three"] = float(np.mean([r["colour"] and r["shape"] and r["position"] for r in seen])) if seen else None
    return {
        **scores,
        "held_out": {key: rate(unseen, key) for key in ("colour", "shape", "position")},
        "held_out_pairs": sorted(" ".join(pair) for pair in held),
        "chance": {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)},
        "num_images": len(rows),
        "num_held_out_images": len(unseen),
    }


# ---------------------------------------------------------------------------- scores of the other tasks
# A "clean" single shape: one component, holding nearly all the saturated pixels (stray specks allowed up
# to this fraction), neither a speck nor a smear: the smallest shape drawn (a triangle of side 0.26)
# covers 3.4% of the image, the largest (a square of side 0.40) 16%.
CLEAN_MAIN_FRACTION = 0.95
MIN_SHAPE_FRACTION = 0.02
MAX_SHAPE_FRACTION = 0.25


def is_clean_single_shape(image: np.ndarray) -> bool:
    """Exactly one shape on the background: one connected component with ≥ 95% of the foreground, of a
    plausible size (a grey background around it)."""
    mask = foreground_mask(image)
    sizes = component_sizes(mask)
    if not sizes or not MIN_SHAPE_FRACTION * mask.size <= sizes[0] <= MAX_SHAPE_FRACTION * mask.size:
        return False
    return count_components(mask) == 1 and sizes[0] >= CLEAN_MAIN_FRACTION * sum(sizes)


def score_unconditional(images: Sequence[np.ndarray]) -> dict:
    clean = [is_clean_single_shape(np.asarray(im)) for im in images]
    return {"clean_single_shape": float(np.mean(clean)), "num_images": len(clean)}


def score_classes(images: Sequence[np.ndarray], classes: Sequence[int]) -> dict:
    """Class adherence: the read colour and shape both match the class id's (shape, colour)."""
    rows = []
    for image, cls in zip(images, classes, strict=True):
        shape, colour = class_name(int(cls))
        found = analyse(np.asarray(image))
        rows.append((found.colour == colour, found.shape == shape))
    hits = np.array(rows, dtype=bool).reshape(-1, 2)
    return {"class": float(hits.all(1).mean()), "colour": float(hits[:, 0].mean()), "shape": float(hits[:, 1].mean()),
            "chance": {"class": 1 / NUM_CLASSES}, "num_images": len(rows)}


def score_layout(images: Sequence[np.ndarray], boxes: Sequence[Sequence[float]], classes: Sequence[int],
                 min_iou: float = 0.5) -> dict:
    """Layout adherence: IoU of the shape's box (the foreground mask's bounding box) with the asked box."""
    ious, class_hits = [], []
    for image, box, cls in zip(images, boxes, classes, strict=True):
        found = analyse(np.asarray(image))
        ious.append(box_iou(found.bbox, box) if found.bbox is not None else 0.0)
        class_hits.append((found.shape, found.colour) == class_name(int(cls)))
    ious_arr = np.asarray(ious)
    return {"iou_at_least_0.5": float((ious_arr >= min_iou).mean()), "mean_iou": float(ious_arr.mean()),
            "class": float(np.mean(class_hits)), "num_images": len(ious)}
