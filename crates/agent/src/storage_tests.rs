//! Making shared and container mounts through the recording syscall seam
//! and a fake disk finder.

use std::cell::RefCell;
use std::time::Duration;

use nix::errno::Errno;
use std::os::fd::OwnedFd;

use podvisor_proto::{MountSource, MountTarget, image_mounts};

use super::*;
use crate::disks::DiskNotFound;
use crate::syscall::RecordingSyscall;

/// Disks `vda`, `vdb`, … by serial, and pmem devices `pmem0`, … by
/// EROFS UUID (DAX on for those in `dax`); records every lookup.
#[derive(Default)]
struct FakeDisks {
    serials: Vec<&'static str>,
    uuids: Vec<&'static str>,
    dax: Vec<&'static str>,
    looked_up: RefCell<Vec<String>>,
}

impl FakeDisks {
    fn with(serials: &[&'static str]) -> Self {
        FakeDisks {
            serials: serials.to_vec(),
            ..Default::default()
        }
    }
}

impl DiskFinder for FakeDisks {
    fn find(&self, serial: &str) -> Result<PathBuf, DiskNotFound> {
        self.looked_up.borrow_mut().push(serial.to_string());
        match self.serials.iter().position(|s| *s == serial) {
            Some(i) => Ok(PathBuf::from(format!(
                "/dev/vd{}",
                (b'a' + i as u8) as char
            ))),
            None => Err(DiskNotFound {
                serial: serial.to_string(),
                waited_ms: Duration::from_secs(5).as_millis() as u64,
            }),
        }
    }

    fn find_pmem(&self, uuid: &str) -> Result<PathBuf, crate::disks::PmemNotFound> {
        self.looked_up.borrow_mut().push(uuid.to_string());
        match self.uuids.iter().position(|u| *u == uuid) {
            Some(i) => Ok(PathBuf::from(format!("/dev/pmem{i}"))),
            None => Err(crate::disks::PmemNotFound {
                uuid: uuid.to_string(),
                waited_ms: 5000,
            }),
        }
    }

    fn dax(&self, target: &Path) -> Option<bool> {
        let name = target.file_name()?.to_str()?;
        Some(self.dax.contains(&name))
    }
}

const UUID0: &str = "00000000-1111-2222-3333-444444444444";
const UUID1: &str = "55555555-6666-7777-8888-999999999999";

#[test]
fn a_pmem_layer_is_found_by_uuid_and_mounted_read_only_with_dax() {
    let sys = RecordingSyscall::new();
    let disks = FakeDisks {
        uuids: vec![UUID0, UUID1],
        dax: vec!["pvl1"],
        ..Default::default()
    };
    let mut shared = SharedMounts::default();
    let (l0, l1) = (
        Mount::layer_pmem("pvl0", UUID1),
        Mount::layer_pmem("pvl1", UUID0),
    );
    shared.make(&sys, &disks, &[&l0, &l1]).unwrap();
    shared.make(&sys, &disks, &[&l0, &l1]).unwrap();
    assert_eq!(
        mounts_only(&sys),
        [
            "mount /dev/pmem1 /run/podvisor/layers/pvl0 erofs RDONLY|NODEV dax=always",
            "mount /dev/pmem0 /run/podvisor/layers/pvl1 erofs RDONLY|NODEV dax=always",
        ]
    );
    assert_eq!(*disks.looked_up.borrow(), [UUID1, UUID0]);

    let missing = Mount::layer_pmem("pvl2", "77777777-6666-7777-8888-999999999999");
    let e = shared.make(&sys, &disks, &[&missing]).unwrap_err();
    assert_eq!(e.kind, StartErrorKind::Mount);
    assert_eq!(
        e.message,
        "shared mount \"pvl2\": no pmem device holds the EROFS file system with UUID \
         77777777-6666-7777-8888-999999999999 after 5000 ms"
    );
}

fn mounts_only(sys: &RecordingSyscall) -> Vec<String> {
    sys.calls()
        .into_iter()
        .filter(|c| c.starts_with("mount"))
        .collect()
}

#[test]
fn layer_is_mounted_read_only_as_erofs() {
    let sys = RecordingSyscall::new();
    let layer = Mount::layer("pvl0");
    SharedMounts::default()
        .make(&sys, &FakeDisks::with(&["pvl0"]), &[&layer])
        .unwrap();
    assert_eq!(
        sys.calls(),
        [
            "mkdir /run/podvisor 755",
            "mkdir /run/podvisor/layers 755",
            "mkdir /run/podvisor/layers/pvl0 755",
            "mount /dev/vda /run/podvisor/layers/pvl0 erofs RDONLY|NODEV -",
        ]
    );
}

#[test]
fn each_shared_mount_is_made_once_however_many_containers_use_it() {
    let sys = RecordingSyscall::new();
    let disks = FakeDisks::with(&["pvl0", "pvl1"]);
    let mut shared = SharedMounts::default();
    let (l0, l1) = (Mount::layer("pvl0"), Mount::layer("pvl1"));
    shared.make(&sys, &disks, &[&l0]).unwrap();
    shared.make(&sys, &disks, &[&l0, &l1]).unwrap();
    assert_eq!(
        mounts_only(&sys),
        [
            "mount /dev/vda /run/podvisor/layers/pvl0 erofs RDONLY|NODEV -",
            "mount /dev/vdb /run/podvisor/layers/pvl1 erofs RDONLY|NODEV -",
        ]
    );
    // A made mount does not even wait for its disk again.
    assert_eq!(*disks.looked_up.borrow(), ["pvl0", "pvl1"]);
}

#[test]
fn another_mount_under_a_made_name_is_refused() {
    let sys = RecordingSyscall::new();
    let disks = FakeDisks::with(&["pvl0", "pvl1"]);
    let mut shared = SharedMounts::default();
    shared.make(&sys, &disks, &[&Mount::layer("pvl0")]).unwrap();
    let other = Mount {
        source: MountSource::Disk {
            serial: "pvl1".into(),
        },
        ..Mount::layer("pvl0")
    };
    let e = shared.make(&sys, &disks, &[&other]).unwrap_err();
    assert_eq!(e.kind, StartErrorKind::InvalidSpec);
    assert_eq!(
        e.message,
        "shared mount \"pvl0\" is already made from another mount"
    );
    assert_eq!(mounts_only(&sys).len(), 1);
}

#[test]
fn a_missing_disk_or_a_failed_mount_is_a_mount_error_and_is_tried_again() {
    let sys = RecordingSyscall::new().fail("mount /dev/vdb", Errno::EINVAL);
    let disks = FakeDisks::with(&["pvl0", "pvl1"]);
    let mut shared = SharedMounts::default();
    let e = shared
        .make(&sys, &disks, &[&Mount::layer("pvl9")])
        .unwrap_err();
    assert_eq!(e.kind, StartErrorKind::Mount);
    assert_eq!(
        e.message,
        "shared mount \"pvl9\": disk with serial \"pvl9\" not found in /sys/block after 5000 ms"
    );
    let e = shared
        .make(&sys, &disks, &[&Mount::layer("pvl1")])
        .unwrap_err();
    assert_eq!(e.kind, StartErrorKind::Mount);
    assert_eq!(
        e.message,
        "shared mount pvl1 (/dev/vdb): mount erofs on /run/podvisor/layers/pvl1: EINVAL: Invalid argument"
    );
    // Neither counts as made: the next request tries again.
    let _ = shared.make(&sys, &disks, &[&Mount::layer("pvl9")]);
    assert_eq!(*disks.looked_up.borrow(), ["pvl9", "pvl1", "pvl9"]);
}

#[test]
fn the_root_can_come_straight_from_a_disk() {
    let dirs = ContainerDirs::new("c1");
    let root = Mount {
        target: MountTarget::Root,
        ..Mount::layer("pvl3")
    };
    let plan = root_plan(&FakeDisks::with(&["pvl0", "pvl3"]), &root, &dirs).unwrap();
    let sys = RecordingSyscall::new();
    mounts::apply(&sys, &plan).unwrap();
    assert_eq!(
        sys.calls(),
        ["mount /dev/vdb /run/podvisor/containers/c1/rootfs erofs RDONLY|NODEV -"]
    );
}

/// Container dirs whose root is a real directory of the test.
fn dirs_in(dir: &Path) -> ContainerDirs {
    ContainerDirs {
        base: dir.to_path_buf(),
        rootfs: dir.join("rootfs"),
        pts: dir.join("pts"),
    }
}

#[test]
fn mounts_inside_make_their_directories_and_follow_symlinks_inside_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = dirs_in(tmp.path());
    std::fs::create_dir_all(dirs.rootfs.join("srv")).unwrap();
    // Absolute and climbing links in the image stay inside its root.
    std::os::unix::fs::symlink("/srv", dirs.rootfs.join("data")).unwrap();
    std::os::unix::fs::symlink("../../../..", dirs.rootfs.join("up")).unwrap();
    let mounts = [
        Mount {
            source: MountSource::Anonymous,
            fstype: "tmpfs".into(),
            target: MountTarget::Container {
                path: "/data/cache".into(),
            },
            options: vec!["size=1m".into()],
            read_only: false,
        },
        Mount {
            source: MountSource::Shared {
                name: "pvl0".into(),
            },
            fstype: "bind".into(),
            target: MountTarget::Container {
                path: "/up/base".into(),
            },
            options: vec![],
            read_only: true,
        },
    ];
    let plan = inside_plan(&FakeDisks::default(), &[&mounts[0], &mounts[1]], &dirs, &[]).unwrap();
    let r = dirs.rootfs.display();
    let sys = RecordingSyscall::new();
    mounts::apply(&sys, &plan).unwrap();
    assert_eq!(
        sys.calls(),
        [
            format!("mkdir {r}/srv 755"),
            format!("mkdir {r}/srv/cache 755"),
            format!("mount tmpfs {r}/srv/cache tmpfs - size=1m"),
            format!("mkdir {r}/base 755"),
            format!("mount /run/podvisor/layers/pvl0 {r}/base - BIND|REC -"),
            format!("mount - {r}/base - RDONLY|REMOUNT|BIND -"),
        ]
    );
}

#[test]
fn a_mount_inside_on_the_root_itself_or_from_a_missing_disk_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = dirs_in(tmp.path());
    std::fs::create_dir_all(&dirs.rootfs).unwrap();
    std::os::unix::fs::symlink("/", dirs.rootfs.join("top")).unwrap();
    let on = |path: &str| Mount {
        source: MountSource::Anonymous,
        fstype: "tmpfs".into(),
        target: MountTarget::Container { path: path.into() },
        options: vec![],
        read_only: false,
    };
    let e = inside_plan(&FakeDisks::default(), &[&on("/top")], &dirs, &[]).unwrap_err();
    assert_eq!(e.kind, StartErrorKind::InvalidSpec);
    assert_eq!(
        e.message,
        "the mount target \"/top\" resolves to the container's root"
    );
    let volume = Mount {
        source: MountSource::Disk {
            serial: "pvv0".into(),
        },
        fstype: "erofs".into(),
        read_only: true,
        ..on("/data")
    };
    let e = inside_plan(&FakeDisks::default(), &[&volume], &dirs, &[]).unwrap_err();
    assert_eq!(e.kind, StartErrorKind::Mount);
    assert!(
        e.message
            .starts_with("the mount on \"/data\": disk with serial \"pvv0\" not found")
    );
    // The spec checks would have let both through: these are found only
    // in the mounted root and at the disk lookup.
    let mut spec = image_mounts(&["pvl0".into()]);
    spec.extend([on("/top"), volume]);
    assert!(crate::mount_spec::check_container(&spec).is_ok());
}

#[test]
fn an_encrypted_volume_that_is_not_open_is_a_mount_failure() {
    let m = Mount {
        source: MountSource::Encrypted {
            volume: "secret".into(),
        },
        fstype: "ext4".into(),
        target: MountTarget::Shared {
            name: "vol-secret".into(),
        },
        options: vec![],
        read_only: false,
    };
    let sys = RecordingSyscall::new();
    let e = SharedMounts::default()
        .make(&sys, &FakeDisks::default(), &[&m])
        .unwrap_err();
    assert_eq!(e.kind, StartErrorKind::Mount);
    assert_eq!(
        e.message,
        "shared mount \"vol-secret\": encrypted volume secret is not open"
    );
    assert!(sys.calls().is_empty());
}

/// Kubernetes CVE-2017-1002101: a sub-path through a symbolic link the
/// container planted in the volume must not lead out of it.
#[test]
fn sub_paths_never_leave_their_shared_mount() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let volume = tmp.path().join("volume");
    let outside = tmp.path().join("etc");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("shadow"), "secret").unwrap();
    symlink("../../etc", volume.join("up")).unwrap();
    symlink(&outside, volume.join("abs")).unwrap();
    symlink("/proc/self/root", volume.join("magic")).unwrap();
    let proc_path = |fd: &OwnedFd| {
        use std::os::fd::AsRawFd;
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
    };
    // Missing directories are made inside the volume.
    let fd = open_beneath(&volume, "a/b/c").unwrap();
    assert_eq!(proc_path(&fd), volume.join("a/b/c"));
    assert!(volume.join("a/b/c").is_dir());
    // `../../etc` stays inside: the volume's own `etc`; while that does not
    // exist the link dangles and the sub-path is refused.
    assert!(open_beneath(&volume, "up/x").is_err());
    std::fs::create_dir(volume.join("etc")).unwrap();
    let fd = open_beneath(&volume, "up/x").unwrap();
    assert_eq!(proc_path(&fd), volume.join("etc/x"));
    // An absolute link to the real directory's path is looked up inside
    // the volume, where it does not exist: refused, nothing made outside.
    assert!(open_beneath(&volume, "abs/x").is_err());
    assert!(!outside.join("x").exists());
    // Magic links are refused outright.
    assert!(open_beneath(&volume, "magic/etc").is_err());
}

#[test]
fn a_sub_path_is_bound_through_its_descriptor_and_staged() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = dirs_in(tmp.path());
    // The shared mount as the agent would have made it.
    let shared = crate::mount_spec::shared_dir("vol-t");
    let Ok(()) = std::fs::create_dir_all(&shared) else {
        return; // not root: /run/podvisor is not ours
    };
    let m = Mount {
        source: MountSource::SharedPath {
            name: "vol-t".into(),
            path: "sub".into(),
        },
        fstype: "bind".into(),
        target: MountTarget::Container { path: "/d".into() },
        options: vec![],
        read_only: true,
    };
    let sys = RecordingSyscall::new();
    let staged = stage_shared_paths(&sys, &[&m], &dirs).unwrap();
    assert_eq!(staged, [dirs.base.join("subpaths/0")]);
    let calls = sys.calls();
    assert!(calls[2].starts_with("mount /proc/self/fd/"), "{calls:?}");
    assert!(calls[2].ends_with("subpaths/0 - BIND -"), "{calls:?}");
    let plan = inside_plan(&FakeDisks::default(), &[&m], &dirs, &staged).unwrap();
    assert!(plan.iter().any(
        |op| matches!(op, Op::Mount(mm) if mm.source.as_deref() == Some(staged[0].as_path()))
    ));
    let _ = std::fs::remove_dir(shared.join("sub"));
}

#[test]
fn closing_a_volume_unmounts_only_its_shared_mounts() {
    let encrypted = Mount {
        source: MountSource::Encrypted {
            volume: "secret".into(),
        },
        fstype: "ext4".into(),
        target: MountTarget::Shared {
            name: "vol-secret".into(),
        },
        options: vec![],
        read_only: false,
    };
    struct Mapped;
    impl DiskFinder for Mapped {
        fn find(&self, serial: &str) -> Result<PathBuf, DiskNotFound> {
            FakeDisks::with(&["pvl0"]).find(serial)
        }
        fn mapping(&self, volume: &str) -> Option<PathBuf> {
            Some(PathBuf::from(format!("/dev/mapper/pv-{volume}")))
        }
    }
    let layer = Mount::layer("pvl0");
    let mut shared = SharedMounts::default();
    let sys = RecordingSyscall::new();
    shared.make(&sys, &Mapped, &[&layer, &encrypted]).unwrap();
    assert!(sys.calls().contains(
        &"mount /dev/mapper/pv-secret /run/podvisor/layers/vol-secret ext4 NODEV -".to_string()
    ));
    let sys = RecordingSyscall::new().fail("umount /run/podvisor/layers/vol-secret", Errno::EBUSY);
    let errors = shared.unmake_volume(&sys, "secret");
    assert_eq!(
        sys.calls(),
        [
            "umount /run/podvisor/layers/vol-secret",
            "umount /run/podvisor/layers/vol-secret detach",
        ]
    );
    assert_eq!(errors.len(), 1);
    assert!(
        shared
            .unmake_volume(&RecordingSyscall::new(), "secret")
            .is_empty()
    );
    // Made again once the volume is open again.
    let sys = RecordingSyscall::new();
    shared.make(&sys, &Mapped, &[&encrypted]).unwrap();
    assert!(!sys.calls().is_empty());
}
