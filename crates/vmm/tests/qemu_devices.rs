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
    let cgroup_dirs = confined(vm.pid(), &spec);

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
    // Its control group went with it, though another process started it.
    for dir in cgroup_dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

/// The field `name` of `/proc/PID/status`.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Checks what confines a QEMU process: its seccomp filter, no new
/// privileges, no core dumps, and a control group (when the machine
/// mounts a usable hierarchy) with the limits its VM implies. Returns the
/// group's directories.
fn confined(pid: u32, spec: &VmSpec) -> Vec<PathBuf> {
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "QEMU runs without its seccomp filter"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );
    let Ok(root) = podvisor_vmm::cgroup::CgroupRoot::detect() else {
        eprintln!("no cgroup hierarchy with memory, pids and cpu: group not checked");
        return vec![];
    };
    let group = podvisor_vmm::cgroup::VmCgroup::of_process(&root, pid)
        .unwrap_or_else(|| panic!("QEMU {pid} is in none of podvisor's control groups"));
    assert_eq!(group.name(), spec.name);
    let dirs = group.dirs();
    let read = |file: &str| -> String {
        dirs.iter()
            .map(|d| d.join(file))
            .find(|p| p.exists())
            .map(|p| std::fs::read_to_string(p).unwrap().trim().to_string())
            .unwrap_or_else(|| panic!("no {file} in {dirs:?}"))
    };
    // Guest RAM plus the VMM's overhead, and nothing unbounded.
    let memory: u64 = if dirs.len() == 1 {
        read("memory.max").parse().unwrap()
    } else {
        read("memory.limit_in_bytes").parse().unwrap()
    };
    assert!(
        memory > spec.memory_mib << 20 && memory <= (spec.memory_mib + 512) << 20,
        "memory limit {memory}"
    );
    let pids: u64 = read("pids.max").parse().unwrap();
    assert!((spec.cpus as u64..=1024).contains(&pids), "pids.max {pids}");
    for dir in &dirs {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "{pid} not in {}",
            dir.display()
        );
    }
    dirs
}
