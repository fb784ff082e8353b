"""Export a training run's checkpoint (EMA or raw weights), consolidated, with no process group.

    python tools/export_checkpoint.py RUN_DIR --out denoiser_ema.safetensors            # flat Denoiser state
    python tools/export_checkpoint.py RUN_DIR --raw --out W.safetensors                 # to resume elsewhere:
        python -m ldmscale.train ... checkpoint.load_weights_only=W.safetensors       #  any world size
    python tools/export_checkpoint.py RUN_DIR --format ldmscale  --out export/unet       # our U-Net folder
    python tools/export_checkpoint.py RUN_DIR --format diffusers --out export/ --with-autoencoder  # unet/ (+ vae/)
    python tools/export_checkpoint.py RUN_DIR --format ldm --out sd.safetensors          # LDM/SD key names

RUN_DIR is a training run directory (config.json + checkpoints) or a checkpoint folder holding 'latest'.
Works for checkpoints of any ZeRO stage and world size (DeepSpeed's zero_to_fp32 merges the partitions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldmscale.checkpoint import load_run_weights, write_weights_export  # noqa: E402
from ldmscale.config import to_dict  # noqa: E402
from ldmscale.runs import DENOISER_EXTRAS, RUN_CONFIG, load  # noqa: E402

FORMATS = ("safetensors", "ldmscale", "diffusers", "ldm")


def export(run_dir: str | Path, out: str | Path, *, ema: bool = True, format: str = "safetensors",
           tag: str | None = None, with_autoencoder: bool = False) -> Path:
    """Write the run's denoiser (EMA or raw) as `format`; returns what was written."""
    from ldmscale.runs import write_weights

    out = Path(out)
    if format == "safetensors":
        state, meta = load_run_weights(run_dir, ema=ema, tag=tag)
        # The run's resolved config travels in the metadata: `python -m ldmscale.sample` needs no --config.
        return write_weights_export(state, out, weights="ema" if ema else "raw", step=meta["step"],
                                    source=run_dir, config=meta.get("config", {}))
    if format not in FORMATS:
        raise ValueError(f"--format {format!r} is not one of {list(FORMATS)}")
    from ldmscale.models import save_autoencoder, save_unet

    models = load(run_dir, ema=ema, tag=tag)
    extras = {k: v for k, v in models.denoiser.state_dict().items() if not k.startswith("unet.")}
    if extras:
        if format != "ldmscale":
            raise ValueError(f"this denoiser has trainable parts outside the U-Net ({sorted(extras)[:3]}...), "
                             f"which the {format} format cannot hold: use --format safetensors or ldmscale")
    if format == "diffusers":
        written = save_unet(models.denoiser.unet, out / "unet", "diffusers")
        if with_autoencoder:
            save_autoencoder(models.autoencoder, out / "vae", "diffusers")
        return written.parent
    written = save_unet(models.denoiser.unet, out, format)
    if extras:  # e.g. the layout encoder: kept beside the U-Net in our folder format
        write_weights({k: v.contiguous() for k, v in extras.items()}, out / DENOISER_EXTRAS)
    if format == "ldmscale":  # the run's config (conditioning kind, classes, process, latent scale) beside it
        (out / RUN_CONFIG).write_text(json.dumps(to_dict(models.cfg), indent=2, default=str))
    if with_autoencoder:
        target = out / "autoencoder" if format == "ldmscale" else out.with_name(out.stem + "_vae" + out.suffix)
        save_autoencoder(models.autoencoder, target, format)
    return written


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="training run directory, or a checkpoint folder holding 'latest'")
    parser.add_argument("--out", required=True, help="file (safetensors, ldm) or folder (ldmscale, diffusers)")
    parser.add_argument("--raw", action="store_true", help="the trained weights instead of the EMA")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="default: safetensors for a *.safetensors --out, else ldmscale")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step_00001000 (default: latest)")
    parser.add_argument("--with-autoencoder", action="store_true", help="also write the autoencoder")
    args = parser.parse_args(argv)
    fmt = args.format or ("safetensors" if args.out.endswith(".safetensors") else "ldmscale")
    with torch.no_grad():
        written = export(args.run_dir, args.out, ema=not args.raw, format=fmt, tag=args.tag,
                         with_autoencoder=args.with_autoencoder)
    print(f"wrote {written} ({fmt}, {'raw' if args.raw else 'EMA'} weights)")
    return written


if __name__ == "__main__":
    main()
