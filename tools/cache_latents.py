"""Cache autoencoder moments and text embeddings of raw WebDataset shards (one output shard per input).

    python tools/cache_latents.py +experiment=NAME cache.input='/data/raw-{000000..000099}.tar' \\
        cache.output=/data/cache cache.num_workers=4

Composed by Hydra from the same conf/ as training, so encoder and data settings cannot drift.
Re-running skips complete shards and retries incomplete ones (unreadable, a `pipe:` that exited non-zero
or stalled longer than cache.read_timeout_s); the exit status is non-zero when cache.max_failure_rate is
exceeded.

With `launcher=slurm` it submits a SLURM array instead (ldmscale/launch/cache_array.py): one task per
`launcher.shards_per_task` input shards, at most `launcher.array_parallelism` at once, plus a job that
writes manifest.json after them; it prints the array id and log paths and returns. Re-submitting
the same command redoes only the shards that are not complete.

    python tools/cache_latents.py cache.input=... cache.output=... launcher=slurm \
        launcher.gpus_per_node=1 launcher.shards_per_task=4 launcher.array_parallelism=32
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ldmscale.config import CONF_DIR, normalize_overrides, register_configs, to_object  # noqa: E402

register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(composed: DictConfig) -> None:
    from ldmscale.data.cache import CacheJobError, run_cache_job
    from ldmscale.launch.slurm import SubmissionError

    cfg = to_object(composed)
    try:
        if cfg.launcher.kind == "slurm":
            from ldmscale.launch.cache_array import submit_cache_array

            print(submit_cache_array(cfg).describe(), flush=True)
            return
        run_cache_job(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache, seed=cfg.seed)
    except (CacheJobError, SubmissionError) as exc:
        print(f"[cache] FAILED: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    # Hydra's log (cache_latents.log) goes beside the cache it describes, not into the working directory.
    sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:]), "hydra.run.dir=${cache.output}",
                "hydra.output_subdir=null"]
    main()
