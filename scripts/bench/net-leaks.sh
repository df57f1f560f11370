#!/usr/bin/env bash
# Leaks of pod networking after create/delete cycles with random kill -9:
#
#   scripts/bench/net-leaks.sh [CYCLES]   (default 100; as root after scripts/setup.sh)
#
# Each cycle starts `podvisor run --network default IMAGE -- sleep 2` and, at
# random, lets it end (delete), SIGKILLs its QEMU, or SIGKILLs the podvisor
# process that owns the pod's network (on the run path it plays the host
# daemon's part: the next run reconciles what a killed one left). At the end
# it waits until killed runs count as abandoned, runs one clean pod (which
# reconciles them) and compares a census (net-common.sh: namespace pins,
# links, iptables rules and chains, IPAM files) with one taken after a first
# clean pod. Exit status 1 when they differ, with the difference printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
cycles=${1:-100}

. scripts/bench/net-common.sh

run_pod() { # seconds the pod sleeps (in the foreground; see the loop for &)
    ip netns exec "$hostns" "$podvisor" run --accel "$accel" --cache-dir "$work/cache" --run-dir "$work/run" \
        --template none --network default --cni-conf-dir "$work/cni" \
        "$work/busybox.tar" -- sleep "$1" >>"$work/runs.log" 2>&1
}
descendants() { # pid -> its descendants' pids
    local c
    for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        echo "$c"
        descendants "$c"
    done
}
qemu_of() { # pid -> pid of the QEMU below it, if any
    local p
    for p in $(descendants "$1"); do
        [ "$(cat /proc/"$p"/comm 2>/dev/null)" = qemu-system-x86 ] && echo "$p" && return
    done
    true
}

run_pod 0
census "$work/before.txt"
ended=0 qemu_killed=0 podvisor_killed=0
for c in $(seq "$cycles"); do
    ip netns exec "$hostns" "$podvisor" run --accel "$accel" --cache-dir "$work/cache" \
        --run-dir "$work/run" --template none --network default --cni-conf-dir "$work/cni" \
        "$work/busybox.tar" -- sleep 2 >>"$work/runs.log" 2>&1 &
    pid=$! # `ip netns exec` execs podvisor in place: this is podvisor
    action=$((RANDOM % 3))
    sleep "$(awk "BEGIN {srand($RANDOM); printf \"%.2f\", 0.5 + rand() * 3}")"
    case $action in
        0) wait "$pid" || true; ended=$((ended + 1)) ;;
        1) q=$(qemu_of "$pid")
           if [ -n "$q" ]; then kill -9 "$q"; qemu_killed=$((qemu_killed + 1)); else ended=$((ended + 1)); fi
           wait "$pid" || true ;;
        2) left=$(descendants "$pid")
           kill -9 "$pid" 2>/dev/null && podvisor_killed=$((podvisor_killed + 1))
           wait "$pid" || true
           # What the killed process started (plugins, QEMU) dies with it
           # (PR_SET_PDEATHSIG); make sure before the next cycle.
           for p in $left; do kill -9 "$p" 2>/dev/null || true; done ;;
    esac
    if [ $((c % 10)) = 0 ]; then
        echo "cycle $c: ended $ended, QEMU killed $qemu_killed, podvisor killed $podvisor_killed"
    fi
done
sleep 11 # killed runs count as abandoned after 10 s
run_pod 0
census "$work/after.txt"
echo "cycles: $cycles (ended $ended, QEMU killed $qemu_killed, podvisor killed $podvisor_killed), accel $accel"
if diff -u "$work/before.txt" "$work/after.txt"; then
    echo "census before/after: equal ($(wc -l <"$work/before.txt") lines)"
else
    echo "census before/after: DIFFERENT" >&2
    exit 1
fi
