#!/usr/bin/env bash
# Pods through the control plane on one machine (`podvisor up`), against the
# baseline of the same pod VM started directly (`podvisor run`):
#   - run:      `podvisor run IMAGE -- true`, start to exit (baseline)
#   - apply:    `podvisor apply` of one pod until the server reports it Running
#   - six:      six pods applied at once until all are Running
#   - adoption: `podvisor up` killed with SIGKILL and started again, until
#               `podvisor exec` into a pod works again (its VM adopted)
# Usage: scripts/bench/up.sh [ROUNDS]   (needs a built podvisor and agent)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
target=${CARGO_TARGET_DIR:-target}
bin=${PODVISOR_BIN:-$target/release/podvisor}
[ -x "$bin" ] || { echo "build podvisor first (cargo build --release)" >&2; exit 1; }
export PODVISOR_AGENT=${PODVISOR_AGENT:-$target/x86_64-unknown-linux-gnu/release/podvisor-agent}

work=$(mktemp -d /tmp/podvisor-bench-up.XXXXXX)
export PODVISOR_CACHE_DIR=$work/cache PODVISOR_CONFIG=$work/config.toml
touch "$PODVISOR_CONFIG"
up_pid=
cleanup() {
    [ -n "$up_pid" ] && kill "$up_pid" 2>/dev/null || true
    # VMs outlive `up` by design: stop this run's (their command lines
    # name this run's directory).
    local pids
    pids=$(pgrep -f "$work/state/host/run" || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

image=$work/busybox.tar
cargo build --release --locked -q --bin busybox-image -p podvisor-testbed
"$target/release/busybox-image" "$image" busybox:latest >/dev/null
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

start_up() {
    setsid "$bin" up --state-dir "$work/state" --listen "127.0.0.1:$port" --name bench \
        --cpu 8 --memory 4Gi </dev/null >>"$work/up.log" 2>&1 &
    up_pid=$!
    until "$bin" get hosts 2>/dev/null | grep -q ' Ready '; do sleep 0.1; done
}

pod() {
    cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  containers:
  - name: main
    image: $image
    command: [sleep, '3600']
    resources: {limits: {cpu: 500m, memory: 128Mi}}
EOF
}

# The pod's own timestamps: created (server) -> VM up (host) -> container
# started (host).
stages() {
    "$bin" get pods "$1" -o json | python3 -c '
import json, sys
from datetime import datetime
p = json.load(sys.stdin)
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
created = t(p["metadata"]["creationTimestamp"])
vm = t(p["status"]["startTime"])
run = t(p["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])
print(f"created->VM up {(vm - created).total_seconds():.3f} s, VM up->container started {(run - vm).total_seconds():.3f} s")'
}

# Seconds until pods $@ are all Running (polled every 50 ms).
wait_running() {
    local t0=$1; shift
    local pattern
    pattern="^($(IFS='|'; echo "$*")) +1/1 +Running "
    until [ "$("$bin" get pods 2>/dev/null | grep -cE "$pattern")" = "$#" ]; do sleep 0.05; done
    since "$t0"
}

# Warm the guest artifacts and layer disks; podvisor says if it emulates.
accel=$("$bin" run "$image" -- true 2>&1 >/dev/null | grep -o 'TCG software emulation' || echo "KVM")
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB, $accel"
for i in $(seq "$rounds"); do
    t0=$(now); "$bin" run "$image" -- true >/dev/null 2>&1; echo "run      round $i: $(since "$t0") s"
done

start_up
for i in $(seq "$rounds"); do
    t0=$(now)
    pod one | "$bin" apply -f - >/dev/null
    echo "apply    round $i: $(wait_running "$t0" one) s until get pods says Running; $(stages one)"
    "$bin" delete pod one --wait >/dev/null
done

t0=$(now)
for i in 1 2 3 4 5 6; do pod "p$i"; echo ---; done | "$bin" apply -f - >/dev/null
echo "six pods at once: $(wait_running "$t0" p1 p2 p3 p4 p5 p6) s"

qemus() { pgrep -f "$work/state/host/run" | sort | tr '\n' ' '; }
before=$(qemus)
kill -9 "$up_pid"
wait "$up_pid" 2>/dev/null || true
t0=$(now)
start_up
until "$bin" exec p1 -- true >/dev/null 2>&1; do sleep 0.1; done
echo "adoption after kill -9: exec works again $(since "$t0") s after restarting up"
after=$(qemus)
echo "QEMU processes before: $(echo "$before" | wc -w), after: $(echo "$after" | wc -w), same pids: $([ "$before" = "$after" ] && echo yes || echo no)"
