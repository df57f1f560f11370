//! Benchmark of issue 12's "zero out-of-memory kills": in pod VMs of
//! 256 MiB, 1 GiB and 4 GiB with 1 and 2 vCPUs, a JVM, a Go program and a
//! Node.js program each fill the memory their runtime profile gives them
//! (one at a time, each sized to the whole VM), and the guest kernel's
//! console is searched for an out-of-memory kill. A runtime that reaches
//! its own limit ends with its own error (Java's OutOfMemoryError caught
//! and reported, V8's "heap out of memory" abort, Go's limit held): what
//! must never happen is the kernel killing it.
//!
//! `cargo run --release -p podvisor-podvm --example runtime_fit`
//! (as root, with PODVISOR_AGENT set to the static agent).

use std::time::{Duration, Instant};

use podvisor_podvm::PodVm;
use podvisor_podvm::image_boot::ImageBoot;
use podvisor_proto::runtime::RuntimeSizing;
use podvisor_proto::{ContainerSpec, GuestMessage, HostMessage, ProcessSpec, Stream};
use podvisor_testbed::host_layer::{build_go, jdk_layer, node_python_layer};
use podvisor_testbed::oci::{Compression, ImageBuilder};

/// Keeps 1 MiB arrays until the heap is full, then reports.
const FILL_JAVA: &str = "import java.util.*;
public class Fill { public static void main(String[] a) {
  List<byte[]> keep = new ArrayList<>(); long max = Runtime.getRuntime().maxMemory() >> 20;
  try { while (true) keep.add(new byte[1 << 20]); }
  catch (OutOfMemoryError e) { int n = keep.size(); keep = null;
    System.out.println(\"jvm: heap full at \" + n + \" MiB of max \" + max + \" MiB\"); } } }
";

/// Keeps 1 MiB slices up to 85 % of its memory limit while churning
/// garbage of twice the limit.
const FILL_GO: &str = "package main

import (
\t\"fmt\"
\t\"runtime/debug\"
)

var keep [][]byte

func main() {
\tlimit := debug.SetMemoryLimit(-1)
\tfor int64(len(keep))<<20 < limit/100*85 {
\t\tkeep = append(keep, make([]byte, 1<<20))
\t\tfor i := range keep[len(keep)-1] {
\t\t\tkeep[len(keep)-1][i] = 1
\t\t}
\t}
\tvar garbage []byte
\tfor i := int64(0); i < 2*limit>>20; i++ {
\t\tgarbage = make([]byte, 1<<20)
\t\tgarbage[0] = 1
\t}
\t_ = garbage
\tfmt.Printf(\"go: held %d MiB under a limit of %d MiB\\n\", len(keep), limit>>20)
}
";

/// Keeps arrays until V8's heap limit stops it.
const FILL_NODE: &str = "const keep = []; const v8 = require('v8');
const limit = v8.getHeapStatistics().heap_size_limit >> 20;
console.log('node: heap limit ' + limit + ' MiB');
while (true) keep.push(new Array(1 << 17).fill(1.5));";

fn container(boot: &ImageBoot, id: &str, args: &[&str]) -> ContainerSpec {
    ContainerSpec {
        id: id.into(),
        hostname: "fit".into(),
        mounts: podvisor_proto::image_mounts(&boot.serials),
        process: ProcessSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/usr/bin:/bin".into()],
            cwd: "/".into(),
            user: String::new(),
            terminal: None,
            stdin: false,
        },
        runtime: Some(RuntimeSizing::whole_vm()),
    }
}

/// Runs `spec` to its end; its output's last lines and the settings set.
async fn run(pod: &mut PodVm, spec: ContainerSpec) -> (String, String) {
    let id = spec.id.clone();
    pod.send(&HostMessage::StartContainer(spec)).await.unwrap();
    let mut out = Vec::new();
    let mut settings = String::new();
    loop {
        match pod.next_event().await.unwrap() {
            GuestMessage::ProfileApplied { profile, .. } => {
                settings = profile
                    .env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ");
            }
            GuestMessage::Output {
                id: i,
                stream,
                data,
            } if i == id && (stream == Stream::Stdout || out.len() < 4096) => {
                out.extend(data);
            }
            GuestMessage::Exited { id: i, status } if i == id => {
                let text = String::from_utf8_lossy(&out);
                let last: Vec<&str> = text.lines().rev().take(2).collect();
                return (format!("{status:?}: {}", last.join(" | ")), settings);
            }
            GuestMessage::StartFailed { error, .. } => {
                return (format!("start failed: {}", error.message), settings);
            }
            _ => {}
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (go, _) = build_go(dir.path(), FILL_GO);
    let mut jdk = jdk_layer();
    jdk.bytes("/app/Fill.java", FILL_JAVA.as_bytes(), 0o644);
    let mut others = node_python_layer();
    others.host_file_at("/app/fill-go", &go, 0o755);
    others.bytes("/app/fill.js", FILL_NODE.as_bytes(), 0o644);
    let archive = dir.path().join("fit.tar");
    ImageBuilder::new()
        .busybox_layer()
        .layer_compressed(jdk.entries(), Compression::None)
        .layer_compressed(others.entries(), Compression::None)
        .write_oci_archive(&archive)
        .unwrap();
    let boot = ImageBoot::prepare(dir.path(), &archive).unwrap();
    let mut kills = 0;
    for memory_mib in [256, 1024, 4096] {
        for cpus in [1, 2] {
            let t = Instant::now();
            let mut spec = boot.spec(&format!("fit{memory_mib}x{cpus}"), memory_mib, vec![]);
            spec.cpus = cpus;
            let mut pod = PodVm::boot(&boot.cfg, spec).await.unwrap();
            for (id, args) in [
                ("jvm", &["java", "/app/Fill.java"][..]),
                ("go", &["/app/fill-go"][..]),
                ("node", &["node", "/app/fill.js"][..]),
            ] {
                let (outcome, settings) = run(&mut pod, container(&boot, id, args)).await;
                println!("{memory_mib:>5} MiB x {cpus} vCPU {id:<5} {outcome}  [{settings}]");
            }
            let console = pod.console_tail(1 << 20);
            let oom = console
                .lines()
                .filter(|l| l.contains("Out of memory") || l.contains("oom-kill"))
                .count();
            kills += oom;
            println!(
                "{memory_mib:>5} MiB x {cpus} vCPU: kernel OOM kills {oom} ({:.0} s)",
                t.elapsed().as_secs_f64()
            );
            pod.shutdown(Duration::from_secs(5)).await;
        }
    }
    println!("runtime-fit: kernel OOM kills in all: {kills}");
}
