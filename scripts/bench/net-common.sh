# shellcheck shell=bash
# Sourced by the network benchmarks: a scratch network namespace standing in
# for a host (podvisor runs inside it, so its bridge, veths, iptables rules
# and namespace pins never touch the machine's own namespace), a conflist
# whose host-local IPAM keeps its files in the work directory, a census of
# what pod networking leaves (the same categories as
# podvisor_net::census::HostNetworkCensus), and helpers to run a management
# server and host daemons inside that namespace (they talk over its
# loopback).
#
# Run from the repository root. Builds podvisor and the test image tool,
# makes a scratch $work (removed on exit) holding a busybox image
# ($work/busybox.tar). Defines: $target, $podvisor, $accel, $work, $hostns,
# in_host, census, net_keep, pv, server_start, host_start, host_kill, wait_hosts_ready,
# pod_json, wait_pod, delete_pod, net_note.
cargo build --release --locked -q --bin podvisor -p podvisor-cli
cargo build --release --locked -q --bin busybox-image -p podvisor-testbed
target=${CARGO_TARGET_DIR:-target}
podvisor=$PWD/$target/release/podvisor
export PODVISOR_AGENT=${PODVISOR_AGENT:-$PWD/$target/x86_64-unknown-linux-gnu/release/podvisor-agent}
accel=${PODVISOR_ACCEL:-$(grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ] && echo kvm || echo tcg)}
work=$(mktemp -d /tmp/podvisor-bench-net.XXXXXX)
hostns=pvnet$$
ip netns add "$hostns"
ip -n "$hostns" link set lo up
in_host() { ip netns exec "$hostns" "$@"; }
net_cleanup() {
    # Every process in the scratch namespace: server, host daemons, QEMU
    # (QEMU runs in its daemon's namespace), CNI plugins.
    local pids
    pids=$(ip netns pids "$hostns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086 # a list of pids
        kill -9 $pids 2>/dev/null || true
        { wait; } 2>/dev/null || true # our daemons, without "Killed" lines
        sleep 0.2
    fi
    grep -o " ${work}[^ ]*" /proc/self/mountinfo 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    ip netns del "$hostns" 2>/dev/null || true
}
mkdir -p "$work/cni" "$work/ipam"
cat >"$work/cni/10-bench.conflist" <<JSON
{"cniVersion":"1.0.0","name":"bench","plugins":[
 {"type":"bridge","bridge":"podvisor0","isGateway":true,"ipMasq":true,"hairpinMode":true,
  "ipam":{"type":"host-local","ranges":[[{"subnet":"10.253.0.0/24"}]],"routes":[{"dst":"0.0.0.0/0"}],
          "dataDir":"$work/ipam"}},
 {"type":"firewall","backend":"iptables"},
 {"type":"portmap","capabilities":{"portMappings":true}},
 {"type":"tuning"}]}
JSON
# census FILE: namespace pins (a host daemon's STATE/netns/*, a run's
# RUN/run-net/*/netns), links, iptables rules and chains (nat, filter),
# IPAM allocations (files named by an address).
census() {
    {
        echo "netns pins: $(find "$work" -path "$work/cache" -prune -o -path '*/netns/*' -print 2>/dev/null | wc -l)"
        in_host ip -o link show | awk -F': ' '{print "link " $2}' | sed 's/@.*//' | sort
        for t in nat filter; do
            in_host iptables-save -t "$t" | grep -E '^(-A|:)' | sed 's/\[[0-9:]*\]//' | sort
        done
        find "$work/ipam" -type f -name '[0-9]*.*' | sed 's/^/ipam /' | sort
    } >"$1"
}
# NET_KEEP=DIR: the logs and census files are copied there on exit.
net_keep() {
    if [ -n "${NET_KEEP:-}" ]; then
        mkdir -p "$NET_KEEP"
        cp "$work"/*.log "$work"/*.txt "$NET_KEEP"/ 2>/dev/null || true
    fi
}
trap 'net_keep; net_cleanup; rm -rf "$work"' EXIT
"$target/release/busybox-image" "$work/busybox.tar" >/dev/null

# --- A management server and host daemons inside $hostns -----------------
# The CLI, the server and the daemons share this environment: an empty
# config file, one cache, the server on $hostns's loopback.
export PODVISOR_CONFIG=$work/config.toml PODVISOR_CACHE_DIR=$work/cache
export PODVISOR_SERVER=http://127.0.0.1:7443
touch "$PODVISOR_CONFIG"
now() { date +%s.%N; }
# pv ARGS: the podvisor CLI inside $hostns, bounded by a deadline.
pv() { timeout 150 ip netns exec "$hostns" "$podvisor" "$@"; }
server_start() {
    PODVISOR_TOKEN=$("$podvisor" server init --state-dir "$work/server")
    export PODVISOR_TOKEN
    nsenter --net="/run/netns/$hostns" "$podvisor" --log info server --listen 127.0.0.1:7443 --state-dir "$work/server" \
        </dev/null >>"$work/server.log" 2>&1 &
    echo $! >"$work/server.pid"
}
# host_start NAME [EXTRA ARGS]: a host daemon named NAME (state in
# $work/NAME, log $work/NAME.log, pid in $work/NAME.pid), 2 CPUs / 2 GiB
# for pods, 5 s grace. Started again with the same name it adopts its VMs.
host_start() {
    local name=$1
    shift
    [ -f "$work/$name.token" ] ||
        "$podvisor" server token create --host "$name" --state-dir "$work/server" >"$work/$name.token"
    mkdir -p "$work/$name"
    # Only the network namespace is entered (nsenter execs in place: $! is
    # the daemon). Not `ip netns exec`: it gives its command a mount
    # namespace of its own, and the daemon's pod namespace pins (bind
    # mounts) would die with a killed daemon.
    nsenter --net="/run/netns/$hostns" "$podvisor" --log "${HOST_LOG:-info}" host --server "$PODVISOR_SERVER" \
        --token "$(cat "$work/$name.token")" --name "$name" --state-dir "$work/$name" \
        --cni-conf-dir "$work/cni" --listen 127.0.0.1:0 --cpu 2 --memory 2Gi --grace 5 \
        --accel "$accel" "$@" </dev/null >>"$work/$name.log" 2>&1 &
    echo $! >"$work/$name.pid"
}
host_kill() { # NAME: SIGKILL the daemon (its VMs live on)
    local pid
    pid=$(cat "$work/$1.pid")
    kill -9 "$pid" 2>/dev/null || true
    { wait "$pid"; } 2>/dev/null || true
}
# wait_hosts_ready N: until N hosts are Ready (60 s at most).
wait_hosts_ready() {
    local deadline=$((SECONDS + 60))
    until [ "$(pv get hosts 2>/dev/null | grep -c ' Ready ')" -ge "$1" ]; do
        [ $SECONDS -lt $deadline ] || { echo "hosts not Ready after 60 s" >&2; tail -n 20 "$work"/*.log >&2; return 1; }
        sleep 0.2
    done
}
# pod_json NAME: the pod as JSON (empty when it does not exist).
pod_json() { pv get pod "$1" -o json 2>/dev/null || true; }
# wait_pod NAME PHASE [SECONDS] [POLL]: until the pod is in PHASE; prints
# the pod's JSON then.
wait_pod() {
    local deadline=$((SECONDS + ${3:-120})) json
    while :; do
        json=$(pod_json "$1")
        if [ -n "$json" ] && [ "$(jq -r .status.phase <<<"$json")" = "$2" ]; then
            echo "$json"
            return 0
        fi
        if [ $SECONDS -ge $deadline ]; then
            echo "pod $1 not $2 after ${3:-120} s: $(jq -c .status <<<"$json" 2>/dev/null)" >&2
            return 1
        fi
        sleep "${4:-0.05}"
    done
}
delete_pod() { pv delete pod "$1" --wait --timeout "${2:-120}" >/dev/null; }
# pod_yaml NAME NODE IMAGE CPU MEMORY COMMAND-JSON
pod_yaml() {
    cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  nodeName: $2
  containers:
  - name: main
    image: $3
    command: $6
    resources: {limits: {cpu: '$4', memory: $5}}
EOF
}
# A command that runs until SIGTERM and then ends at once (pid 1 in the
# container ignores signals it has no handler for).
# shellcheck disable=SC2034 # used by the scripts that source this one
sleeper='[sh, -c, "trap \"exit 0\" TERM; sleep 3600 & wait"]'
# net_note: the line each benchmark prints about where it ran.
net_note() {
    echo "date $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD), $(nproc) CPUs, accel $accel, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
}
