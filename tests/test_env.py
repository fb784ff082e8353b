"""Rank/world/master detection under each launcher's variables."""

from __future__ import annotations

import pytest

from ldmscale.distributed.env import detect, expand_nodelist, export, port_from_job_id


def test_plain_python():
    dist = detect({}, ["train.py"])
    assert (dist.rank, dist.world_size, dist.local_rank, dist.launcher) == (0, 1, 0, "python")
    assert dist.master_addr == "127.0.0.1" and dist.master_port > 0


def test_torchrun():
    environ = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "node7", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"}
    dist = detect(environ, ["train.py"])
    assert (dist.rank, dist.world_size, dist.local_rank, dist.local_world_size) == (3, 8, 1, 2)
    assert (dist.master_addr, dist.master_port, dist.launcher) == ("node7", 1234, "torchrun")


@pytest.mark.parametrize("argv", [["train.py", "--local_rank=2"], ["train.py", "--local_rank", "2"]])
def test_deepspeed_launcher(argv):
    environ = {"RANK": "6", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    dist = detect(environ, argv)
    assert (dist.rank, dist.world_size, dist.local_rank, dist.launcher) == (6, 8, 2, "deepspeed")


def test_srun():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
               "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_ID": "4242",
               "SLURM_JOB_NODELIST": "gpu[007-008]"}
    dist = detect(environ, ["train.py"])
    assert (dist.rank, dist.world_size, dist.local_rank, dist.local_world_size) == (5, 8, 1, 4)
    assert dist.master_addr == "gpu007"
    assert dist.master_port == port_from_job_id("4242")
    assert dist.launcher == "srun"


def test_submitit_label_and_same_rendezvous():
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "17",
               "SLURM_JOB_NODELIST": "localhost", "SUBMITIT_EXECUTOR": "slurm"}
    dist = detect(environ, ["x"])
    assert dist.launcher == "submitit" and dist.world_size == 2 and dist.master_addr == "localhost"
    assert 20000 <= dist.master_port < 30000


def test_array_tasks_on_one_node_get_their_own_ports():
    # Sweep points are array tasks of one array job and may share a node: one port each.
    base = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1",
            "SLURM_ARRAY_JOB_ID": "40"}
    ports = {detect(dict(base, SLURM_JOB_ID=job, SLURM_ARRAY_TASK_ID=task), ["x"]).master_port
             for job, task in (("40", "0"), ("41", "1"))}
    assert len(ports) == 2


@pytest.mark.parametrize(
    "nodelist, hosts",
    [("a1", ["a1"]), ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
     ("n[1,3-4],x9", ["n1", "n3", "n4", "x9"]), ("r[8-10]-ib", ["r8-ib", "r9-ib", "r10-ib"])],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_export_sets_deepspeed_variables_and_threads():
    environ: dict[str, str] = {}
    export(detect({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "9",
                   "SLURM_JOB_NODELIST": "h1"}, ["x"]), environ)
    assert environ["RANK"] == "1" and environ["WORLD_SIZE"] == "2" and environ["LOCAL_RANK"] == "1"
    assert environ["MASTER_ADDR"] == "h1" and int(environ["OMP_NUM_THREADS"]) >= 1


def test_submitit_task_ignores_rank_variables_inherited_from_the_submitting_shell():
    """sbatch exports the submitter's environment: a stale RANK=0 WORLD_SIZE=1 (left by a process that ran
    torch.distributed) made every task rank 0 of 1, and the second one failed to bind the store's port."""
    environ = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29777",
               "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
               "SLURM_LOCALID": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost",
               "SUBMITIT_EXECUTOR": "slurm"}
    dist = detect(environ, argv=[])
    assert (dist.launcher, dist.rank, dist.world_size, dist.local_rank) == ("submitit", 1, 2, 1)
    # and the rendezvous is this job's own: two sweep jobs on one node must not share an inherited port
    assert (dist.master_addr, dist.master_port) == ("localhost", port_from_job_id("7"))
