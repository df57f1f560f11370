//! A real pod VM whose layers are on virtio-pmem (mounted with DAX)
//! hibernated and woken: the layers' files read the same before and after
//! (the guest maps them at the addresses it knew), the container's memory
//! survives, and the snapshot leaves the layers out (they are in their
//! files).

use std::path::Path;
use std::time::Duration;

use podvisor_podvm::image_boot::ImageBoot;
use podvisor_podvm::{LayerBus, PodVm};
use podvisor_proto::{ContainerSpec, GuestMessage, HostMessage, ProcessSpec};
use podvisor_testbed::oci::{Entry, ImageBuilder, incompressible, sha256_digest};

const MEMORY_MIB: u64 = 192;
/// The layer file the container reads, bigger than what the guest's RAM
/// gives the snapshot once compressed.
const DATA_MIB: u64 = 48;
const CONTEXT: &[u8] = b"pod default/reader uid-reader";

struct VmReaper(std::path::PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}

/// Output of container `id` until a line containing `until`; that line.
async fn line_with(pod: &mut PodVm, id: &str, until: &str) -> String {
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match pod.next_event().await.expect("pod event") {
                GuestMessage::Output { id: i, data, .. } if i == id => {
                    out.push_str(&String::from_utf8_lossy(&data));
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

async fn tick(pod: &mut PodVm) {
    pod.send(&HostMessage::Stdin {
        id: "c".into(),
        data: b"tick\n".to_vec(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_a_pod_with_dax_layers_hibernates_and_wakes_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    let data = incompressible((DATA_MIB << 20) as usize, "hibernate-dax");
    let sha = sha256_digest(&data)
        .trim_start_matches("sha256:")
        .to_string();
    let archive = dir.path().join("img.tar");
    ImageBuilder::new()
        .busybox_layer()
        .layer(vec![
            Entry::dir("app"),
            Entry::file("app/data", data, 0o644),
        ])
        .write_oci_archive(&archive)
        .unwrap();
    let mut boot = ImageBoot::prepare_on(dir.path(), &archive, LayerBus::Pmem).unwrap();
    // As the host daemon boots pods that may hibernate: freed pages are
    // zeros, which the snapshot does not carry.
    boot.cfg.extra_kernel_args.push("init_on_free=1".into());
    let spec = boot.spec("reader", MEMORY_MIB, vec![]);
    let mut pod = PodVm::boot(&boot.cfg, spec.clone()).await.unwrap();
    // Each line in: a count (kept in the shell's memory) and the data's hash.
    let script = "n=0; while read line; do n=$((n+1)); \
                  echo \"count $n $(busybox sha256sum /app/data)\"; done";
    pod.send(&HostMessage::StartContainer(ContainerSpec {
        id: "c".into(),
        hostname: "reader".into(),
        mounts: boot.mounts(),
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
    tick(&mut pod).await;
    let line = line_with(&mut pod, "c", "count 1 ").await;
    assert!(line.contains(&sha), "{line}");
    assert!(
        pod.console_tail(64 << 10).contains("mounted with DAX"),
        "{}",
        pod.console_tail(64 << 10)
    );

    let snapshots = dir.path().join("snapshots");
    let (snapshot, key) = podvisor_hibernate::hibernate(pod, &snapshots, CONTEXT)
        .await
        .unwrap();
    println!(
        "hibernate with DAX layers: guest RAM {MEMORY_MIB} MiB, layer file {DATA_MIB} MiB, \
         state {:.1} MiB, sealed file {:.1} MiB",
        snapshot.state_bytes as f64 / 1048576.0,
        snapshot.sealed_bytes as f64 / 1048576.0,
    );
    // The incompressible layer file is not in it: the sealed snapshot is
    // smaller than that file alone.
    assert!(
        snapshot.sealed_bytes < DATA_MIB << 20,
        "the snapshot ({} bytes) holds the layers",
        snapshot.sealed_bytes
    );

    let from = podvisor_hibernate::WakeFrom {
        snapshot: &snapshot,
        key: &key,
        context: CONTEXT,
        hostname: "reader",
        timeout: Duration::from_secs(60),
    };
    let mut pod = podvisor_hibernate::wake(&boot.cfg, spec, from, async {})
        .await
        .unwrap();
    tick(&mut pod).await;
    let line = line_with(&mut pod, "c", "count 2 ").await;
    assert!(line.contains(&sha), "after the wake: {line}");
    pod.kill().await;
    podvisor_hibernate::pod::remove(&snapshot).unwrap();
    assert!(!Path::new(&snapshot.path).exists());
}
