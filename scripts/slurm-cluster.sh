#!/usr/bin/env bash
# A real single-node SLURM cluster with accounting, for CI and for trying the cluster guide on
# one machine (Debian 12, root, no systemd). See /work/shared/notes/slurm-in-ci.md for why
# each setting is what it is.
#
#   scripts/slurm-cluster.sh install   # apt packages (munge, slurm 22.05, slurmdbd, mariadb)
#   scripts/slurm-cluster.sh start     # write configs, start the daemons, wait for an idle node
#   scripts/slurm-cluster.sh stop      # stop the daemons by their pid files
#   scripts/slurm-cluster.sh status    # sinfo
#
# The node declares at least SSLPIPE_SLURM_CPUS CPUs (default 16, more if the machine has them):
# a test cluster on a 2-core machine must still run a 16-task array at once, as a real cluster's
# many nodes would (tests/test_tracking_server.py). Jobs here are tiny; slurmd accepts the larger
# count through SlurmdParameters=config_overrides. SSLPIPE_SLURM_CPUS=0 declares what slurmd -C sees.
#
# Daemons background themselves and write pid files under $STATE/run; nothing is started
# through systemd or init scripts (package scripts cannot start them here: policy-rc.d).
set -euo pipefail

STATE=${SSLPIPE_SLURM_STATE:-/var/lib/sslpipe-slurm}
CLUSTER=${SSLPIPE_SLURM_CLUSTER:-sslpipe}
PARTITION=${SSLPIPE_SLURM_PARTITION:-debug}
ETC=/etc/slurm
RUN=$STATE/run
MARIADB_PID=/run/mysqld/sslpipe-mariadb.pid  # mariadbd runs as mysql: its pid file lives in its own folder
LOG=$STATE/log

die() { echo "slurm-cluster: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it writes /etc/slurm and starts daemons)"; }

install() {
  need_root
  export DEBIAN_FRONTEND=noninteractive
  if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends munge slurm-client slurmctld slurmd slurmdbd mariadb-server
  fi
}

# pid_alive <pid file> <program>: the pid file names a live process running that program. A pid
# file left by a machine image taken while the daemons ran names a pid that, after a restart, is
# either dead or some other program: checking the name keeps such a file from skipping a start.
# A killed daemon not yet reaped (state Z) is not alive either.
pid_alive() {
  local pid
  [ -f "$1" ] && pid=$(cat "$1") && [[ $pid =~ ^[0-9]+$ ]] \
    && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] \
    && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

wait_for() {  # wait_for <seconds> <what> <command...>
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timed out after ${limit}s waiting for $what (logs in $LOG)"
}

write_configs() {
  local host cpus sockets cores threads mem
  host=$(hostname -s)
  getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts  # slurmd and MASTER_ADDR need it
  # Topology and memory as slurmd itself sees them; RealMemory above that drains the node.
  read -r cpus sockets cores threads mem < <(slurmd -C | head -1 | tr ' ' '\n' | awk -F= '
    $1=="CPUs"{c=$2} $1=="SocketsPerBoard"{s=$2} $1=="CoresPerSocket"{k=$2} $1=="ThreadsPerCore"{t=$2}
    $1=="RealMemory"{m=$2} END{print c, s, k, t, m}')
  mem=$((mem * 95 / 100))
  local want=${SSLPIPE_SLURM_CPUS:-16} overrides=""
  [[ $want =~ ^[0-9]+$ ]] || die "SSLPIPE_SLURM_CPUS=$want is not a whole number of CPUs (e.g. 16, or 0 for what the machine has)"
  if [ "$want" -gt "$cpus" ]; then
    cpus=$want sockets=1 cores=$want threads=1 overrides="SlurmdParameters=config_overrides"
  fi
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/d"
  cat > "$ETC/slurm.conf" <<EOF
# Written by sslpipe scripts/slurm-cluster.sh: one node, accounting through slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
EnforcePartLimits=ALL
ReturnToService=2
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
KillWait=10
MinJobAge=60
$overrides
NodeName=$host CPUs=$cpus SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"  # slurmdbd refuses a readable one
}

start_munge() {
  mkdir -p /run/munge && chown munge:munge /run/munge
  [ -s /etc/munge/munge.key ] || { mungekey -c -f 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; \
                                    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  pid_alive /run/munge/munged.pid munged || runuser -u munge -- /usr/sbin/munged --force
  wait_for 10 munged sh -c 'munge -n | unmunge'
}

start_mariadb() {
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOG/mariadb-install.log" 2>&1
  if ! pid_alive "$MARIADB_PID" mariadbd; then
    # setsid + nohup: it must outlive this shell; --skip-networking: unix socket only.
    setsid nohup mariadbd --user=mysql --skip-networking --pid-file="$MARIADB_PID" \
      >"$LOG/mariadb.log" 2>&1 < /dev/null &
  fi
  wait_for 30 mariadb mariadb -e 'select 1'
}

start() {
  need_root
  command -v slurmctld >/dev/null || die "slurm is not installed; run: $0 install"
  mkdir -p "$RUN" "$LOG"
  write_configs
  start_munge
  start_mariadb
  pid_alive "$RUN/slurmdbd.pid" slurmdbd || slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  local cold=false
  pid_alive "$RUN/slurmctld.pid" slurmctld || { cold=true; slurmctld; }
  wait_for 30 slurmctld scontrol ping
  sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true  # slurmctld adds it too; harmless if present
  pid_alive "$RUN/slurmd.pid" slurmd || slurmd -N "$(hostname -s)"
  if $cold; then
    # slurmctld recovers the jobs in its saved state as still running, but on a cold start
    # (a rebooted machine, or a machine image saved while tests ran) their processes are gone:
    # left alone they hold the node allocated for ever (measured: a 16-task array recovered from
    # an image kept the node 'alloc' past the 60 s wait). Cancel them so that accounting records
    # them as ended and the node comes back idle; job ids go on from where they were.
    local stale
    stale=$(squeue -h -o %A | tr '\n' ' ')
    if [ -n "${stale// }" ]; then
      echo "slurm-cluster: cancelling jobs left from before the daemons last stopped: $stale" >&2
      # shellcheck disable=SC2086
      scancel $stale || true
    fi
  fi
  wait_for 60 "an idle node" sh -c "sinfo -h -o %t | grep -qx idle"
  sinfo
}

stop() {
  # each daemon by its pid file (munged writes its own), waiting until it has gone
  local pidfile name pid
  for pidfile in "$RUN/slurmd.pid:slurmd" "$RUN/slurmctld.pid:slurmctld" "$RUN/slurmdbd.pid:slurmdbd" \
                 "$MARIADB_PID:mariadbd" /run/munge/munged.pid:munged; do
    name=${pidfile##*:} pidfile=${pidfile%:*}
    if pid_alive "$pidfile" "$name"; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) die "usage: $0 install|start|stop|status" ;;
esac
