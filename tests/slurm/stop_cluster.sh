#!/usr/bin/env bash
# Stop the one-node SLURM cluster tests/slurm/start_cluster.sh started (slurmd, slurmctld; munged
# is left running, other services may use it). Only daemons of that cluster are stopped.
set -euo pipefail
MARK="# written by bloom-pretrain tests/slurm/start_cluster.sh"
grep -qF "$MARK" /etc/slurm/slurm.conf 2>/dev/null || { echo "stop_cluster.sh: no test cluster here" >&2; exit 0; }
for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        kill "$(cat "$pidfile")"
    fi
done
echo "slurm test cluster stopped"
