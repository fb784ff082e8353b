#!/usr/bin/env bash
# CI: start the local SLURM test cluster, run the `slurm`-marked tests against it (they fail rather
# than skip if it does not answer), then stop the daemons this script started.
#   usage: slurm/ci_cluster.sh [PYTHON] [extra pytest args]   (PYTHON defaults to `python`)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python}; shift || true

started_here=0
if ! (command -v sinfo >/dev/null && sinfo -h -N -o %T 2>/dev/null | grep -q idle); then
  started_here=1
fi
t0=$(date +%s)
bash slurm/start_test_cluster.sh
echo "[ci] SLURM cluster up in $(( $(date +%s) - t0 )) s"
# Leave a cluster someone else started running; stop ours even when the tests fail.
[ "$started_here" = 1 ] && trap 'bash slurm/stop_test_cluster.sh' EXIT

LDMSCALE_REQUIRE_SLURM=1 OMP_NUM_THREADS=1 "$PYTHON" -m pytest -m slurm -q "$@"
