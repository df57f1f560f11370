#!/usr/bin/env bash
# The quick start: installs what podvisor needs (Debian 12, as root), builds
# and installs it, starts `podvisor up` (a management server and a host
# daemon on this machine) in the background, applies a Kubernetes Pod YAML,
# waits for the pod and prints its logs. Idempotent: run it again and it
# reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

examples=/var/lib/podvisor/examples
mkdir -p "$examples"

# An image made from the host's busybox (no registry needed).
image=$examples/busybox.tar
if [ ! -f "$image" ]; then
    cargo build --release --locked -q --bin busybox-image -p podvisor-testbed
    target/release/busybox-image "$image" busybox:latest
fi

# `podvisor up` in the background, once; its pid in /run/podvisor/up.pid.
pidfile=/run/podvisor/up.pid
log=/var/log/podvisor-up.log
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "quickstart: podvisor up is already running (pid $(cat "$pidfile"))"
else
    mkdir -p "$(dirname "$pidfile")"
    echo "quickstart: starting podvisor up (log: $log)"
    setsid podvisor up </dev/null >>"$log" 2>&1 &
    echo $! >"$pidfile"
fi
for _ in $(seq 60); do
    podvisor get hosts 2>/dev/null | grep -q ' Ready ' && break
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "quickstart: podvisor up exited; the end of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    sleep 1
done
podvisor get hosts

# The image goes into the global cache under its name (busybox:latest), so
# pods name it as they would on Kubernetes; a reference the cache does not
# have is pulled from its registry.
podvisor image import "$image"

# A pod as Kubernetes users write it.
cat >"$examples/hello-pod.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: hello
  labels:
    app: hello
spec:
  restartPolicy: Never
  containers:
  - name: hello
    image: busybox
    command: [sh, -c]
    args: ['echo "hello from pod \$(hostname) at \$(hostname -i), in a VM running \$(uname -s) \$(uname -r) with \$(nproc) CPU"']
    resources:
      limits:
        cpu: "1"
        memory: 192Mi
EOF

# Start over if an earlier run left the pod.
podvisor delete pod hello --wait >/dev/null 2>&1 || true
echo "quickstart: podvisor apply -f $examples/hello-pod.yaml"
podvisor apply -f "$examples/hello-pod.yaml"
phase=
for _ in $(seq 180); do
    phase=$(podvisor get pods hello -o json | sed -n 's/.*"phase": *"\([A-Za-z]*\)".*/\1/p' | head -n 1)
    case "$phase" in Succeeded | Failed) break ;; esac
    sleep 1
done
podvisor get pods
echo "quickstart: podvisor logs hello"
podvisor logs hello
if [ "$phase" != Succeeded ]; then
    echo "quickstart: the pod did not succeed (phase: ${phase:-unknown}); see: podvisor describe pod hello" >&2
    exit 1
fi
echo "quickstart: done. podvisor up keeps running (pid $(cat "$pidfile")); try: podvisor exec, podvisor get pods -o yaml"
