"""Executor parameters from `cfg.launcher`: what sbatch will be asked for (only the script text needs SLURM's
programs installed)."""

from __future__ import annotations

import pytest

from ldmscale.config import ConfigError, compose
from ldmscale.launch.cache_array import array_task_launcher
from ldmscale.launch.slurm import build_executor, executor_parameters


def test_slurm_group_one_task_per_gpu(tmp_path):
    cfg = compose(["launcher=slurm", "launcher.nodes=16", f"run_dir={tmp_path}"])
    params = executor_parameters(cfg.launcher)
    assert params["nodes"] == 16
    assert params["gpus_per_node"] == 8 and params["ntasks_per_node"] == 8
    assert params["time"] == cfg.launcher.timeout_min and params["signal_delay_s"] == 120
    assert params["job_name"] == "demo"
    assert cfg.launcher.folder == f"{tmp_path}/slurm"


def test_no_gres_flag_without_gpus_and_unset_options_left_out():
    cfg = compose(["launcher=slurm", "launcher.gpus_per_node=0", "launcher.cpus_per_task=2"])
    params = executor_parameters(cfg.launcher)
    assert "gpus_per_node" not in params and "gres" not in params
    assert params["ntasks_per_node"] == 1
    for key in ("mem", "partition", "account", "qos", "constraint", "setup", "additional_parameters"):
        assert key not in params


@pytest.mark.slurm  # submitit writes the script with `srun`'s own flags, so it runs where SLURM is installed
def test_sbatch_script_carries_every_setting(tmp_path):
    cfg = compose([
        "launcher=slurm", "launcher.nodes=2", "launcher.gpus_per_node=4", "launcher.tasks_per_node=4",
        "launcher.cpus_per_task=6", "launcher.mem_gb=200", "launcher.partition=gpu", "launcher.account=proj",
        "launcher.qos=high", "launcher.constraint=a100", "launcher.timeout_min=240",
        "launcher.signal_delay_s=300", "launcher.max_num_timeout=7",
        "+launcher.additional_parameters.exclusive=true", "launcher.setup=[module load cuda/12.4]",
        "launcher.job_name=sd", f"launcher.folder={tmp_path}",
    ])
    executor = build_executor(cfg.launcher)
    assert executor.max_num_timeout == 7
    script = executor._make_submission_file_text("python -m x", "UID")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --mem=200GB", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=a100",
                 "#SBATCH --time=240", "#SBATCH --signal=USR2@300", "#SBATCH --exclusive",
                 "#SBATCH --job-name=sd", "module load cuda/12.4", f"--output {tmp_path}/%j_%t_log.out"):
        assert line in script, line
    assert "srun --unbuffered" in script and "--kill-on-bad-exit=1" in script  # one dead task ends the job


@pytest.mark.parametrize("override, key", [
    ("launcher.nodes=0", "launcher.nodes"),
    ("launcher.gpus_per_node=-1", "launcher.gpus_per_node"),
    ("launcher.kind=pbs", "launcher.kind"),
])
def test_bad_launcher_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        compose([override])


def test_cache_array_task_is_one_process_with_at_most_one_gpu():
    cfg = compose(["launcher=slurm", "launcher.nodes=4", "launcher.cpus_per_task=6"])  # training: 8 GPUs/node
    params = executor_parameters(array_task_launcher(cfg.launcher))
    assert (params["nodes"], params["ntasks_per_node"], params["gpus_per_node"]) == (1, 1, 1)
    assert params["cpus_per_task"] == 6  # data-loading workers keep their CPUs
    cpu_only = executor_parameters(array_task_launcher(compose(["launcher=slurm", "launcher.gpus_per_node=0"]).launcher))
    assert "gpus_per_node" not in cpu_only and cpu_only["ntasks_per_node"] == 1
