#!/usr/bin/env bash
# CI's handle on the local SLURM test cluster (slurm/start_test_cluster.sh, stop_test_cluster.sh).
#
#   slurm/ci_cluster.sh start                 bring the cluster up (installs packages on first use);
#                                             remembers whether it was already running
#   slurm/ci_cluster.sh stop                  stop it again, unless it was running before `start`
#   slurm/ci_cluster.sh test [PYTHON] [ARGS]  start, run the `slurm`-marked tests (they FAIL, not skip,
#                                             if the cluster does not answer), stop; PYTHON defaults
#                                             to `python`, ARGS go to pytest
#
# .ci/run calls `start`, traps `stop` on exit and runs the whole suite with LDMSCALE_REQUIRE_SLURM=1.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE_DIR=${STATE_DIR:-/tmp/ldmscale-slurm}
MARK="$STATE_DIR/started-by-ci"

cluster_answers() {
  command -v sinfo >/dev/null && sinfo -h -N -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

start() {
  local before=0 t0
  cluster_answers && before=1
  t0=$(date +%s)
  bash slurm/start_test_cluster.sh
  mkdir -p "$STATE_DIR"
  if [ "$before" = 0 ]; then touch "$MARK"; fi
  echo "[ci] SLURM cluster up in $(( $(date +%s) - t0 )) s"
}

stop() {
  # Leave a cluster someone else started running; stop the one `start` brought up.
  if [ -e "$MARK" ]; then
    rm -f "$MARK"
    bash slurm/stop_test_cluster.sh
  else
    echo "[ci] SLURM cluster was running before 'start': left running"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  test)
    shift
    PYTHON=${1:-python}; shift || true
    start
    trap stop EXIT
    LDMSCALE_REQUIRE_SLURM=1 OMP_NUM_THREADS=1 "$PYTHON" -m pytest -m slurm -q --durations=10 "$@"
    ;;
  *) echo "usage: $0 start | stop | test [PYTHON] [pytest args]" >&2; exit 2 ;;
esac
