//! Benchmark of VM templates: time to a container's first output by cold
//! boot, by fork from a base template, from an image template, and from a
//! warm template whose process already runs; and host memory (sum of PSS
//! of the QEMU processes) of N pods forked from a template vs N booted cold.
//!
//! ```text
//! cargo build --release --bin podvisor
//! cargo run --release -p podvisor-cli --example template-bench -- \
//!     [--podvisor $CARGO_TARGET_DIR/release/podvisor] [--runs 5] [--pods 20]
//! ```
//!
//! Uses the agent `podvisor` finds (`PODVISOR_AGENT`) and a busybox image
//! built from the host's busybox; everything else lives in a temporary
//! directory (template RAM in one under /dev/shm). Prints a table.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podvisor_testbed::oci::ImageBuilder;

/// The container: reads one command line from stdin and runs it. Started
/// in the warm template, it is blocked in `read` when the template is saved.
const SERVER: &str = "read cmd; eval \"$cmd\"";

struct Bench {
    podvisor: PathBuf,
    dir: tempfile::TempDir,
    ram: tempfile::TempDir,
    image: PathBuf,
}

impl Bench {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.podvisor);
        cmd.env("PODVISOR_CACHE_DIR", self.dir.path().join("cache"))
            .env("PODVISOR_RUN_DIR", self.dir.path().join("run"))
            .env("PODVISOR_TEMPLATE_RAM_DIR", self.ram.path())
            .env("PODVISOR_LOG", "error");
        cmd
    }

    /// `podvisor run -i --template T IMAGE -- sh -c SERVER`, fed `input`.
    fn spawn_pod(&self, template: &str, name: &str, input: &str) -> Child {
        let mut child = self
            .command()
            .args(["run", "-i", "--name", name, "--template", template])
            .arg(&self.image)
            .args(["--", "sh", "-c", SERVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start podvisor");
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child
    }

    /// Seconds from starting `podvisor run` to the container's first output.
    fn first_output(&self, template: &str) -> f64 {
        let started = Instant::now();
        let mut child = self.spawn_pod(template, "bench", "echo hello\n");
        let mut out = child.stdout.take().unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(out.read(&mut byte).unwrap(), 1, "no output ({template})");
        let elapsed = started.elapsed().as_secs_f64();
        let mut rest = Vec::new();
        out.read_to_end(&mut rest).unwrap();
        assert!(child.wait().unwrap().success(), "run failed ({template})");
        assert_eq!([&byte[..], &rest].concat(), b"hello\n");
        elapsed
    }

    fn template_create(&self, args: &[&str]) -> f64 {
        let started = Instant::now();
        let out = self
            .command()
            .args(["template", "create"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "template create {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed().as_secs_f64()
    }

    /// Starts `n` pods that stay up, one after the other; returns them
    /// once all said so.
    fn start_idle_pods(&self, template: &str, n: usize) -> Vec<Child> {
        (0..n)
            .map(|i| {
                let mut pod = self.spawn_pod(
                    template,
                    &format!("idle{i}"),
                    "echo up; exec sleep 100000\n",
                );
                let mut line = String::new();
                BufReader::new(pod.stdout.as_mut().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                assert_eq!(line, "up\n", "pod {i} ({template})");
                pod
            })
            .collect()
    }

    /// PSS (and private) kB of the QEMU processes of this benchmark's pods.
    fn qemu_memory_kb(&self) -> (u64, u64, usize) {
        let pods = self.dir.path().join("run/pods");
        let needle = pods.to_string_lossy().into_owned();
        let mut pss = 0;
        let mut private = 0;
        let mut count = 0;
        for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if !cmdline.starts_with("qemu-system") || !cmdline.contains(&needle) {
                continue;
            }
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
            pss += field_kb(&rollup, "Pss:");
            private += field_kb(&rollup, "Private_Clean:") + field_kb(&rollup, "Private_Dirty:");
            count += 1;
        }
        (pss, private, count)
    }

    /// kB the template RAM files take on tmpfs (they sit in a
    /// subdirectory per run directory).
    fn template_ram_kb(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let entries = |d: &std::path::Path| -> Vec<std::fs::DirEntry> {
            std::fs::read_dir(d)
                .map(|rd| rd.filter_map(|e| e.ok()).collect())
                .unwrap_or_default()
        };
        entries(self.ram.path())
            .into_iter()
            .flat_map(|e| entries(&e.path()))
            .filter(|e| e.path().extension().is_some_and(|x| x == "ram"))
            .map(|e| e.metadata().unwrap().blocks() / 2)
            .sum()
    }
}

fn field_kb(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn stop(pods: Vec<Child>) {
    for mut p in pods {
        // podvisor's QEMU dies with it (PR_SET_PDEATHSIG).
        let _ = p.kill();
        let _ = p.wait();
    }
    std::thread::sleep(Duration::from_secs(1));
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Default: the podvisor built next to this example (a stale
    // `target/release/podvisor` would measure old code).
    let podvisor = arg(&args, "--podvisor").map_or_else(
        || {
            let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
            PathBuf::from(target).join("release/podvisor")
        },
        PathBuf::from,
    );
    let runs: usize = arg(&args, "--runs").map_or(5, |v| v.parse().unwrap());
    let pods: usize = arg(&args, "--pods").map_or(20, |v| v.parse().unwrap());
    let dir = tempfile::Builder::new()
        .prefix("podvisor-bench-")
        .tempdir()
        .unwrap();
    let ram = tempfile::Builder::new()
        .prefix("podvisor-bench-ram-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let image = dir.path().join("busybox.tar");
    ImageBuilder::new()
        .busybox_layer()
        .cmd(&["sh"])
        .write_oci_archive(&image)
        .unwrap();
    let bench = Bench {
        podvisor: std::fs::canonicalize(podvisor).expect("the podvisor binary"),
        dir,
        ram,
        image,
    };
    let image_arg = bench.image.to_string_lossy().into_owned();

    // Templates, made up front (and a cold run so the image and initramfs
    // are cached for every scenario alike).
    bench.first_output("none");
    let t_base = bench.template_create(&["--name", "bench-base"]);
    let t_image = bench.template_create(&["--name", "bench-image", &image_arg]);
    let t_warm = bench.template_create(&[
        "--name",
        "bench-warm",
        "--warm",
        "-i",
        "--warm-for",
        "1",
        &image_arg,
        "--",
        "sh",
        "-c",
        SERVER,
    ]);
    println!(
        "template creation: base {t_base:.2} s (a cold boot), image {t_image:.2} s and warm {t_warm:.2} s (each from the base)"
    );

    println!("\ntime to the container's first output ({runs} runs each; median, min, max):");
    let mut cold_median = 0.0;
    for (label, template) in [
        ("cold boot (--template none)", "none"),
        ("fork from base template", "bench-base"),
        ("fork from image template", "bench-image"),
        ("fork from warm template", "bench-warm"),
    ] {
        let times: Vec<f64> = (0..runs).map(|_| bench.first_output(template)).collect();
        let min = times.iter().cloned().fold(f64::MAX, f64::min);
        let max = times.iter().cloned().fold(0.0, f64::max);
        let med = median(times);
        if template == "none" {
            cold_median = med;
        }
        println!(
            "  {label:<30} {med:>7.3} s  (min {min:.3}, max {max:.3})  {:>5.1}x faster than cold",
            cold_median / med
        );
    }

    println!("\nhost memory of {pods} idle pods (sum over their QEMU processes, MiB):");
    for (label, template) in [
        ("cold boot", "none"),
        ("forked from image template", "bench-image"),
        ("forked from warm template", "bench-warm"),
    ] {
        let idle = bench.start_idle_pods(template, pods);
        std::thread::sleep(Duration::from_secs(3));
        let (pss, private, count) = bench.qemu_memory_kb();
        assert_eq!(count, pods, "QEMU processes found");
        let ram = bench.template_ram_kb();
        println!(
            "  {label:<28} PSS {:>7.1}  private {:>7.1}  ({:.1} per pod); all template RAM files on tmpfs: {:.1}",
            pss as f64 / 1024.0,
            private as f64 / 1024.0,
            pss as f64 / 1024.0 / pods as f64,
            ram as f64 / 1024.0
        );
        stop(idle);
    }
}
