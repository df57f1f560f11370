//! Real QEMU, no guest agent: a VM started in a network namespace with a
//! network card on a tap there, a bridge, devices hot-plugged into it, and
//! an adoption that finds the same slots. The guest kernel boots without an
//! init and stops at its panic (no `panic=` on the command line), which
//! keeps QEMU running for the test.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use podvisor_vmm::{
    Accel, BlockDevice, Device, MacAddress, MemoryBacking, NetworkDevice, PciAddress, PciLayout,
    Tap, VmSpec,
};

fn kernel() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// A network namespace made for the test, deleted when dropped.
struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        let name = format!("pv-vmm-test-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Netns(name))
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn disk(dir: &std::path::Path, i: usize) -> Device {
    let path = dir.join(format!("d{i}.img"));
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    Device::Block(BlockDevice {
        id: format!("layer{i}"),
        path,
        read_only: true,
        serial: format!("pvl{i}"),
    })
}

#[tokio::test]
async fn a_vm_in_a_netns_with_a_bridge_takes_devices_and_is_adopted_with_its_slots() {
    let Some(kernel) = kernel() else {
        eprintln!("skipped: no kernel in /boot");
        return;
    };
    let Some(netns) = Netns::create() else {
        eprintln!("skipped: cannot create a network namespace");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let initramfs = dir.path().join("empty.cpio");
    std::fs::write(&initramfs, b"").unwrap();
    let mut devices = Device::pod_basics("io.podvisor.agent.0");
    devices.push(Device::Network(NetworkDevice {
        id: "eth0".into(),
        tap: Tap::Name("pvtap0".into()),
        mac: "02:00:0a:58:00:05".parse::<MacAddress>().unwrap(),
        mtu: Some(1400),
    }));
    devices.push(disk(dir.path(), 0));
    let spec = VmSpec {
        name: "devices-test".into(),
        cpus: 1,
        memory_mib: 128,
        memory: MemoryBacking::Anonymous,
        memory_merge: false,
        kernel,
        initramfs,
        kernel_cmdline: "console=ttyS0".into(),
        devices,
        pci: PciLayout {
            bridges: 1,
            slots: Default::default(),
        },
        run_dir: dir.path().to_path_buf(),
        accel: Accel::Tcg,
        die_with_parent: true,
        netns: Some(netns.path()),
    };
    let qemu = podvisor_vmm::hypervisor("qemu").unwrap();
    let mut vm = qemu.launch(&spec).await.unwrap();

    // QEMU runs in the namespace and made its tap there.
    let ino = |p: PathBuf| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    assert_eq!(
        ino(format!("/proc/{}/ns/net", vm.pid()).into()),
        ino(netns.path())
    );
    let link = Command::new("ip")
        .args(["-n", &netns.0, "link", "show", "pvtap0"])
        .output()
        .unwrap();
    assert!(link.status.success(), "no tap in the namespace");
    assert!(String::from_utf8_lossy(&link.stdout).contains("mtu"));

    let at = |bus, slot| PciAddress { bus, slot };
    let layout = vm.pci_layout();
    assert_eq!(layout.bridges, 1);
    assert_eq!(layout.slots["eth0"], at(0, 4));
    assert_eq!(layout.slots["layer0"], at(0, 5));

    // Fill the root bus by hot-plugging; the next disk goes behind the
    // bridge, which QEMU accepts.
    let mut last = at(0, 0);
    for i in 1..=25 {
        last = vm.add_device(disk(dir.path(), i)).await.unwrap();
    }
    assert_eq!(last, at(0, 30));
    assert_eq!(vm.add_device(disk(dir.path(), 26)).await.unwrap(), at(1, 1));
    // A device QEMU refuses frees its slot again.
    let missing = Device::Block(BlockDevice {
        id: "missing".into(),
        path: dir.path().join("no-such-file"),
        read_only: true,
        serial: "pvl99".into(),
    });
    let err = vm.add_device(missing).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("hot-plugging block device missing"),
        "{err}"
    );
    assert_eq!(vm.add_device(disk(dir.path(), 27)).await.unwrap(), at(1, 2));

    // An adoption reads the slots back from QEMU, once the firmware has
    // numbered the bridge's bus (the kernel is writing to the console).
    let log = vm.paths().console_log.clone();
    let started = Instant::now();
    while std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no console output"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record = vm.vmm_process().unwrap();
    let layout = vm.pci_layout();
    // The launcher lets go (as a host daemon that dies): QEMU serves one
    // QMP client at a time.
    drop(vm);
    let mut adopted = qemu.adopt(&record).await.unwrap();
    assert_eq!(adopted.pci_layout(), layout);
    // The adopted VM takes devices where the launched one left off.
    assert_eq!(
        adopted.add_device(disk(dir.path(), 28)).await.unwrap(),
        at(1, 3)
    );
    tokio::time::timeout(Duration::from_secs(10), adopted.kill())
        .await
        .unwrap()
        .unwrap();
}
