//! The VMM process as the operating system sees it: what identifies it
//! across a restart of the process that launched it, and a handle that
//! waits for and signals a process that is not our child (a pidfd).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::VmmError;

/// What a VM is found again by after the process that launched it has gone
/// (a host daemon that restarted): the VMM's pid, its start time, which
/// tells it from a later process given the same pid, and its run directory.
/// Recorded by the launcher, passed to [`crate::Hypervisor::adopt`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmProcess {
    pub pid: u32,
    /// Start time of the process in clock ticks after boot (field 22 of
    /// `/proc/<pid>/stat`).
    pub start_time: u64,
    /// The VM's run directory (sockets, console log).
    pub run_dir: PathBuf,
}

impl VmmProcess {
    /// The record of running process `pid` whose run directory is `run_dir`.
    pub fn of(pid: u32, run_dir: &Path) -> Result<Self, VmmError> {
        Ok(Self {
            pid,
            start_time: start_time(pid).map_err(|source| VmmError::Io {
                what: format!("read the start time of process {pid}"),
                source,
            })?,
            run_dir: run_dir.to_path_buf(),
        })
    }

    /// Checks that the process is still the one recorded; returns why not.
    pub fn check_alive(&self) -> Result<(), String> {
        match start_time(self.pid) {
            Ok(t) if t == self.start_time => Ok(()),
            Ok(t) => Err(format!(
                "process {} is another process now (started at tick {t}, recorded {})",
                self.pid, self.start_time
            )),
            Err(e) => Err(format!("process {} is gone ({e})", self.pid)),
        }
    }
}

/// Start time of process `pid` in clock ticks after boot.
pub fn start_time(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat"),
        )
    })
}

/// Field 22 of a `/proc/<pid>/stat` line. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); field 22 is the 20th after it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The command line of process `pid`, arguments separated by spaces.
pub fn cmdline(pid: u32) -> std::io::Result<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// A process that is not (necessarily) our child, through a pidfd: it can
/// be waited for and signalled without racing a reuse of its pid. Its exit
/// status belongs to its parent and is not known here.
pub struct ProcessHandle {
    fd: AsyncFd<OwnedFd>,
}

impl ProcessHandle {
    /// Opens a pidfd for `pid`.
    pub fn open(pid: u32) -> std::io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags, returns a new descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the OwnedFd stays open, and is the same descriptor, for
        // as long as the AsyncFd that owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Self { fd })
    }

    /// Whether the process has exited (a pidfd polls readable then).
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd with a zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }

    /// Waits until the process has exited.
    pub async fn exited(&self) -> std::io::Result<()> {
        loop {
            if self.has_exited() {
                return Ok(());
            }
            let mut guard = self.fd.readable().await?;
            guard.clear_ready();
        }
    }

    /// Sends `signal` to the process (a no-op once it has exited).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    10 20 0 0 20 0 3 0 987654 1000000 500 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        let me = std::process::id();
        assert!(start_time(me).unwrap() > 0);
    }

    #[tokio::test]
    async fn a_process_that_is_not_our_child_is_waited_for_and_killed() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let record = VmmProcess::of(child.id(), Path::new("/x")).unwrap();
        assert_eq!(record.check_alive(), Ok(()));
        let stale = VmmProcess {
            start_time: record.start_time + 1,
            ..record.clone()
        };
        assert!(stale.check_alive().unwrap_err().contains("another process"));
        let h = ProcessHandle::open(child.id()).unwrap();
        assert!(!h.has_exited());
        h.signal(libc::SIGKILL).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), h.exited())
            .await
            .unwrap()
            .unwrap();
        assert!(h.has_exited());
        child.wait().unwrap();
        // Signalling a reaped process through its pidfd is harmless.
        h.signal(libc::SIGKILL).unwrap();
        assert!(record.check_alive().unwrap_err().contains("gone"));
    }
}
