#!/usr/bin/env bash
# Start-up time added by pod networking, on the `podvisor run` path:
#
#   scripts/bench/net-start.sh [RUNS]   (default 20; as root after scripts/setup.sh)
#
# `podvisor run --template none --network none IMAGE -- true` (only lo)
# against the same with `--network default` (CNI bridge + host-local +
# firewall + portmap + tuning, a tap tc-redirected to the pod's veth, eth0
# configured by the agent), timed from process start to exit, runs
# alternating so both see the same load. Prints p50/p90 of each and the
# difference. podvisor runs inside a scratch network namespace (see
# net-common.sh) with a conflist on 10.253.0.0/24 whose IPAM files stay in
# the work directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-20}

. scripts/bench/net-common.sh

pod() { # none|default
    in_host "$podvisor" run --accel "$accel" --cache-dir "$work/cache" --run-dir "$work/run" \
        --template none --network "$1" --cni-conf-dir "$work/cni" \
        "$work/busybox.tar" -- true >/dev/null
}
now() { date +%s.%N; }
pod none; pod default # warm up: image conversion, initramfs, first CNI use
for _ in $(seq "$runs"); do
    t=$(now); pod none; awk "BEGIN {print $(now) - $t}" >>"$work/none.txt"
    t=$(now); pod default; awk "BEGIN {print $(now) - $t}" >>"$work/default.txt"
done
pct() { # file pct -> value (nearest rank)
    sort -g "$1" | awk -v p="$2" '{v[NR]=$1} END {i=int((p*NR+99)/100); if (i<1) i=1; printf "%.3f", v[i]}'
}
echo "accel: $accel, runs: $runs each, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| what | p50 | p90 |"
echo "|---|---|---|"
echo "| run --network none | $(pct "$work/none.txt" 50) s | $(pct "$work/none.txt" 90) s |"
echo "| run --network default | $(pct "$work/default.txt" 50) s | $(pct "$work/default.txt" 90) s |"
echo "| added by the network | $(awk "BEGIN {printf \"%+.0f\", ($(pct "$work/default.txt" 50) - $(pct "$work/none.txt" 50))*1000}") ms | $(awk "BEGIN {printf \"%+.0f\", ($(pct "$work/default.txt" 90) - $(pct "$work/none.txt" 90))*1000}") ms |"
