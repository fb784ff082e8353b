"""Post-hoc EMA (EDM2): choose the EMA length after training, from a run trained with ema.kind=power.

    python tools/posthoc_ema.py RUN_DIR --sigma-rel 0.03 0.05 0.08 0.12
    python -m ldmscale.sample --checkpoint RUN_DIR/export/denoiser_ema_sigma_rel_0.0800.safetensors \\
        --config RUN_DIR/config.json --prompt "a red circle in the top left"

For each σ_rel (the EMA profile's width relative to training length; EDM2 tracks 0.05 and 0.10) the
weights are the least-squares combination of the fp16 snapshots in checkpoint.dir/ema_snapshots
(Karras et al. 2024, Alg. 3), written as the flat safetensors export that sampling and evaluation read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldmscale.ema import export_posthoc  # noqa: E402


def main(argv: list[str] | None = None) -> dict[float, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="training run directory (trained with ema.kind=power)")
    parser.add_argument("--sigma-rel", type=float, nargs="+", required=True, help="σ_rel values to reconstruct")
    parser.add_argument("--step", type=int, help="reconstruct at this snapshot step (default: the last)")
    parser.add_argument("--out-dir", help="where the exports go (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    written = export_posthoc(args.run_dir, args.sigma_rel, args.out_dir, args.step)
    for sigma_rel, path in written.items():
        print(f"sigma_rel {sigma_rel:.4f} -> {path}")
    return written


if __name__ == "__main__":
    main()
