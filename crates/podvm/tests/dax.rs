//! Image layers on virtio-pmem, mounted with DAX, in real pod VMs (QEMU,
//! the Debian cloud kernel, the agent): the container reads the layers'
//! files and runs programs from them; the guest says DAX is on; reading a
//! big file does not fill the guest's page cache (the pages are the
//! host's, mapped); the host maps each layer file shared and read-only.
//! The same image on virtio-blk (a pod that asks for isolation) gets none
//! of that: its reads go through the guest's own cache. Memory a guest
//! frees returns to the host (free page reporting).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use podvisor_podvm::image_boot::ImageBoot;
use podvisor_podvm::{LayerBus, PodVm};
use podvisor_proto::{ContainerSpec, ExitStatus, GuestMessage, HostMessage, ProcessSpec};
use podvisor_testbed::oci::{Entry, ImageBuilder, incompressible};

/// Size of the big file the containers read.
const BIG_MIB: u64 = 32;

struct VmReaper(std::path::PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}

/// An image of busybox and an app layer: a greeting, a program (a copy
/// of busybox named `echo`) and a big file.
fn image(dir: &Path) -> (std::path::PathBuf, String) {
    let big = incompressible((BIG_MIB << 20) as usize, "dax");
    let sha = podvisor_testbed::oci::sha256_digest(&big);
    let archive = dir.join("img.tar");
    ImageBuilder::new()
        .busybox_layer()
        .layer(vec![
            Entry::dir("app"),
            Entry::file("app/greeting", "hello from a DAX layer\n", 0o644),
            // busybox runs the applet its name says: this copy is `echo`.
            Entry::host_file("app/echo", "/bin/busybox", 0o755),
            Entry::file("app/big", big, 0o644),
        ])
        .write_oci_archive(&archive)
        .unwrap();
    (archive, sha.trim_start_matches("sha256:").to_string())
}

/// Runs `sh -c script` as container `id`; its stdout and exit status.
async fn run(pod: &mut PodVm, boot: &ImageBoot, id: &str, script: &str) -> (String, ExitStatus) {
    let container = ContainerSpec {
        id: id.into(),
        hostname: "dax".into(),
        mounts: boot.mounts(),
        process: ProcessSpec {
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: String::new(),
            terminal: None,
            stdin: false,
        },
        runtime: None,
    };
    pod.send(&HostMessage::StartContainer(container))
        .await
        .unwrap();
    let mut out = String::new();
    let status = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match pod.next_event().await.expect("pod event") {
                GuestMessage::Output { id: i, data, .. } if i == id => {
                    out.push_str(&String::from_utf8_lossy(&data))
                }
                GuestMessage::Exited { id: i, status } if i == id => return status,
                GuestMessage::StartFailed { id: i, error } if i == id => {
                    panic!(
                        "{id} failed to start: {error:?}\n{}",
                        pod.console_tail(4000)
                    )
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id} did not exit: {out}"));
    (out, status)
}

/// The value of `Cached:` in `/proc/meminfo` output, in KiB.
fn cached_kib(meminfo_line: &str) -> u64 {
    meminfo_line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("not a Cached: line: {meminfo_line:?}"))
}

/// What a pod's container sees of the image, and how much the guest's page
/// cache grew while it read the big file.
struct Seen {
    greeting: String,
    tool: String,
    big_sha: String,
    cache_growth_kib: u64,
}

/// Reads the image's files in a container of `pod`.
async fn look(pod: &mut PodVm, boot: &ImageBoot) -> Seen {
    let script = "cat /app/greeting; \
                  /app/echo ran from the layer; \
                  grep ^Cached: /proc/meminfo; \
                  /bin/busybox sha256sum /app/big; \
                  grep ^Cached: /proc/meminfo";
    let (out, status) = run(pod, boot, "look", script).await;
    assert_eq!(status, ExitStatus::Code(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    Seen {
        greeting: lines[0].to_string(),
        tool: lines[1].to_string(),
        big_sha: lines[3].split_whitespace().next().unwrap().to_string(),
        cache_growth_kib: cached_kib(lines[4]).saturating_sub(cached_kib(lines[2])),
    }
}

/// The lines of `/proc/PID/maps` naming layer disks.
fn layer_mappings(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.ends_with("/disk.erofs"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_dax_layers_serve_files_from_the_hosts_page_cache_and_blk_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    let (archive, big_sha) = image(dir.path());

    // Layers on virtio-pmem (what pods get unless they ask for isolation).
    let boot = ImageBoot::prepare_on(&dir.path().join("dax"), &archive, LayerBus::Pmem).unwrap();
    let mut pod = PodVm::boot(&boot.cfg, boot.spec("dax", 256, vec![]))
        .await
        .unwrap();
    let seen = look(&mut pod, &boot).await;
    assert_eq!(seen.greeting, "hello from a DAX layer");
    assert_eq!(seen.tool, "ran from the layer");
    assert_eq!(seen.big_sha, big_sha, "the big file reads back whole");
    println!(
        "DAX layer: reading {BIG_MIB} MiB grew the guest's page cache by {} KiB",
        seen.cache_growth_kib
    );
    // The guest's own page cache does not hold the file: its pages are the
    // host's, mapped into the guest.
    assert!(
        seen.cache_growth_kib < (BIG_MIB << 10) / 4,
        "reading {BIG_MIB} MiB from a DAX layer grew the guest's page cache by {} KiB",
        seen.cache_growth_kib
    );
    // The guest says so for each layer (the kernel keeps `dax=always` on
    // the mount only when the device can do DAX).
    let console = pod.console_tail(64 << 10);
    for layer in ["pvl0", "pvl1"] {
        assert!(
            console
                .lines()
                .any(|l| l.contains(&format!("layer {layer}: /dev/pmem"))
                    && l.ends_with("mounted with DAX")),
            "no DAX for {layer} on the console:\n{console}"
        );
    }
    // The host maps each layer file shared and read-only: one copy in its
    // page cache for every VM (a private mapping would copy it per VM).
    let maps = layer_mappings(pod.vmm_pid());
    assert_eq!(maps.len(), 2, "{maps:?}");
    for m in &maps {
        let perms = m.split_whitespace().nth(1).unwrap();
        assert_eq!(perms, "r--s", "{m}");
    }
    pod.shutdown(Duration::ZERO).await;

    // The same image on virtio-blk (an isolated pod): same files, read into
    // the guest's own cache, nothing of the layers mapped from the host.
    let boot = ImageBoot::prepare_on(&dir.path().join("blk"), &archive, LayerBus::Block).unwrap();
    let mut pod = PodVm::boot(&boot.cfg, boot.spec("blk", 256, vec![]))
        .await
        .unwrap();
    let seen = look(&mut pod, &boot).await;
    assert_eq!(seen.greeting, "hello from a DAX layer");
    assert_eq!(seen.tool, "ran from the layer");
    assert_eq!(seen.big_sha, big_sha);
    println!(
        "virtio-blk layer: reading {BIG_MIB} MiB grew the guest's page cache by {} KiB",
        seen.cache_growth_kib
    );
    assert!(
        seen.cache_growth_kib >= (BIG_MIB - 1) << 10,
        "reading {BIG_MIB} MiB from a virtio-blk layer grew the guest's page cache by only {} KiB",
        seen.cache_growth_kib
    );
    let console = pod.console_tail(64 << 10);
    assert!(!console.contains("mounted with DAX"), "{console}");
    assert!(layer_mappings(pod.vmm_pid()).is_empty());
    memory_the_guest_frees_returns_to_the_host(&mut pod, &boot).await;
    pod.shutdown(Duration::ZERO).await;
}

/// Free page reporting (every pod VM booted with anonymous RAM has it,
/// isolated ones too): a process in the guest holds 128 MiB for a few
/// seconds; the VM's anonymous memory on the host grows by about that
/// much, and shrinks again once the process is gone. Without the device
/// guest RAM once touched stays the VM's until it stops.
async fn memory_the_guest_frees_returns_to_the_host(pod: &mut PodVm, boot: &ImageBoot) {
    const HELD_MIB: u64 = 128;
    let pid = pod.vmm_pid();
    let before = rollup_kib(pid, "Anonymous");
    let peak = Arc::new(AtomicU64::new(before));
    let watch = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rollup_kib(pid, "Anonymous"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let script = format!("dd if=/dev/zero bs={HELD_MIB}M count=1 2>/dev/null | sleep 5");
    let (out, status) = run(pod, boot, "hold", &script).await;
    watch.abort();
    assert_eq!(status, ExitStatus::Code(0), "{out}");
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak >= before + ((HELD_MIB - 28) << 10),
        "holding {HELD_MIB} MiB in the guest grew the VM's anonymous memory from {before} KiB \
         only to {peak} KiB"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = rollup_kib(pid, "Anonymous");
        if now + ((HELD_MIB - 48) << 10) <= peak {
            println!(
                "free page reporting: anonymous memory {before} KiB, {peak} KiB holding \
                 {HELD_MIB} MiB, {now} KiB after"
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest freed {HELD_MIB} MiB but the VM's anonymous memory stayed at {now} KiB \
             (peak {peak} KiB, {before} KiB before)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A field of `/proc/PID/smaps_rollup` (`Pss`, `Anonymous`...), in KiB.
fn rollup_kib(pid: u32, field: &str) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {rollup}"))
}

/// `Rss` and `Pss` of the mapping of `file` in process `pid`, in KiB.
fn mapping_kib(pid: u32, file: &Path) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let name = file.display().to_string();
    let mut lines = smaps.lines().skip_while(|l| !l.ends_with(&name)).skip(1);
    let mut field = |f: &str| {
        lines
            .find_map(|l| l.strip_prefix(f))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{pid} does not map {name}"))
    };
    let rss = field("Rss:");
    (rss, field("Pss:"))
}

/// Host memory of two pod VMs that each read the big file, in KiB.
struct TwoPods {
    /// The first QEMU's PSS once it read the file, alone.
    one: u64,
    /// Sum of both QEMU processes' PSS once both read it (a page mapped by
    /// both counts half in each).
    two: u64,
    /// How much their anonymous memory (guest RAM, QEMU's own) grew while
    /// they read.
    anonymous_growth: u64,
    /// Sum of the PSS of their mappings of the big file's layer disk, and
    /// the smaller of their RSS of it (none on virtio-blk).
    file_pss: u64,
    file_rss: u64,
}

/// Boots two pod VMs of `boot` one after the other and has each read the
/// big file.
async fn two_pods_reading(boot: &ImageBoot, big_sha: &str, disk: &Path) -> TwoPods {
    let mut pods = Vec::new();
    let mut anonymous_growth = 0;
    let mut one = 0;
    for i in 0..2 {
        let id = format!("{:?}-{i}", boot.bus).to_lowercase();
        let mut pod = PodVm::boot(&boot.cfg, boot.spec(&id, 256, vec![]))
            .await
            .unwrap();
        let before = rollup_kib(pod.vmm_pid(), "Anonymous");
        let (out, status) = run(&mut pod, boot, "read", "busybox sha256sum /app/big").await;
        assert_eq!(status, ExitStatus::Code(0), "{out}");
        assert!(out.starts_with(big_sha), "{out}");
        anonymous_growth += rollup_kib(pod.vmm_pid(), "Anonymous").saturating_sub(before);
        if i == 0 {
            one = rollup_kib(pod.vmm_pid(), "Pss");
        }
        pods.push(pod);
    }
    let pids: Vec<u32> = pods.iter().map(|p| p.vmm_pid()).collect();
    let mapped: Vec<(u64, u64)> = match boot.bus {
        LayerBus::Pmem => pids.iter().map(|&pid| mapping_kib(pid, disk)).collect(),
        LayerBus::Block => vec![(0, 0)],
    };
    let two = TwoPods {
        one,
        two: pids.iter().map(|&pid| rollup_kib(pid, "Pss")).sum(),
        anonymous_growth,
        file_pss: mapped.iter().map(|m| m.1).sum(),
        file_rss: mapped.iter().map(|m| m.0).min().unwrap_or(0),
    };
    for pod in pods {
        pod.shutdown(Duration::ZERO).await;
    }
    two
}

/// Host memory of two pods reading the same 100 MiB layer file: with DAX
/// the file's pages are the host's page cache, mapped by both QEMUs and
/// counted once between them, so the second pod adds no copy of it; on
/// virtio-blk each guest caches what it reads in its own RAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_two_pods_reading_one_dax_layer_hold_one_copy_of_it() {
    const FILE_MIB: u64 = 100;
    let file_kib = FILE_MIB << 10;
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    let big = incompressible((FILE_MIB << 20) as usize, "two pods");
    let big_sha = podvisor_testbed::oci::sha256_digest(&big)
        .trim_start_matches("sha256:")
        .to_string();
    let archive = dir.path().join("img.tar");
    ImageBuilder::new()
        .busybox_layer()
        .layer(vec![Entry::dir("app"), Entry::file("app/big", big, 0o644)])
        .write_oci_archive(&archive)
        .unwrap();
    let node = dir.path().join("node");
    let dax = ImageBoot::prepare_on(&node, &archive, LayerBus::Pmem).unwrap();
    let cache = podvisor_image::LayerCache::open(&dax.cfg.cache_dir).unwrap();
    let image = podvisor_image::import(&cache, &archive, None).unwrap();
    let disk = &image.layers[1].path;
    let d = two_pods_reading(&dax, &big_sha, disk).await;
    let blk = ImageBoot::prepare_on(&node, &archive, LayerBus::Block).unwrap();
    let b = two_pods_reading(&blk, &big_sha, disk).await;
    let mib = |kib: u64| kib as f64 / 1024.0;
    for (what, m) in [("DAX", &d), ("virtio-blk", &b)] {
        println!(
            "{what} layers, 256 MiB pod VMs each reading one {FILE_MIB} MiB layer file: \
             QEMU PSS {:.1} MiB for one pod, {:.1} MiB for two (the second adds {:.1} MiB); \
             the file's mapping {:.1} MiB of the two's; anonymous memory grew by {:.1} MiB \
             in all while they read",
            mib(m.one),
            mib(m.two),
            mib(m.two.saturating_sub(m.one)),
            mib(m.file_pss),
            mib(m.anonymous_growth),
        );
    }
    // With DAX both map the whole file, one copy counted between them.
    assert!(d.file_rss >= file_kib, "mapped {} KiB", d.file_rss);
    assert!(
        d.file_pss <= file_kib + (file_kib / 20),
        "the file's pages count {} KiB between the two",
        d.file_pss
    );
    // Reading through DAX takes next to no guest RAM (what grows is
    // mostly QEMU's translated code); through virtio-blk each guest's page
    // cache takes RAM for its own copy (partly pages it had touched and
    // freed before).
    assert!(
        d.anonymous_growth * 3 < b.anonymous_growth,
        "anonymous memory grew by {} KiB with DAX, {} KiB with virtio-blk",
        d.anonymous_growth,
        b.anonymous_growth
    );
    // So the second pod costs the host less with DAX.
    assert!(
        d.two - d.one < b.two - b.one,
        "the second pod added {} KiB with DAX, {} KiB with virtio-blk",
        d.two - d.one,
        b.two - b.one
    );
}
