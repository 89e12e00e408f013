#!/usr/bin/env bash
# Stop the SLURM test cluster tests/slurm/start_cluster.sh started, whatever its --nodes: every
# slurmd, slurmctld, and for a multi-node cluster the node namespaces (with anything still running
# in them) and the bridge. munged is left running, other services may use it. Only daemons of
# that cluster are stopped.
set -euo pipefail
MARK="# written by bloom-pretrain tests/slurm/start_cluster.sh"
. "$(cd "$(dirname "$0")" && pwd)/netns.sh"
grep -qF "$MARK" /etc/slurm/slurm.conf 2>/dev/null || { echo "stop_cluster.sh: no test cluster here" >&2; exit 0; }
[ "$(id -u)" = 0 ] || { echo "stop_cluster.sh: error: run as root" >&2; exit 1; }

stop_daemons
remove_network
echo "slurm test cluster stopped"
