//! Tests of the child's start sequence, run through the recording syscalls.

use super::*;
use crate::mounts::{ContainerDirs, rootfs_plan};
use crate::syscall::RecordingSyscall;

fn plan() -> ChildPlan {
    let dirs = ContainerDirs::new("c1");
    ChildPlan::new(ChildPlanParts {
        rootfs_ops: rootfs_plan(&dirs),
        rootfs: dirs.rootfs.clone(),
        hostname: "web".into(),
        cwd_dirs: vec!["/srv".into(), "/srv/app".into()],
        cwd: "/srv/app".into(),
        uid: Uid::from_raw(1000),
        gid: Gid::from_raw(100),
        groups: vec![Gid::from_raw(10), Gid::from_raw(29)],
        exe: c"/bin/sh".into(),
        argv: vec![c"sh".into(), c"-c".into()],
        envp: vec![c"A=1".into()],
        stdio: Stdio::Terminal { slave: 9 },
        error_fd: 7,
        status_fd: 8,
    })
}

#[test]
fn enters_the_root_with_pivot_root_then_sets_hostname_and_cwd() {
    let sys = RecordingSyscall::new().fail("mkdir /srv 755", Errno::EEXIST);
    let p = plan();
    enter_container(&sys, &p).unwrap();
    let calls = sys.calls();
    let tail = &calls[p.rootfs_ops.len()..];
    assert_eq!(
        tail,
        [
            "chdir /run/podvisor/containers/c1/rootfs",
            "pivot_root . .",
            "umount . detach",
            "chdir /",
            "sethostname web",
            "mkdir /srv 755",
            "mkdir /srv/app 755",
            "chdir /srv/app",
        ]
    );
}

#[test]
fn failures_name_their_step() {
    let p = plan();
    let sys = RecordingSyscall::new().fail("pivot_root", Errno::EINVAL);
    assert_eq!(
        enter_container(&sys, &p).unwrap_err(),
        Failure::new(Step::PivotRoot, Errno::EINVAL)
    );
    let sys = RecordingSyscall::new().fail("mkdir /srv/app", Errno::EROFS);
    assert_eq!(enter_container(&sys, &p).unwrap_err().step, Step::Cwd);
    let sys = RecordingSyscall::new().fail("mount proc", Errno::EPERM);
    let f = enter_container(&sys, &p).unwrap_err();
    assert_eq!(
        (f.step, p.rootfs_ops[f.index as usize].describe()),
        (
            Step::Rootfs,
            "mount proc on /run/podvisor/containers/c1/rootfs/proc".to_string()
        )
    );
}

#[test]
fn privileges_drop_groups_then_gid_then_uid() {
    let sys = RecordingSyscall::new();
    drop_privileges(&sys, &plan()).unwrap();
    assert_eq!(
        sys.calls(),
        ["setgroups [10,29]", "setresgid 100", "setresuid 1000"]
    );
    let sys = RecordingSyscall::new().fail("setresuid", Errno::EPERM);
    assert_eq!(drop_privileges(&sys, &plan()).unwrap_err().step, Step::Uid);
}

#[test]
fn failure_records_round_trip() {
    let f = Failure {
        step: Step::Exec,
        index: 3,
        errno: Errno::ENOEXEC,
    };
    assert_eq!(Failure::decode(&f.encode()), Some(f));
    assert_eq!(Failure::decode(&[1, 2, 3]), None);
    assert_eq!(
        Failure::decode(&[99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        None
    );
}

#[test]
fn exec_pointer_arrays_are_null_terminated() {
    let p = plan();
    assert_eq!(p.argv_ptrs.len(), 3);
    assert!(p.argv_ptrs[2].is_null());
    assert_eq!(p.envp_ptrs.len(), 2);
    assert_eq!(p.argv_ptrs[0], p.argv[0].as_ptr());
}
