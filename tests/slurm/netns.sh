# The network of a multi-node test cluster, sourced by start_cluster.sh and stop_cluster.sh: a
# bridge that exists only on this machine (bloombr0, 10.77.0.1 = the controller), and per node a
# network namespace named after the node with one veth end on the bridge (bloomnodek = 10.77.0.1k).
# Nothing routes off the bridge (no default route in the namespaces, no NAT), so the nodes reach
# each other and the controller, and nothing else.
BRIDGE=bloombr0
BRIDGE_ADDR=10.77.0.1
NODE_PREFIX=bloomnode

node_names() { seq -f "$NODE_PREFIX%g" 1 "$1" | tr '\n' ' '; }

node_addr() { echo "10.77.0.1${1#"$NODE_PREFIX"}"; }  # bloomnode2 -> 10.77.0.12

# Every node resolves every node's name, and its own, to its bridge address (gloo and torchrun
# look up their own hostname to pick the address they listen on): start_node_slurmd bind-mounts
# /etc/netns/<node>/hosts over /etc/hosts in the node's own mount namespace, so this machine's
# /etc/hosts is untouched.
hosts_file() {
    echo "127.0.0.1 localhost"
    echo "$BRIDGE_ADDR $(hostname -s)"
    for name; do echo "$(node_addr "$name") $name"; done
}

ns_exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

make_node_ns() {
    local name=$1 veth=v$1
    ns_exists "$name" || ip netns add "$name"
    ip link show "$veth" >/dev/null 2>&1 || ip link add "$veth" type veth peer name eth0 netns "$name"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$name" link set lo up
    ip -n "$name" link set eth0 up
    ip -n "$name" -4 addr show dev eth0 | grep -q "inet $(node_addr "$name")/" \
        || ip -n "$name" addr add "$(node_addr "$name")/24" dev eth0
}

make_network() {  # $1: the node names
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip -4 addr show dev "$BRIDGE" | grep -q "inet $BRIDGE_ADDR/" || ip addr add "$BRIDGE_ADDR/24" dev "$BRIDGE"
    # Bridged packets skip the host's firewall: FORWARD rules (Docker sets DROP) would filter the
    # traffic between nodes. (Best effort: older kernels have no per-bridge switch.)
    ip link set "$BRIDGE" type bridge nf_call_iptables 0 nf_call_ip6tables 0 nf_call_arptables 0 2>/dev/null || true
    ip link set "$BRIDGE" up
    for name in $1; do
        make_node_ns "$name" || return 1
        mkdir -p "/etc/netns/$name"
        # shellcheck disable=SC2086
        hosts_file $1 > "/etc/netns/$name/hosts"
    done
}

# slurmd -N: this slurmd is that node whatever the host is called; the UTS namespace gives the
# node's processes its hostname too, so logs and torchrun see the node, not this machine. (Not
# `ip netns exec`: it remounts /sys without the cgroup mounts slurmd 22.05 insists on.)
start_node_slurmd() {
    nsenter --net="/run/netns/$1" unshare --mount --uts sh -c \
        'mount --bind "/etc/netns/$1/hosts" /etc/hosts && hostname "$1" && exec slurmd -N "$1"' sh "$1"
    for _ in $(seq 50); do
        [ -s "/run/slurmd-$1.pid" ] && kill -0 "$(cat "/run/slurmd-$1.pid")" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# Stops every slurmd (one per node) and slurmctld of the test cluster, and waits until they have
# exited: a cluster started right after must find their ports free.
stop_daemons() {
    local pidfile pid stopped=()
    for pidfile in /run/slurmd.pid /run/slurmd-"$NODE_PREFIX"*.pid /run/slurmctld.pid; do
        if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            pid=$(cat "$pidfile")
            kill "$pid" && stopped+=("$pid")
        fi
    done
    for _ in $(seq 100); do
        for pid in "${stopped[@]}"; do kill -0 "$pid" 2>/dev/null && { sleep 0.1; continue 2; }; done
        return 0
    done
}

# Ends what still runs in the node namespaces not named in $1 (job steps, slurmstepd), then
# removes those namespaces; and the bridge too when $1 names none.
remove_network() {
    local keep=" ${1:-} " names="" name
    for name in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NODE_PREFIX[0-9]*$" || true); do
        [[ "$keep" == *" $name "* ]] || names="$names $name"
    done
    for signal in TERM KILL; do
        for name in $names; do
            ip netns pids "$name" 2>/dev/null | xargs -r kill -s "$signal" 2>/dev/null || true
        done
        [ "$signal" = TERM ] && [ -n "$names" ] && sleep 1
    done
    for name in $names; do
        ip netns del "$name"
        rm -rf "/etc/netns/$name"
    done
    [ -n "${1:-}" ] || ! ip link show "$BRIDGE" >/dev/null 2>&1 || ip link del "$BRIDGE"
}
