#!/usr/bin/env bash
# Start a SLURM test cluster on this machine (munged, slurmctld, one slurmd per node) for the SLURM
# tests. Idempotent: a second call with the same --nodes only checks that the nodes are idle.
#
#   sudo tests/slurm/start_cluster.sh [--nodes N]    (needs Debian's slurm-wlm and munge installed)
#
# --nodes 1 (the default): one node, this machine itself, at 127.0.0.1.
# --nodes 2 or 3: nodes bloomnode1..N, each in its own network namespace (same name) with its own
# hostname (a UTS namespace) and address 10.77.0.1k on a bridge (bloombr0, 10.77.0.1 for the
# controller) that exists only on this machine: no route leads off it, so no job traffic leaves.
# Each slurmd runs as `slurmd -N bloomnodek` inside its namespaces, so every process of a job on
# node k does too, and torch.distributed meets over the bridge. Debian's slurm is built without
# --enable-multiple-slurmd: separate namespaces are how several slurmds share one host.
#
# It writes /etc/slurm/slurm.conf, so it refuses to touch one it did not write itself: on a
# machine that belongs to a real cluster it does nothing. tests/slurm/stop_cluster.sh undoes it.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by bloom-pretrain tests/slurm/start_cluster.sh"
HOST=$(hostname -s)
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/netns.sh"

fail() { echo "start_cluster.sh: error: $*" >&2; exit 1; }

NODES=1
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES=${2:-}; shift 2 || fail "--nodes needs a value (1, 2 or 3)" ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        *) fail "unknown argument '$1' (usage: start_cluster.sh [--nodes 1|2|3])" ;;
    esac
done
case "$NODES" in 1|2|3) ;; *) fail "--nodes $NODES: this test cluster has 1, 2 or 3 nodes" ;; esac

[ "$(id -u)" = 0 ] || fail "run as root (it starts munged, slurmctld and slurmd)"
for cmd in munged slurmctld slurmd sinfo scontrol; do
    command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || fail "$cmd not found: apt-get install -y slurm-wlm munge"
done
if [ "$NODES" -gt 1 ]; then
    for cmd in ip unshare nsenter; do command -v "$cmd" >/dev/null || fail "$cmd not found: apt-get install -y iproute2 util-linux"; done
fi
export PATH="$PATH:/usr/sbin"
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    fail "$CONF was not written by this script; refusing to replace a real cluster's config"
fi

# CPUs from nproc (the cpuset this machine gives us); RealMemory a little under MemTotal because
# slurmd drains a node whose configured memory exceeds what it finds. Namespaced nodes all
# declare the whole machine: they share its cores, as the tests' processes always do here.
CPUS=$(nproc)
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

if [ "$NODES" = 1 ]; then
    CTLD_ADDR=127.0.0.1
    NODE_NAMES=$HOST
else
    CTLD_ADDR=$BRIDGE_ADDR
    NODE_NAMES=$(node_names "$NODES")
fi

# Daemon files: one slurmd per node, so namespaced nodes each get their own (%n: the node name).
if [ "$NODES" = 1 ]; then
    SLURMD_FILES=(/var/spool/slurmd /run/slurmd.pid /var/log/slurm/slurmd.log)
else
    SLURMD_FILES=(/var/spool/slurmd-%n /run/slurmd-%n.pid /var/log/slurm/slurmd-%n.log)
fi

node_lines() {
    if [ "$NODES" = 1 ]; then
        echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
        echo "PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP"
        return
    fi
    for name in $NODE_NAMES; do
        echo "NodeName=$name NodeHostname=$name NodeAddr=$(node_addr "$name") CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(echo $NODE_NAMES | tr ' ' ',') Default=YES MaxTime=INFINITE State=UP"
}

write_conf() {
    cat <<CONF
$MARK
ClusterName=bloomtest
SlurmctldHost=$HOST($CTLD_ADDR)
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
SlurmdSpoolDir=${SLURMD_FILES[0]}
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=${SLURMD_FILES[1]}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=${SLURMD_FILES[2]}
# No accounting database: finished jobs stay visible to scontrol for MinJobAge seconds instead.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=5
InactiveLimit=0
$(node_lines)
CONF
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The namespaces first: where they cannot be made, a running cluster is left as it is.
[ "$NODES" = 1 ] || make_network "$NODE_NAMES" || fail "cannot build the node namespaces and their bridge (see above)"

# The node set a running cluster was started with: a different one needs fresh daemons (slurmctld
# cannot add or drop nodes on `scontrol reconfigure`), and the namespaces of dropped nodes go.
RESTART=0
if [ -e "$CONF" ] && [ "$(grep '^NodeName=' "$CONF")" != "$(node_lines | grep '^NodeName=')" ]; then
    stop_daemons
    if [ "$NODES" = 1 ]; then remove_network; else remove_network "$NODE_NAMES"; fi
    RESTART=1
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
NEW=$(write_conf)
CHANGED=0
if [ ! -e "$CONF" ] || [ "$NEW" != "$(cat "$CONF")" ]; then
    printf '%s\n' "$NEW" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    CHANGED=1
fi

# munge: the package ships a key; make one if it is missing. Its socket is a file, so slurmds in
# other network namespaces reach the same munged.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || mungekey --create --force 2>/dev/null || create-munge-key -f
    mkdir -p /run/munge && chown munge:munge /run/munge /etc/munge/munge.key
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || fail "munged did not start"
fi

if pid_alive /run/slurmctld.pid && [ "$CHANGED" = 1 ]; then
    scontrol reconfigure
elif ! pid_alive /run/slurmctld.pid; then
    # -c: a new node set makes the saved job and node state meaningless.
    if [ "$RESTART" = 1 ]; then slurmctld -c; else slurmctld; fi
fi
if [ "$NODES" = 1 ]; then
    mkdir -p /var/spool/slurmd
    pid_alive /run/slurmd.pid || slurmd
else
    for name in $NODE_NAMES; do
        mkdir -p "/var/spool/slurmd-$name"
        pid_alive "/run/slurmd-$name.pid" || start_node_slurmd "$name" || fail "slurmd of $name did not start"
    done
fi

# Wait for the nodes to register and be schedulable; a node left down or drained by an earlier run
# (a killed slurmd, a changed config) is resumed.
NODE_LIST=$(echo $NODE_NAMES | tr ' ' ',')
for i in $(seq 60); do
    states=$(sinfo -h -N -n "$NODE_LIST" -o %t 2>/dev/null | sort -u | tr '\n' ' ' || true)
    case "$states" in
        "idle "|"mix "|"alloc "|"idle mix "|"alloc idle "|"alloc mix "|"alloc idle mix ")
            echo "slurm cluster up: $NODES node(s) ($NODE_LIST, $CPUS CPUs each) ${states% }"; exit 0 ;;
        *down*|*drain*) [ $((i % 5)) = 0 ] && scontrol update NodeName="$NODE_LIST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
fail "nodes $NODE_LIST are not idle after 30 s (sinfo: ${states:-no answer}); see /var/log/slurm/"
