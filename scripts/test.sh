#!/usr/bin/env bash
# Installs what the tests need (Debian 12, as root), builds once, and runs the
# whole test suite: unit tests and integration tests that boot real QEMU VMs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --test

# CI builds once: incremental state would only double what the test build
# leaves on disk.
export CARGO_INCREMENTAL=0

echo "test: formatting and lints"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

# What a Rust user does first: a plain workspace build must give a podvisor
# that runs pods (its build script embeds the static agent; the dynamically
# linked target/release/podvisor-agent that build also writes is refused).
echo "test: a plain cargo build --release runs a pod"
cargo build --release --locked
plain=$(mktemp -d /tmp/podvisor-plain-build-XXXXXX)
target/release/busybox-image "$plain/busybox.tar" busybox:latest >/dev/null
: >"$plain/config.toml"
plain_run() {
    PODVISOR_CONFIG="$plain/config.toml" target/release/podvisor run \
        --cache-dir "$plain/cache" --run-dir "$plain/run" --template-ram-dir "$plain/ram" \
        --template none "$plain/busybox.tar" "$@"
}
out=$(unset PODVISOR_AGENT; plain_run echo hello from a plain build)
if [ "$out" != "hello from a plain build" ]; then
    echo "test: the pod of the plain build printed: $out" >&2
    exit 1
fi
if err=$(PODVISOR_AGENT="$PWD/target/release/podvisor-agent" plain_run true 2>&1) ||
    ! grep -q "dynamically linked" <<<"$err"; then
    echo "test: the dynamically linked agent was not refused: $err" >&2
    exit 1
fi
rm -rf "$plain"

# setup.sh built the static agent (release: a small initramfs boots faster).
# The hostile-guest tests also need the misbehaving stand-in agent.
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p podvisor-agent --example hostile-agent \
    --target x86_64-unknown-linux-gnu
export PODVISOR_AGENT="$PWD/target/x86_64-unknown-linux-gnu/release/podvisor-agent"

# crates/cli/tests/workspace.rs reads the whole locked dependency graph
# offline (`cargo metadata --offline`), which needs every locked package
# downloaded, also those only other targets build (a build fetches only
# what it compiles).
cargo fetch --locked

echo "test: cargo nextest"
if ! command -v cargo-nextest >/dev/null; then
    cargo install --locked cargo-nextest
fi
cargo nextest run --locked --workspace "$@"
