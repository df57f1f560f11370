//! A real pod VM saved into a sealed snapshot, its QEMU gone, and loaded
//! back from it: the container's state in guest memory (a counter a shell
//! keeps) is there, the guest clock is the host's again once the identity
//! step has run, a marker string that the guest holds in memory is in the
//! state but not in the file, and a snapshot with one changed byte is
//! refused before any VM starts. Prints the sizes and times.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use podvisor_hibernate::{OpenedSnapshot, SealedWriter, SnapshotKey};
use podvisor_image::LayerCache;
use podvisor_podvm::{LoadSpec, NodeConfig, PodVm, PodVmSpec, layer_disks};
use podvisor_proto::{ContainerSpec, GuestMessage, HostMessage, ProcessSpec};
use podvisor_testbed::oci::ImageBuilder;
use podvisor_vmm::{AfterSave, Device, MemoryBacking};

const MEMORY_MIB: u64 = 192;
const CONTEXT: &[u8] = b"pod default/counter uid-counter";

struct VmReaper(std::path::PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}

fn node(dir: &Path) -> (NodeConfig, PodVmSpec, Vec<String>) {
    let mut cfg = NodeConfig::with_defaults(podvisor_vmm::AccelChoice::resolve(None).accel);
    cfg.cache_dir = dir.join("cache");
    cfg.run_dir = dir.join("run");
    let archive = dir.join("img.tar");
    ImageBuilder::new()
        .busybox_layer()
        .write_oci_archive(&archive)
        .unwrap();
    let cache = LayerCache::open(&cfg.cache_dir).unwrap();
    let image = podvisor_image::import(&cache, &archive, None).unwrap();
    let guest =
        podvisor_guest::prepare(&podvisor_guest::GuestOptions::new(&cfg.cache_dir)).unwrap();
    let mut layers = podvisor_image::LayerAttachments::default();
    let serials = layers.add_image(&image);
    let spec = PodVmSpec {
        id: "counter".into(),
        cpus: 1,
        memory_mib: MEMORY_MIB,
        guest,
        devices: layer_disks(&layers)
            .into_iter()
            .map(Device::Block)
            .collect(),
        pci: Default::default(),
        netns: None,
        memory: MemoryBacking::Anonymous,
        die_with_parent: true,
    };
    (cfg, spec, serials)
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
async fn vm_a_sealed_snapshot_brings_the_pod_vm_back_with_its_memory() {
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

    // Hibernate: the state into a sealed file, the VM gone.
    let key = SnapshotKey::generate().unwrap();
    let path = dir.path().join("snapshot.sealed");
    let writer = SealedWriter::new(File::create(&path).unwrap(), &key, CONTEXT)
        .unwrap()
        .shared();
    let started = Instant::now();
    let saved = pod
        .save_state(Box::new(writer.clone()), AfterSave::Paused)
        .await
        .unwrap();
    let (file, summary) = writer.finish().unwrap();
    file.sync_all().unwrap();
    let save_time = started.elapsed();
    assert_eq!(summary.state_bytes, saved);
    let pci = pod.pci_layout();
    let agent = pod.agent.clone();
    let pid = pod.vmm_pid();
    pod.kill().await;
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the VM's QEMU is gone"
    );
    println!(
        "hibernate: guest RAM {MEMORY_MIB} MiB, state {:.1} MiB, sealed file {:.1} MiB, saved in {save_time:?}",
        summary.state_bytes as f64 / 1048576.0,
        summary.sealed_bytes as f64 / 1048576.0,
    );
    assert!(summary.sealed_bytes < summary.state_bytes);

    // The marker is in the state the VMM wrote, not in the file.
    let sealed = std::fs::read(&path).unwrap();
    let marker = b"HIBERNATE-MARKER-42";
    assert!(!sealed.windows(marker.len()).any(|w| w == marker));
    let mut state = Vec::new();
    OpenedSnapshot::open(File::open(&path).unwrap(), &key, CONTEXT)
        .unwrap()
        .read_to_end(&mut state)
        .unwrap();
    assert_eq!(state.len() as u64, summary.state_bytes);
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

    // Asleep a while, then woken: same VM, same memory.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let started = Instant::now();
    let opened = OpenedSnapshot::open(File::open(&path).unwrap(), &key, CONTEXT).unwrap();
    let mut spec = spec;
    spec.pci = pci;
    let mut pod = PodVm::load(
        &cfg,
        spec,
        LoadSpec {
            state: Box::new(opened),
            agent,
        },
    )
    .await
    .unwrap();
    // Its own identity again (same hostname), which steps the clock.
    pod.set_identity("counter", Duration::from_secs(30))
        .await
        .unwrap();
    let wake_time = started.elapsed();
    pod.send(&HostMessage::Stdin {
        id: "c".into(),
        data: b"tick\n".to_vec(),
    })
    .await
    .unwrap();
    let line = line_with(&mut pod, "c", "count 3 ").await;
    let (n, guest_time) = count_and_time(&line);
    assert_eq!(n, 3, "{line}");
    let host_time = now();
    assert!(
        guest_time.abs_diff(host_time) <= 2,
        "the guest clock ({guest_time}) is the host's ({host_time})"
    );
    println!("wake: sealed snapshot opened and loaded, identity set in {wake_time:?}");
    pod.kill().await;
}
