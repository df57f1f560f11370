#!/usr/bin/env bash
# Unlocking an encrypted volume against mounting a plain one, through the
# control plane:
#
#   scripts/bench/volume-unlock.sh [RUNS]   (default 5; as root after
#                                            scripts/setup.sh --test)
#
# A management server and one host daemon (no pod network) inside a
# scratch namespace (net-common.sh). Two 64 MiB volumes, one plain and one
# encrypted, each formatted first by a warm-up pod (its first use). Then
# RUNS rounds, alternating: a pod (busybox, 1 vCPU, 192 MiB) mounting the
# plain volume, then one mounting the encrypted volume; each is applied,
# waited for Running and deleted. The figure is the daemon's own
# "container started" line: milliseconds from the pod VM's agent being
# ready to the container's Started, which for the encrypted volume holds
# the key release (an instance id from the server, the guest's key pair,
# the server's checks and sealing, the guest opening the dm-crypt
# mapping) before the container may start. Prints each run and the p50
# of both and their difference (the issue's goal: at most 150 ms).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-5}

. scripts/bench/net-common.sh

server_start
host_start h1 --pod-network none
wait_hosts_ready 1
pv image import "$work/busybox.tar" >/dev/null
pv volume create plain --size 64Mi >/dev/null
pv volume create secret --size 64Mi --encrypted >/dev/null

pod() { # NAME CLAIM
    cat <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  volumes:
  - name: v
    persistentVolumeClaim: {claimName: $2}
  containers:
  - name: main
    image: busybox
    command: [sh, -c, "trap 'exit 0' TERM; sleep 3600 & wait"]
    resources: {limits: {cpu: '1', memory: 192Mi}}
    volumeMounts:
    - {name: v, mountPath: /data}
YAML
}
# started_ms NAME: the daemon's figure for pod NAME's container.
started_ms() {
    local deadline=$((SECONDS + 120)) ms
    while :; do
        ms=$(grep "container started" "$work/h1.log" | grep "pod=default/$1 " |
            sed -n 's/.*after_vm_ready_ms=\([0-9.]*\).*/\1/p' | tail -1)
        [ -n "$ms" ] && { echo "$ms"; return 0; }
        [ $SECONDS -lt $deadline ] || { echo "no start of $1" >&2; return 1; }
        sleep 0.1
    done
}
one() { # NAME CLAIM -> ms
    pod "$1" "$2" | pv apply -f - >/dev/null
    wait_pod "$1" Running 180 >/dev/null
    started_ms "$1"
    delete_pod "$1"
}
echo "warm-up (formats both volumes): plain $(one warm-plain plain) ms, encrypted $(one warm-secret secret) ms"
plain=()
enc=()
for i in $(seq "$runs"); do
    p=$(one "plain-$i" plain)
    e=$(one "secret-$i" secret)
    plain+=("$p")
    enc+=("$e")
    echo "run $i: VM ready -> container started: plain $p ms, encrypted $e ms"
done
p50() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
pp=$(p50 "${plain[@]}")
ep=$(p50 "${enc[@]}")
echo "p50 over $runs runs: plain $pp ms, encrypted $ep ms, unlock adds $(awk "BEGIN {printf \"%.0f\", $ep - $pp}") ms"
pv volume audit secret | tail -3
net_note
