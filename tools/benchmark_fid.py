"""Time a FID of N images on this machine: Inception features (pytorch-fid's network, random weights: the cost
is the same as with the real ones) and the Fréchet distance, ours against pytorch-fid's scipy sqrtm.

    python tools/benchmark_fid.py --num-images 1000 --resolution 32 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldmscale.data import synthetic  # noqa: E402
from ldmscale.evaluation.fid import (  # noqa: E402
    FeatureStats,
    InceptionFeatures,
    frechet_distance,
    random_inception_weights,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "random_inception.pth"
        torch.save(random_inception_weights(), weights)
        net = InceptionFeatures(weights)
    specs = [synthetic.draw_spec(0, i) for i in range(args.num_images)]
    pixels = torch.from_numpy(np.stack([np.asarray(synthetic.render(s, args.resolution)) for s in specs]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    stats = FeatureStats()
    start = time.perf_counter()
    for lo in range(0, args.num_images, args.batch_size):
        stats.update(net(pixels[lo:lo + args.batch_size]))
    features_s = time.perf_counter() - start
    mu, sigma = stats.mean_cov()
    reference = (mu + 0.01, sigma * 1.01)
    start = time.perf_counter()
    ours = frechet_distance(mu, sigma, *reference)
    ours_s = time.perf_counter() - start
    from pytorch_fid.fid_score import calculate_frechet_distance

    start = time.perf_counter()
    theirs = calculate_frechet_distance(mu.numpy(), sigma.numpy(), reference[0].numpy(), reference[1].numpy())
    theirs_s = time.perf_counter() - start
    print(f"{args.num_images} images at {args.resolution}px, {args.threads} thread(s): features {features_s:.1f} s "
          f"({args.num_images / features_s:.1f} img/s); Fréchet ours {ours_s:.2f} s vs pytorch-fid "
          f"{theirs_s:.2f} s (x{theirs_s / max(ours_s, 1e-9):.1f}); FID total {features_s + ours_s:.1f} s; "
          f"values {ours:.6g} vs {theirs:.6g}")


if __name__ == "__main__":
    main()
