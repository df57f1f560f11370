#!/usr/bin/env bash
# Encrypted volumes in a pod VM: runs the guest-side VM test
# (crates/podvm/tests/volumes.rs) RUNS times and prints its `volumes:`
# lines: the key conversation's times (RequestVolumeKeys -> VolumeKeyRequest,
# VolumeKeys -> VolumesOpened for a first open with format, a resume after
# SuspendVolumes and an open of an existing volume), sequential dd MB/s
# inside the guest on the encrypted (dm-crypt aes-xts-plain64, 4 KiB
# sectors) and the plain ext4 volume of the same VM, and the AES-XTS
# driver the guest picked.
#
#   scripts/bench/volumes.sh [RUNS]
#
# Builds the static agent first. Needs root (QEMU, /dev/kvm if any) and
# e2fsprogs.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-1}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --offline --release -q -p podvisor-agent --target x86_64-unknown-linux-gnu
export PODVISOR_AGENT=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/podvisor-agent
for i in $(seq "$runs"); do
    echo "== run $i"
    cargo nextest run --offline -p podvisor-podvm --test volumes --no-capture 2>&1 |
        grep '^volumes:'
done
