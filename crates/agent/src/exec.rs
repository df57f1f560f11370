//! Exec: another process inside a running container, as `kubectl exec` and
//! `docker exec` start one.
//!
//! The process joins the container's namespaces through its init's
//! `/proc/<pid>/ns/*` files. The PID namespace cannot be joined by the
//! process itself (`setns` only changes where the caller's *children* go),
//! so the agent points its own children's PID namespace at the container's
//! just for the `clone` and back right after: the exec process is then a
//! direct child of the agent, reaped by its usual SIGCHLD handling, and
//! dies with the container (the kernel kills a PID namespace's members when
//! its init ends). The cloned child joins the mount, UTS and IPC namespaces
//! (joining the mount namespace moves it into the container's root),
//! creates and enters the working directory, and finishes like a container's
//! main process: stdio or terminal, user switch, `execve`.
//!
//! User, environment and program are resolved in the container's root as
//! for a container start; a terminal comes from the container's devpts.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use podvisor_proto::{ExecSpec, StartError, StartErrorKind};

use crate::child::{self, ChildPlan, ChildPlanParts, Failure, Step};
use crate::mounts::ContainerDirs;
use crate::path_lookup::is_safe_name;
use crate::process::{
    Launched, cstring, describe_failure, envp, err, pipe, process_stdio, read_failure,
    resolve_process,
};
use crate::spec;
use crate::syscall::{LinuxSyscall, Syscall};

/// The namespaces an exec process joins itself, in this order. The PID
/// namespace is joined for it by the agent (see the module docs).
pub const JOINED_NAMESPACES: [(&str, CloneFlags); 3] = [
    ("mnt", CloneFlags::CLONE_NEWNS),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("ipc", CloneFlags::CLONE_NEWIPC),
];

/// Everything the exec child needs, prepared before `clone`.
#[derive(Debug)]
pub struct ExecPlan {
    /// Namespace descriptors (close-on-exec) and their kinds, joined in order.
    pub namespaces: Vec<(RawFd, CloneFlags)>,
    /// Working directory, user, program and stdio; its rootfs plan is empty.
    pub process: ChildPlan,
}

/// Rejects an exec the agent cannot act on: a bad id, no command.
pub fn validate(spec: &ExecSpec) -> Result<(), StartError> {
    let invalid = |message: String| err(StartErrorKind::InvalidSpec, message);
    if !is_safe_name(&spec.id) {
        return Err(invalid(format!("invalid exec id {:?}", spec.id)));
    }
    if spec.process.args.first().is_none_or(|a| a.is_empty()) {
        return Err(invalid("no command given (empty args)".into()));
    }
    Ok(())
}

/// What the exec child does before the common tail: join the namespaces,
/// then create (as root, like a container start) and enter the working
/// directory. Does not allocate.
pub fn enter_namespaces(sys: &dyn Syscall, plan: &ExecPlan) -> Result<(), Failure> {
    for (fd, kind) in &plan.namespaces {
        sys.setns(*fd, *kind)
            .map_err(|e| Failure::new(Step::Setns, e))?;
    }
    for dir in &plan.process.cwd_dirs {
        match sys.mkdir(dir, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(Failure::new(Step::Cwd, e)),
        }
    }
    sys.chdir(&plan.process.cwd)
        .map_err(|e| Failure::new(Step::Cwd, e))
}

/// The entry point of the cloned exec child. Never returns.
fn exec_child_main(plan: &ExecPlan) -> ! {
    if let Err(f) = enter_namespaces(&LinuxSyscall, plan) {
        child::fail(plan.process.error_fd, f);
    }
    // SAFETY: async-signal-safe system calls on prepared data; the agent is
    // single-threaded so the child owns its copy of the address space.
    unsafe { child::exec_main(&plan.process) }
}

fn open_ns(pid: i32, name: &str) -> Result<OwnedFd, StartError> {
    let path = PathBuf::from(format!("/proc/{pid}/ns/{name}"));
    nix::fcntl::open(&path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| {
        err(
            StartErrorKind::Other,
            format!("the container is gone ({}: {e})", path.display()),
        )
    })
}

/// Starts `spec` in the namespaces of the container whose init is
/// `init_pid` and whose agent-side directories are `dirs`.
pub fn launch(
    spec: &ExecSpec,
    init_pid: i32,
    dirs: &ContainerDirs,
) -> Result<Launched, StartError> {
    validate(spec)?;
    let p = &spec.process;
    let mut ns_files = Vec::new();
    for (name, kind) in JOINED_NAMESPACES {
        ns_files.push((open_ns(init_pid, name)?, kind));
    }
    let container_pid_ns = open_ns(init_pid, "pid")?;
    let own_pid_ns = open_ns(std::process::id() as i32, "pid")?;

    let r = resolve_process(p, &dirs.rootfs)?;
    let io = process_stdio(p, &dirs.pts)?;
    let (error_r, error_w) = pipe()?;
    let exe = r.exe.clone();
    let plan = ExecPlan {
        namespaces: ns_files.iter().map(|(f, k)| (f.as_raw_fd(), *k)).collect(),
        process: ChildPlan::new(ChildPlanParts {
            rootfs_ops: vec![],
            rootfs: PathBuf::from("/"),
            hostname: String::new(),
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
            status_fd: -1,
        }),
    };

    LinuxSyscall
        .setns(container_pid_ns.as_raw_fd(), CloneFlags::CLONE_NEWPID)
        .map_err(|e| {
            err(
                StartErrorKind::Other,
                format!("joining the container's PID namespace: {e}"),
            )
        })?;
    let mut stack = vec![0u8; 256 * 1024];
    // SAFETY: the agent is single-threaded, so the child (a copy of it, no
    // CLONE_VM) cannot inherit a lock held by another thread; it only runs
    // `exec_child_main` on the prepared plan and never returns.
    let cloned = unsafe {
        nix::sched::clone(
            Box::new(|| exec_child_main(&plan)),
            &mut stack,
            CloneFlags::empty(),
            Some(libc::SIGCHLD),
        )
    };
    if let Err(e) = LinuxSyscall.setns(own_pid_ns.as_raw_fd(), CloneFlags::CLONE_NEWPID) {
        // Containers started after this would nest in the wrong namespace.
        crate::log!("cannot return to the agent's PID namespace: {e}");
    }
    let pid = cloned.map_err(|e| err(StartErrorKind::Other, format!("clone: {e}")))?;
    drop(io.child_ends);
    drop(error_w);

    match read_failure(&error_r) {
        None => Ok(Launched {
            pid: pid.as_raw(),
            stdin: io.stdin,
            stdout: io.stdout,
            stderr: io.stderr,
            terminal: p.terminal.is_some(),
            status: None,
            // Execs keep their own environment: no runtime profile.
            profile: None,
        }),
        Some(failure) => {
            let _ = nix::sys::wait::waitpid(pid, None);
            Err(describe_failure(&failure, &plan.process, &exe))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::child::Stdio;
    use crate::syscall::RecordingSyscall;
    use podvisor_proto::ProcessSpec;

    fn plan(cwd: &str) -> ExecPlan {
        let cwd = PathBuf::from(cwd);
        ExecPlan {
            namespaces: vec![
                (7, CloneFlags::CLONE_NEWNS),
                (8, CloneFlags::CLONE_NEWUTS),
                (9, CloneFlags::CLONE_NEWIPC),
            ],
            process: ChildPlan::new(ChildPlanParts {
                rootfs_ops: vec![],
                rootfs: "/".into(),
                hostname: String::new(),
                cwd_dirs: spec::ancestors(&cwd),
                cwd,
                uid: Uid::from_raw(0),
                gid: Gid::from_raw(0),
                groups: vec![],
                exe: c"/bin/sh".into(),
                argv: vec![c"sh".into()],
                envp: vec![],
                stdio: Stdio::Pipes {
                    stdin: 0,
                    stdout: 1,
                    stderr: 2,
                },
                error_fd: 3,
                status_fd: -1,
            }),
        }
    }

    #[test]
    fn joins_mount_uts_ipc_then_enters_the_working_directory() {
        let sys = RecordingSyscall::new().fail("mkdir /srv", Errno::EEXIST);
        enter_namespaces(&sys, &plan("/srv/app")).unwrap();
        assert_eq!(
            sys.calls(),
            [
                "setns 7 NEWNS",
                "setns 8 NEWUTS",
                "setns 9 NEWIPC",
                "mkdir /srv 755",
                "mkdir /srv/app 755",
                "chdir /srv/app",
            ]
        );
    }

    #[test]
    fn a_failed_setns_stops_before_anything_else() {
        let sys = RecordingSyscall::new().fail("setns 8", Errno::EINVAL);
        let f = enter_namespaces(&sys, &plan("/")).unwrap_err();
        assert_eq!((f.step, f.errno), (Step::Setns, Errno::EINVAL));
        assert_eq!(sys.calls(), ["setns 7 NEWNS", "setns 8 NEWUTS"]);
        let sys = RecordingSyscall::new().fail("chdir", Errno::EACCES);
        let f = enter_namespaces(&sys, &plan("/")).unwrap_err();
        assert_eq!(f.step, Step::Cwd);
    }

    #[test]
    fn setns_failures_are_described() {
        let p = plan("/");
        let e = describe_failure(
            &Failure::new(Step::Setns, Errno::EINVAL),
            &p.process,
            "/bin/sh",
        );
        assert_eq!(
            e.message,
            "entering the container's namespaces: EINVAL: Invalid argument"
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let spec = |id: &str, args: &[&str]| ExecSpec {
            id: id.into(),
            container: "c".into(),
            process: ProcessSpec {
                args: args.iter().map(|s| s.to_string()).collect(),
                env: vec![],
                cwd: "/".into(),
                user: String::new(),
                terminal: None,
                stdin: false,
            },
        };
        assert!(validate(&spec("exec.1", &["sh"])).is_ok());
        assert!(
            validate(&spec("../x", &["sh"]))
                .unwrap_err()
                .message
                .contains("invalid exec id")
        );
        assert!(
            validate(&spec("e", &[]))
                .unwrap_err()
                .message
                .contains("no command")
        );
    }
}
