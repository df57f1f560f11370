# Sourced by the network benchmarks: a scratch network namespace standing in
# for a host (podvisor runs inside it, so its bridge, veths, iptables rules
# and namespace pins never touch the machine's own namespace), a conflist
# whose host-local IPAM keeps its files in the work directory, and a census
# of what pod networking leaves (the same categories as
# podvisor_net::census::HostNetworkCensus).
#
# Run from the repository root. Builds podvisor and the test image tool,
# makes a scratch $work (removed on exit) holding a busybox image
# ($work/busybox.tar). Defines: $target, $podvisor, $accel, $work, $hostns,
# in_host, census.
cargo build --release --locked -q --bin podvisor -p podvisor-cli
cargo build --release --locked -q --bin busybox-image -p podvisor-testbed
target=${CARGO_TARGET_DIR:-target}
podvisor=$PWD/$target/release/podvisor
export PODVISOR_AGENT=${PODVISOR_AGENT:-$PWD/$target/x86_64-unknown-linux-gnu/release/podvisor-agent}
accel=${PODVISOR_ACCEL:-$(grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ] && echo kvm || echo tcg)}
work=$(mktemp -d)
hostns=pvnet$$
ip netns add "$hostns"
ip -n "$hostns" link set lo up
in_host() { ip netns exec "$hostns" "$@"; }
net_cleanup() {
    ip netns pids "$hostns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    grep -o " $work[^ ]*" /proc/self/mountinfo 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    ip netns del "$hostns" 2>/dev/null || true
}
mkdir -p "$work/cni" "$work/ipam"
cat >"$work/cni/10-bench.conflist" <<JSON
{"cniVersion":"1.0.0","name":"bench","plugins":[
 {"type":"bridge","bridge":"podvisor0","isGateway":true,"ipMasq":true,"hairpinMode":true,
  "ipam":{"type":"host-local","ranges":[[{"subnet":"10.253.0.0/24"}]],"routes":[{"dst":"0.0.0.0/0"}],
          "dataDir":"$work/ipam"}},
 {"type":"firewall","backend":"iptables"},
 {"type":"portmap","capabilities":{"portMappings":true}},
 {"type":"tuning"}]}
JSON
# census FILE: namespace pins under the run dir, links, iptables rules and
# chains (nat, filter), IPAM allocations (files named by an address).
census() {
    {
        echo "netns pins: $(find "$work/run" -path '*/netns/*' 2>/dev/null | wc -l)"
        in_host ip -o link show | awk -F': ' '{print "link " $2}' | sed 's/@.*//' | sort
        for t in nat filter; do
            in_host iptables-save -t "$t" | grep -E '^(-A|:)' | sed 's/\[[0-9:]*\]//' | sort
        done
        find "$work/ipam" -type f -name '[0-9]*.*' | sed 's/^/ipam /' | sort
    } >"$1"
}
trap 'net_cleanup; rm -rf "$work"' EXIT
"$target/release/busybox-image" "$work/busybox.tar" >/dev/null
