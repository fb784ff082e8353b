"""FID reference statistics of a raw shard set → pytorch-fid's .npz (mu, sigma), which `python -m pytorch_fid
REF.npz IMAGES/` reads too. Runs on one process, under torchrun, or under srun (ranks split the shards).

    python tools/fid_stats.py 'data/val-{000000..000009}.tar' --resolution 256 --out val256.npz \\
        --inception-weights ~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node 8 tools/fid_stats.py ...     # the same numbers, faster

Images are resized (short side, bicubic) and centre-cropped to --resolution as the training loaders do, then
quantized to 8 bits and resized to 299x299 by pytorch-fid's network. Use the resolution you generate at.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldmscale.distributed import env  # noqa: E402
from ldmscale.evaluation.fid import InceptionFeatures, resolve_inception_weights, save_stats  # noqa: E402
from ldmscale.evaluation.reference import reference_statistics  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shards", nargs="+", help="raw shard paths, globs or brace ranges")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--resolution", type=int, required=True, help="pixels (the generation resolution)")
    p.add_argument("--inception-weights", help="pytorch-fid's weights file (default: its cache file)")
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args(argv)
    dist = env.setup()
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    weights = resolve_inception_weights(args.inception_weights, key="--inception-weights")
    if weights is None:
        raise SystemExit("--inception-weights is needed (pytorch-fid's cache holds no weights file)")
    started = time.perf_counter()
    stats = reference_statistics(args.shards, args.resolution, InceptionFeatures(weights, "--inception-weights")
                                 .to(device), batch_size=args.batch_size, rank=dist.rank,
                                 world_size=dist.world_size)
    out = Path(args.out)
    if dist.is_main:
        save_stats(out, *stats.mean_cov(), num_images=int(stats.count))
        print(f"wrote {out}: {int(stats.count)} images, {time.perf_counter() - started:.1f} s", flush=True)
    env.teardown()
    return out


if __name__ == "__main__":
    main()
