//! The system calls the agent makes to set up the guest and its containers,
//! behind a trait so that the plans (boot mounts, module loading, container
//! root, user switch) are unit-tested without root or a VM.
//!
//! [`LinuxSyscall`] is the real thing. It is also used in the cloned child
//! before `execve`, so its methods must not allocate: paths go through nix's
//! stack buffer and errors are plain [`Errno`] values.

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{Gid, Uid};

/// The system calls of the agent's plans. Errors are raw errno values so the
/// container child can report them without allocating.
pub trait Syscall {
    /// `mount(2)`.
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno>;
    /// `umount2(2)`.
    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), Errno>;
    /// `mkdir(2)`.
    fn mkdir(&self, path: &Path, mode: Mode) -> Result<(), Errno>;
    /// `mknod(2)` of a device node.
    fn mknod(&self, path: &Path, kind: SFlag, mode: Mode, dev: u64) -> Result<(), Errno>;
    /// `symlink(2)`: creates `link` pointing at `target`.
    fn symlink(&self, target: &Path, link: &Path) -> Result<(), Errno>;
    /// `pivot_root(2)`.
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), Errno>;
    /// `chdir(2)`.
    fn chdir(&self, path: &Path) -> Result<(), Errno>;
    /// `chroot(2)`.
    fn chroot(&self, path: &Path) -> Result<(), Errno>;
    /// `sethostname(2)`.
    fn sethostname(&self, name: &str) -> Result<(), Errno>;
    /// `init_module(2)` with the module image and parameter string.
    fn init_module(&self, image: &[u8], params: &CStr) -> Result<(), Errno>;
    /// `setgroups(2)`.
    fn setgroups(&self, groups: &[Gid]) -> Result<(), Errno>;
    /// `setresgid(2)` with all three ids equal.
    fn setresgid(&self, gid: Gid) -> Result<(), Errno>;
    /// `setresuid(2)` with all three ids equal.
    fn setresuid(&self, uid: Uid) -> Result<(), Errno>;
    /// `setns(2)`: joins the namespace `fd` refers to, of kind `nstype`.
    fn setns(&self, fd: RawFd, nstype: CloneFlags) -> Result<(), Errno>;
    /// Mixes `bytes` into the kernel's input pool, crediting them as
    /// entropy (`ioctl(RNDADDENTROPY)` on `/dev/urandom`). Allocates; not
    /// for the container child.
    fn add_entropy(&self, bytes: &[u8]) -> Result<(), Errno>;
    /// Reseeds the kernel's CRNG from the input pool now
    /// (`ioctl(RNDRESEEDCRNG)`).
    fn reseed_crng(&self) -> Result<(), Errno>;
    /// `clock_settime(CLOCK_REALTIME)` to nanoseconds since the epoch.
    fn set_realtime(&self, unix_time_ns: u64) -> Result<(), Errno>;
    /// `sethostname(2)` in the UTS namespace of process `pid` (entering it
    /// with `setns(2)` and returning to the caller's own afterwards).
    fn sethostname_in(&self, pid: i32, name: &str) -> Result<(), Errno>;
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn open_urandom() -> Result<std::os::fd::OwnedFd, Errno> {
    nix::fcntl::open(
        "/dev/urandom",
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// The real system calls, through nix.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), Errno> {
        nix::mount::umount2(target, flags)
    }

    fn mkdir(&self, path: &Path, mode: Mode) -> Result<(), Errno> {
        nix::unistd::mkdir(path, mode)
    }

    fn mknod(&self, path: &Path, kind: SFlag, mode: Mode, dev: u64) -> Result<(), Errno> {
        nix::sys::stat::mknod(path, kind, mode, dev)
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<(), Errno> {
        nix::unistd::symlinkat(target, nix::fcntl::AT_FDCWD, link)
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), Errno> {
        nix::unistd::pivot_root(new_root, put_old)
    }

    fn chdir(&self, path: &Path) -> Result<(), Errno> {
        nix::unistd::chdir(path)
    }

    fn chroot(&self, path: &Path) -> Result<(), Errno> {
        nix::unistd::chroot(path)
    }

    fn sethostname(&self, name: &str) -> Result<(), Errno> {
        nix::unistd::sethostname(name)
    }

    fn init_module(&self, image: &[u8], params: &CStr) -> Result<(), Errno> {
        nix::kmod::init_module(image, params)
    }

    fn setgroups(&self, groups: &[Gid]) -> Result<(), Errno> {
        nix::unistd::setgroups(groups)
    }

    fn setresgid(&self, gid: Gid) -> Result<(), Errno> {
        nix::unistd::setresgid(gid, gid, gid)
    }

    fn setresuid(&self, uid: Uid) -> Result<(), Errno> {
        nix::unistd::setresuid(uid, uid, uid)
    }

    fn setns(&self, fd: RawFd, nstype: CloneFlags) -> Result<(), Errno> {
        // SAFETY: a plain system call on a descriptor number; no memory.
        Errno::result(unsafe { libc::setns(fd, nstype.bits()) }).map(drop)
    }

    fn add_entropy(&self, bytes: &[u8]) -> Result<(), Errno> {
        use std::os::fd::AsRawFd;
        let fd = open_urandom()?;
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let words = bytes.len().div_ceil(4);
        let mut info = vec![0u32; 2 + words];
        info[0] = (bytes.len() * 8) as u32;
        info[1] = bytes.len() as u32;
        // SAFETY: `info` has room for the header and `bytes.len()` bytes
        // after it; u32 slots are plain memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                info[2..].as_mut_ptr().cast::<u8>(),
                bytes.len(),
            );
            Errno::result(libc::ioctl(fd.as_raw_fd(), RNDADDENTROPY, info.as_ptr())).map(drop)
        }
    }

    fn reseed_crng(&self) -> Result<(), Errno> {
        use std::os::fd::AsRawFd;
        let fd = open_urandom()?;
        // SAFETY: RNDRESEEDCRNG takes no argument.
        Errno::result(unsafe { libc::ioctl(fd.as_raw_fd(), RNDRESEEDCRNG) }).map(drop)
    }

    fn set_realtime(&self, unix_time_ns: u64) -> Result<(), Errno> {
        let ts = nix::sys::time::TimeSpec::new(
            (unix_time_ns / 1_000_000_000) as libc::time_t,
            (unix_time_ns % 1_000_000_000) as libc::c_long,
        );
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
    }

    fn sethostname_in(&self, pid: i32, name: &str) -> Result<(), Errno> {
        use nix::sched::{CloneFlags, setns};
        let flags = nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC;
        let own = nix::fcntl::open("/proc/self/ns/uts", flags, Mode::empty())?;
        let theirs =
            nix::fcntl::open(format!("/proc/{pid}/ns/uts").as_str(), flags, Mode::empty())?;
        setns(&theirs, CloneFlags::CLONE_NEWUTS)?;
        let result = nix::unistd::sethostname(name);
        // Back to the agent's own namespace whatever happened; if even that
        // fails the agent's hostname calls would go astray, so say so.
        setns(&own, CloneFlags::CLONE_NEWUTS)?;
        result
    }
}

/// Test double: records every call as a line of text and fails the calls
/// whose record starts with a configured prefix.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct RecordingSyscall {
    /// The calls made, in order, e.g. `mount /dev/vda /run/x erofs RDONLY -`.
    pub calls: std::cell::RefCell<Vec<String>>,
    /// Calls whose record starts with one of these prefixes fail with the errno.
    pub failures: Vec<(String, Errno)>,
}

#[cfg(test)]
impl RecordingSyscall {
    /// A recorder where every call succeeds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes calls whose record starts with `prefix` fail with `errno`.
    pub fn fail(mut self, prefix: &str, errno: Errno) -> Self {
        self.failures.push((prefix.to_string(), errno));
        self
    }

    /// The recorded calls.
    pub fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }

    fn record(&self, line: String) -> Result<(), Errno> {
        let result = match self.failures.iter().find(|(p, _)| line.starts_with(p)) {
            Some((_, errno)) => Err(*errno),
            None => Ok(()),
        };
        self.calls.borrow_mut().push(line);
        result
    }
}

#[cfg(test)]
fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

#[cfg(test)]
impl Syscall for RecordingSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        let flags: Vec<_> = flags
            .iter_names()
            .map(|(n, _)| n.trim_start_matches("MS_"))
            .collect();
        self.record(format!(
            "mount {} {} {} {} {}",
            opt(source.map(Path::display)),
            target.display(),
            opt(fstype),
            if flags.is_empty() {
                "-".to_string()
            } else {
                flags.join("|")
            },
            opt(data)
        ))
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), Errno> {
        let detach = if flags.contains(MntFlags::MNT_DETACH) {
            " detach"
        } else {
            ""
        };
        self.record(format!("umount {}{detach}", target.display()))
    }

    fn mkdir(&self, path: &Path, mode: Mode) -> Result<(), Errno> {
        self.record(format!("mkdir {} {:o}", path.display(), mode.bits()))
    }

    fn mknod(&self, path: &Path, kind: SFlag, mode: Mode, dev: u64) -> Result<(), Errno> {
        let kind = if kind == SFlag::S_IFCHR { "c" } else { "?" };
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        self.record(format!(
            "mknod {} {kind} {major}:{minor} {:o}",
            path.display(),
            mode.bits()
        ))
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<(), Errno> {
        self.record(format!(
            "symlink {} -> {}",
            link.display(),
            target.display()
        ))
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), Errno> {
        self.record(format!(
            "pivot_root {} {}",
            new_root.display(),
            put_old.display()
        ))
    }

    fn chdir(&self, path: &Path) -> Result<(), Errno> {
        self.record(format!("chdir {}", path.display()))
    }

    fn chroot(&self, path: &Path) -> Result<(), Errno> {
        self.record(format!("chroot {}", path.display()))
    }

    fn sethostname(&self, name: &str) -> Result<(), Errno> {
        self.record(format!("sethostname {name}"))
    }

    fn init_module(&self, image: &[u8], params: &CStr) -> Result<(), Errno> {
        let image = String::from_utf8_lossy(image);
        self.record(format!("init_module {image} {:?}", params))
    }

    fn setgroups(&self, groups: &[Gid]) -> Result<(), Errno> {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        self.record(format!("setgroups [{}]", groups.join(",")))
    }

    fn setresgid(&self, gid: Gid) -> Result<(), Errno> {
        self.record(format!("setresgid {gid}"))
    }

    fn setresuid(&self, uid: Uid) -> Result<(), Errno> {
        self.record(format!("setresuid {uid}"))
    }

    fn setns(&self, fd: RawFd, nstype: CloneFlags) -> Result<(), Errno> {
        let kinds: Vec<_> = nstype
            .iter_names()
            .map(|(n, _)| n.trim_start_matches("CLONE_"))
            .collect();
        self.record(format!("setns {fd} {}", kinds.join("|")))
    }

    fn add_entropy(&self, bytes: &[u8]) -> Result<(), Errno> {
        self.record(format!("add_entropy {} bytes", bytes.len()))
    }

    fn reseed_crng(&self) -> Result<(), Errno> {
        self.record("reseed_crng".into())
    }

    fn set_realtime(&self, unix_time_ns: u64) -> Result<(), Errno> {
        self.record(format!("set_realtime {unix_time_ns}"))
    }

    fn sethostname_in(&self, pid: i32, name: &str) -> Result<(), Errno> {
        self.record(format!("sethostname_in {pid} {name}"))
    }
}
