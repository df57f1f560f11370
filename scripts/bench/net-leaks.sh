#!/usr/bin/env bash
# Leaks of pod networking after create/delete cycles with random kill -9 of
# QEMU and of the host daemon, through the control plane:
#
#   scripts/bench/net-leaks.sh [CYCLES] [SEED]   (default 100; as root after
#                                                 scripts/setup.sh --test)
#
# A management server and one host daemon `h0` (CNI bridge network) inside a
# scratch namespace (net-common.sh). Each cycle applies a busybox pod pinned
# to h0, waits a random 0.2-3.5 s (scheduling, CNI ADD, boot or running)
# and then, at random:
#   - deletes it (`podvisor delete pod --wait`);
#   - SIGKILLs its QEMU (the daemon starts a new VM in the same network),
#     waits a random 0-3 s, deletes it;
#   - SIGKILLs the host daemon, deletes the pod while the daemon is down or
#     after, and starts the daemon again (it adopts its VMs and reconciles
#     the networks of pods that are gone); waits until the pod is gone;
#   - deletes the pod and SIGKILLs the daemon 0-1.5 s later (while it stops
#     the VM or removes the network), starts it again, waits until the pod
#     is gone.
# Every wait has a deadline (a pod that does not go is reported as stuck).
# At the end every pod is deleted and a census (net-common.sh: namespace
# pins, links, iptables rules and chains, IPAM files, plus the daemon's
# network records and QEMU processes) is compared with one taken after a
# first clean pod, for up to 90 s (the daemon also reconciles every 60 s).
# Exit status 1 when they differ or a pod got stuck, with the difference.
set -euo pipefail
cd "$(dirname "$0")/../.."
cycles=${1:-100}
seed=${2:-$$}
RANDOM=$seed

. scripts/bench/net-common.sh

server_start
host_start h0
wait_hosts_ready 1

full_census() {
    census "$1"
    {
        echo "network records: $(find "$work/h0/net" -name '*.json' 2>/dev/null | wc -l)"
        echo "qemu processes: $(pgrep -fc "qemu.*$work/h0/run/pods/" || true)"
    } >>"$1"
}
vm_of() { # NAME -> pid of the pod's QEMU, if any
    local uid vmid
    uid=$(pod_json "$1" | jq -r '.metadata.uid // empty')
    [ -n "$uid" ] || return 0
    vmid=$(tr -cd '[:alnum:]' <<<"$uid" | cut -c1-16 | tr '[:upper:]' '[:lower:]')
    pgrep -f "qemu.*$work/h0/run/pods/$vmid/" | head -n1 || true
}
rnd() { # LOW SPAN -> LOW + a random fraction of SPAN seconds
    awk -v r="$RANDOM" -v lo="$1" -v span="$2" 'BEGIN {printf "%.2f", lo + span * r / 32767}'
}
stuck=0
gone_or_stuck() { # NAME: wait until the pod is gone (120 s)
    if ! delete_pod "$1" 120 2>>"$work/delete.err" && [ -n "$(pod_json "$1")" ]; then
        stuck=$((stuck + 1))
        echo "cycle $c: pod $1 still there after 120 s: $(pod_json "$1" | jq -c '{deletionTimestamp: .metadata.deletionTimestamp, status: .status}')" >&2
        tail -n 15 "$work/h0.log" >&2
    fi
}

pod_yaml first h0 "$work/busybox.tar" 1 256Mi "$sleeper" | pv apply -f - >/dev/null
wait_pod first Running 180 0.2 >/dev/null
delete_pod first
full_census "$work/before.txt"
t_start=$SECONDS
deleted=0 qemu_killed=0 daemon_killed=0 daemon_killed_deleting=0 qemu_absent=0
for c in $(seq "$cycles"); do
    name=c$c
    pod_yaml "$name" h0 "$work/busybox.tar" 1 256Mi "$sleeper" | pv apply -f - >/dev/null
    action=$((RANDOM % 4))
    sleep "$(rnd 0.2 3.3)"
    case $action in
        0) deleted=$((deleted + 1))
           gone_or_stuck "$name" ;;
        1) q=$(vm_of "$name")
           if [ -n "$q" ]; then
               kill -9 "$q"
               qemu_killed=$((qemu_killed + 1))
               sleep "$(rnd 0 3)"
           else
               qemu_absent=$((qemu_absent + 1))
           fi
           gone_or_stuck "$name" ;;
        2) host_kill h0
           daemon_killed=$((daemon_killed + 1))
           if [ $((RANDOM % 2)) = 0 ]; then
               pv delete pod "$name" >/dev/null # while the daemon is down
               host_start h0
           else
               host_start h0
               sleep "$(rnd 0 1)"
           fi
           gone_or_stuck "$name" ;;
        3) pv delete pod "$name" >/dev/null # the daemon dies while it tears the pod down
           sleep "$(rnd 0 1.5)"
           host_kill h0
           daemon_killed_deleting=$((daemon_killed_deleting + 1))
           host_start h0
           gone_or_stuck "$name" ;;
    esac
    if [ $((c % 10)) = 0 ]; then
        echo "cycle $c ($((SECONDS - t_start)) s): deleted $deleted, QEMU killed $qemu_killed (no QEMU yet: $qemu_absent), daemon killed $daemon_killed (+$daemon_killed_deleting while deleting), stuck $stuck; load $(cut -d' ' -f1 /proc/loadavg)"
    fi
done
# Whatever is left (stuck pods) is deleted once more.
for name in $(pv get pods -o json | jq -r '.items[].metadata.name'); do gone_or_stuck "$name"; done
t_end=$SECONDS
deadline=$((SECONDS + 90))
while :; do
    full_census "$work/after.txt"
    if cmp -s "$work/before.txt" "$work/after.txt" || [ $SECONDS -ge $deadline ]; then break; fi
    sleep 2
done
echo "cycles: $cycles in $((t_end - t_start)) s (seed $seed): deleted $deleted, QEMU killed $qemu_killed (+$qemu_absent with no QEMU yet, then deleted), daemon killed $daemon_killed (+$daemon_killed_deleting while deleting); stuck $stuck; $(net_note)"
echo "daemon log: $(grep -c 'removed the network of a pod that is gone' "$work/h0.log" || true) networks removed by reconcile, $(grep -c 'pod network removed' "$work/h0.log" || true) on delete, $(grep -ciE ' (WARN|ERROR) ' "$work/h0.log" || true) warnings/errors"
if diff -u "$work/before.txt" "$work/after.txt"; then
    echo "census before/after: equal ($(wc -l <"$work/before.txt") lines), $((SECONDS - t_end)) s after the last delete"
else
    echo "census before/after: DIFFERENT after 90 s" >&2
    grep -iE ' (WARN|ERROR) ' "$work/h0.log" | tail -n 20 >&2 || true
    exit 1
fi
[ "$stuck" = 0 ] || exit 1
