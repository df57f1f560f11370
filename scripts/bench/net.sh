#!/usr/bin/env bash
# Network benchmark baseline: TCP throughput and round-trip time between two
# plain network namespaces joined by a veth pair, on this machine.
#
#   scripts/bench/net.sh [SECONDS] [RUNS]   (default 10 s, 3 runs; as root,
#                                            after scripts/setup.sh --test)
#
# Throughput: iperf3 (Debian's), one TCP stream, client in one namespace,
# server in the other, SECONDS per run; the receiver's Mb/s is reported.
# Round-trip time: busybox ping, 50 ICMP echoes 20 ms apart, avg and max.
# Every address lives in the two namespaces this script makes (10.252.0.1/2
# on their veth ends); both are deleted on exit, also on failure.
# The pod-to-pod side of the comparison (two pod VMs on one host with the
# same tools inside: iperf3 and its shared libraries copied into the image)
# is still to be written: see docs/BENCHMARKS.md, "Pod networking".
set -euo pipefail
secs=${1:-10}
runs=${2:-3}
command -v iperf3 >/dev/null || { echo "net.sh: iperf3 missing: scripts/setup.sh --test" >&2; exit 1; }

a=pvbench$$a
b=pvbench$$b
cleanup() {
    ip netns pids "$a" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns pids "$b" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$a" 2>/dev/null || true
    ip netns del "$b" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$a"
ip netns add "$b"
ip -n "$a" link add veth0 type veth peer name veth0 netns "$b"
ip -n "$a" addr add 10.252.0.1/30 dev veth0
ip -n "$b" addr add 10.252.0.2/30 dev veth0
for ns in "$a" "$b"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set veth0 up
done

echo "veth baseline: $(nproc) CPUs, kernel $(uname -r), iperf3 $(iperf3 --version | head -n1 | awk '{print $2}')"
for r in $(seq "$runs"); do
    ip netns exec "$b" iperf3 -s -1 -D -B 10.252.0.2 --logfile /dev/null
    sleep 0.3
    mbps=$(ip netns exec "$a" iperf3 -c 10.252.0.2 -t "$secs" -J |
        python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))')
    echo "run $r: TCP ${mbps} Mb/s"
done
ip netns exec "$a" busybox ping -c 50 -i 0.02 -q 10.252.0.2 | tail -n 1 | sed 's/^/ping (busybox, 50 x): /'
