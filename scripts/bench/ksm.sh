#!/usr/bin/env bash
# KSM on a host (issue 12): two identical idle pod VMs (busybox, 256 MiB,
# same image) under `podvisor up`, without `--ksm`, with it at podvisor's
# scan rate and with it at the kernel's (100 pages / 20 ms). WAIT seconds
# after both pods run: the PSS of the two QEMU processes, KSM's counters
# (the machine's: other mergeable processes count too, so the script says
# how many other QEMUs ran) and ksmd's CPU time over the wait.
# Usage: scripts/bench/ksm.sh [WAIT]   (default 60; as root, needs a built
# podvisor and agent; changes /sys/kernel/mm/ksm only through the daemon,
# which puts it back)
set -euo pipefail
cd "$(dirname "$0")/../.."
wait_s=${1:-60}
target=${CARGO_TARGET_DIR:-target}
bin=${PODVISOR_BIN:-$target/release/podvisor}
[ -x "$bin" ] || { echo "build podvisor first (cargo build --release)" >&2; exit 1; }
export PODVISOR_AGENT=${PODVISOR_AGENT:-$target/x86_64-unknown-linux-gnu/release/podvisor-agent}
busybox_image=${BUSYBOX_IMAGE_BIN:-$target/release/busybox-image}
[ -x "$busybox_image" ] || cargo build --release --locked -q --bin busybox-image -p podvisor-testbed

work=$(mktemp -d /tmp/podvisor-bench-ksm.XXXXXX)
export PODVISOR_CACHE_DIR=$work/cache PODVISOR_CONFIG=$work/config.toml
up_pid=
stop_up() {
    if [ -n "$up_pid" ]; then
        # SIGTERM: the daemon puts KSM's settings back.
        kill "$up_pid" 2>/dev/null || true
        wait "$up_pid" 2>/dev/null || true
        up_pid=
    fi
    # VMs outlive `up` by design: stop this run's.
    local pids
    pids=$(pgrep -f "^qemu-system.*$work/" || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    return 0
}
trap 'stop_up; rm -rf "$work"' EXIT

"$busybox_image" "$work/busybox.tar" busybox:latest >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ksmd=$(grep -lx ksmd /proc/[0-9]*/comm | head -1 | cut -d/ -f3)
tick=$(getconf CLK_TCK)
ksmd_ticks() { awk '{print $14 + $15}' "/proc/$ksmd/stat"; }
ksm() { cat "/sys/kernel/mm/ksm/$1"; }
mib() { echo "scale=1; $1 / 1024" | bc; }

# One round: `podvisor up` with FLAGS, two pods, WAIT seconds, a table row.
round() {
    local label=$1
    shift
    rm -rf "$work/state"
    printf '[server]\nurl = "http://127.0.0.1:%s"\ntoken_file = "%s"\n' \
        "$port" "$work/state/server/admin.token" >"$PODVISOR_CONFIG"
    setsid "$bin" up --state-dir "$work/state" --listen "127.0.0.1:$port" --name bench \
        --pod-network none --no-config "$@" </dev/null >>"$work/up.log" 2>&1 &
    up_pid=$!
    until "$bin" get hosts 2>/dev/null | grep -q ' Ready '; do sleep 0.2; done
    "$bin" image import "$work/busybox.tar" >/dev/null 2>&1
    for n in a b; do
        "$bin" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: idle-$n}
spec:
  containers:
  - {name: main, image: busybox, command: [sleep, '100000'],
     resources: {limits: {cpu: 500m, memory: 256Mi}}}
EOF
    done
    until [ "$("$bin" get pods | grep -c ' Running ')" = 2 ]; do sleep 0.5; done
    local c0 s0
    c0=$(ksmd_ticks)
    s0=$(ksm full_scans)
    sleep "$wait_s"
    local c1 pss=0 p
    c1=$(ksmd_ticks)
    for p in $(pgrep -f "^qemu-system.*$work/state/"); do
        pss=$((pss + $(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup")))
    done
    local others
    others=$(($(pgrep -fc '^qemu-system' || true) - 2))
    echo "| $label | $(mib $pss) MiB | $(ksm pages_sharing) | $(ksm pages_shared) |" \
        "$(mib $(($(ksm pages_sharing) * 4))) MiB | $(($(ksm full_scans) - s0)) |" \
        "$(echo "scale=2; ($c1 - $c0) / $tick" | bc) s | $others |"
    "$bin" delete pod idle-a --wait >/dev/null
    "$bin" delete pod idle-b --wait >/dev/null
    stop_up
}

echo "Two idle busybox pods of 256 MiB, ${wait_s} s after both run;" \
    "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| host | PSS of the 2 QEMUs | pages_sharing | pages_shared | saved | full scans in the wait | ksmd CPU in the wait | other QEMUs on the machine |"
echo "|---|---|---|---|---|---|---|---|"
round "without --ksm"
round "--ksm (1000 pages / 20 ms)" --ksm
round "--ksm --ksm-pages-to-scan 100" --ksm --ksm-pages-to-scan 100
echo
echo "KSM settings afterwards: run $(ksm run), pages_to_scan $(ksm pages_to_scan)," \
    "sleep_millisecs $(ksm sleep_millisecs)"
