#!/usr/bin/env bash
# The quick start: installs what podvisor needs (Debian 12, as root), builds
# and installs it, then runs a container in its own pod VM on the embedded
# defaults. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# An image to run, made from the host's busybox (no registry needed).
image=/var/lib/podvisor/examples/busybox.tar
if [ ! -f "$image" ]; then
    mkdir -p "$(dirname "$image")"
    cargo build --release --locked -q --bin busybox-image -p podvisor-testbed
    target/release/busybox-image "$image" busybox:latest
fi

echo "quickstart: podvisor run $image -- ..."
podvisor run "$image" -- sh -c 'echo "hello from a pod VM: $(uname -sr), $(nproc) CPU, hostname $(hostname)"'
