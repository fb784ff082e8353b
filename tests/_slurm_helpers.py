"""Functions that SLURM jobs run: submitit pickles them by module name, so they live in a module the job
can import as `tests._slurm_helpers` (pytest imports test files under their bare names)."""

import os
import signal
import time

import submitit


def die_or_wait() -> str:
    """Task 1 is killed outright (as by the OOM killer: nothing reported); task 0 is busy outside any
    collective for 5 minutes, so only the launcher can end it."""
    if submitit.JobEnvironment().global_rank == 1:
        time.sleep(2)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(300)
    return "survived"
