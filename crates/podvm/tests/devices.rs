//! Devices of a running pod VM (QEMU, the real guest kernel and agent): a
//! disk hot-plugged after boot is usable by a container, a disk is removed
//! again once the guest released it and its slot is reused, and a state
//! saved with the VM left running does not disturb the pod.

use std::time::Duration;

use podvisor_image::LayerCache;
use podvisor_podvm::{NodeConfig, PodVm, PodVmSpec, layer_disks};
use podvisor_proto::{ContainerSpec, ExitStatus, GuestMessage, HostMessage, ProcessSpec};
use podvisor_testbed::oci::ImageBuilder;
use podvisor_vmm::{AfterSave, BlockDevice, Device, PciAddress};

/// Layer disk `i` on `path`, as a pod VM names it.
fn layer_disk(i: usize, path: std::path::PathBuf) -> BlockDevice {
    BlockDevice {
        id: format!("layer{i}"),
        path,
        read_only: true,
        serial: podvisor_image::layer_serial(i),
    }
}

/// Runs `sh -c script` as a container on `layers`; returns its stdout and
/// exit status.
async fn run(pod: &mut PodVm, id: &str, layers: &[&str], script: &str) -> (String, ExitStatus) {
    let container = ContainerSpec {
        id: id.into(),
        hostname: "devices".into(),
        mounts: podvisor_proto::image_mounts(
            &layers.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ),
        process: ProcessSpec {
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![],
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
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match pod.next_event().await.expect("pod event") {
                GuestMessage::Output { id: i, data, .. } if i == id => {
                    out.push_str(&String::from_utf8_lossy(&data))
                }
                GuestMessage::Exited { id: i, status } if i == id => return status,
                GuestMessage::StartFailed { id: i, error } if i == id => {
                    panic!("{id} failed to start: {error:?}")
                }
                _ => {}
            }
        }
    })
    .await
    .map(|status| (out.clone(), status))
    .unwrap_or_else(|_| panic!("{id} did not exit"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_disks_come_and_go_and_a_running_save_keeps_the_pod() {
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    let mut cfg = NodeConfig::with_defaults(podvisor_vmm::AccelChoice::resolve(None).accel);
    cfg.cache_dir = dir.path().join("cache");
    cfg.run_dir = dir.path().join("run");
    let archive = dir.path().join("img.tar");
    ImageBuilder::new()
        .busybox_layer()
        .write_oci_archive(&archive)
        .unwrap();
    let cache = LayerCache::open(&cfg.cache_dir).unwrap();
    let image = podvisor_image::import(&cache, &archive, None).unwrap();
    let mut layers = podvisor_image::LayerAttachments::default();
    assert_eq!(layers.add_image(&image), ["pvl0"]);
    let guest = podvisor_guest::prepare(&podvisor_guest::GuestOptions {
        kernel: None,
        agent: None,
        extra_modules: vec![],
        cache_dir: cfg.cache_dir.clone(),
    })
    .unwrap();
    let mut pod = PodVm::boot(
        &cfg,
        PodVmSpec {
            id: "devicestest".into(),
            cpus: 1,
            memory_mib: 192,
            guest,
            devices: layer_disks(&layers)
                .into_iter()
                .map(Device::Block)
                .collect(),
            pci: Default::default(),
            memory: podvisor_vmm::MemoryBacking::Anonymous,
            memory_merge: false,
            die_with_parent: true,
            netns: None,
        },
    )
    .await
    .unwrap();
    let at = |slot| PciAddress { bus: 0, slot };
    assert_eq!(pod.pci_layout().slots["layer0"], at(4));
    // Free page reporting takes the highest free root slot, leaving the
    // low ones to hot-plugging.
    assert!(pod.pci_layout().slots["balloon"].slot > 20);

    // The image's layer again, as a second disk: a container runs on it.
    let layer = image.layers[0].path.clone();
    let added = pod
        .add_device(Device::Block(layer_disk(1, layer.clone())))
        .await
        .unwrap();
    assert_eq!(added, at(5));
    let (out, status) = run(&mut pod, "on-hotplugged", &["pvl1"], "echo hello from pvl1").await;
    assert_eq!(
        (out.as_str(), status),
        ("hello from pvl1\n", ExitStatus::Code(0))
    );

    // A disk nothing mounted is removed once the guest let go of it: the
    // guest no longer lists it, and its slot is taken by the next disk.
    pod.add_device(Device::Block(layer_disk(2, layer.clone())))
        .await
        .unwrap();
    let serials = "cat /sys/block/vd*/serial; echo";
    let (out, _) = run(&mut pod, "serials.1", &["pvl0"], serials).await;
    assert!(out.contains("pvl2"), "{out}");
    pod.remove_device("layer2").await.unwrap();
    assert!(!pod.pci_layout().slots.contains_key("layer2"));
    let (out, _) = run(&mut pod, "serials.2", &["pvl0"], serials).await;
    assert!(!out.contains("pvl2"), "{out}");
    let readded = pod
        .add_device(Device::Block(layer_disk(3, layer)))
        .await
        .unwrap();
    assert_eq!(readded, at(6));

    // A checkpoint: the state is saved and the VM runs on, with a new
    // agent channel.
    let state = dir.path().join("checkpoint.state");
    let sink = std::fs::File::create(&state).unwrap();
    let written = pod
        .save_state(Box::new(sink), AfterSave::Running)
        .await
        .unwrap();
    assert!(written > 0);
    assert_eq!(std::fs::metadata(&state).unwrap().len(), written);
    let (out, status) = run(&mut pod, "after-save", &["pvl3"], "echo still here").await;
    assert_eq!(
        (out.as_str(), status),
        ("still here\n", ExitStatus::Code(0))
    );
    pod.shutdown(Duration::from_secs(5)).await;
}

struct VmReaper(std::path::PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}
