//! What starting a container process and starting an exec process share:
//! the [`Launched`] result, resolving user, program and working directory in
//! the container's root, stdio (pipes or a pty from the container's devpts),
//! the child's failure report and exit statuses.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag};
use nix::sys::stat::Mode;
use podvisor_proto::{
    AppliedProfile, ExitStatus, ProcessSpec, StartError, StartErrorKind, TerminalSize,
};

use crate::child::{ChildPlan, FAILURE_LEN, Failure, Stdio, Step};
use crate::mounts::Op;
use crate::path_lookup::{self, resolve_in_root};
use crate::{spec, user};

/// A started container process and the agent's ends of its stdio.
#[derive(Debug)]
pub struct Launched {
    /// The container's init, in the agent's PID namespace.
    pub pid: i32,
    /// Where [`HostMessage::Stdin`](podvisor_proto::HostMessage) data goes:
    /// the stdin pipe, or the pty master. `None`: stdin is `/dev/null`.
    pub stdin: Option<OwnedFd>,
    /// stdout pipe, or the pty master (everything comes out there).
    pub stdout: OwnedFd,
    /// stderr pipe; `None` with a terminal.
    pub stderr: Option<OwnedFd>,
    /// Whether `stdin`/`stdout` are a pty master.
    pub terminal: bool,
    /// Read end of the status pipe: the init writes the main process's wait
    /// status there before exiting.
    pub status: Option<OwnedFd>,
    /// The runtime profile applied to a container's main process
    /// ([`crate::runtime_profiles`]), reported just before `Started`.
    pub profile: Option<AppliedProfile>,
}

pub(crate) fn err(kind: StartErrorKind, message: impl Into<String>) -> StartError {
    StartError {
        kind,
        message: message.into(),
    }
}

/// A pipe whose both ends are close-on-exec.
pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd), StartError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| err(StartErrorKind::Other, format!("pipe: {e}")))
}

pub(crate) fn set_nonblocking(fd: &OwnedFd) {
    let _ = nix::fcntl::fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
}

/// Sets the window size of a terminal.
pub fn set_winsize(fd: RawFd, size: TerminalSize) -> Result<(), Errno> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from valid memory.
    Errno::result(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// Opens a pty in the container's own devpts instance (so the container
/// sees its terminal in `/dev/pts`): returns (master, slave).
fn open_pty(pts: &Path, size: TerminalSize) -> Result<(OwnedFd, OwnedFd), Errno> {
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = nix::fcntl::open(&pts.join("ptmx"), flags, Mode::empty())?;
    let mut unlock: libc::c_int = 0;
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCSPTLCK reads an int, TIOCGPTN writes an unsigned int.
    unsafe {
        Errno::result(libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCSPTLCK,
            &mut unlock,
        ))?;
        Errno::result(libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n))?;
    }
    let slave = nix::fcntl::open(&pts.join(n.to_string()), flags, Mode::empty())?;
    set_winsize(master.as_raw_fd(), size)?;
    Ok((master, slave))
}

/// Reads a container file (resolved inside its root); empty if missing.
fn read_in_root(root: &Path, path: &str) -> String {
    resolve_in_root(root, Path::new(path))
        .and_then(std::fs::read)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

pub(crate) fn cstring(what: &str, s: &str) -> Result<CString, StartError> {
    CString::new(s).map_err(|_| {
        err(
            StartErrorKind::InvalidSpec,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// A process's user, environment, program and working directory, resolved
/// in the container's root.
pub(crate) struct ResolvedProcess {
    pub user: user::ExecUser,
    pub exe: String,
    pub cwd: PathBuf,
    pub argv: Vec<CString>,
    /// `KEY=VALUE`, defaults filled in (see [`envp`]).
    pub env: Vec<String>,
}

/// An environment as `execve` takes it.
pub(crate) fn envp(env: &[String]) -> Result<Vec<CString>, StartError> {
    env.iter()
        .map(|e| cstring("an environment variable", e))
        .collect()
}

/// Resolves user (in the container's `/etc/passwd` and `/etc/group`),
/// environment defaults, the program (in the container's `PATH`) and the
/// working directory of `p` in the container root `root`.
pub(crate) fn resolve_process(p: &ProcessSpec, root: &Path) -> Result<ResolvedProcess, StartError> {
    let user = user::resolve(
        &p.user,
        &read_in_root(root, "/etc/passwd"),
        &read_in_root(root, "/etc/group"),
    )
    .map_err(|e| err(StartErrorKind::InvalidSpec, e.to_string()))?;
    let env = spec::container_env(&p.env, &user.home, p.terminal.is_some());
    let exe = path_lookup::find_executable(root, path_lookup::path_from_env(&env), &p.args[0])
        .map_err(|e| err(StartErrorKind::NotFound, e.to_string()))?;
    let cwd = spec::cwd(&p.cwd)?;
    let mut argv = Vec::new();
    for a in &p.args {
        argv.push(cstring("an argument", a)?);
    }
    envp(&env)?;
    Ok(ResolvedProcess {
        user,
        exe,
        cwd,
        argv,
        env,
    })
}

/// The stdio of a process about to be cloned: what the child installs, the
/// child's ends the agent keeps open until the clone is made, and the
/// agent's own ends.
pub(crate) struct ProcessStdio {
    pub stdio: Stdio,
    pub child_ends: Vec<OwnedFd>,
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: Option<OwnedFd>,
}

/// Pipes (stdin from `/dev/null` unless `p.stdin`), or with a terminal a
/// pty from the container's devpts instance at `pts`.
pub(crate) fn process_stdio(p: &ProcessSpec, pts: &Path) -> Result<ProcessStdio, StartError> {
    match p.terminal {
        Some(size) => {
            let (master, slave) = open_pty(pts, size).map_err(|e| {
                err(
                    StartErrorKind::Other,
                    format!("cannot open a terminal: {e}"),
                )
            })?;
            set_nonblocking(&master);
            let input = nix::unistd::dup(&master)
                .map_err(|e| err(StartErrorKind::Other, format!("dup: {e}")))?;
            let _ = nix::fcntl::fcntl(&input, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
            Ok(ProcessStdio {
                stdio: Stdio::Terminal {
                    slave: slave.as_raw_fd(),
                },
                child_ends: vec![slave],
                stdin: Some(input),
                stdout: master,
                stderr: None,
            })
        }
        None => {
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            let (in_parent, in_child) = if p.stdin {
                let (r, w) = pipe()?;
                set_nonblocking(&w);
                (Some(w), r)
            } else {
                let null =
                    nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
                        .map_err(|e| err(StartErrorKind::Other, format!("/dev/null: {e}")))?;
                (None, null)
            };
            set_nonblocking(&out_r);
            set_nonblocking(&err_r);
            Ok(ProcessStdio {
                stdio: Stdio::Pipes {
                    stdin: in_child.as_raw_fd(),
                    stdout: out_w.as_raw_fd(),
                    stderr: err_w.as_raw_fd(),
                },
                child_ends: vec![in_child, out_w, err_w],
                stdin: in_parent,
                stdout: out_r,
                stderr: Some(err_r),
            })
        }
    }
}

/// Blocks until the error pipe reports a failure or closes (exec done).
pub(crate) fn read_failure(fd: &OwnedFd) -> Option<Failure> {
    let mut buf = [0u8; FAILURE_LEN];
    let mut got = 0;
    while got < FAILURE_LEN {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    Failure::decode(&buf[..got])
}

/// The [`StartError`] for a failure reported by the child.
pub(crate) fn describe_failure(f: &Failure, plan: &ChildPlan, exe: &str) -> StartError {
    use StartErrorKind::*;
    let e = f.errno;
    match f.step {
        Step::Exec => match e {
            Errno::ENOENT => err(NotFound, format!("no such file: {exe}")),
            Errno::EACCES | Errno::EPERM => err(NotExecutable, format!("permission denied: {exe}")),
            Errno::ENOEXEC => err(NotExecutable, format!("exec format error: {exe}")),
            Errno::EISDIR => err(NotExecutable, format!("is a directory: {exe}")),
            _ => err(Other, format!("cannot execute {exe}: {e}")),
        },
        Step::Rootfs => {
            let what = plan
                .rootfs_ops
                .get(f.index as usize)
                .map_or_else(|| "?".to_string(), Op::describe);
            err(Other, format!("setting up the container root: {what}: {e}"))
        }
        Step::PivotRoot => err(Other, format!("pivot_root into the container: {e}")),
        Step::Hostname => err(
            InvalidSpec,
            format!("cannot set hostname {:?}: {e}", plan.hostname),
        ),
        Step::Cwd => err(
            InvalidSpec,
            format!("working directory {}: {e}", plan.cwd.display()),
        ),
        Step::Groups | Step::Gid | Step::Uid => {
            err(Other, format!("switching to the container user: {e}"))
        }
        Step::Fork | Step::Terminal | Step::Stdio => {
            err(Other, format!("starting the process ({:?}): {e}", f.step))
        }
        Step::Panic => err(Other, "the container child failed unexpectedly"),
        Step::Setns => err(Other, format!("entering the container's namespaces: {e}")),
    }
}

/// The exit status of a container: what its init reported for the main
/// process, or, if it reported nothing (killed itself), the init's own.
pub fn exit_status(init: nix::sys::wait::WaitStatus, status_pipe: Option<&OwnedFd>) -> ExitStatus {
    use nix::sys::wait::WaitStatus;
    if let Some(fd) = status_pipe {
        let mut buf = [0u8; 4];
        if let Ok(4) = nix::unistd::read(fd, &mut buf) {
            return decode_wait_status(i32::from_ne_bytes(buf));
        }
    }
    match init {
        WaitStatus::Exited(_, code) => ExitStatus::Code(code),
        WaitStatus::Signaled(_, sig, core) => ExitStatus::Signaled {
            signal: sig as i32,
            core_dumped: core,
        },
        _ => ExitStatus::Code(255),
    }
}

/// Decodes a raw `waitpid` status.
pub fn decode_wait_status(status: i32) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signaled {
            signal: libc::WTERMSIG(status),
            core_dumped: libc::WCOREDUMP(status),
        }
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

#[cfg(test)]
mod tests {
    use nix::unistd::Pid;

    use super::*;

    #[test]
    fn wait_statuses_decode() {
        assert_eq!(decode_wait_status(3 << 8), ExitStatus::Code(3));
        assert_eq!(
            decode_wait_status(9),
            ExitStatus::Signaled {
                signal: 9,
                core_dumped: false
            }
        );
        assert_eq!(
            decode_wait_status(11 | 0x80),
            ExitStatus::Signaled {
                signal: 11,
                core_dumped: true
            }
        );
    }

    #[test]
    fn init_report_wins_over_its_own_status() {
        use nix::sys::wait::WaitStatus;
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, &(9i32).to_ne_bytes()).unwrap();
        let init = WaitStatus::Exited(Pid::from_raw(5), 0);
        assert_eq!(
            exit_status(init, Some(&r)),
            ExitStatus::Signaled {
                signal: 9,
                core_dumped: false
            }
        );
        set_nonblocking(&r);
        let killed =
            WaitStatus::Signaled(Pid::from_raw(5), nix::sys::signal::Signal::SIGKILL, false);
        assert_eq!(
            exit_status(killed, Some(&r)),
            ExitStatus::Signaled {
                signal: 9,
                core_dumped: false
            }
        );
        assert_eq!(
            exit_status(WaitStatus::Exited(Pid::from_raw(5), 127), None),
            ExitStatus::Code(127)
        );
    }
}
