#!/usr/bin/env bash
# Hibernation against a cold start, through the control plane:
#
#   scripts/bench/hibernate.sh [RUNS] [N]   (default 5 and 10; as root after
#                                            scripts/setup.sh --test)
#
# A management server and one host daemon with CNI pod networking inside a
# scratch namespace (net-common.sh). The pod: busybox httpd serving a
# small page, 1 vCPU, 256 MiB. RUNS rounds, each:
#   - cold: `podvisor apply`, then GET http://POD_IP/ every 20 ms (curl,
#     1 s timeout each) until one answers: time to first byte of a cold
#     start, from before the apply (the pod IP is known once the pod is
#     Running; the polling starts at the apply and tries each address as
#     soon as it is reported);
#   - hibernate: `podvisor hibernate` wall time (the CLI through the server
#     to the daemon, the VM saved, sealed and synced, QEMU gone), the
#     daemon's own "saved in" figure, the sealed file's size and the VM
#     state's size against the pod's RAM;
#   - wake: one GET to the sleeping pod's IP, curl's time to first byte
#     (connect + request + the wake + the answer; one connection, no retry);
#   - delete.
# Then host memory: N pods running (PSS of their QEMU processes plus the
# daemon's) against the same N pods hibernated (the daemon's PSS; no QEMU
# is left), for N = 1 and N (default 10; 0 skips this), with the daemon's
# PSS before any pod as the baseline.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-5}
n=${2:-10}

. scripts/bench/net-common.sh

server_start
HOST_LOG=${HOST_LOG:-info} host_start h1 --pod-network cni
wait_hosts_ready 1
web='[sh, -c, "mkdir -p /www; echo hello from web > /www/index.html; exec httpd -f -p 80 -h /www"]'

pod_ip() { pod_json "$1" | jq -r '.status.podIP // empty'; }
# ttfb_cold NAME: apply, then poll until a GET answers; prints seconds.
ttfb_cold() {
    local t0 ip deadline
    t0=$(now)
    pod_yaml "$1" h1 "$work/busybox.tar" 1 256Mi "$web" | pv apply -f - >/dev/null
    deadline=$((SECONDS + 120))
    while :; do
        ip=$(pod_ip "$1")
        if [ -n "$ip" ] && in_host curl -sf -o /dev/null --max-time 1 "http://$ip/"; then
            awk "BEGIN {print $(now) - $t0}"
            return 0
        fi
        [ $SECONDS -lt $deadline ] || { echo "pod $1 never answered" >&2; return 1; }
        sleep 0.02
    done
}
pss_kb() { # PID -> PSS in KiB
    awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0
}
qemu_pids() { pgrep -f "$work/h1/run/pods" || true; }
qemu_pss_kb() {
    local total=0 pid
    for pid in $(qemu_pids); do total=$((total + $(pss_kb "$pid"))); done
    echo "$total"
}
daemon_pid=$(cat "$work/h1.pid")

ttfb_cold warm >/dev/null # image conversion, guest artifacts, first CNI use
delete_pod warm
: >"$work/rounds.txt"
for r in $(seq "$runs"); do
    cold=$(ttfb_cold "w$r")
    ip=$(pod_ip "w$r")
    t0=$(now)
    pv hibernate "w$r" >"$work/hibernate-$r.txt"
    hib=$(awk "BEGIN {print $(now) - $t0}")
    saved=$(grep -o 'saved in [0-9.]* s' "$work/hibernate-$r.txt" | awk '{print $3}')
    sealed=$(find "$work/h1/pods" -name '*.sealed' -printf '%s\n' | head -n1)
    state=$(grep -o '([0-9.]* MiB of VM state)' "$work/hibernate-$r.txt" | tr -d '(' | awk '{print $1}')
    [ -z "$(qemu_pids)" ] || { echo "QEMU still runs after hibernate" >&2; exit 1; }
    wake=$(in_host curl -sf -o "$work/body-$r.txt" -w '%{time_starttransfer}' --max-time 60 "http://$ip/")
    grep -q 'hello from web' "$work/body-$r.txt"
    echo "$cold $wake $hib $saved $sealed $state" >>"$work/rounds.txt"
    delete_pod "w$r"
done
pct() { # COLUMN PCT -> value (nearest rank)
    awk -v c="$1" '{print $c}' "$work/rounds.txt" | sort -g | awk -v p="$2" '{v[NR]=$1} END {i=int((p*NR+99)/100); if (i<1) i=1; printf "%.3f", v[i]}'
}
echo "runs: $runs; $(net_note)"
echo "| what (p50 / p90 over the runs) | value |"
echo "|---|---|"
echo "| cold start: apply -> first byte | $(pct 1 50) / $(pct 1 90) s |"
echo "| wake: one GET to the sleeping pod -> first byte | $(pct 2 50) / $(pct 2 90) s |"
echo "| wake / cold | $(awk "BEGIN {printf \"%.3f\", $(pct 2 50) / $(pct 1 50)}") (p50s) |"
echo "| podvisor hibernate (CLI wall) | $(pct 3 50) / $(pct 3 90) s |"
echo "| of which the daemon's save (\"saved in\") | $(pct 4 50) / $(pct 4 90) s |"
echo "| sealed snapshot, of 256 MiB RAM | $(awk "BEGIN {printf \"%.1f MiB (%.1f %%)\", $(pct 5 50) / 1048576, $(pct 5 50) / 2684354.56}") |"
echo "| VM state before compression | $(pct 6 50) MiB |"

# Host memory, N running against N hibernated (N=0: not measured).
[ "$n" -gt 0 ] || exit 0
sleep 2
base=$(pss_kb "$daemon_pid")
mem_row() { # COUNT
    local k=$1 i running_q running_d slept_d
    for i in $(seq "$k"); do
        pod_yaml "m$k-$i" h1 "$work/busybox.tar" 1 256Mi "$web" | pv apply -f - >/dev/null
    done
    for i in $(seq "$k"); do wait_pod "m$k-$i" Running 300 >/dev/null; done
    sleep 5
    running_q=$(qemu_pss_kb)
    running_d=$(pss_kb "$daemon_pid")
    for i in $(seq "$k"); do pv hibernate "m$k-$i" >/dev/null; done
    sleep 2
    [ -z "$(qemu_pids)" ] || {
        echo "QEMU still runs after hibernating all:" >&2
        pv get pods >&2
        grep -E 'woken|WARN' "$work/h1.log" | tail -n 20 >&2
        exit 1
    }
    slept_d=$(pss_kb "$daemon_pid")
    awk -v k="$k" -v q="$running_q" -v d="$running_d" -v s="$slept_d" -v b="$base" 'BEGIN {
        printf "| %d | %.1f MiB (QEMU %.1f + daemon %.1f) | %.1f MiB | %.2f MiB |\n",
            k, (q + d) / 1024, q / 1024, d / 1024, s / 1024, (s - b) / 1024 / k }'
    for i in $(seq "$k"); do delete_pod "m$k-$i"; done
}
echo
echo "daemon PSS before any pod: $(awk "BEGIN {printf \"%.1f\", $base / 1024}") MiB"
echo "| N pods | running: host PSS | hibernated: host PSS (daemon only) | per hibernated pod, over the baseline |"
echo "|---|---|---|---|"
mem_row 1
mem_row "$n"
