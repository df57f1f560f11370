//! Checks and plans of the mounts a host lists.

use podvisor_proto::image_mounts;

use super::*;
use crate::syscall::RecordingSyscall;

fn tmpfs(path: &str, options: &[&str]) -> Mount {
    Mount {
        source: MountSource::Anonymous,
        fstype: "tmpfs".into(),
        target: MountTarget::Container { path: path.into() },
        options: options.iter().map(|o| o.to_string()).collect(),
        read_only: false,
    }
}

fn bind(name: &str, path: &str, read_only: bool) -> Mount {
    Mount {
        source: MountSource::Shared { name: name.into() },
        fstype: "bind".into(),
        target: MountTarget::Container { path: path.into() },
        options: vec![],
        read_only,
    }
}

/// The image's mounts (layer `pvl0` and the root over it) followed by `more`.
fn with(more: Vec<Mount>) -> Vec<Mount> {
    let mut mounts = image_mounts(&["pvl0".into()]);
    mounts.extend(more);
    mounts
}

fn refusal(mounts: &[Mount]) -> String {
    let e = check_container(mounts).unwrap_err();
    assert_eq!(e.kind, StartErrorKind::InvalidSpec, "{}", e.message);
    e.message
}

fn calls(ops: &[Op]) -> Vec<String> {
    let sys = RecordingSyscall::new();
    mounts::apply(&sys, ops).unwrap();
    sys.calls()
}

#[test]
fn overlay_lists_lower_layers_top_first() {
    let dirs = ContainerDirs::new("c1");
    let root = Mount::overlay_root(vec!["pvl0".into(), "pvl1".into(), "pvl2".into()]);
    let plan = ops(&root, None, &dirs.rootfs, &dirs).unwrap();
    let [Op::Mount(overlay)] = plan.as_slice() else {
        panic!("one mount expected: {plan:?}");
    };
    assert_eq!(
        overlay.target,
        Path::new("/run/podvisor/containers/c1/rootfs")
    );
    assert_eq!(
        overlay.data.as_deref(),
        Some(
            "lowerdir=/run/podvisor/layers/pvl2:/run/podvisor/layers/pvl1:/run/podvisor/layers/pvl0,\
             upperdir=/run/podvisor/containers/c1/upper,workdir=/run/podvisor/containers/c1/work"
        )
    );
}

#[test]
fn an_image_and_mounts_inside_are_sorted_by_where_they_go() {
    let mounts = with(vec![tmpfs("/tmp", &[]), bind("pvl0", "/srv/base", true)]);
    let checked = check_container(&mounts).unwrap();
    assert_eq!(checked.shared, [&mounts[0]]);
    assert_eq!(checked.root, &mounts[1]);
    assert_eq!(checked.inside, [&mounts[2], &mounts[3]]);
}

#[test]
fn a_container_needs_exactly_one_root_before_its_inner_mounts() {
    assert_eq!(refusal(&[]), "the container has no root mount");
    assert_eq!(
        refusal(&[Mount::layer("pvl0")]),
        "the container has no root mount"
    );
    let mut two = image_mounts(&["pvl0".into()]);
    two.push(Mount::overlay_root(vec!["pvl0".into()]));
    assert_eq!(refusal(&two), "the container has more than one root mount");
    let mut early = vec![Mount::layer("pvl0"), tmpfs("/tmp", &[])];
    early.push(Mount::overlay_root(vec!["pvl0".into()]));
    assert_eq!(
        refusal(&early),
        "the mount on \"/tmp\" is listed before the container's root"
    );
}

#[test]
fn targets_outside_the_container_root_are_refused() {
    for (path, why) in [
        ("tmp", "the target is not an absolute path"),
        ("/../etc", "the target has a `.` or `..` component"),
        ("/srv/../../etc", "the target has a `.` or `..` component"),
        ("/srv/./data", "the target has a `.` or `..` component"),
        ("/", "the target is the container's root itself"),
        ("//", "the target is the container's root itself"),
        ("/a\0b", "the target is not a usable path"),
    ] {
        assert_eq!(
            refusal(&with(vec![tmpfs(path, &[])])),
            format!("the mount on {path:?}: {why}"),
        );
    }
}

#[test]
fn unknown_types_and_sources_that_do_not_fit_are_refused() {
    let xfs = Mount {
        fstype: "xfs".into(),
        ..tmpfs("/data", &[])
    };
    assert_eq!(
        refusal(&with(vec![xfs])),
        "the mount on \"/data\": unknown mount type \"xfs\" \
         (the agent mounts erofs, tmpfs, overlay, ext4 and bind)"
    );
    let tmpfs_from_disk = Mount {
        source: MountSource::Disk {
            serial: "pvv0".into(),
        },
        ..tmpfs("/data", &[])
    };
    assert_eq!(
        refusal(&with(vec![tmpfs_from_disk])),
        "the mount on \"/data\": a tmpfs mount cannot come from a disk (\"pvv0\")"
    );
    let writable_erofs = Mount {
        read_only: false,
        ..Mount::layer("pvl0")
    };
    assert_eq!(
        refusal(&[writable_erofs, Mount::overlay_root(vec!["pvl0".into()])]),
        "shared mount \"pvl0\": an erofs mount must be read-only"
    );
    let inner_overlay = Mount {
        target: MountTarget::Container {
            path: "/data".into(),
        },
        ..Mount::overlay_root(vec!["pvl0".into()])
    };
    assert_eq!(
        refusal(&with(vec![inner_overlay])),
        "the mount on \"/data\": an overlay can only be the container's root"
    );
    let shared_bind = Mount {
        target: MountTarget::Shared {
            name: "again".into(),
        },
        ..bind("pvl0", "/x", false)
    };
    assert_eq!(
        refusal(&with(vec![shared_bind])),
        "shared mount \"again\": a bind mount cannot be shared"
    );
}

#[test]
fn shared_mounts_are_named_once_and_before_their_use() {
    assert_eq!(
        refusal(&[
            Mount::overlay_root(vec!["pvl0".into()]),
            Mount::layer("pvl0")
        ]),
        "the container's root: shared mount \"pvl0\" is not listed before it"
    );
    assert_eq!(
        refusal(&with(vec![bind("vol", "/data", false)])),
        "the mount on \"/data\": shared mount \"vol\" is not listed before it"
    );
    let mut twice = vec![Mount::layer("pvl0")];
    twice.extend(image_mounts(&["pvl0".into()]));
    assert_eq!(refusal(&twice), "shared mount \"pvl0\": listed twice");
    assert_eq!(
        refusal(&image_mounts(&["pvl0,upperdir=/".into()])),
        "invalid shared mount name \"pvl0,upperdir=/\""
    );
    let long_serial = Mount {
        target: MountTarget::Shared {
            name: "layer0".into(),
        },
        ..Mount::layer("pvl012345678901234567")
    };
    assert_eq!(
        refusal(&[long_serial, Mount::overlay_root(vec!["layer0".into()])]),
        "shared mount \"layer0\": invalid disk serial \"pvl012345678901234567\""
    );
    let too_many: Vec<Mount> = (0..=MAX_MOUNTS)
        .map(|i| Mount::layer(format!("pvl{i}")))
        .collect();
    assert_eq!(
        check_shared(&too_many).unwrap_err().message,
        "257 mounts listed; at most 256 are allowed"
    );
}

#[test]
fn options_are_the_known_ones_of_the_type() {
    let m = tmpfs("/tmp", &["size=64m", "mode=1777", "nosuid", "nodev"]);
    assert_eq!(
        options(&m).unwrap(),
        Options {
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("size=64m,mode=1777".into()),
        }
    );
    let dax = Mount {
        options: vec!["dax=always".into()],
        ..Mount::layer("pvl0")
    };
    assert_eq!(options(&dax).unwrap().data.as_deref(), Some("dax=always"));
    for bad in [
        "size=1m,upperdir=/",
        "mode=999",
        "size=",
        "uid=0",
        "ro",
        "dax=always",
    ] {
        assert_eq!(
            refusal(&with(vec![tmpfs("/tmp", &[bad])])),
            format!(
                "the mount on \"/tmp\": mount option {bad:?} is not one the agent takes for tmpfs"
            ),
        );
    }
    let overlay_upper = Mount {
        options: vec!["upperdir=/".into()],
        ..Mount::overlay_root(vec!["pvl0".into()])
    };
    assert!(refusal(&[Mount::layer("pvl0"), overlay_upper]).contains("\"upperdir=/\""));
}

#[test]
fn a_read_only_bind_is_remounted_read_only() {
    let dirs = ContainerDirs::new("c1");
    let target = dirs.rootfs.join("srv/base");
    assert_eq!(
        calls(&ops(&bind("pvl0", "/srv/base", true), None, &target, &dirs).unwrap()),
        [
            "mount /run/podvisor/layers/pvl0 /run/podvisor/containers/c1/rootfs/srv/base - BIND|REC -",
            "mount - /run/podvisor/containers/c1/rootfs/srv/base - RDONLY|REMOUNT|BIND -",
        ]
    );
    assert_eq!(
        calls(&ops(&bind("pvl0", "/srv/base", false), None, &target, &dirs).unwrap()).len(),
        1
    );
}

#[test]
fn a_tmpfs_gets_its_options_as_data() {
    let dirs = ContainerDirs::new("c1");
    let target = dirs.rootfs.join("tmp");
    assert_eq!(
        calls(&ops(&tmpfs("/tmp", &["size=1m", "noexec"]), None, &target, &dirs).unwrap()),
        ["mount tmpfs /run/podvisor/containers/c1/rootfs/tmp tmpfs NOEXEC size=1m"]
    );
}

#[test]
fn an_overlay_of_too_many_layers_for_one_page_is_refused() {
    let dirs = ContainerDirs::new("c1");
    let lower: Vec<String> = (0..200).map(|i| format!("pvl{i}")).collect();
    let e = ops(&Mount::overlay_root(lower), None, &dirs.rootfs, &dirs).unwrap_err();
    assert_eq!(e.kind, StartErrorKind::InvalidSpec);
    assert!(
        e.message.contains("longer than 4095 bytes (200 layers)"),
        "{}",
        e.message
    );
}

fn volume(source: MountSource, name: &str) -> Mount {
    Mount {
        source,
        fstype: "ext4".into(),
        target: MountTarget::Shared { name: name.into() },
        options: vec!["nosuid".into(), "noexec".into()],
        read_only: false,
    }
}

fn sub_path(name: &str, path: &str, target: &str, read_only: bool) -> Mount {
    Mount {
        source: MountSource::SharedPath {
            name: name.into(),
            path: path.into(),
        },
        fstype: "bind".into(),
        target: MountTarget::Container {
            path: target.into(),
        },
        options: vec![],
        read_only,
    }
}

#[test]
fn volumes_are_shared_ext4_mounts_of_a_disk_or_a_mapping() {
    let plain = volume(
        MountSource::Disk {
            serial: "pvv0".into(),
        },
        "vol-plain",
    );
    let secret = volume(
        MountSource::Encrypted {
            volume: "secret".into(),
        },
        "vol-secret",
    );
    let mounts = with(vec![
        plain.clone(),
        secret.clone(),
        bind("vol-plain", "/plain", true),
        sub_path("vol-secret", "a/b", "/sub", false),
    ]);
    check_container(&mounts).unwrap();
    let dirs = ContainerDirs::new("c1");
    let target = Path::new("/run/podvisor/layers/vol-secret");
    let plan = ops(
        &secret,
        Some(Path::new("/dev/mapper/pv-secret")),
        target,
        &dirs,
    )
    .unwrap();
    assert_eq!(
        calls(&plan),
        ["mount /dev/mapper/pv-secret /run/podvisor/layers/vol-secret ext4 NOSUID|NODEV|NOEXEC -"]
    );
    // A sub-path binds its staged directory, read-only by a remount.
    let staged = Path::new("/run/podvisor/containers/c1/subpaths/0");
    let ro = sub_path("vol-secret", "a/b", "/sub", true);
    assert_eq!(
        calls(&ops(&ro, Some(staged), Path::new("/r/sub"), &dirs).unwrap()),
        [
            "mount /run/podvisor/containers/c1/subpaths/0 /r/sub - BIND|REC -",
            "mount - /r/sub - RDONLY|REMOUNT|BIND -",
        ]
    );
    assert_eq!(
        volumes_used(&mounts).into_iter().collect::<Vec<_>>(),
        ["plain", "secret"]
    );
}

#[test]
fn bad_volume_mounts_and_sub_paths_are_refused() {
    let inside = Mount {
        target: MountTarget::Container {
            path: "/data".into(),
        },
        ..volume(MountSource::Encrypted { volume: "v".into() }, "x")
    };
    assert!(refusal(&with(vec![inside])).contains("can only be a shared mount"));
    let bad_name = volume(
        MountSource::Encrypted {
            volume: "../v".into(),
        },
        "vol-v",
    );
    assert!(refusal(&with(vec![bad_name])).contains("invalid volume name"));
    let option = Mount {
        options: vec!["data=journal".into()],
        ..volume(
            MountSource::Disk {
                serial: "pvv0".into(),
            },
            "vol-v",
        )
    };
    assert!(refusal(&with(vec![option])).contains("not one the agent takes"));
    let tmp = Mount {
        target: MountTarget::Shared {
            name: "vol-t".into(),
        },
        ..tmpfs("/x", &["size=1m"])
    };
    for (path, why) in [
        ("/etc", "is not relative"),
        ("a/../../etc", "`.` or `..`"),
        ("./a", "`.` or `..`"),
        ("", "empty"),
    ] {
        let m = with(vec![tmp.clone(), sub_path("vol-t", path, "/d", false)]);
        let e = refusal(&m);
        assert!(e.contains(why), "{path:?}: {e}");
    }
    let long = "a/".repeat(2049);
    assert!(
        refusal(&with(vec![
            tmp.clone(),
            sub_path("vol-t", &long, "/d", false)
        ]))
        .contains("too long")
    );
    // The shared mount must be listed before.
    assert!(
        refusal(&with(vec![sub_path("vol-t", "a", "/d", false)])).contains("not listed before")
    );
}

#[test]
fn a_pmem_layer_needs_a_uuid_and_read_only() {
    let uuid = "01234567-89ab-cdef-0123-456789abcdef";
    let mut mounts = podvisor_proto::pmem_image_mounts(&[("pvl0".into(), uuid.into())]);
    let checked = check_container(&mounts).unwrap();
    assert_eq!(checked.shared.len(), 1);
    assert_eq!(pmem(checked.shared[0]), Some(uuid));
    let o = options(checked.shared[0]).unwrap();
    assert_eq!(o.flags, MsFlags::MS_RDONLY | MsFlags::MS_NODEV);
    assert_eq!(o.data.as_deref(), Some("dax=always"));

    for bad in [
        "",
        "/dev/pmem0",
        "01234567-89AB-cdef-0123-456789abcdef",
        "x,dax=never",
    ] {
        mounts[0].source = MountSource::Pmem { uuid: bad.into() };
        assert!(
            refusal(&mounts).contains("invalid EROFS UUID"),
            "{bad:?}: {}",
            refusal(&mounts)
        );
    }
    mounts[0].source = MountSource::Pmem { uuid: uuid.into() };
    mounts[0].read_only = false;
    assert!(refusal(&mounts).contains("must be read-only"));
    mounts[0].read_only = true;
    mounts[0].fstype = "ext4".into();
    assert!(refusal(&mounts).contains("cannot come from a pmem device"));
}
