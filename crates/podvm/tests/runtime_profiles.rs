//! Runtime profiles in real pod VMs (QEMU, the real guest kernel and
//! agent) with Debian's runtimes put into the image by the test: the
//! host's JDK 17 (reached through Debian's `/usr/bin/java ->
//! /etc/alternatives/java -> ...` links), Node.js, CPython 3.11 with the
//! few stdlib files it needs to start, and a static Go program built here
//! with Debian's Go. One VM of 1 GiB runs them all at once: the JVM gets
//! a heap of at least half of the VM, its processor count and
//! a class-data archive mapped at its base address; a user's own `-Xmx`
//! wins; a spec without sizing keeps the JVM's own default (a quarter of
//! the RAM); Node's heap limit, Go's GOMAXPROCS and GOMEMLIMIT, and
//! Python's PYTHON_CPU_COUNT are what the agent chose. A second VM of
//! 256 MiB shows a JVM whose heap was sized to it compiling and running
//! a program.
//!
//! Prints the numbers that go into the report (`runtime-profiles:` lines).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use podvisor_podvm::PodVm;
use podvisor_podvm::image_boot::ImageBoot;
use podvisor_proto::runtime::{AppliedProfile, RuntimeSizing, WHOLE_VM_PPM};
use podvisor_proto::{ContainerSpec, ExitStatus, GuestMessage, HostMessage, ProcessSpec, Stream};
use podvisor_testbed::host_layer::{JDK, build_go, jdk_layer, node_python_layer};
use podvisor_testbed::oci::{Compression, Entry, ImageBuilder};

const MIB: u64 = 1 << 20;

/// The host's JDK 17 ([`jdk_layer`]) and a program for the small VM: the
/// source launcher compiles it in the guest (javac runs in the JVM: a real
/// load of classes).
fn jdk_app_layer() -> Vec<Entry> {
    let mut layer = jdk_layer();
    layer.bytes(
        "/app/Hello.java",
        b"public class Hello { public static void main(String[] a) { \
          byte[][] keep = new byte[16][]; \
          for (int i = 0; i < keep.length; i++) keep[i] = new byte[1 << 20]; \
          System.out.println(\"max \" + Runtime.getRuntime().maxMemory() + \" kept \" + keep.length); } }\n",
        0o644,
    );
    layer.entries()
}

/// Node.js, CPython 3.11 and the Go program.
fn other_runtimes_layer(go_program: &Path) -> Vec<Entry> {
    let mut layer = node_python_layer();
    layer.host_file_at("/app/gosize", go_program, 0o755);
    layer.entries()
}

/// A static Go program printing what its runtime chose.
const GO_SIZE: &str = "package main\n\nimport (\n\t\"fmt\"\n\t\"os\"\n\t\"runtime\"\n\t\"runtime/debug\"\n)\n\n\
    func main() {\n\tfmt.Printf(\"gomaxprocs=%d env=%s memlimit=%d env=%s\\n\", \
    runtime.GOMAXPROCS(0), os.Getenv(\"GOMAXPROCS\"), debug.SetMemoryLimit(-1), \
    os.Getenv(\"GOMEMLIMIT\"))\n}\n";

fn host_java_version() -> String {
    let release = std::fs::read_to_string(format!("{JDK}/release")).unwrap();
    release
        .lines()
        .find_map(|l| l.strip_prefix("JAVA_VERSION="))
        .unwrap()
        .trim_matches('"')
        .to_string()
}

fn sizing(ppm: u32, cpus: Option<u32>, archive: Option<&str>) -> Option<RuntimeSizing> {
    Some(RuntimeSizing {
        memory_share_ppm: ppm,
        cpus,
        loaded_classes: None,
        peak_threads: None,
        jvm_archive: archive.map(str::to_string),
    })
}

fn container(
    boot: &ImageBoot,
    id: &str,
    args: &[&str],
    env: &[&str],
    runtime: Option<RuntimeSizing>,
) -> ContainerSpec {
    ContainerSpec {
        id: id.into(),
        hostname: id.into(),
        mounts: podvisor_proto::image_mounts(&boot.serials),
        process: ProcessSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            cwd: "/".into(),
            user: String::new(),
            terminal: None,
            stdin: false,
        },
        runtime,
    }
}

/// What one container reported.
#[derive(Debug, Default)]
struct Run {
    /// `ProfileApplied`, and whether it came before `Started`.
    profile: Option<AppliedProfile>,
    profile_before_started: bool,
    started: bool,
    stdout: String,
    stderr: String,
    status: Option<ExitStatus>,
}

/// Starts `specs` together and collects what each reports until all have
/// exited.
async fn run_all(pod: &mut PodVm, specs: Vec<ContainerSpec>) -> BTreeMap<String, Run> {
    let mut runs: BTreeMap<String, Run> = BTreeMap::new();
    for spec in specs {
        runs.insert(spec.id.clone(), Run::default());
        pod.send(&HostMessage::StartContainer(spec)).await.unwrap();
    }
    let deadline = Duration::from_secs(300);
    tokio::time::timeout(deadline, async {
        while runs.values().any(|r| r.status.is_none()) {
            match pod.next_event().await.expect("pod event") {
                GuestMessage::ProfileApplied { id, profile } => {
                    let run = runs.get_mut(&id).expect("a known container");
                    run.profile_before_started = !run.started;
                    run.profile = Some(profile);
                }
                GuestMessage::Started { id, .. } => runs.get_mut(&id).unwrap().started = true,
                GuestMessage::StartFailed { id, error } => panic!("{id} failed: {error:?}"),
                GuestMessage::Output { id, stream, data } => {
                    let run = runs.get_mut(&id).unwrap();
                    let text = String::from_utf8_lossy(&data);
                    match stream {
                        Stream::Stdout => run.stdout.push_str(&text),
                        Stream::Stderr => run.stderr.push_str(&text),
                    }
                }
                GuestMessage::Exited { id, status } => {
                    runs.get_mut(&id).unwrap().status = Some(status)
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not all exited within {deadline:?}: {runs:#?}"));
    runs
}

/// A flag's value in `-XX:+PrintFlagsFinal` output.
fn flag<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            let _type = words.next()?;
            (words.next()? == name && words.next()? == "=").then(|| words.next().unwrap_or(""))
        })
        .unwrap_or_else(|| panic!("no {name} in {out}"))
}

fn flag_u64(out: &str, name: &str) -> u64 {
    flag(out, name).parse().unwrap()
}

fn env_of<'a>(p: &'a AppliedProfile, key: &str) -> &'a str {
    p.env
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {p:?}"))
}

fn ok(run: &Run, id: &str) {
    assert_eq!(run.status, Some(ExitStatus::Code(0)), "{id}: {run:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_runtimes_are_sized_to_their_pod_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (go_program, go_version) = build_go(dir.path(), GO_SIZE);
    let archive = dir.path().join("img.tar");
    let t = Instant::now();
    ImageBuilder::new()
        .busybox_layer()
        .layer_compressed(jdk_app_layer(), Compression::None)
        .layer_compressed(other_runtimes_layer(&go_program), Compression::None)
        .write_oci_archive(&archive)
        .unwrap();
    let boot = ImageBoot::prepare(dir.path(), &archive).unwrap();
    println!(
        "runtime-profiles: image with JDK, Node, CPython, Go imported in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let java_version = host_java_version();
    let base_archive = format!("{JDK}/lib/server/classes.jsa");

    // One VM of 1 GiB and 2 vCPUs for everything.
    let t = Instant::now();
    let mut spec = boot.spec("rtprofile", 1024, vec![]);
    spec.cpus = 2;
    let mut pod = PodVm::boot(&boot.cfg, spec).await.unwrap();
    println!(
        "runtime-profiles: 1 GiB VM booted in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let flags = ["java", "-XX:+PrintFlagsFinal", "-version"];
    let t = Instant::now();
    let runs = run_all(
        &mut pod,
        vec![
            container(
                &boot,
                "jvm",
                &flags,
                &[],
                sizing(WHOLE_VM_PPM, Some(8), Some(&base_archive)),
            ),
            container(
                &boot,
                "jvm-own-xmx",
                &flags,
                &["JAVA_TOOL_OPTIONS=-Xmx64m"],
                sizing(WHOLE_VM_PPM, None, Some("/no/such/app.jsa")),
            ),
            container(&boot, "jvm-unsized", &flags, &[], None),
            container(
                &boot,
                "node",
                &[
                    "node",
                    "-e",
                    "console.log(require('v8').getHeapStatistics().heap_size_limit)",
                ],
                &[],
                sizing(WHOLE_VM_PPM / 2, None, None),
            ),
            container(
                &boot,
                "python",
                &[
                    "python3",
                    "-c",
                    "import os; print(os.environ.get('PYTHON_CPU_COUNT'))",
                ],
                &[],
                sizing(WHOLE_VM_PPM, Some(1), None),
            ),
            container(
                &boot,
                "go",
                &["/bin/sh", "-c", "exec /app/gosize"],
                &[],
                sizing(WHOLE_VM_PPM, Some(1), None),
            ),
        ],
    )
    .await;
    println!(
        "runtime-profiles: six containers ran in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for (id, run) in &runs {
        ok(run, id);
        if let Some(p) = &run.profile {
            assert!(
                run.profile_before_started,
                "{id}: ProfileApplied after Started"
            );
            println!("runtime-profiles: {id}: {} {:?}", p.runtime, p.env);
            for r in &p.reasons {
                println!("runtime-profiles: {id}:   {r}");
            }
        }
    }

    // The JVM: at least half of the VM as heap, the VM's one CPU (of the 8
    // asked for; the JVM's own default is -1, "ask the OS"), and the
    // class-data archive mapped at its base address.
    let jvm = &runs["jvm"];
    let p = jvm.profile.as_ref().expect("a profile for the JVM");
    assert_eq!(p.runtime, format!("JVM {java_version}"));
    let heap = flag_u64(&jvm.stdout, "MaxHeapSize");
    println!(
        "runtime-profiles: 1 GiB VM: JVM MaxHeapSize {} MiB",
        heap / MIB
    );
    assert!(heap >= 512 * MIB, "heap {} MiB", heap / MIB);
    // Its limit (8) is more than the VM has online: the VM's 2.
    assert_eq!(flag(&jvm.stdout, "ActiveProcessorCount"), "2");
    assert_eq!(flag(&jvm.stdout, "SharedArchiveFile"), base_archive);
    assert_eq!(flag(&jvm.stdout, "ArchiveRelocationMode"), "0");
    assert!(
        jvm.stderr.contains("sharing)"),
        "the archive was not mapped: {}",
        jvm.stderr
    );
    let options = env_of(p, "JAVA_TOOL_OPTIONS");
    assert!(
        jvm.stderr
            .contains(&format!("Picked up JAVA_TOOL_OPTIONS: {options}")),
        "{}",
        jvm.stderr
    );

    // The user's own -Xmx wins; a missing archive is said so.
    let own = &runs["jvm-own-xmx"];
    assert_eq!(flag_u64(&own.stdout, "MaxHeapSize"), 64 * MIB);
    let p = own.profile.as_ref().unwrap();
    assert!(
        p.reasons
            .iter()
            .any(|r| r.contains("the container's own -Xmx")),
        "{p:?}"
    );
    assert!(
        p.reasons
            .iter()
            .any(|r| r.contains("/no/such/app.jsa is not in the container's root")),
        "{p:?}"
    );

    // Without sizing: no profile, the JVM's own default of a quarter of
    // the RAM.
    let unsized_jvm = &runs["jvm-unsized"];
    assert!(unsized_jvm.profile.is_none());
    assert!(!unsized_jvm.stderr.contains("JAVA_TOOL_OPTIONS"));
    let default_heap = flag_u64(&unsized_jvm.stdout, "MaxHeapSize");
    println!(
        "runtime-profiles: 1 GiB VM: unsized JVM MaxHeapSize {} MiB",
        default_heap / MIB
    );
    assert!(default_heap <= 300 * MIB, "{} MiB", default_heap / MIB);
    assert_eq!(flag(&unsized_jvm.stdout, "ActiveProcessorCount"), "-1");

    // Node: half of the VM, 75 % of it as old space; V8's limit adds its
    // young generation.
    let node = &runs["node"];
    let p = node.profile.as_ref().unwrap();
    assert_eq!(p.runtime, "Node.js");
    let chosen: u64 = env_of(p, "NODE_OPTIONS")
        .strip_prefix("--max-old-space-size=")
        .unwrap()
        .parse()
        .unwrap();
    let limit = node.stdout.trim().parse::<u64>().unwrap() / MIB;
    println!("runtime-profiles: node: --max-old-space-size={chosen}, heap_size_limit {limit} MiB");
    assert!(
        (300..=384).contains(&chosen),
        "75 % of half of what a 1 GiB VM leaves: {chosen}"
    );
    assert!(
        (chosen..=chosen + 64).contains(&limit),
        "limit {limit} for {chosen}"
    );

    // CPython sees its CPU count (read by os.cpu_count() from 3.13 on).
    let python = &runs["python"];
    assert_eq!(python.profile.as_ref().unwrap().runtime, "CPython 3.11");
    assert_eq!(python.stdout.trim(), "1");

    // Go: its CPUs and the memory limit the agent set.
    let go = &runs["go"];
    let p = go.profile.as_ref().unwrap();
    assert_eq!(p.runtime, format!("Go {go_version}"));
    let gomemlimit = env_of(p, "GOMEMLIMIT");
    let mib: u64 = gomemlimit.strip_suffix("MiB").unwrap().parse().unwrap();
    assert_eq!(
        go.stdout.trim(),
        format!("gomaxprocs=1 env=1 memlimit={} env={gomemlimit}", mib * MIB)
    );
    pod.shutdown(Duration::from_secs(5)).await;

    // A pod VM of 256 MiB: its JVM, sized to what the VM leaves, compiles
    // and runs a program (javac in the guest, then 16 MiB kept on the
    // heap).
    let t = Instant::now();
    let mut small = PodVm::boot(&boot.cfg, boot.spec("rtprofile-small", 256, vec![]))
        .await
        .unwrap();
    let runs = run_all(
        &mut small,
        vec![container(
            &boot,
            "jvm-small",
            &["java", "/app/Hello.java"],
            &[],
            sizing(WHOLE_VM_PPM, None, None),
        )],
    )
    .await;
    let run = &runs["jvm-small"];
    println!(
        "runtime-profiles: 256 MiB VM: boot and run in {:.1} s: {:?} {}",
        t.elapsed().as_secs_f64(),
        run.profile,
        run.stdout.trim()
    );
    ok(run, "jvm-small");
    assert!(run.stdout.contains("kept 16"), "{}", run.stdout);
    let max: u64 = run
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|m| m.parse().ok())
        .expect("max memory printed");
    let p = run.profile.as_ref().expect("a profile for the JVM");
    let xmx = p.env.iter().find_map(|(k, v)| {
        (k == "JAVA_TOOL_OPTIONS").then(|| {
            v.split_whitespace()
                .find_map(|f| {
                    f.strip_prefix("-Xmx")?
                        .strip_suffix('m')?
                        .parse::<u64>()
                        .ok()
                })
                .expect("an -Xmx")
        })
    });
    let xmx = xmx.expect("the JVM of a 256 MiB pod is sized");
    println!(
        "runtime-profiles: 256 MiB VM: JVM -Xmx{xmx}m, maxMemory {} MiB",
        max / MIB
    );
    assert!(xmx >= 32, "a heap that serves: -Xmx{xmx}m");
    assert!(max <= xmx * MIB, "maxMemory {max} for -Xmx{xmx}m");
    small.shutdown(Duration::from_secs(5)).await;
}
