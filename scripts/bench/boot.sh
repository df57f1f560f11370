#!/usr/bin/env bash
# Benchmark of `podvisor run` against a bare QEMU boot of the same kernel.
#
#   scripts/bench/boot.sh [RUNS]        (default 10; run as root after scripts/setup.sh)
#
# Baseline: qemu-system-x86_64 with the same machine, CPU, memory, accelerator
# and kernel command line as a pod VM, booting an initramfs whose /init is
# busybox powering the VM off at once; timed from process start to exit.
# Measured: `podvisor run --template none IMAGE -- echo hello` (busybox image,
# warm cache; a cold boot, not a fork from a template: see the template-bench example)
# from process start to exit, and its per-stage times (`--timings`).
# Runs alternate between the two so both see the same machine load. A second
# baseline, under TCG only: the same bare boot with transparent huge pages
# disabled for QEMU, as podvisor runs its TCG VMs.
# Prints a markdown table of medians (and min-max).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-10}

cargo build --release --locked -q --bin podvisor -p podvisor-cli
cargo build --release --locked -q --bin busybox-image -p podvisor-testbed
target=${CARGO_TARGET_DIR:-target}
podvisor=$target/release/podvisor
export PODVISOR_AGENT=${PODVISOR_AGENT:-$target/x86_64-unknown-linux-gnu/release/podvisor-agent}
accel=${PODVISOR_ACCEL:-$(grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ] && echo kvm || echo tcg)}
cpu=$([ "$accel" = kvm ] && echo host || echo max)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$target/release/busybox-image" "$work/busybox.tar" >/dev/null

mkdir -p "$work/bare/bin"
cp /bin/busybox "$work/bare/bin/busybox"
printf '#!/bin/busybox sh\n/bin/busybox poweroff -f\n' >"$work/bare/init"
chmod +x "$work/bare/init"
(cd "$work/bare" && find . | cpio -o -H newc --quiet) >"$work/bare.cpio"
kernel=$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -n 1)
# Keep in step with KERNEL_CMDLINE in crates/podvm/src/pod_vm.rs.
cmdline="console=ttyS0 quiet panic=-1 reboot=t acpi=noirq i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd cryptomgr.notests"

bare() {
    "$@" qemu-system-x86_64 -nodefaults -no-user-config -no-reboot -display none \
        -machine pc -accel "$accel" -cpu "$cpu" -smp 1 -m 256M \
        -kernel "$kernel" -initrd "$work/bare.cpio" -append "$cmdline" \
        -serial "file:$work/bare-console.log"
}
pod() {
    "$podvisor" run --accel "$accel" --cache-dir "$work/cache" --run-dir "$work/run" \
        --template none --timings "$work/busybox.tar" -- echo hello >/dev/null 2>>"$work/timings.txt"
}
now() { date +%s.%N; }
# Runs its arguments with transparent huge pages disabled (inherited by exec).
no_thp() {
    python3 -c 'import ctypes, os, sys
assert ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE
os.execvp(sys.argv[1], sys.argv[1:])' "$@"
}

# Warm up: the first pod run converts the image and builds the initramfs.
bare; : >"$work/timings.txt"; pod; : >"$work/timings.txt"
for _ in $(seq "$runs"); do
    t=$(now); bare; awk "BEGIN {print $(now) - $t}" >>"$work/bare.txt"
    t=$(now); pod; awk "BEGIN {print $(now) - $t}" >>"$work/pod.txt"
    if [ "$accel" = tcg ]; then
        t=$(now); bare no_thp; awk "BEGIN {print $(now) - $t}" >>"$work/bare-no-thp.txt"
    fi
done

stat() { # file -> "median (min-max)"
    sort -g "$1" | awk '{v[NR]=$1} END {m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2;
        printf "%.3f s (%.3f-%.3f)", m, v[1], v[NR]}'
}
stage() { # name -> median of that --timings row
    grep -F "$1" "$work/timings.txt" | grep -v '^total' | awk '{print $(NF-1)}' >"$work/stage.txt" || true
    stat "$work/stage.txt"
}
bare_med=$(sort -g "$work/bare.txt" | awk '{v[NR]=$1} END {print (NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2}')
pod_med=$(sort -g "$work/pod.txt" | awk '{v[NR]=$1} END {print (NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2}')

echo "accel: $accel, runs: $runs, kernel: $(basename "$kernel"), $(nproc) CPUs"
echo
echo "| what | median (min-max) |"
echo "|---|---|"
echo "| bare QEMU boot to power-off (baseline) | $(stat "$work/bare.txt") |"
if [ "$accel" = tcg ]; then
    echo "| bare QEMU boot, transparent huge pages off (second baseline) | $(stat "$work/bare-no-thp.txt") |"
fi
echo "| \`podvisor run\` total, process start to exit | $(stat "$work/pod.txt") |"
for s in "prepare (image, guest artifacts)" "QEMU start -> kernel" "kernel -> agent started" \
         "agent: load modules" "agent: modules -> ready" \
         "agent ready -> container started" "container run" "exit -> VM gone"; do
    echo "| stage: $s | $(stage "$s") |"
done
echo "| podvisor / bare (medians) | $(awk "BEGIN {printf \"%.3f\", $pod_med / $bare_med}") |"
if [ "$accel" = tcg ]; then
    nothp_med=$(sort -g "$work/bare-no-thp.txt" | awk '{v[NR]=$1} END {print (NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2}')
    echo "| podvisor / bare without huge pages (medians) | $(awk "BEGIN {printf \"%.3f\", $pod_med / $nothp_med}") |"
fi
