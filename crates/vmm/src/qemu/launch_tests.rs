//! Whole command lines: a template's and its clone's.

use super::*;
use crate::DiskSpec;

fn spec(dir: &str, memory: MemoryBacking, disks: usize) -> VmSpec {
    VmSpec {
        name: "t".into(),
        cpus: 1,
        memory_mib: 256,
        memory,
        kernel: "/boot/vmlinuz".into(),
        initramfs: "/c/initrd".into(),
        kernel_cmdline: "console=ttyS0".into(),
        disks: (0..disks)
            .map(|i| DiskSpec {
                path: format!("/c/l{i}.erofs").into(),
                read_only: true,
                serial: format!("pvl{i}"),
            })
            .collect(),
        run_dir: dir.into(),
        accel: Accel::Tcg,
        die_with_parent: true,
    }
}

fn args(spec: &VmSpec, incoming: bool) -> Vec<String> {
    Qemu::command_line(spec, incoming)
        .unwrap()
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
    assert!(t.contains(&"pc,memory-backend=ram0".to_string()));
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
        &"virtio-blk-pci,drive=disk1,id=dev-disk1,serial=pvl1,bus=pci.0,addr=0x5".to_string()
    ));
}

#[test]
fn cold_boots_use_anonymous_ram_and_disk_limits_are_named() {
    let a = args(&spec("/r", MemoryBacking::Anonymous, 0), false);
    assert!(!a.iter().any(|x| x.contains("memory-backend")));
    assert!(a.contains(&"pc".to_string()));
    let err = Qemu::command_line(&spec("/r", MemoryBacking::Anonymous, 29), false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid VM spec: 29 disks do not fit on the PCI bus (at most 28)"
    );
}
