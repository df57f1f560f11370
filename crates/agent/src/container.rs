//! Starting a container: resolve its process in the mounted root, size
//! its language runtime when the spec asks ([`crate::runtime_profiles`]),
//! set up stdio, `clone` the child into new mount/PID/UTS/IPC namespaces
//! with a prepared [`ChildPlan`], and learn through the close-on-exec
//! error pipe whether its `execve` succeeded.

use std::os::fd::AsRawFd;

use nix::sched::CloneFlags;
use nix::unistd::{Gid, Uid};
use podvisor_proto::{ContainerSpec, StartError, StartErrorKind};

use crate::boot::VmResources;
use crate::child::{self, ChildPlan, ChildPlanParts};
use crate::mounts::{self, ContainerDirs, Op};
use crate::process::{
    Launched, cstring, describe_failure, envp, err, pipe, process_stdio, read_failure,
    resolve_process, set_nonblocking,
};
use crate::{runtime_profiles, spec};

/// Resolves user, program and environment in the mounted root, sets up
/// stdio and clones the container.
/// `extra_rootfs_ops` run in the child after the standard root
/// ([`mounts::rootfs_plan`]): the mounts the spec lists inside the
/// container, the network files' bind mounts.
/// `vm`: what the VM left to containers at boot, which a runtime profile
/// takes its share of.
pub fn launch(
    spec: &ContainerSpec,
    dirs: &ContainerDirs,
    extra_rootfs_ops: Vec<Op>,
    vm: &VmResources,
) -> Result<Launched, StartError> {
    let p = &spec.process;
    let root = &dirs.rootfs;
    let mut r = resolve_process(p, root)?;
    // Only the main process: an exec keeps the environment it is given.
    let profile = spec
        .runtime
        .as_ref()
        .and_then(|sizing| runtime_profiles::apply(sizing, vm, root, &p.args, &mut r.env));
    let io = process_stdio(p, &dirs.pts)?;
    let (error_r, error_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    set_nonblocking(&status_r);

    let exe = r.exe.clone();
    let mut rootfs_ops = mounts::rootfs_plan(dirs);
    rootfs_ops.extend(extra_rootfs_ops);
    let plan = ChildPlan::new(ChildPlanParts {
        rootfs_ops,
        rootfs: root.clone(),
        hostname: spec.hostname.clone(),
        cwd_dirs: spec::ancestors(&r.cwd),
        cwd: r.cwd,
        uid: Uid::from_raw(r.user.uid),
        gid: Gid::from_raw(r.user.gid),
        groups: r.user.groups.iter().map(|g| Gid::from_raw(*g)).collect(),
        exe: cstring("the program path", &r.exe)?,
        argv: r.argv,
        envp: envp(&r.env)?,
        stdio: io.stdio,
        error_fd: error_w.as_raw_fd(),
        status_fd: status_w.as_raw_fd(),
    });

    let mut stack = vec![0u8; 256 * 1024];
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    // SAFETY: the agent is single-threaded, so the child (a copy of it, no
    // CLONE_VM) cannot inherit a lock held by another thread; it only runs
    // `child_main` on the prepared plan and never returns.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(|| child::child_main(&plan)),
            &mut stack,
            flags,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(|e| err(StartErrorKind::Other, format!("clone: {e}")))?;
    drop(io.child_ends);
    drop(error_w);
    drop(status_w);

    match read_failure(&error_r) {
        None => Ok(Launched {
            pid: pid.as_raw(),
            stdin: io.stdin,
            stdout: io.stdout,
            stderr: io.stderr,
            terminal: p.terminal.is_some(),
            status: Some(status_r),
            profile,
        }),
        Some(failure) => {
            // The child exits right after reporting; reap it here so the
            // event loop never sees it.
            let _ = nix::sys::wait::waitpid(pid, None);
            Err(describe_failure(&failure, &plan, &exe))
        }
    }
}
