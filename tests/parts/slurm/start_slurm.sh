#!/bin/bash
# A one-node SLURM cluster on this machine, for tests/parts/test_slurm.py: munge, slurmctld and slurmd on localhost.
#
#   sudo tests/parts/slurm/start_slurm.sh [DIR]     # start (installing Debian's slurm-wlm and munge if missing)
#   sudo tests/parts/slurm/start_slurm.sh --stop [DIR]
#
# DIR (default /tmp/slurm-test) holds slurm.conf, the daemons' state, pid and log files. On success the last
# line printed is `export SLURM_CONF=DIR/slurm.conf`: the slurm commands (sbatch, scontrol, ...) need it.
# Needs root (the daemons run as root; slurmd must be able to start jobs as any user). No cgroups, no accounting
# database: process tracking by /proc (proctrack/linuxproc), job history from `scontrol show job`.
set -euo pipefail

STOP=0
if [ "${1:-}" = "--stop" ]; then STOP=1; shift; fi
DIR=${1:-/tmp/slurm-test}
CONF=$DIR/slurm.conf

fail() { echo "start_slurm.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (it starts munged, slurmctld and slurmd)"

stop_daemon() {  # by the pid file each daemon wrote
    local pidfile=$1
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        local pid
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
}

if [ "$STOP" = 1 ]; then
    stop_daemon "$DIR/slurmd.pid"
    stop_daemon "$DIR/slurmctld.pid"
    stop_daemon "$DIR/munged.pid"
    echo "stopped the test cluster in $DIR"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || fail "slurm is not installed and there is no apt-get to install it"
    echo "installing slurm-wlm and munge (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

mkdir -p "$DIR/state" "$DIR/spool"

# munge: slurm's authentication. Debian's package made a key; make one if it did not.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none;
                                      chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$DIR/munged.pid" 2>/dev/null || true
    for _ in $(seq 100); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || fail "munged did not start"
fi

NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

cat > "$CONF" <<EOF
# Written by tests/parts/slurm/start_slurm.sh: one node, this machine.
ClusterName=localtest
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A job step credential lives 10 s (default 120). This is also how long SLURM holds a requeued job before it may
# start again (its old credential is revoked on the node until then): the test's requeued job starts after ~11 s.
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$CONF

# Started afresh each time, so that the config above is the one in force (-c: forget jobs of an earlier start).
stop_daemon "$DIR/slurmd.pid"
stop_daemon "$DIR/slurmctld.pid"
/usr/sbin/slurmctld -c -f "$CONF" || fail "slurmctld did not start; see $DIR/slurmctld.log"
/usr/sbin/slurmd -f "$CONF" -N "$NODE" || fail "slurmd did not start; see $DIR/slurmd.log"

# Wait (up to 60 s) until the node takes jobs.
for _ in $(seq 600); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    case "$state" in idle|mixed|allocated) break ;; esac
    sleep 0.1
done
case "$state" in
    idle|mixed|allocated) ;;
    *) fail "node $NODE is '${state:-unknown}', not idle, after 60 s; see $DIR/slurmctld.log and $DIR/slurmd.log" ;;
esac
echo "SLURM cluster up: node $NODE, $CPUS CPUs, config $CONF"
echo "export SLURM_CONF=$CONF"
