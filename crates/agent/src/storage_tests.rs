//! Making shared and container mounts through the recording syscall seam
//! and a fake disk finder.

use std::cell::RefCell;
use std::time::Duration;

use nix::errno::Errno;
use podvisor_proto::{MountSource, MountTarget, image_mounts};

use super::*;
use crate::disks::DiskNotFound;
use crate::syscall::RecordingSyscall;

/// Disks `vda`, `vdb`, … by serial; records every lookup.
#[derive(Default)]
struct FakeDisks {
    serials: Vec<&'static str>,
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
    let plan = inside_plan(&FakeDisks::default(), &[&mounts[0], &mounts[1]], &dirs).unwrap();
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
    let e = inside_plan(&FakeDisks::default(), &[&on("/top")], &dirs).unwrap_err();
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
    let e = inside_plan(&FakeDisks::default(), &[&volume], &dirs).unwrap_err();
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
