#!/usr/bin/env bash
# Installs what podvisor needs on Debian 12 and builds it. Idempotent; run as root.
#
#   scripts/setup.sh          runtime packages, release build, install to /usr/local
#   scripts/setup.sh --test   also the packages the test suite starts (registry,
#                             etcd); builds only the static agent (tests build
#                             the rest themselves)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (it installs Debian packages and runs VMs)" >&2
    exit 1
fi

# protobuf-compiler and libprotobuf-dev (its well-known .proto files) build
# etcd-client, which the podvisor binary links for its etcd state store.
# containernetworking-plugins (bridge, host-local, firewall, portmap, tuning
# in /usr/lib/cni) and iptables (which they run) give pods their network.
# e2fsprogs (mkfs.ext4) formats volume disks and encrypted volumes' format
# images (crates/volume).
packages=(qemu-system-x86 linux-image-cloud-amd64 erofs-utils busybox-static zstd cpio ca-certificates
          protobuf-compiler libprotobuf-dev containernetworking-plugins iptables e2fsprogs)
if [ "$want_test" = 1 ]; then
    # openssl signs the bearer tokens of the token-auth registry tests;
    # iperf3 measures pod-to-pod throughput in scripts/bench/net.sh;
    # socat is the UDP peer of the pod-to-pod tests (busybox has none);
    # the runtime-profile tests put Debian's JDK 17, Node.js and CPython
    # into a pod's image, compile their Java servers with its javac and jar
    # (openjdk-17-jdk-headless: the JRE alone has neither) and build a Go
    # program with golang-go; the page-sharing benchmark's Java server is
    # Debian's Jetty 9.
    packages+=(docker-registry etcd-server etcd-client apache2-utils cpio openssl iperf3 socat
               openjdk-17-jdk-headless nodejs python3.11-minimal golang-go libjetty9-java)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian starts these as services where an init system runs; the tests start
# their own instances on loopback, so make sure stray ones do not hold ports.
if [ "$want_test" = 1 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now docker-registry etcd >/dev/null 2>&1 || true
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found: install a Rust toolchain (rustup, Rust >= 1.89)" >&2
    exit 1
fi

echo "setup: building the static guest agent"
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p podvisor-agent --target x86_64-unknown-linux-gnu
[ "$want_test" = 1 ] && exit 0

echo "setup: building podvisor (release)"
cargo build --release --locked --bin podvisor
install -D -m 0755 target/release/podvisor /usr/local/bin/podvisor
install -D -m 0755 target/x86_64-unknown-linux-gnu/release/podvisor-agent \
    /usr/local/lib/podvisor/podvisor-agent
echo "setup: installed /usr/local/bin/podvisor and /usr/local/lib/podvisor/podvisor-agent"
