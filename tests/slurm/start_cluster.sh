#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (munged, slurmctld, slurmd) for
# tests/test_launch_slurm.py. Idempotent: a second call only checks that the node is idle.
#
#   sudo tests/slurm/start_cluster.sh        (needs Debian's slurm-wlm and munge installed)
#
# It writes /etc/slurm/slurm.conf, so it refuses to touch one it did not write itself: on a
# machine that belongs to a real cluster it does nothing.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by bloom-pretrain tests/slurm/start_cluster.sh"
HOST=$(hostname -s)

fail() { echo "start_cluster.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (it starts munged, slurmctld and slurmd)"
for cmd in munged slurmctld slurmd sinfo scontrol; do
    command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || fail "$cmd not found: apt-get install -y slurm-wlm munge"
done
export PATH="$PATH:/usr/sbin"
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    fail "$CONF was not written by this script; refusing to replace a real cluster's config"
fi

# CPUs from nproc (the cpuset this machine gives us); RealMemory a little under MemTotal because
# slurmd drains a node whose configured memory exceeds what it finds.
CPUS=$(nproc)
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

write_conf() {
    cat <<CONF
$MARK
ClusterName=bloomtest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No cgroups: containers and CI machines rarely allow them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No accounting database: finished jobs stay visible to scontrol for MinJobAge seconds instead.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
}

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
NEW=$(write_conf)
CHANGED=0
if [ ! -e "$CONF" ] || [ "$NEW" != "$(cat "$CONF")" ]; then
    printf '%s\n' "$NEW" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    CHANGED=1
fi

# munge: the package ships a key; make one if it is missing.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || mungekey --create --force 2>/dev/null || create-munge-key -f
    mkdir -p /run/munge && chown munge:munge /run/munge /etc/munge/munge.key
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || fail "munged did not start"
fi

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if pid_alive /run/slurmctld.pid && [ "$CHANGED" = 1 ]; then
    scontrol reconfigure
elif ! pid_alive /run/slurmctld.pid; then
    slurmctld
fi
if ! pid_alive /run/slurmd.pid; then
    slurmd
fi

# Wait for the node to register and be schedulable; a node left down or drained by an earlier run
# (a killed slurmd, a changed config) is resumed.
for i in $(seq 60); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
    case "$state" in
        idle|mix|alloc) echo "slurm cluster up: node $HOST ($CPUS CPUs) is $state"; exit 0 ;;
        down*|drain*) [ $((i % 5)) = 0 ] && scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
fail "node $HOST is not idle after 30 s (sinfo: ${state:-no answer}); see /var/log/slurm/"
