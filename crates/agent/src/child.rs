//! The container side of a start: what runs in the cloned child.
//!
//! The child (PID 1 of the container's new PID namespace) builds the
//! container's root from a prepared [`ChildPlan`], `pivot_root`s into it and
//! sets the hostname. It then forks the main process and stays as a minimal
//! init: it reaps orphans, forwards signals to the main process, and when
//! the main process ends writes its wait status to the status pipe and exits
//! (which makes the kernel kill the rest of the namespace). The main process
//! sets up stdio (and the controlling terminal), drops to the container's
//! user and `execve`s.
//!
//! Why an init of our own: the kernel protects a namespace's init from
//! signals it has no handler for, so a command running as PID 1 could not
//! be killed with `kill -9 $$` from inside, would ignore SIGTERM from
//! `Stop`, and would leave zombies (docker's `--init` has the same reason).
//!
//! Everything here runs after `clone` and before `execve`: it only makes
//! system calls on prepared data and reports failures as a fixed-size
//! [`Failure`] record on a close-on-exec pipe.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::MntFlags;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use crate::mounts::{self, Op};
use crate::syscall::{LinuxSyscall, Syscall};

/// Where in the start sequence a child failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    /// A step of the rootfs plan (index in [`Failure::index`]).
    Rootfs = 1,
    PivotRoot = 2,
    Hostname = 3,
    Cwd = 4,
    Fork = 5,
    Terminal = 6,
    Stdio = 7,
    Groups = 8,
    Gid = 9,
    Uid = 10,
    Exec = 11,
    /// The child panicked (a bug).
    Panic = 12,
    /// An exec could not enter the container's namespaces.
    Setns = 13,
}

impl Step {
    fn from_u32(v: u32) -> Option<Step> {
        use Step::*;
        [
            Rootfs, PivotRoot, Hostname, Cwd, Fork, Terminal, Stdio, Groups, Gid, Uid, Exec, Panic,
            Setns,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

/// A failure before `execve`, as sent over the error pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub step: Step,
    /// Index of the failed step of the rootfs plan, else 0.
    pub index: u32,
    pub errno: Errno,
}

/// Size of an encoded [`Failure`].
pub const FAILURE_LEN: usize = 12;

impl Failure {
    pub(crate) fn new(step: Step, errno: Errno) -> Self {
        Failure {
            step,
            index: 0,
            errno,
        }
    }

    /// The fixed-size record written to the error pipe.
    pub fn encode(&self) -> [u8; FAILURE_LEN] {
        let mut out = [0u8; FAILURE_LEN];
        out[..4].copy_from_slice(&(self.step as u32).to_ne_bytes());
        out[4..8].copy_from_slice(&self.index.to_ne_bytes());
        out[8..].copy_from_slice(&(self.errno as i32).to_ne_bytes());
        out
    }

    /// Decodes a record read from the error pipe.
    pub fn decode(bytes: &[u8]) -> Option<Failure> {
        let word = |i: usize| u32::from_ne_bytes(bytes.get(i..i + 4)?.try_into().ok()?).into();
        let step: Option<u32> = word(0);
        let index: Option<u32> = word(4);
        let errno: Option<u32> = word(8);
        Some(Failure {
            step: Step::from_u32(step?)?,
            index: index?,
            errno: Errno::from_raw(errno? as i32),
        })
    }
}

/// The stdio of the main process.
#[derive(Debug, Clone, Copy)]
pub enum Stdio {
    /// Pipes (or `/dev/null` for stdin): dup'ed to 0, 1, 2.
    Pipes {
        stdin: RawFd,
        stdout: RawFd,
        stderr: RawFd,
    },
    /// A pty slave: becomes the controlling terminal and 0, 1, 2.
    Terminal { slave: RawFd },
}

/// Everything the child needs, prepared by the agent before `clone`.
#[derive(Debug)]
pub struct ChildPlan {
    /// Mounts and nodes to make in the new mount namespace.
    pub rootfs_ops: Vec<Op>,
    /// The overlay mount to `pivot_root` into.
    pub rootfs: PathBuf,
    pub hostname: String,
    /// The working directory and its ancestors, outermost first, to create
    /// (as root, like docker) if missing.
    pub cwd_dirs: Vec<PathBuf>,
    pub cwd: PathBuf,
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    pub exe: CString,
    /// Owns the strings `argv_ptrs` points into.
    pub argv: Vec<CString>,
    /// Owns the strings `envp_ptrs` points into.
    pub envp: Vec<CString>,
    /// Null-terminated pointer arrays for `execve`, built by [`ChildPlan::new`].
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    pub stdio: Stdio,
    /// Write end of the error pipe (close-on-exec).
    pub error_fd: RawFd,
    /// Write end of the status pipe (the init reports the main exit here).
    pub status_fd: RawFd,
}

/// The parts of a [`ChildPlan`] that are not pointer arrays.
#[derive(Debug)]
pub struct ChildPlanParts {
    pub rootfs_ops: Vec<Op>,
    pub rootfs: PathBuf,
    pub hostname: String,
    pub cwd_dirs: Vec<PathBuf>,
    pub cwd: PathBuf,
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    pub exe: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub stdio: Stdio,
    pub error_fd: RawFd,
    pub status_fd: RawFd,
}

impl ChildPlan {
    /// Builds the plan and its `execve` pointer arrays.
    pub fn new(p: ChildPlanParts) -> Self {
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        ChildPlan {
            argv_ptrs: ptrs(&p.argv),
            envp_ptrs: ptrs(&p.envp),
            rootfs_ops: p.rootfs_ops,
            rootfs: p.rootfs,
            hostname: p.hostname,
            cwd_dirs: p.cwd_dirs,
            cwd: p.cwd,
            uid: p.uid,
            gid: p.gid,
            groups: p.groups,
            exe: p.exe,
            argv: p.argv,
            envp: p.envp,
            stdio: p.stdio,
            error_fd: p.error_fd,
            status_fd: p.status_fd,
        }
    }
}

/// Builds the container's root and enters it: the rootfs plan, then
/// `pivot_root(".", ".")` from the new root (no directory for the old root
/// needed), detach the old root, set the hostname, create the working
/// directory.
pub fn enter_container(sys: &dyn Syscall, plan: &ChildPlan) -> Result<(), Failure> {
    mounts::apply(sys, &plan.rootfs_ops).map_err(|(index, errno)| Failure {
        step: Step::Rootfs,
        index: index as u32,
        errno,
    })?;
    let pivot = |e| Failure::new(Step::PivotRoot, e);
    sys.chdir(&plan.rootfs).map_err(pivot)?;
    sys.pivot_root(Path::new("."), Path::new("."))
        .map_err(pivot)?;
    sys.umount2(Path::new("."), MntFlags::MNT_DETACH)
        .map_err(pivot)?;
    sys.chdir(Path::new("/")).map_err(pivot)?;
    sys.sethostname(&plan.hostname)
        .map_err(|e| Failure::new(Step::Hostname, e))?;
    for dir in &plan.cwd_dirs {
        match sys.mkdir(dir, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(Failure::new(Step::Cwd, e)),
        }
    }
    sys.chdir(&plan.cwd).map_err(|e| Failure::new(Step::Cwd, e))
}

/// Switches to the container's user: supplementary groups, then gid, then
/// uid (the order that keeps the privilege to do each).
pub fn drop_privileges(sys: &dyn Syscall, plan: &ChildPlan) -> Result<(), Failure> {
    sys.setgroups(&plan.groups)
        .map_err(|e| Failure::new(Step::Groups, e))?;
    sys.setresgid(plan.gid)
        .map_err(|e| Failure::new(Step::Gid, e))?;
    sys.setresuid(plan.uid)
        .map_err(|e| Failure::new(Step::Uid, e))
}

/// Writes a failure to the error pipe and exits with 127.
pub(crate) fn fail(fd: RawFd, failure: Failure) -> ! {
    let record = failure.encode();
    // SAFETY: plain write and _exit on valid memory.
    unsafe {
        libc::write(fd, record.as_ptr().cast(), record.len());
        libc::_exit(127)
    }
}

/// Signals the init does not take over: faults of its own.
const SYNC_SIGNALS: [libc::c_int; 6] = [
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGABRT,
    libc::SIGSYS,
];

/// The entry point of the cloned child. Never returns.
pub fn child_main(plan: &ChildPlan) -> ! {
    // `run_init` only returns by unwinding from a panic (a bug): report it
    // rather than unwind into the agent's copy of the stack.
    let _panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_init(plan)));
    fail(
        plan.error_fd,
        Failure::new(Step::Panic, Errno::UnknownErrno),
    )
}

fn run_init(plan: &ChildPlan) -> ! {
    // SAFETY: the calls below are async-signal-safe system calls on
    // prepared data; the agent is single-threaded so the child owns its copy
    // of the address space.
    unsafe {
        close_other_fds(plan);
        libc::umask(0);
        if let Err(f) = enter_container(&LinuxSyscall, plan) {
            fail(plan.error_fd, f);
        }
        libc::umask(0o022);

        // Take every signal synchronously (they stay queued for sigwaitinfo),
        // except faults of our own.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for sig in SYNC_SIGNALS {
            libc::sigdelset(&mut set, sig);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());

        let main = libc::fork();
        if main < 0 {
            fail(plan.error_fd, Failure::new(Step::Fork, Errno::last()));
        }
        if main == 0 {
            exec_main(plan);
        }
        // The init: keep nothing of the container's stdio or the error pipe,
        // so they close when the main process closes them.
        libc::close(plan.error_fd);
        match plan.stdio {
            Stdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                libc::close(stdin);
                libc::close(stdout);
                libc::close(stderr);
            }
            Stdio::Terminal { slave } => {
                libc::close(slave);
            }
        }
        init_loop(main, plan.status_fd, &set)
    }
}

/// Closes every descriptor the child inherited from the agent except
/// stdio 0-2 (the console) and the plan's own. The init never execs, so
/// close-on-exec does not protect it: without this it would keep, say,
/// the write end of another container's stdin open.
fn close_other_fds(plan: &ChildPlan) {
    let mut keep = [plan.error_fd, plan.status_fd, -1, -1, -1];
    match plan.stdio {
        Stdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => keep[2..].copy_from_slice(&[stdin, stdout, stderr]),
        Stdio::Terminal { slave } => keep[2] = slave,
    }
    keep.sort_unstable();
    let mut next: libc::c_uint = 3;
    for fd in keep {
        if fd < next as RawFd {
            continue;
        }
        if fd > next as RawFd {
            // SAFETY: closes descriptors this process does not use.
            unsafe { libc::syscall(libc::SYS_close_range, next, fd as libc::c_uint - 1, 0) };
        }
        next = fd as libc::c_uint + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, next, libc::c_uint::MAX, 0) };
}

/// Reaps and forwards signals until the main process ends; then reports its
/// wait status and exits.
unsafe fn init_loop(main: libc::pid_t, status_fd: RawFd, set: &libc::sigset_t) -> ! {
    loop {
        // SAFETY: see run_init.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(set, &mut info);
            if sig < 0 {
                continue;
            }
            if sig != libc::SIGCHLD {
                libc::kill(main, sig);
                continue;
            }
            loop {
                let mut status = 0;
                let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                if pid <= 0 {
                    break;
                }
                if pid == main {
                    let bytes = status.to_ne_bytes();
                    libc::write(status_fd, bytes.as_ptr().cast(), bytes.len());
                    libc::_exit(0);
                }
            }
        }
    }
}

/// Moves `fd` to `target` without close-on-exec.
unsafe fn install(fd: RawFd, target: RawFd) -> Result<(), Errno> {
    // SAFETY: fcntl/dup2 on descriptors the child owns.
    let r = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    Errno::result(r).map(drop)
}

/// The main process: stdio, terminal, user, exec. Also the last part of
/// an exec's child (see the exec module).
pub(crate) unsafe fn exec_main(plan: &ChildPlan) -> ! {
    // SAFETY: see run_init.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // Rust ignores SIGPIPE in the agent; the program gets the default.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        let stdio = match plan.stdio {
            Stdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => install(stdin, 0)
                .and_then(|_| install(stdout, 1))
                .and_then(|_| install(stderr, 2)),
            Stdio::Terminal { slave } => {
                if libc::setsid() < 0 || libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
                    fail(plan.error_fd, Failure::new(Step::Terminal, Errno::last()));
                }
                install(slave, 0)
                    .and_then(|_| install(slave, 1))
                    .and_then(|_| install(slave, 2))
            }
        };
        if let Err(e) = stdio {
            fail(plan.error_fd, Failure::new(Step::Stdio, e));
        }
        if let Err(f) = drop_privileges(&LinuxSyscall, plan) {
            fail(plan.error_fd, f);
        }
        libc::execve(
            plan.exe.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        );
        fail(plan.error_fd, Failure::new(Step::Exec, Errno::last()))
    }
}

#[cfg(test)]
#[path = "child_tests.rs"]
mod tests;
