#!/usr/bin/env bash
# Installs what the tests need (Debian 12, as root), builds once, and runs the
# whole test suite: unit tests and integration tests that boot real QEMU VMs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --test

echo "test: formatting and lints"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

# setup.sh built the static agent (release: a small initramfs boots faster).
# The hostile-guest tests also need the misbehaving stand-in agent.
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p podvisor-agent --example hostile-agent \
    --target x86_64-unknown-linux-gnu
export PODVISOR_AGENT="$PWD/target/x86_64-unknown-linux-gnu/release/podvisor-agent"

echo "test: cargo nextest"
if ! command -v cargo-nextest >/dev/null; then
    cargo install --locked cargo-nextest
fi
cargo nextest run --locked --workspace "$@"
