"""FID and CLIP score of a trained model: N images with fixed seeds, split over all ranks.

    python tools/evaluate.py RUN_DIR --reference-stats val256.npz --inception-weights pt_inception.pth \\
        --clip-weights open_clip_vit_l14.bin --num-images 10000
    torchrun --nproc_per_node 8 tools/evaluate.py RUN_DIR ...        # or srun: the same numbers, faster

Image i uses seed `eval.seed + i` and prompt i mod P (eval.prompts / --prompts-file; class i mod C for
class models), whichever rank makes it, so any world size gives the same images. Settings default to
the run's `eval` config section. Writes OUT (default RUN_DIR/evaluation.json) and the generated images'
statistics beside it (pytorch-fid's .npz), on the main rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldmscale.distributed import env  # noqa: E402
from ldmscale.evaluation.fid import save_stats  # noqa: E402
from ldmscale.evaluation.generated import SampleEvaluator, evaluate_models  # noqa: E402

FLAGS = {"num_images": int, "reference_stats": str, "inception_weights": str, "clip_model": str,
         "clip_weights": str, "prompts_file": str, "batch_size": int, "num_steps": int, "seed": int}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="training run dir (or any checkpoint python -m ldmscale.sample reads)")
    for name, kind in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"eval.{name} (default: the run's)")
    p.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    p.add_argument("--out", help="result JSON (default: CHECKPOINT/evaluation.json)")
    args = p.parse_args(argv)
    dist = env.setup()
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    from ldmscale.runs import load

    started = time.perf_counter()
    models = load(args.checkpoint, ema=not args.raw, device=device)
    cfg = models.cfg
    cfg.eval = dataclasses.replace(cfg.eval, **{k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None})
    evaluator = SampleEvaluator(cfg.eval, device)
    if not evaluator.enabled:
        raise SystemExit("nothing to measure: set --inception-weights (FID) and/or --clip-weights (CLIP score)")
    result = evaluate_models(models, cfg, evaluator)
    stats = result.pop("stats", None)
    result.update(checkpoint=str(args.checkpoint), weights="raw" if args.raw else "ema", world_size=dist.world_size,
                  seconds=round(time.perf_counter() - started, 1), eval=dataclasses.asdict(cfg.eval))
    if dist.is_main:
        root = Path(args.checkpoint)
        out = Path(args.out) if args.out else (root if root.is_dir() else root.parent) / "evaluation.json"
        if stats is not None:
            result["samples_stats"] = str(save_stats(out.with_suffix(".npz"), *stats.mean_cov(), int(stats.count)))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        shown = {k: result[k] for k in ("fid", "clip_score", "num_images", "seconds") if k in result}
        print(f"{shown} -> {out}", flush=True)
    env.teardown()
    return result


if __name__ == "__main__":
    main()
