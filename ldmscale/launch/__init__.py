"""Launchers: run a job here, or submit it to SLURM (launch/slurm.py). Apart from what runs."""

from __future__ import annotations

from typing import Any

from ldmscale.config import Config


def launch(cfg: Config) -> Any:
    """Dispatch on `cfg.launcher.kind`: local runs `ldmscale.train.run` in this process (python,
    torchrun, deepspeed or srun); slurm submits a job that runs the same function, prints its id and
    log paths, and returns the submitit Job."""
    if cfg.launcher.kind == "slurm":
        from ldmscale.launch.slurm import describe, submit_training

        job = submit_training(cfg)
        print(describe(job), flush=True)
        return job
    from ldmscale.train import run

    return run(cfg)
