"""The latent cache job as a SLURM array: one array task per group of input shards, then a
dependent job that assembles manifest.json once every task has ended.

Each task runs `ldmscale.data.cache.cache_shard` (the same per-shard function the local job runs)
on its shards. Shards already complete are left out at submission and skipped again inside a task,
so re-submitting after a failure redoes exactly the unfinished shards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import submitit

from ldmscale.config import Config, LauncherConfig
from ldmscale.launch.slurm import build_executor, submit


def cache_shards(cfg: Config, urls: list[str]) -> list[dict[str, Any]]:
    """One array task: cache `urls` into cfg.cache.output; returns their shard results."""
    from tqdm import tqdm

    from ldmscale.data.cache import CacheSpec, build_encoders, cache_shard, resolve_device

    # build_encoders seeds a random init itself: every task encodes with the same networks.
    encoders = build_encoders(cfg.autoencoder, cfg.conditioner, resolve_device(cfg.cache.device))
    spec = CacheSpec.build(cfg.data, cfg.conditioner, cfg.autoencoder, cfg.cache, encoders, cfg.seed)
    results = []
    with tqdm(desc=f"caching {len(urls)} shards", unit="img", disable=not cfg.cache.progress) as bar:
        for url in urls:
            results.append(cache_shard(url, cfg.cache.output, encoders, spec, progress=bar.update).to_json())
    return results


def assemble(cfg: Config, names: list[str]) -> dict[str, Any]:
    """The dependent job: write manifest.json from every shard's result, then check the failure rate.

    Each result is read once (200k shards: seconds); a shard is missing without a complete result or file."""
    from ldmscale.data.cache import (
        CacheJobError,
        check_failure_rate,
        incomplete_shards,
        load_results,
        write_manifest,
    )

    output = Path(cfg.cache.output)
    results, missing = load_results(output, names)
    missing += incomplete_shards(output, names, results)
    if missing:
        raise CacheJobError(
            f"{len(missing)} of {len(names)} shards are not complete (e.g. {sorted(missing)[:5]}); their array tasks "
            f"failed (logs in {cfg.launcher.folder}). Re-submit the same command: it redoes only these shards."
        )
    manifest = write_manifest(output, results)
    check_failure_rate(manifest, cfg.cache.max_failure_rate)
    return manifest


@dataclasses.dataclass
class CacheArray:
    """What was submitted: the array's jobs (one per task) and the manifest job after them."""

    tasks: list[submitit.Job]
    manifest_job: submitit.Job
    skipped_shards: int

    def describe(self) -> str:
        ids = f"{self.tasks[0].job_id.split('_')[0]}_[0-{len(self.tasks) - 1}]" if self.tasks else "(none)"
        return (f"submitted cache array {ids}: {len(self.tasks)} tasks ({self.skipped_shards} shards already "
                f"complete, skipped); manifest job {self.manifest_job.job_id} runs after them\n"
                f"  logs:   {Path(self.manifest_job.paths.stdout).parent}\n"
                f"  result: {self.manifest_job.paths.result_pickle}")

    def wait(self) -> dict[str, Any]:
        """Block until the manifest is written; returns it (raises with the task's traceback on failure)."""
        return self.manifest_job.result()


def array_task_launcher(cfg: LauncherConfig) -> LauncherConfig:
    """What one cache array task asks for: ONE process on one node with at most one GPU (cache.device),
    never training's one task per GPU, which would run each task's shards several times over."""
    return dataclasses.replace(cfg, folder=str(Path(cfg.folder).absolute()), nodes=1, tasks_per_node=1,
                               gpus_per_node=min(1, cfg.gpus_per_node))


def submit_cache_array(cfg: Config) -> CacheArray:
    """Submit the cache job as an array over groups of `launcher.shards_per_task` input shards,
    at most `launcher.array_parallelism` running at once, plus the manifest job after them.
    Each array task is one process with at most one GPU (`launcher.gpus_per_node` > 0 → 1)."""
    from ldmscale.data.cache import CacheJobError, incomplete_shards
    from ldmscale.data.shards import expand_urls, shard_name

    if not cfg.cache.input or not cfg.cache.output:
        raise CacheJobError("cache.input and cache.output must both be set")
    output = str(Path(cfg.cache.output).absolute())
    launcher = array_task_launcher(cfg.launcher)
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, output=output), launcher=launcher)
    Path(output).mkdir(parents=True, exist_ok=True)
    urls = expand_urls(cfg.cache.input)
    names = [shard_name(u) for u in urls]
    redo = set(incomplete_shards(output, names))
    todo = [u for u, n in zip(urls, names) if n in redo]
    size = cfg.launcher.shards_per_task
    groups = [todo[i:i + size] for i in range(0, len(todo), size)]

    executor = build_executor(cfg.launcher)
    tasks: list[submitit.Job] = []
    if groups:
        try:
            tasks = executor.map_array(cache_shards, [cfg] * len(groups), groups)
        except submitit.core.utils.FailedJobError as err:
            from ldmscale.launch.slurm import SubmissionError

            raise SubmissionError(f"SLURM refused the cache array: {err}") from err
    # One small task for the manifest, after every array task has ended (whatever its state), so a
    # failed task gives a message naming the missing shards instead of a job pending forever.
    extra = dict(cfg.launcher.additional_parameters)
    if tasks:
        extra["dependency"] = f"afterany:{tasks[0].job_id.split('_')[0]}"
    small = dataclasses.replace(cfg.launcher, nodes=1, gpus_per_node=0, tasks_per_node=1,
                                job_name=f"{cfg.launcher.job_name}-manifest", additional_parameters=extra)
    manifest_job = submit(build_executor(small), assemble, cfg, names)
    return CacheArray(tasks, manifest_job, len(urls) - len(todo))
