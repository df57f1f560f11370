//! Benchmark of issue 12: host memory of N identical Java HTTP server pods
//! (the host's JDK 17 and Debian's Jetty 9, or with
//! `PAGE_SHARING_APP=httpserver` the JDK's own `com.sun.net.httpserver`;
//! real pod VMs through the host runtime),
//! for four ways of running them:
//!
//! - `blk`: layers on virtio-blk, no class-data archive, no free page
//!   reporting (the pods ask for isolation: what podvisor did before);
//! - `blk+fpr`: the same with free page reporting;
//! - `dax`: layers on virtio-pmem with DAX, free page reporting, no
//!   archive;
//! - `dax+archive`: DAX, free page reporting and the JVM archive a
//!   training run made.
//!
//! For N = 1, 2, 4, 8 (pods added one at a time) each new pod is warmed
//! up with requests from inside it (busybox `wget` through `exec`), then
//! the sum of the QEMU processes' PSS and the drop of MemAvailable are
//! read; the marginal MiB per added pod is (PSS at 8 - PSS at 1) / 7.
//! Also the time from `run` to the first response of each pod.
//!
//! Then, for the time to the first response without the other pods'
//! load, `ALONE` pods are started one at a time (each deleted before the
//! next). `PAGE_SHARING_MODES=blk,dax` runs only those rounds;
//! `PAGE_SHARING_BREAKDOWN=1` prints the largest mappings of the first
//! pod's QEMU and the guest's memory counters.
//!
//! `cargo run --release -p podvisor-hostd --example page_sharing -- [MAX_N] [REQUESTS] [ALONE]`
//! (as root, with PODVISOR_AGENT set to the static agent).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podvisor_hostd::host::runtime::processes_mentioning;
use podvisor_hostd::host::{
    ContainerPlan, ExecEvent, ExecRequest, HostConfig, PodPlan, PodRuntime,
};
use podvisor_podvm::NodeConfig;

const MIB: f64 = (1 << 20) as f64;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Blk,
    BlkReporting,
    Dax,
    DaxArchive,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Blk => "blk",
            Mode::BlkReporting => "blk+fpr",
            Mode::Dax => "dax",
            Mode::DaxArchive => "dax+archive",
        }
    }
}

fn plan(uid: &str, image: &Path, mode: Mode) -> PodPlan {
    let mut web = ContainerPlan::of_image("web", &image.display().to_string());
    web.memory_bytes = Some(512 << 20);
    let mut plan = PodPlan::of_containers(uid, vec![web], 512);
    plan.isolated = matches!(mode, Mode::Blk | Mode::BlkReporting);
    plan
}

/// Runs `sh -c script` in pod `uid`: whether it exited 0 (false if it
/// could not start), and its output.
async fn sh(rt: &PodRuntime, uid: &str, script: &str) -> (bool, Vec<u8>) {
    let request = ExecRequest {
        container: None,
        command: vec!["sh".into(), "-c".into(), script.into()],
        tty: false,
        stdin: false,
        size: None,
    };
    let Ok(mut session) = rt.exec("default", uid, request).await else {
        return (false, Vec::new());
    };
    let mut output = Vec::new();
    loop {
        match session.events.recv().await {
            Some(ExecEvent::Exited(code)) => return (code == 0, output),
            Some(ExecEvent::Failed { .. }) | None => return (false, output),
            Some(ExecEvent::Output(_, bytes)) => output.extend_from_slice(&bytes),
        }
    }
}

/// Runs `wget` `n` times in pod `uid`; true if the last answered.
async fn requests(rt: &PodRuntime, uid: &str, n: usize) -> bool {
    let script = format!(
        "i=0; while [ $i -lt {n} ]; do wget -q -O - http://127.0.0.1:8080/ >/dev/null || exit 1; i=$((i+1)); done"
    );
    sh(rt, uid, &script).await.0
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(5)).await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let max_n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(8);
    let warm_requests: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(50);
    let alone_runs: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(5);
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("java.tar");
    let app = std::env::var("PAGE_SHARING_APP").unwrap_or_else(|_| "jetty".into());
    match app.as_str() {
        "jetty" => podvisor_testbed::java::jetty_image(work.path(), "bench", 8080),
        "httpserver" => podvisor_testbed::java::java_image(work.path(), "bench", 8080, &[]),
        other => panic!("PAGE_SHARING_APP={other}: jetty or httpserver"),
    }
    .unwrap()
    .write_oci_archive(&image)
    .unwrap();
    println!(
        "machine: {} cores; accel {:?}",
        num_cpus(),
        podvisor_vmm::AccelChoice::resolve(None).accel
    );
    println!(
        "pods: 512 MiB, 1 vCPU, host JDK 17, {app} server; warm-up {warm_requests} requests each"
    );
    let only = std::env::var("PAGE_SHARING_MODES").ok();
    for mode in [Mode::Blk, Mode::BlkReporting, Mode::Dax, Mode::DaxArchive] {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|m| m == mode.name()))
        {
            continue;
        }
        let state = work.path().join(mode.name());
        let mut node = NodeConfig::with_defaults(podvisor_vmm::AccelChoice::resolve(None).accel);
        node.cache_dir = work.path().join("cache");
        node.free_page_reporting = !matches!(mode, Mode::Blk);
        let mut cfg = HostConfig::new(node, state.clone());
        cfg.delete_grace = Duration::from_secs(2);
        cfg.jvm_archive_warm_up = match mode {
            Mode::DaxArchive => Some(Duration::from_secs(20)),
            _ => None,
        };
        let (rt, _feed) = PodRuntime::open(cfg).unwrap();
        if matches!(mode, Mode::DaxArchive) {
            // The archive is made once, by the first pod's training run.
            rt.run(plan("trainer", &image, mode)).unwrap();
            wait_for_archive(&work.path().join("cache")).await;
            rt.delete("trainer", None).await;
            settle().await;
        }
        let run_dir: PathBuf = state.join("run");
        let before = mem_available_kib();
        let mut firsts = Vec::new();
        let mut points = Vec::new();
        for i in 1..=max_n {
            let uid = format!("{}-{i}", mode.name().replace('+', "-"));
            let first = start_and_wait(&rt, &uid, &image, mode).await;
            firsts.push(first);
            assert!(requests(&rt, &uid, warm_requests).await, "{uid} warm-up");
            if i.is_power_of_two() {
                settle().await;
                let pids = processes_mentioning(&run_dir.display().to_string());
                let pss: u64 = pids.iter().map(|p| pss_kib(*p)).sum();
                let drop = before.saturating_sub(mem_available_kib());
                println!(
                    "{:<12} N={i}: QEMU PSS {:.0} MiB ({} processes), MemAvailable drop {:.0} MiB",
                    mode.name(),
                    pss as f64 / 1024.0,
                    pids.len(),
                    drop as f64 / 1024.0
                );
                points.push((i, pss as f64 * 1024.0, drop as f64 * 1024.0));
                if i == 1 && std::env::var_os("PAGE_SHARING_BREAKDOWN").is_some() {
                    for pid in &pids {
                        print_breakdown(*pid);
                    }
                    print_guest(&rt, &uid).await;
                }
            }
        }
        if let (Some(first), Some(last)) = (points.first(), points.last())
            && last.0 > first.0
        {
            let n = (last.0 - first.0) as f64;
            println!(
                "{:<12} marginal per added pod: PSS {:.1} MiB, MemAvailable {:.1} MiB",
                mode.name(),
                (last.1 - first.1) / n / MIB,
                (last.2 - first.2) / n / MIB
            );
        }
        report_firsts(mode, "among N pods", &firsts);
        for i in 1..=max_n {
            rt.delete(&format!("{}-{i}", mode.name().replace('+', "-")), None)
                .await;
        }
        settle().await;
        // First responses of pods started alone, one after the other.
        let mut alone = Vec::new();
        for i in 1..=alone_runs {
            let uid = format!("{}-alone-{i}", mode.name().replace('+', "-"));
            alone.push(start_and_wait(&rt, &uid, &image, mode).await);
            rt.delete(&uid, None).await;
            settle().await;
        }
        if !alone.is_empty() {
            report_firsts(mode, "alone", &alone);
        }
        podvisor_testbed::daemon::kill_mentioning(&run_dir.display().to_string());
    }
}

/// Runs pod `uid` and returns the seconds from `run` to its first answer,
/// polled from inside the pod (one exec looping in the guest, so polling
/// costs the booting guest little).
async fn start_and_wait(rt: &PodRuntime, uid: &str, image: &Path, mode: Mode) -> f64 {
    let started = Instant::now();
    rt.run(plan(uid, image, mode)).unwrap();
    let script = "until wget -q -O - http://127.0.0.1:8080/ >/dev/null 2>&1; do sleep 0.05; done";
    loop {
        if sh(rt, uid, script).await.0 {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{uid} never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn report_firsts(mode: Mode, how: &str, firsts: &[f64]) {
    let mut sorted = firsts.to_vec();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{:<12} run to first response ({how}): median {:.2} s, min {:.2} s (all: {:?})",
        mode.name(),
        sorted[sorted.len() / 2],
        sorted[0],
        firsts
            .iter()
            .map(|f| (f * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
}

/// Prints the mappings of `pid` that hold the most PSS.
fn print_breakdown(pid: u32) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, u64, String)> = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            maps.push((0, 0, line.to_string()));
        } else if let Some(v) = line.strip_prefix("Pss:") {
            if let Some(m) = maps.last_mut() {
                m.0 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            }
        } else if let Some(v) = line.strip_prefix("Size:")
            && let Some(m) = maps.last_mut()
        {
            m.1 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    println!("  pid {pid}: largest mappings by PSS");
    for (pss, size, head) in maps.iter().take(10) {
        println!(
            "    {:>8.1} MiB PSS of {:>8.1} MiB  {head}",
            *pss as f64 / 1024.0,
            *size as f64 / 1024.0
        );
    }
}

/// Prints the guest's memory counters, as the container sees them.
async fn print_guest(rt: &PodRuntime, uid: &str) {
    let script = "head -25 /proc/meminfo; ps -o pid,rss,args 2>/dev/null || ps; for p in /proc/[0-9]*; do grep -a JAVA_TOOL $p/environ 2>/dev/null | tr \"\\0\" \"\\n\" | grep JAVA_TOOL; grep jsa $p/maps 2>/dev/null; done";
    print!("{}", String::from_utf8_lossy(&sh(rt, uid, script).await.1));
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Waits until the cache holds the archive layer (four layer disks:
/// busybox, JDK, jar, archive).
async fn wait_for_archive(cache: &Path) {
    let start = Instant::now();
    loop {
        let n = std::fs::read_dir(
            podvisor_image::LayerCache::open(cache)
                .unwrap()
                .layers_dir(),
        )
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().join("disk.erofs").is_file())
                .count()
        })
        .unwrap_or(0);
        if n >= 4 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no archive made"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
