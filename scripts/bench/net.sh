#!/usr/bin/env bash
# Pod-to-pod TCP throughput and round-trip time, against two plain network
# namespaces joined by a veth pair on this machine, in one run:
#
#   scripts/bench/net.sh [SECONDS] [RUNS]   (default 10 s, 3 runs; as root,
#                                            after scripts/setup.sh --test)
#
# Pods: a management server and one host daemon (CNI bridge network, see
# net-common.sh) inside a scratch namespace; two pods on that host, each a
# VM with 1 vCPU and 256 MiB, from a busybox image that also carries the
# host's iperf3 and its shared libraries. `iperf3 -s` is one pod's command;
# the client runs in the other through `podvisor exec`.
# Baseline: two namespaces joined by one veth pair (10.252.0.1/2), no VM.
# Throughput: iperf3, one TCP stream for SECONDS, the receiver's Mb/s; the
# runs alternate baseline and pods so both see the same load. Round-trip
# time: busybox ping, 50 ICMP echoes 20 ms apart.
# Every address lives in namespaces this script makes; they and every
# process in them are removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
runs=${2:-3}
command -v iperf3 >/dev/null || { echo "net.sh: iperf3 missing: scripts/setup.sh --test" >&2; exit 1; }

. scripts/bench/net-common.sh

a=pvbench$$a
b=pvbench$$b
veth_cleanup() {
    local ns pids
    for ns in "$a" "$b"; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        # shellcheck disable=SC2086 # a list of pids
        if [ -n "$pids" ]; then kill -9 $pids 2>/dev/null || true; fi
        ip netns del "$ns" 2>/dev/null || true
    done
}
trap 'net_keep; veth_cleanup; net_cleanup; rm -rf "$work"' EXIT
ip netns add "$a"
ip netns add "$b"
ip -n "$a" link add veth0 type veth peer name veth0 netns "$b"
ip -n "$a" addr add 10.252.0.1/30 dev veth0
ip -n "$b" addr add 10.252.0.2/30 dev veth0
for ns in "$a" "$b"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set veth0 up
done

"$target/release/busybox-image" "$work/iperf.tar" iperf:latest --with /usr/bin/iperf3 >/dev/null
server_start
host_start h0
wait_hosts_ready 1
{
    pod_yaml server h0 "$work/iperf.tar" 1 256Mi '[/usr/bin/iperf3, -s]'
    echo ---
    pod_yaml client h0 "$work/iperf.tar" 1 256Mi "$sleeper"
} | pv apply -f - >/dev/null
wait_pod server Running 180 0.5 >/dev/null
wait_pod client Running 180 0.5 >/dev/null
ip=$(pod_json server | jq -r .status.podIP)
if [ -z "$ip" ] || [ "$ip" = null ]; then echo "net.sh: the server pod has no IP" >&2; exit 1; fi
echo "pods: server at $ip, client $(pod_json client | jq -r .status.podIP)"

mbps() { python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))'; }
veth_run() {
    ip netns exec "$b" iperf3 -s -1 -D -B 10.252.0.2 --logfile /dev/null
    sleep 0.3
    timeout $((secs + 30)) ip netns exec "$a" iperf3 -c 10.252.0.2 -t "$secs" -J | mbps
}
pod_run() { # retried once: the server pod's iperf3 may still be starting
    local out
    out=$(pv exec client -- /usr/bin/iperf3 -c "$ip" -t "$secs" -J 2>&1) ||
        { sleep 2; out=$(pv exec client -- /usr/bin/iperf3 -c "$ip" -t "$secs" -J); }
    mbps <<<"$out"
}

echo "iperf3 $(iperf3 --version | head -n1 | awk '{print $2}'), one TCP stream, $secs s per run; $(net_note)"
for r in $(seq "$runs"); do
    v=$(veth_run)
    l1=$(cut -d' ' -f1 /proc/loadavg)
    p=$(pod_run)
    l2=$(cut -d' ' -f1 /proc/loadavg)
    echo "run $r: veth $v Mb/s (load $l1), pod-to-pod $p Mb/s (load $l2)"
done
ip netns exec "$a" busybox ping -c 50 -i 0.02 -q 10.252.0.2 | tail -n 1 | sed 's/^/veth ping (busybox, 50 x): /'
pv exec client -- sh -c "ping -c 50 -i 0.02 -q $ip" | tail -n 1 | sed 's/^/pod ping (busybox, 50 x): /'
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
for p in server client; do delete_pod "$p"; done
