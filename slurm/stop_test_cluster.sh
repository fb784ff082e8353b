#!/usr/bin/env bash
# Stop the test cluster started by slurm/start_test_cluster.sh: only the daemons whose pid files it
# wrote under $STATE_DIR, and only if /proc/PID/comm still names that daemon (a reused pid is left alone).
# A killed daemon can linger as a zombie for a few seconds; a zombie counts as stopped.
set -uo pipefail

STATE_DIR=${STATE_DIR:-/tmp/ldmscale-slurm}
log() { echo "[slurm-cluster] $*" >&2; }

alive() {  # alive PID COMM
  [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] &&
    ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null
}

# Reverse start order: compute first, then the controller, accounting, database, auth.
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  pidfile="$STATE_DIR/run/$name.pid"
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if alive "$pid" "$name"; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do alive "$pid" "$name" || break; sleep 0.1; done
    if alive "$pid" "$name"; then
      log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null
    fi
    log "stopped $name ($pid)"
  fi
  rm -f "$pidfile"
done
rm -f /run/munge/ldmscale-munged.pid
# Keep the state (MariaDB datadir, spool) unless asked: a restart then keeps job ids and accounting.
if [ "${1:-}" = "--purge" ]; then
  rm -rf "$STATE_DIR"
  log "removed $STATE_DIR"
fi
