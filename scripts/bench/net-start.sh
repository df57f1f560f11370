#!/usr/bin/env bash
# Start-up time added by pod networking, through the control plane:
#
#   scripts/bench/net-start.sh [RUNS] [RUN_PAIRS]   (default 20 and 10; as
#                                                    root after scripts/setup.sh --test)
#
# A management server and two host daemons inside a scratch namespace
# (net-common.sh): `hcni` gives pods a CNI network (bridge + host-local +
# firewall + portmap + tuning on 10.253.0.0/24, a tap tc-redirected to the
# pod's veth, eth0 configured by the agent), `hnone` runs them with
# `--pod-network none` (only lo). RUNS rounds; each applies one busybox pod
# (1 vCPU, 256 MiB, cold boot) pinned to each host in turn (the order
# alternates between rounds), one pod at a time, and deletes it. Per pod:
#   - apply -> Running: the pod's creationTimestamp (server clock) to its
#     status.startTime (host daemon, same machine clock, both with
#     nanoseconds): the VM is up with its network configured, and podvisor
#     reports phase Running from then on;
#   - the same to its container's startedAt (the container started);
#   - wall: before `podvisor apply` until `get pod -o json` says phase
#     Running, and until it shows the container running (polled every
#     50 ms; includes the status report and the poll).
# Prints p50/p90 of each and the difference (and the p50/p90 of the
# difference within each round, the two pods of a round having run back to
# back), then where the time goes: stages from the daemons' logs, and
# RUN_PAIRS pairs of `podvisor run --timings --template none --network
# none|default IMAGE -- true` (the guest's own boot stages; no control
# plane) in the same namespace, alternating.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-20}
run_pairs=${2:-10}

. scripts/bench/net-common.sh

server_start
HOST_LOG=info,podvisor_net=debug,podvisor_podvm=debug host_start hcni --pod-network cni
HOST_LOG=info,podvisor_net=debug,podvisor_podvm=debug host_start hnone --pod-network none
wait_hosts_ready 2

# one NAME NODE: apply, wait until the pod is Running and its container has
# started, record, delete. Columns: created -> startTime, created ->
# container startedAt, wall to phase Running, wall to container running.
one() {
    local t0 json wall_phase wall_run deadline
    t0=$(now)
    pod_yaml "$1" "$2" "$work/busybox.tar" 1 256Mi "$sleeper" | pv apply -f - >/dev/null
    wait_pod "$1" Running 120 >/dev/null
    wall_phase=$(awk "BEGIN {print $(now) - $t0}")
    deadline=$((SECONDS + 60))
    until json=$(pod_json "$1") && jq -e '.status.containerStatuses[0].state.running' <<<"$json" >/dev/null; do
        [ $SECONDS -lt $deadline ] || { echo "pod $1: container not running after 60 s: $(jq -c .status <<<"$json")" >&2; return 1; }
        sleep 0.05
    done
    wall_run=$(awk "BEGIN {print $(now) - $t0}")
    python3 -c '
import json, sys
from datetime import datetime
p = json.load(sys.stdin)
t = lambda s: datetime.fromisoformat(s).timestamp()
c = t(p["metadata"]["creationTimestamp"])
vm = t(p["status"]["startTime"]) - c
run = t(p["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]) - c
ip = p["status"].get("podIP", "-")
print(f"{vm:.3f} {run:.3f} {sys.argv[1]} {sys.argv[2]} {ip}")' "$wall_phase" "$wall_run" <<<"$json" >>"$work/$2.txt"
    jq -c --arg node "$2" '{node: $node, name: .metadata.name, uid: .metadata.uid, created: .metadata.creationTimestamp, start: .status.startTime}' <<<"$json" >>"$work/pods.jsonl"
    delete_pod "$1"
}
one warm-cni hcni # warm up: image conversion, guest artifacts, first CNI use
one warm-none hnone
: >"$work/hcni.txt"
: >"$work/hnone.txt"
: >"$work/pods.jsonl"
for r in $(seq "$runs"); do
    if [ $((r % 2)) = 1 ]; then
        one "n$r" hcni; one "l$r" hnone
    else
        one "l$r" hnone; one "n$r" hcni
    fi
done
pct() { # FILE COLUMN PCT -> value (nearest rank)
    awk -v c="$2" '{print $c}' "$1" | sort -g | awk -v p="$3" '{v[NR]=$1} END {i=int((p*NR+99)/100); if (i<1) i=1; printf "%.3f", v[i]}'
}
diffms() { awk "BEGIN {printf \"%+.0f\", ($1 - $2) * 1000}"; }
row() { # LABEL COLUMN
    local n50 n90 c50 c90
    n50=$(pct "$work/hnone.txt" "$2" 50); n90=$(pct "$work/hnone.txt" "$2" 90)
    c50=$(pct "$work/hcni.txt" "$2" 50); c90=$(pct "$work/hcni.txt" "$2" 90)
    echo "| $1 | $n50 / $n90 s | $c50 / $c90 s | $(diffms "$c50" "$n50") / $(diffms "$c90" "$n90") ms |"
}
echo "runs: $runs each; $(net_note)"
echo "| what (p50 / p90) | --pod-network none | cni | added by the network |"
echo "|---|---|---|---|"
row "created -> startTime (VM up, phase Running)" 1
row "created -> container startedAt" 2
row "wall: apply -> get says phase Running" 3
row "wall: apply -> get says container running" 4
paste "$work/hcni.txt" "$work/hnone.txt" | awk '{print $1 - $6}' >"$work/paired.txt"
echo "| created -> startTime, cni minus none within a round | | | $(awk "BEGIN {printf \"%+.0f\", $(pct "$work/paired.txt" 1 50) * 1000}") / $(awk "BEGIN {printf \"%+.0f\", $(pct "$work/paired.txt" 1 90) * 1000}") ms |"
# Where the time goes, from the daemons' logs (podvisor_net and
# podvisor_podvm at debug): created -> agent ready (everything up to a
# booted guest), of which the CNI ADD, and agent ready -> VM up (the
# network configuration sent to the agent and acknowledged).
python3 - "$work" <<'PY'
import json, re, sys
from datetime import datetime
work = sys.argv[1]
t = lambda s: datetime.fromisoformat(s).timestamp()
ev = {}
for node in ("hcni", "hnone"):
    for line in open(f"{work}/{node}.log"):
        m = re.match(r"(\S+Z)\s+\w+\s+(\S+): (.*)", line)
        if not m:
            continue
        ts, msg = t(m.group(1)), m.group(3)
        if m2 := re.search(r"CNI ADD pod=(\S+) elapsed=([0-9.]+)(ms|µs|s)\b", msg):
            k = {"ms": 1e-3, "µs": 1e-6, "s": 1}[m2.group(3)]
            ev.setdefault(m2.group(1), {})["add"] = (ts, float(m2.group(2)) * k)
        elif m2 := re.search(r"agent ready pod=(\S+)", msg):
            ev.setdefault(m2.group(1), {})["ready"] = ts
        elif m2 := re.search(r"pod VM up pod=default/(\S+)", msg):
            ev.setdefault(m2.group(1), {})["up"] = ts
rows = {"hcni": [], "hnone": []}
for line in open(f"{work}/pods.jsonl"):
    p = json.loads(line)
    vmid = re.sub(r"[^0-9a-zA-Z]", "", p["uid"])[:16].lower()
    c = t(p["created"])
    ready = ev.get(vmid, {}).get("ready")
    up = ev.get(p["name"], {}).get("up")
    add = ev.get(p["uid"], {}).get("add")
    if ready is None or up is None:
        continue
    rows[p["node"]].append((ready - c, add[1] if add else None,
                            ready - c - (add[1] if add else 0), up - ready))
def p50(xs):
    xs = sorted(x for x in xs if x is not None)
    return f"{xs[(len(xs) + 1) // 2 - 1] * 1000:.0f} ms" if xs else "-"
print()
print("| stage, p50 over the pods (from the daemons' logs) | --pod-network none | cni |")
print("|---|---|---|")
names = ["created -> agent ready (watch, images, CNI ADD, tap, QEMU, guest boot)",
         "of which CNI ADD", "the same without the CNI ADD",
         "agent ready -> VM up (network configuration)"]
for i, n in enumerate(names):
    print(f"| {n} | {p50(r[i] for r in rows['hnone'])} | {p50(r[i] for r in rows['hcni'])} |")
PY
echo "pod IPs on hcni: $(awk '{print $5}' "$work/hcni.txt" | sort -u | tr '\n' ' ')"

# The guest's boot stages on the run path (no control plane), alternating.
for _ in $(seq "$run_pairs"); do
    for n in none default; do
        in_host "$podvisor" run --timings --accel "$accel" --run-dir "$work/run" --template none \
            --network "$n" --cni-conf-dir "$work/cni" "$work/busybox.tar" -- true 2>&1 >/dev/null |
            sed -nE 's/^(.*[^ ]) +([0-9.]+) s$/\1\t\2/p' >>"$work/run-$n.tsv"
    done
done
if [ "$run_pairs" -gt 0 ]; then
    echo
    echo "podvisor run --timings, $run_pairs each, p50 (load $(cut -d' ' -f1-3 /proc/loadavg)):"
    echo "| stage | --network none | --network default | difference |"
    echo "|---|---|---|---|"
    python3 - "$work" <<'PY'
import sys
from collections import defaultdict
work = sys.argv[1]
def load(n):
    d = defaultdict(list)
    for line in open(f"{work}/run-{n}.tsv"):
        k, v = line.rstrip("\n").split("\t")
        d[k].append(float(v))
    return d
def p50(xs):
    xs = sorted(xs)
    return xs[(len(xs) + 1) // 2 - 1]
a, b = load("none"), load("default")
for k in a:
    if k in b:
        print(f"| {k} | {p50(a[k]) * 1000:.0f} ms | {p50(b[k]) * 1000:.0f} ms | {(p50(b[k]) - p50(a[k])) * 1000:+.0f} ms |")
PY
fi
