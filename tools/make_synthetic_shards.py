"""Write the embedded synthetic shapes dataset as WebDataset shards.

    python tools/make_synthetic_shards.py --out DIR --num-samples 1000 --resolution 64
"""

from __future__ import annotations

import argparse
import time

from ldmscale.data.synthetic import write_shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-index", type=int, default=0, help="first sample index (held-out sets use another range)")
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    parser.add_argument("--holdout", action="append", default=[], metavar="'COLOUR SHAPE'",
                        help="a colour/shape pair to leave out, e.g. 'blue triangle' (repeatable)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = write_shards(args.out, args.num_samples, args.resolution, args.shard_size, args.seed,
                         args.start_index, args.format, args.holdout)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.num_samples} samples in {len(paths)} shards to {args.out} "
          f"in {elapsed:.2f} s ({args.num_samples / elapsed:.0f} samples/s)")


if __name__ == "__main__":
    main()
