//! Whole command lines: a template's and its clone's, and VMs with many
//! devices of every kind.

use std::sync::Arc;

use super::*;
use crate::device::{BlockDevice, Device, NetworkDevice, PciAddress, PciLayout, PmemDevice};

fn layers(n: usize) -> Vec<Device> {
    (0..n)
        .map(|i| {
            Device::Block(BlockDevice {
                id: format!("layer{i}"),
                path: format!("/c/l{i}.erofs").into(),
                read_only: true,
                serial: format!("pvl{i}"),
            })
        })
        .collect()
}

fn spec(dir: &str, memory: MemoryBacking, disks: usize) -> VmSpec {
    let mut devices = Device::pod_basics("io.podvisor.agent.0");
    devices.extend(layers(disks));
    VmSpec {
        name: "t".into(),
        cpus: 1,
        memory_mib: 256,
        memory,
        memory_merge: false,
        kernel: "/boot/vmlinuz".into(),
        initramfs: "/c/initrd".into(),
        kernel_cmdline: "console=ttyS0".into(),
        devices,
        pci: PciLayout::default(),
        run_dir: dir.into(),
        accel: Accel::Tcg,
        die_with_parent: true,
        netns: None,
    }
}

fn args(spec: &VmSpec, incoming: bool) -> Vec<String> {
    Qemu::command_line(spec, incoming)
        .unwrap()
        .0
        .args()
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect()
}

#[test]
fn a_clone_has_its_templates_devices_its_own_paths_and_private_ram() {
    let ram = PathBuf::from("/dev/shm/podvisor/t.ram");
    let template = spec(
        "/run/pods/tmpl",
        MemoryBacking::File {
            path: ram.clone(),
            shared: true,
        },
        2,
    );
    let clone = spec(
        "/run/pods/clone",
        MemoryBacking::File {
            path: ram,
            shared: false,
        },
        2,
    );
    let t = args(&template, false);
    let c = args(&clone, true);
    assert!(t.contains(&"pc,memory-backend=ram0,mem-merge=off".to_string()));
    assert!(
        t.contains(
            &"memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/podvisor/t.ram,share=on"
                .to_string()
        )
    );
    assert!(
        c.contains(
            &"memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/podvisor/t.ram,share=off"
                .to_string()
        )
    );
    assert_eq!(&c[c.len() - 3..], ["-S", "-incoming", "defer"]);
    // Apart from paths, sharing and the incoming flags, nothing differs.
    let normalize = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|a| {
                a.replace("/run/pods/clone", "DIR")
                    .replace("/run/pods/tmpl", "DIR")
                    .replace("share=off", "share=?")
                    .replace("share=on", "share=?")
            })
            .collect()
    };
    assert_eq!(normalize(&t), normalize(&c[..c.len() - 3]));
    assert!(c.contains(
        &"virtio-blk-pci,drive=layer1,id=dev-layer1,serial=pvl1,bus=pci.0,addr=0x5".to_string()
    ));
    // The usual addresses: agent 2, rng 3, disks from 4.
    assert!(c.contains(&"virtio-serial-pci,id=vserial0,bus=pci.0,addr=0x2".to_string()));
    assert!(c.contains(&"virtio-rng-pci,rng=rng0,bus=pci.0,addr=0x3".to_string()));
}

#[test]
fn cold_boots_use_anonymous_ram_and_many_disks_get_bridges() {
    let a = args(&spec("/r", MemoryBacking::Anonymous, 0), false);
    assert!(!a.iter().any(|x| x.contains("memory-backend")));
    assert!(a.contains(&"pc,mem-merge=off".to_string()));
    assert!(!a.iter().any(|x| x.contains("pci-bridge")));

    // 40 disks do not fit on the root bus: one bridge in slot 31, the
    // rest of the disks behind it.
    let (cl, slots) = Qemu::command_line(&spec("/r", MemoryBacking::Anonymous, 40), false).unwrap();
    assert_eq!(slots.bridges(), 1);
    let a: Vec<String> = cl
        .args()
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect();
    let bridge = a.iter().position(|x| x.starts_with("pci-bridge")).unwrap();
    let first_disk = a
        .iter()
        .position(|x| x.starts_with("virtio-blk-pci"))
        .unwrap();
    assert!(
        bridge < first_disk,
        "the bridge's bus exists before devices name it"
    );
    assert!(a.contains(
        &"virtio-blk-pci,drive=layer39,id=dev-layer39,serial=pvl39,bus=pci.1,addr=0xd".to_string()
    ));
    assert_eq!(
        slots.address_of("layer26"),
        Some(PciAddress { bus: 0, slot: 30 })
    );
    assert_eq!(
        slots.address_of("layer27"),
        Some(PciAddress { bus: 1, slot: 1 })
    );

    let err = Qemu::command_line(&spec("/r", MemoryBacking::Anonymous, 200), false).unwrap_err();
    assert!(err.to_string().contains("no free PCI slot"), "{err}");
}

#[test]
fn guest_ram_is_mergeable_only_when_the_spec_asks() {
    let machine = |spec: &VmSpec| {
        let a = args(spec, false);
        let at = a.iter().position(|x| x == "-machine").unwrap();
        a[at + 1].clone()
    };
    let mut cold = spec("/r", MemoryBacking::Anonymous, 0);
    assert_eq!(machine(&cold), "pc,mem-merge=off");
    cold.memory_merge = true;
    assert_eq!(machine(&cold), "pc,mem-merge=on");
    // A clone maps its template's RAM file privately; its RAM is not
    // merged either unless asked.
    let clone = spec(
        "/r",
        MemoryBacking::File {
            path: "/dev/shm/t.ram".into(),
            shared: false,
        },
        0,
    );
    assert_eq!(machine(&clone), "pc,memory-backend=ram0,mem-merge=off");
}

#[test]
fn free_page_reporting_never_reaches_a_privately_mapped_ram_file() {
    let with_reporting = |memory| {
        let mut s = spec("/r", memory, 0);
        s.devices.push(Device::FreePageReporting);
        s
    };
    let a = args(&with_reporting(MemoryBacking::Anonymous), false);
    assert!(
        a.iter()
            .any(|x| x.starts_with("virtio-balloon-pci,id=balloon,free-page-reporting=on,"))
    );
    // QEMU 7.2 discards reported pages of a file by punching holes into
    // it: a clone's private mapping of its template's RAM file would
    // punch them into the template.
    let err = Qemu::command_line(
        &with_reporting(MemoryBacking::File {
            path: "/dev/shm/t.ram".into(),
            shared: false,
        }),
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("free page reporting"), "{err}");
}

#[test]
fn a_restored_vm_keeps_the_saved_slots_of_hot_plugged_devices() {
    // The template booted with one disk and hot-plugged two more after
    // removing the first: its layout is not the one a fresh boot gives.
    let layout = PciLayout {
        bridges: 1,
        slots: [
            ("agent", 2),
            ("rng", 3),
            ("layer1", 4),
            ("layer0", 5),
            ("layer2", 9),
        ]
        .into_iter()
        .map(|(id, slot)| (id.to_string(), PciAddress { bus: 0, slot }))
        .collect(),
    };
    let mut clone = spec("/r", MemoryBacking::Anonymous, 3);
    clone.pci = layout.clone();
    let (cl, slots) = Qemu::command_line(&clone, true).unwrap();
    assert_eq!(slots.layout(), layout);
    let a: Vec<String> = cl
        .args()
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect();
    assert!(a.contains(
        &"virtio-blk-pci,drive=layer0,id=dev-layer0,serial=pvl0,bus=pci.0,addr=0x5".to_string()
    ));
    assert!(a.contains(
        &"virtio-blk-pci,drive=layer2,id=dev-layer2,serial=pvl2,bus=pci.0,addr=0x9".to_string()
    ));
    assert!(
        a.contains(&"pci-bridge,id=pci.1,chassis_nr=1,shpc=off,bus=pci.0,addr=0x1f".to_string())
    );
}

#[test]
fn network_pmem_and_bad_specs() {
    let tap: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&tap);
    let mut s = spec("/r", MemoryBacking::Anonymous, 1);
    s.devices.push(Device::Network(NetworkDevice {
        id: "eth0".into(),
        tap: Tap::Fd(Arc::new(tap)),
        mac: "02:00:0a:58:00:05".parse().unwrap(),
        mtu: Some(1450),
    }));
    s.devices.push(Device::Pmem(PmemDevice {
        id: "dax0".into(),
        path: "/c/l0.erofs".into(),
        size_bytes: 6 << 20,
        read_only: true,
    }));
    let a = args(&s, false);
    assert!(a.contains(&format!("tap,id=eth0,fd={raw},vhost=off")));
    assert!(a.contains(&"virtio-net-pci,netdev=eth0,id=dev-eth0,mac=02:00:0a:58:00:05,host_mtu=1450,bus=pci.0,addr=0x5".to_string()));
    assert!(a.contains(&"virtio-pmem-pci,memdev=dax0,id=dev-dax0,bus=pci.0,addr=0x6".to_string()));
    // The file itself, shared and read-only: every VM mapping it shares the
    // host's page cache, and no guest can change it.
    assert!(
        a.contains(
            &"memory-backend-file,id=dax0,size=6M,mem-path=/c/l0.erofs,share=on,readonly=on"
                .to_string()
        ),
        "{a:?}"
    );
    // The pmem region needs memory hot-plug room beyond RAM.
    assert!(a.contains(&"256M,slots=2,maxmem=262M".to_string()), "{a:?}");

    let mut dup = spec("/r", MemoryBacking::Anonymous, 2);
    dup.devices.extend(layers(1));
    let err = Qemu::command_line(&dup, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid VM spec: two devices have the id \"layer0\""
    );

    let mut odd = spec("/r", MemoryBacking::Anonymous, 0);
    odd.devices.push(Device::Pmem(PmemDevice {
        id: "dax0".into(),
        path: "/c/x".into(),
        size_bytes: 3 << 20,
        read_only: true,
    }));
    let err = Qemu::command_line(&odd, false).unwrap_err();
    assert!(
        err.to_string().contains("not a positive multiple of 2 MiB"),
        "{err}"
    );

    let mut bad_id = spec("/r", MemoryBacking::Anonymous, 0);
    bad_id.devices.push(Device::Block(BlockDevice {
        id: "layer,0".into(),
        path: "/c/x".into(),
        read_only: true,
        serial: "pvl0".into(),
    }));
    assert!(Qemu::command_line(&bad_id, false).is_err());

    let mut two_consoles = spec("/r", MemoryBacking::Anonymous, 0);
    two_consoles.devices.push(Device::Console);
    let err = Qemu::command_line(&two_consoles, false).unwrap_err();
    assert!(err.to_string().contains("at most one console"), "{err}");
}
