"""Convert a U-Net or autoencoder checkpoint between diffusers folders, LDM/SD files and our export.

    python tools/convert_checkpoint.py unet  sd-v2.ckpt          out/unet          --to diffusers
    python tools/convert_checkpoint.py vae   pipeline_folder/    out/vae.safetensors --to ldm
    python tools/convert_checkpoint.py unet  cin256-v2.ckpt      out/unet          --to ldmscale \
        --original-config cin256-v2.yaml

An LDM/SD file carries no config: pass the .yaml it shipped with (--original-config) so heads, attention
levels and the rest come from there. Without it the structure is inferred from the weights, and a U-Net whose
heads the weights do not determine (anything but SD1/SD2/SDXL) is refused rather than guessed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldmscale.models.interop import FORMATS, load_autoencoder, load_unet, save_autoencoder, save_unet  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=("unet", "vae"))
    parser.add_argument("src", help="diffusers folder (model or pipeline), LDM .ckpt/.safetensors, or our export")
    parser.add_argument("dst", help="output folder (diffusers, ldmscale) or file (ldm: .ckpt or .safetensors)")
    parser.add_argument("--to", choices=FORMATS, required=True)
    parser.add_argument("--original-config", default=None,
                        help="the LDM/SD .yaml shipped with an LDM/SD checkpoint file (heads, attention levels, ...)")
    args = parser.parse_args(argv)
    if args.model == "unet":
        out = save_unet(load_unet(args.src, original_config=args.original_config), args.dst, args.to)
    else:
        out = save_autoencoder(load_autoencoder(args.src, original_config=args.original_config), args.dst, args.to)
    print(f"wrote {out} ({args.to})")
    return out


if __name__ == "__main__":
    main()
