//! A real pod VM hibernated into a sealed snapshot and woken from it: a
//! snapshot that cannot be written (a full file system) leaves the pod
//! running; hibernated, its QEMU is gone and the file is its owner's only;
//! woken, the container's state in guest memory (a counter a shell keeps)
//! is there and the guest clock is the host's; a marker string that the
//! guest holds in memory is in the state but not in the file; a snapshot
//! with one changed byte is refused before any VM starts. Prints the sizes
//! and times.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use podvisor_hibernate::OpenedSnapshot;
use podvisor_podvm::image_boot::ImageBoot;
use podvisor_podvm::{NodeConfig, PodVm, PodVmSpec};
use podvisor_proto::{ContainerSpec, GuestMessage, HostMessage, ProcessSpec};
use podvisor_testbed::oci::ImageBuilder;

const MEMORY_MIB: u64 = 192;
const CONTEXT: &[u8] = b"pod default/counter uid-counter";

struct VmReaper(std::path::PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}

fn node(dir: &Path) -> (NodeConfig, PodVmSpec, Vec<String>) {
    let archive = dir.join("img.tar");
    ImageBuilder::new()
        .busybox_layer()
        .write_oci_archive(&archive)
        .unwrap();
    let boot = ImageBoot::prepare(dir, &archive).unwrap();
    let spec = boot.spec("counter", MEMORY_MIB, vec![]);
    (boot.cfg, spec, boot.serials)
}

/// Output of container `id` until a line containing `until`; that line.
async fn line_with(pod: &mut PodVm, id: &str, until: &str) -> String {
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match pod.next_event().await.expect("pod event") {
                GuestMessage::Output { id: i, data, .. } if i == id => {
                    out.push_str(&String::from_utf8_lossy(&data));
                    // The whole line, once its end has arrived.
                    if let Some(at) = out.find(until)
                        && let Some(end) = out[at..].find('\n')
                    {
                        let start = out[..at].rfind('\n').map_or(0, |i| i + 1);
                        return out[start..at + end].to_string();
                    }
                }
                GuestMessage::Exited { id: i, status } if i == id => {
                    panic!("{id} exited ({status:?}): {out}")
                }
                GuestMessage::StartFailed { id: i, error } => panic!("{i}: {error:?}"),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {until:?} from {id}: {out}"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `count N at T` -> (N, T).
fn count_and_time(line: &str) -> (u32, u64) {
    let words: Vec<&str> = line.split_whitespace().collect();
    (words[1].parse().unwrap(), words[3].parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_a_pod_hibernates_into_a_sealed_snapshot_and_wakes_with_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    let (cfg, spec, serials) = node(dir.path());
    let mut pod = PodVm::boot(&cfg, spec.clone()).await.unwrap();
    // The shell keeps a counter and a marker (made at run time, so the
    // image does not hold it) in its memory.
    let script = "marker=HIBERNATE-MARKER-$((6*7)); n=0; \
                  while read line; do n=$((n+1)); echo \"count $n at $(date +%s) $marker\"; done";
    pod.send(&HostMessage::StartContainer(ContainerSpec {
        id: "c".into(),
        hostname: "counter".into(),
        mounts: podvisor_proto::image_mounts(&serials),
        process: ProcessSpec {
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            terminal: None,
            stdin: true,
        },
        runtime: None,
    }))
    .await
    .unwrap();
    for _ in 0..2 {
        pod.send(&HostMessage::Stdin {
            id: "c".into(),
            data: b"tick\n".to_vec(),
        })
        .await
        .unwrap();
    }
    let line = line_with(&mut pod, "c", "count 2 ").await;
    assert!(line.contains("HIBERNATE-MARKER-42"), "{line}");

    // A snapshot that cannot be written (a 1 MiB file system): the pod
    // runs on, its memory as it was, and nothing is left behind.
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    let _unmount = Unmount(full.clone());
    nix::mount::mount(
        Some("tmpfs"),
        &full,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m,mode=0700"),
    )
    .unwrap();
    let failed = podvisor_hibernate::hibernate(pod, &full, CONTEXT)
        .await
        .expect_err("1 MiB cannot hold the snapshot");
    let message = podvisor_errors::chain(&failed.error);
    assert!(
        message.contains("the pod runs on") && message.contains("No space left on device"),
        "{message}"
    );
    let mut pod = failed.pod.expect("the pod still runs");
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 0, "no file left");
    pod.send(&HostMessage::Stdin {
        id: "c".into(),
        data: b"tick\n".to_vec(),
    })
    .await
    .unwrap();
    line_with(&mut pod, "c", "count 3 ").await;

    // Hibernate: the state into a sealed file, the VM gone.
    let snapshots = dir.path().join("snapshots");
    let started = Instant::now();
    let pid = pod.vmm_pid();
    let (snapshot, key) = podvisor_hibernate::hibernate(pod, &snapshots, CONTEXT)
        .await
        .unwrap();
    let save_time = started.elapsed();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the VM's QEMU is gone"
    );
    let path = snapshot.path.clone();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&snapshots), mode(&path)), (0o700, 0o600));
    println!(
        "hibernate: guest RAM {MEMORY_MIB} MiB, state {:.1} MiB, sealed file {:.1} MiB, saved in {save_time:?}",
        snapshot.state_bytes as f64 / 1048576.0,
        snapshot.sealed_bytes as f64 / 1048576.0,
    );
    assert!(snapshot.sealed_bytes < snapshot.state_bytes);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        snapshot.sealed_bytes
    );

    // The marker is in the state the VMM wrote, not in the file.
    let sealed = std::fs::read(&path).unwrap();
    let marker = b"HIBERNATE-MARKER-42";
    assert!(!sealed.windows(marker.len()).any(|w| w == marker));
    let mut state = Vec::new();
    OpenedSnapshot::open(File::open(&path).unwrap(), &key, CONTEXT)
        .unwrap()
        .read_to_end(&mut state)
        .unwrap();
    assert_eq!(state.len() as u64, snapshot.state_bytes);
    assert!(
        state.windows(marker.len()).any(|w| w == marker),
        "the guest's memory holds the marker"
    );
    drop(state);

    // One changed byte: refused before any VM starts.
    let mut tampered = sealed.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x20;
    let tampered_path = dir.path().join("tampered.sealed");
    std::fs::write(&tampered_path, &tampered).unwrap();
    let err = OpenedSnapshot::open(File::open(&tampered_path).unwrap(), &key, CONTEXT)
        .err()
        .expect("a tampered snapshot is refused");
    assert!(err.to_string().contains("authentication"), "{err}");

    // The tampered copy in the snapshot's place: refused before any VM.
    let tampered_snapshot = podvisor_hibernate::Snapshot {
        path: tampered_path.clone(),
        ..snapshot.clone()
    };
    // The pod wakes as itself, with the snapshot's key.
    let wake_from = |snapshot| podvisor_hibernate::WakeFrom {
        snapshot,
        key: &key,
        context: CONTEXT,
        hostname: "counter",
        timeout: Duration::from_secs(30),
    };
    let err = podvisor_hibernate::wake(&cfg, spec.clone(), wake_from(&tampered_snapshot), async {})
        .await
        .err()
        .expect("a tampered snapshot does not wake");
    assert!(
        matches!(err, podvisor_hibernate::HibernateError::Refused { .. }),
        "{err}"
    );
    assert!(
        !Path::new(&cfg.run_dir.join("pods").join("counter")).exists(),
        "no VM was started for it"
    );

    // Asleep a while, then woken: same VM, same memory, its own identity
    // again (which steps the clock).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let started = Instant::now();
    let mut pod = podvisor_hibernate::wake(&cfg, spec, wake_from(&snapshot), async {})
        .await
        .unwrap();
    let wake_time = started.elapsed();
    pod.send(&HostMessage::Stdin {
        id: "c".into(),
        data: b"tick\n".to_vec(),
    })
    .await
    .unwrap();
    let line = line_with(&mut pod, "c", "count 4 ").await;
    let (n, guest_time) = count_and_time(&line);
    assert_eq!(n, 4, "{line}");
    let host_time = now();
    assert!(
        guest_time.abs_diff(host_time) <= 2,
        "the guest clock ({guest_time}) is the host's ({host_time})"
    );
    println!("wake: sealed snapshot opened and loaded, identity set in {wake_time:?}");
    pod.kill().await;
    podvisor_hibernate::pod::remove(&snapshot).unwrap();
    assert!(!path.exists());
}

/// Unmounts a test's file system when dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}
