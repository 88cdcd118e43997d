#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, from Debian's packages (slurm-wlm, slurmdbd,
# munge, mariadb-server; installed when missing), for the `slurm` tests:
#   sudo scripts/slurm-up.sh && python -m pytest -m slurm
# munged runs as user munge, MariaDB as mysql, slurmdbd, slurmctld and slurmd as root; the node is this host (its real
# hostname, reached on 127.0.0.1) with CPUs=$(nproc), in one partition `debug` (Default=YES).
# Safe to run again: what already answers is left running, a changed slurm.conf restarts
# the daemons. It exits 0 once `sinfo` shows the node idle and `srun hostname` works, and
# otherwise non-zero with one line that says why.
#
# Stop it:  scancel --user=root; for d in slurm/slurmd slurm/slurmctld slurm/slurmdbd mysqld/mysqld munge/munged;
#           do pkill -F /run/$d.pid; done
# Logs:     /var/log/slurm/{slurmctld,slurmd,slurmdbd,mariadb}.log, /var/log/munge/munged.log
#
# Job accounting is real (MariaDB and slurmdbd, both on this host): submitit polls `sacct`
# for job states, and plain accounting_storage/none makes that fail on every poll.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
PARTITION=debug
WAIT_S=${SLURM_UP_WAIT_S:-90}
t0=$SECONDS

die() {
  echo "slurm-up: $*" >&2
  exit 1
}
say() { echo "slurm-up: $*"; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"

# ---------------------------------------------------------------- packages
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
missing=0
for cmd in slurmctld slurmd slurmdbd munged mariadbd; do command -v "$cmd" >/dev/null || missing=1; done
if [[ $missing -eq 1 ]]; then
  command -v apt-get >/dev/null || die "SLURM, munge or MariaDB is missing and there is no apt-get to install them"
  say "installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q "${PACKAGES[@]}" >/tmp/slurm-up-apt.log 2>&1; then
    apt-get update -q >>/tmp/slurm-up-apt.log 2>&1 || true
    apt-get install -y -q "${PACKAGES[@]}" >>/tmp/slurm-up-apt.log 2>&1 ||
      die "apt-get install ${PACKAGES[*]} failed: $(tail -n 1 /tmp/slurm-up-apt.log)"
  fi
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo) # leave 10% to the OS

# ---------------------------------------------------------------- munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
chown munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 ||
    die "could not create /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged 2>/tmp/slurm-up-munged.err ||
    die "munged did not start: $(tail -n 1 /tmp/slurm-up-munged.err)"
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# ---------------------------------------------------------------- accounting: MariaDB + slurmdbd
# submitit learns job states from `sacct`, which needs slurmdbd. Without it (the
# accounting_storage/none set-up) sacct fails with "Slurm accounting storage is disabled":
# submitit logs "Bypassing sacct error" on every poll, and a job that dies without writing
# its result is never seen to end. MariaDB listens on its socket only (no TCP port), and
# slurmdbd logs in as root through that socket (unix_socket auth): no password anywhere.
mkdir -p /run/mysqld /var/log/slurm /run/slurm
chown mysql:mysql /run/mysqld
if ! mariadb -e 'select 1' >/dev/null 2>&1; then
  [[ -d /var/lib/mysql/mysql ]] ||
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/tmp/slurm-up-mariadb.log 2>&1 ||
    die "mariadb-install-db failed: $(tail -n 1 /tmp/slurm-up-mariadb.log)"
  (setsid mariadbd --user=mysql --skip-networking >>/var/log/slurm/mariadb.log 2>&1 </dev/null &)
  for _ in $(seq 150); do
    mariadb -e 'select 1' >/dev/null 2>&1 && break
    sleep 0.2
  done
  mariadb -e 'select 1' >/dev/null 2>&1 || die "MariaDB does not answer: $(tail -n 1 /var/log/slurm/mariadb.log)"
fi
dbd_conf=$(
  cat <<EOF
# Written by quadnet's scripts/slurm-up.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
)
dbd_changed=0
if [[ ! -f $CONF_DIR/slurmdbd.conf ]] || [[ "$(cat "$CONF_DIR/slurmdbd.conf")" != "$dbd_conf" ]]; then
  mkdir -p "$CONF_DIR"
  printf '%s\n' "$dbd_conf" >"$CONF_DIR/slurmdbd.conf"
  dbd_changed=1
fi
chmod 0600 "$CONF_DIR/slurmdbd.conf" # slurmdbd refuses a conf that others can read

# ---------------------------------------------------------------- slurm.conf
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
new_conf=$(
  cat <<EOF
# Written by quadnet's scripts/slurm-up.sh: one node, this host.
ClusterName=quadnet
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
changed=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
  printf '%s\n' "$new_conf" >"$CONF"
  changed=1
fi

pid_alive() { # pid_alive PIDFILE: the daemon it names runs (a stale file's pid may be reused)
  local pid
  [[ -s $1 ]] || return 1
  pid=$(cat "$1")
  [[ -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$(basename "$1" .pid)" ]]
}
stop_pid() { # stop_pid PIDFILE: TERM the daemon it names, and wait for it to go
  if pid_alive "$1"; then
    local pid
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$1"
}

if [[ $changed -eq 1 || $dbd_changed -eq 1 ]]; then
  stop_pid /run/slurm/slurmd.pid
  stop_pid /run/slurm/slurmctld.pid
fi
[[ $dbd_changed -eq 1 ]] && stop_pid /run/slurm/slurmdbd.pid

# ---------------------------------------------------------------- daemons
# slurmdbd first, and the cluster known to it, so that slurmctld registers with it.
if ! pid_alive /run/slurm/slurmdbd.pid; then
  slurmdbd 2>/tmp/slurm-up-slurmdbd.err || die "slurmdbd did not start: $(tail -n 1 /tmp/slurm-up-slurmdbd.err)"
fi
for _ in $(seq 150); do
  timeout 5 sacctmgr -n -P list cluster >/dev/null 2>&1 && break
  sleep 0.2
done
clusters=$(timeout 5 sacctmgr -n -P list cluster format=cluster 2>&1) ||
  die "slurmdbd does not answer: $(tail -n 1 /var/log/slurm/slurmdbd.log 2>/dev/null)"
if ! grep -qx quadnet <<<"$clusters"; then
  timeout 10 sacctmgr -i add cluster quadnet >/dev/null 2>&1 || die "sacctmgr could not add the cluster 'quadnet'"
fi
if ! pid_alive /run/slurm/slurmctld.pid || ! timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
  stop_pid /run/slurm/slurmctld.pid
  slurmctld -i 2>/tmp/slurm-up-slurmctld.err || die "slurmctld did not start: $(tail -n 1 /tmp/slurm-up-slurmctld.err)"
fi
for _ in $(seq 100); do
  timeout 5 scontrol ping 2>/dev/null | grep -q UP && break
  sleep 0.2
done
timeout 5 scontrol ping 2>/dev/null | grep -q UP ||
  die "slurmctld does not answer: $(tail -n 1 /var/log/slurm/slurmctld.log 2>/dev/null)"
if ! pid_alive /run/slurm/slurmd.pid; then
  slurmd 2>/tmp/slurm-up-slurmd.err || die "slurmd did not start: $(tail -n 1 /tmp/slurm-up-slurmd.err)"
fi

# ---------------------------------------------------------------- wait for the node
state=""
for ((i = 0; i < WAIT_S * 2; i++)); do
  state=$(timeout 5 sinfo -h -n "$host" -o %T 2>/dev/null | head -n 1 || true)
  case $state in
    idle | mixed | allocated | completing) break ;;
    down* | drain* | fail*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
case $state in
  idle | mixed | allocated | completing) ;;
  *)
    reason=$(sinfo -h -n "$host" -o %E 2>/dev/null | head -n 1 || true)
    die "node $host is '${state:-unknown}' after ${WAIT_S} s${reason:+ ($reason)}; see /var/log/slurm/slurmd.log"
    ;;
esac
out=$(timeout 60 srun -N1 -n1 -t 1 hostname 2>&1) || die "srun hostname failed: $(printf '%s' "$out" | tail -n 1)"
[[ $out == "$host"* ]] || die "srun hostname answered '$out', not '$host'"
say "node $host ($cpus CPUs, ${mem_mb} MB) is $state in partition $PARTITION; srun works ($((SECONDS - t0)) s)"
