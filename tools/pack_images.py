"""Pack a folder of images (with captions or class labels) into WebDataset tar shards for ldmscale.

    python tools/pack_images.py IMAGES/ --out data/mine --labels folders --val-fraction 0.05
    python tools/pack_images.py photos/ --out data/photos --crop-size 64 --crops-per-image 200

Writes OUT/train-NNNNNN.tar (and OUT/val-NNNNNN.tar with --val-fraction) with webdataset's own
ShardWriter, in the img2dataset layout every ldmscale command reads: `KEY.jpg|png|webp`, `KEY.txt` (the
caption: IMAGE.txt beside the image, when there is one), `KEY.cls` (--labels folders: the index of the
image's parent folder among the sorted folder names; the names go to OUT/classes.json) and `KEY.json`
(the source path). Images are stored as they are (no re-encoding) unless --resize or --crop-size asks
for new pixels, which are then written as PNG (lossless). The train/val split is a hash of each image's
relative path, so adding images never moves an existing one to the other side.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def class_names(root: Path, images: list[Path]) -> list[str]:
    """--labels folders: the sorted names of the folders (relative to root) that hold images."""
    return sorted({str(p.parent.relative_to(root)) for p in images})


def is_val(relative: str, fraction: float) -> bool:
    return fraction > 0 and zlib.crc32(relative.encode()) % 10_000 < fraction * 10_000


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_payloads(path: Path, resize: int, crop_size: int, crops: int, seed: int,
                   name: str = "") -> Iterator[tuple[str, bytes]]:
    """(extension, encoded bytes) for each sample made from one image: the file itself, a resized copy,
    or `crops` random crops (at random scales between the short side = crop_size and the full image).
    The crops are a function of (seed, `name`: the path under the packed folder), so the same images give
    the same shards wherever the folder lives."""
    if not resize and not crop_size:
        ext = path.suffix.lower().lstrip(".")
        yield ("jpg" if ext == "jpeg" else ext), path.read_bytes()
        return
    from PIL import Image

    image = Image.open(path).convert("RGB")
    if resize:
        scale = resize / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    if not crop_size:
        yield "png", _png(image)
        return
    if min(image.size) < crop_size:
        raise ValueError(f"{path}: {image.width}x{image.height} is smaller than --crop-size {crop_size}")
    rng = random.Random(zlib.crc32(f"{seed}:{name or path.name}".encode()))
    for _ in range(crops):
        # A random zoom (down to crop_size on the short side) shows the model textures at several scales.
        scale = rng.uniform(crop_size / min(image.size), 1.0)
        scaled = image if scale == 1.0 else image.resize(
            (max(crop_size, round(image.width * scale)), max(crop_size, round(image.height * scale))),
            Image.Resampling.BICUBIC)
        left, top = rng.randint(0, scaled.width - crop_size), rng.randint(0, scaled.height - crop_size)
        yield "png", _png(scaled.crop((left, top, left + crop_size, top + crop_size)))


def pack(root: str | Path, out: str | Path, *, labels: str = "none", val_fraction: float = 0.0,
         shard_size: int = 1000, resize: int = 0, crop_size: int = 0, crops_per_image: int = 1,
         seed: int = 0) -> dict[str, Any]:
    """Write the shards; returns {"train": n, "val": n, "classes": [...], "shards": [paths]}."""
    import webdataset as wds

    root, out = Path(root), Path(out)
    images = find_images(root)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    names = class_names(root, images) if labels == "folders" else []
    out.mkdir(parents=True, exist_ok=True)
    if names:
        (out / "classes.json").write_text(json.dumps(names, indent=1))
    writers = {split: wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0)
               for split in ("train", "val")}
    counts = {"train": 0, "val": 0}
    try:
        for path in images:
            relative = str(path.relative_to(root))
            split = "val" if is_val(relative, val_fraction) else "train"
            fields: dict[str, Any] = {"json": {"source": relative}}
            caption = path.with_suffix(".txt")
            if caption.is_file():
                fields["txt"] = caption.read_text().strip()
            if names:
                fields["cls"] = str(names.index(str(path.parent.relative_to(root))))
            for ext, payload in image_payloads(path, resize, crop_size, crops_per_image if crop_size else 1, seed,
                                               relative):
                writers[split].write({"__key__": f"{counts[split]:09d}", ext: payload, **fields})
                counts[split] += 1
    finally:
        for writer in writers.values():
            writer.close()
    for split, count in counts.items():  # ShardWriter opens its first shard eagerly: drop an empty one
        if count == 0:
            for empty in out.glob(f"{split}-*.tar"):
                empty.unlink()
    shards = sorted(str(p) for p in out.glob("*.tar"))
    return {**counts, "classes": names, "shards": shards}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="folder of images (searched recursively); IMAGE.txt beside an image is its caption")
    parser.add_argument("--out", required=True, help="output folder for train-*.tar / val-*.tar")
    parser.add_argument("--labels", choices=("none", "folders"), default="none",
                        help="folders: class label = the image's parent folder (index into OUT/classes.json)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of images held out as val-*.tar")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--resize", type=int, default=0, help="resize the short side to this many pixels first")
    parser.add_argument("--crop-size", type=int, default=0, help="store random square crops of this size")
    parser.add_argument("--crops-per-image", type=int, default=1, help="with --crop-size")
    parser.add_argument("--seed", type=int, default=0, help="crop positions and scales")
    args = parser.parse_args(argv)
    result = pack(args.images, args.out, labels=args.labels, val_fraction=args.val_fraction,
                  shard_size=args.shard_size, resize=args.resize, crop_size=args.crop_size,
                  crops_per_image=args.crops_per_image, seed=args.seed)
    classes = f", {len(result['classes'])} classes" if result["classes"] else ""
    print(f"wrote {result['train']} training and {result['val']} held-out samples to {args.out} "
          f"({len(result['shards'])} shards{classes})")
    return result


if __name__ == "__main__":
    main()
