"""Shared pytest fixtures."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest


@functools.lru_cache(maxsize=1)
def _slurm_cluster_problem() -> str | None:
    """None if a SLURM cluster answers (a node up, accounting reachable); else why not."""
    if not shutil.which("sinfo"):
        return "sinfo not found (start one with slurm/start_test_cluster.sh)"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=15)
        clusters = subprocess.run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"],
                                  capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM did not answer: {err}"
    if nodes.returncode or not any(s.startswith(("idle", "mixed", "alloc")) for s in nodes.stdout.split()):
        return f"no usable SLURM node: {(nodes.stdout + nodes.stderr).strip() or 'none'}"
    if clusters.returncode or not clusters.stdout.strip():
        # submitit reads job states with sacct; without accounting a dead job can be waited on forever.
        return f"SLURM accounting (slurmdbd) did not answer: {clusters.stderr.strip()}"
    return None


@pytest.fixture(autouse=True)
def _require_slurm(request: pytest.FixtureRequest) -> None:
    """Tests marked `slurm` skip without a cluster, and FAIL when LDMSCALE_REQUIRE_SLURM=1 (CI)."""
    if request.node.get_closest_marker("slurm") is None:
        return
    problem = _slurm_cluster_problem()
    if problem is None:
        return
    if os.environ.get("LDMSCALE_REQUIRE_SLURM") == "1":
        pytest.fail(f"LDMSCALE_REQUIRE_SLURM=1 but {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def fid_inception_weights(tmp_path_factory: pytest.TempPathFactory):
    """Random weights for pytorch-fid's Inception, saved once per session (real ones cannot be downloaded)."""
    import torch

    from ldmscale.evaluation.fid import random_inception_weights

    path = tmp_path_factory.mktemp("fid") / "pt_inception_random.pth"
    torch.save(random_inception_weights(seed=0), path)
    return path
