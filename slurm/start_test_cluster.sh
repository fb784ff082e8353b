#!/usr/bin/env bash
# Start a throwaway single-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) for tests/CI.
#
# Debian packages, no systemd: the daemons are started here and their pids written under $STATE_DIR,
# so slurm/stop_test_cluster.sh ends only what this script started. Idempotent: if the cluster already
# answers (node idle, cluster registered in accounting) it returns at once.
# Needs root (it installs packages and writes /etc/slurm). Facts behind each setting: shared/ENVIRONMENT.md.
#
#   STATE_DIR  where pid files, logs, spool and the MariaDB datadir live (default /tmp/ldmscale-slurm)
#   DB_PORT    MariaDB port on 127.0.0.1 (default 33061)
set -euo pipefail

STATE_DIR=${STATE_DIR:-/tmp/ldmscale-slurm}
DB_PORT=${DB_PORT:-33061}
CLUSTER=${CLUSTER:-ldmscale}
HOST=$(hostname -s)
NCPU=$(nproc)
# Real memory in MB, leaving headroom so slurmd does not drain the node for "Low RealMemory".
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
T0=$(date +%s.%N)

log() { echo "[slurm-cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

cluster_ready() {
  sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)' &&
    sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"
}

if command -v sinfo >/dev/null && cluster_ready; then
  log "already running ($(sinfo -h -N -o '%N %T' | head -1))"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (installs packages, writes /etc/slurm, starts daemons)"

# ------------------------------------------------------------------ packages
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge slurmdbd:slurmdbd \
            mariadbd:mariadb-server; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # The image blocks package scripts from starting services; we start them below.
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$STATE_DIR"/{log,run,spool/ctld,spool/d,db}
chmod 755 "$STATE_DIR"

is_running() {  # is_running NAME COMM: the pid in STATE_DIR/run/NAME.pid is alive (not a zombie) and is COMM
  local pidfile="$STATE_DIR/run/$1.pid" pid
  [ -s "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ -r "/proc/$pid/comm" ] || return 1
  [ "$(cat /proc/$pid/comm)" = "$2" ] || return 1
  ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out waiting for $what"
    sleep 0.2
  done
}

# ------------------------------------------------------------------ munge
if ! is_running munged munged; then
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge /etc/munge/munge.key 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  # sacctmgr ignores AuthInfo=socket=, so the default socket path is kept.
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  # munged runs as user munge and writes its pid file into its own /run/munge; we keep a copy.
  rm -f /run/munge/ldmscale-munged.pid
  su -s /bin/sh munge -c "munged --pid-file=/run/munge/ldmscale-munged.pid" \
    || die "munged failed to start (see /var/log/munge/munged.log)"
  wait_for 10 munged test -s /run/munge/ldmscale-munged.pid
  cp /run/munge/ldmscale-munged.pid "$STATE_DIR/run/munged.pid"
  log "munged up"
fi

# ------------------------------------------------------------------ MariaDB (throwaway, 127.0.0.1 only)
DB_SOCK="$STATE_DIR/run/mariadb.sock"
if ! is_running mariadbd mariadbd; then
  if [ ! -d "$STATE_DIR/db/mysql" ]; then
    mariadb-install-db --no-defaults --user=root --datadir="$STATE_DIR/db" --auth-root-authentication-method=normal \
      --skip-test-db >"$STATE_DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $STATE_DIR/log/mariadb-install.log"
  fi
  mariadbd --no-defaults --user=root --datadir="$STATE_DIR/db" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --socket="$DB_SOCK" --pid-file="$STATE_DIR/run/mariadbd.pid" --skip-name-resolve \
    --innodb-buffer-pool-size=32M --log-error="$STATE_DIR/log/mariadb.log" &
  disown
  wait_for 30 "MariaDB on port $DB_PORT" mariadb --no-defaults -uroot --socket="$DB_SOCK" -e 'select 1'
  mariadb --no-defaults -uroot --socket="$DB_SOCK" -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    FLUSH PRIVILEGES;"
  log "mariadbd up on 127.0.0.1:$DB_PORT"
fi

# ------------------------------------------------------------------ configs
mkdir -p /etc/slurm
cat >/etc/slurm/slurmdbd.conf <<CONF
# Written by ldmscale slurm/start_test_cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE_DIR/run/slurmdbd.pid
LogFile=$STATE_DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
chmod 0600 /etc/slurm/slurmdbd.conf  # slurmdbd refuses a readable file (it holds the DB password)

cat >/etc/slurm/slurm.conf <<CONF
# Written by ldmscale slurm/start_test_cluster.sh: a one-node test cluster, no cgroups.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# A requeued job otherwise waits for the 120 s credential expiry before it may start again.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/spool/ctld
SlurmdSpoolDir=$STATE_DIR/spool/d
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
# No cgroup here: track processes through /proc, no task binding, no accounting gather.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
# An impossible request fails at submit instead of pending forever.
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
MinJobAge=300
KillWait=10
# Preemption: a job in "preempt" (high priority) requeues jobs running in "debug".
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 OverSubscribe=NO
PartitionName=preempt Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=10 OverSubscribe=NO
CONF

# ------------------------------------------------------------------ slurmdbd, slurmctld, slurmd
if ! is_running slurmdbd slurmdbd; then
  slurmdbd || die "slurmdbd failed: $STATE_DIR/log/slurmdbd.log"
  wait_for 30 slurmdbd sacctmgr -n list cluster
  log "slurmdbd up"
fi
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if ! is_running slurmctld slurmctld; then
  slurmctld -c || die "slurmctld failed: $STATE_DIR/log/slurmctld.log"
  wait_for 30 slurmctld scontrol ping
  log "slurmctld up"
fi
if ! is_running slurmd slurmd; then
  slurmd || die "slurmd failed: $STATE_DIR/log/slurmd.log"
fi
wait_for 60 "node $HOST idle and cluster $CLUSTER registered (logs: $STATE_DIR/log/)" cluster_ready
log "ready in $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $T0}") s: $(sinfo -h -o '%P %a %D %T' | tr '\n' ' ')"
