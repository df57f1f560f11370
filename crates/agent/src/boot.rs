//! PID 1 duties at boot and at the end: mount the basic file systems, make
//! sure stdio is the console, load the kernel modules, move off the
//! initramfs root, and power the VM off.

use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::sys::stat::Mode;
use podvisor_proto::{AgentInfo, MODULES_LOAD_LIST};

use crate::modules;
use crate::mounts::{self, Mount, Op};
use crate::syscall::Syscall;

/// The new root the agent moves to (a tmpfs) before serving containers.
pub const SYSROOT: &str = "/sysroot";

/// A boot step failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("boot: {what}: {errno}")]
    Step { what: String, errno: Errno },
}

fn step(ops: &[Op], (i, errno): (usize, Errno)) -> BootError {
    BootError::Step {
        what: ops[i].describe(),
        errno,
    }
}

/// Mounts `/proc`, `/sys`, `/dev`, `/dev/pts`, `/dev/shm` and `/run`.
/// A file system that is already mounted (`EBUSY`) is fine.
pub fn mount_basics(sys: &dyn Syscall) -> Result<(), BootError> {
    let plan = mounts::boot_plan();
    for (i, op) in plan.iter().enumerate() {
        match mounts::apply(sys, std::slice::from_ref(op)) {
            Ok(()) | Err((_, Errno::EBUSY)) => {}
            Err((_, errno)) => return Err(step(&plan, (i, errno))),
        }
    }
    Ok(())
}

/// Where the initramfs stays visible to the agent after [`switch_root`]
/// (a bind mount under `/run`, which containers never see): the module
/// lists loaded later ([`podvisor_proto::MODULES_VOLUMES_LIST`]) and their
/// modules are read from here.
pub const INITRAMFS_DIR: &str = "/run/podvisor/initramfs";

/// Binds the initramfs root onto [`INITRAMFS_DIR`], before [`switch_root`]
/// moves `/run`; failures are logged (only lazily loaded modules need it).
pub fn keep_initramfs(sys: &dyn Syscall) {
    let plan = [
        Op::Mkdir {
            path: "/run/podvisor".into(),
            mode: 0o755,
        },
        Op::Mkdir {
            path: INITRAMFS_DIR.into(),
            mode: 0o700,
        },
        Op::Mount(Mount {
            source: Some("/".into()),
            target: INITRAMFS_DIR.into(),
            fstype: None,
            flags: MsFlags::MS_BIND,
            data: None,
        }),
    ];
    if let Err((i, errno)) = mounts::apply(sys, &plan) {
        crate::log!("keeping the initramfs: {}: {errno}", plan[i].describe());
    }
}

/// Moves the agent off the initramfs onto a fresh tmpfs, taking the
/// mounted `/proc`, `/sys`, `/dev` and `/run` along (what `switch_root`
/// does). The initramfs root cannot be `pivot_root`ed away from, so
/// without this no container could `pivot_root`.
pub fn switch_root(sys: &dyn Syscall) -> Result<(), BootError> {
    let root = Path::new(SYSROOT);
    let mut plan = vec![
        Op::Mkdir {
            path: root.into(),
            mode: 0o755,
        },
        Op::Mount(Mount {
            source: Some("tmpfs".into()),
            target: root.into(),
            fstype: Some("tmpfs".into()),
            flags: MsFlags::empty(),
            data: Some("mode=0755".into()),
        }),
    ];
    for dir in ["proc", "sys", "dev", "run"] {
        plan.push(Op::Mkdir {
            path: root.join(dir),
            mode: 0o755,
        });
        plan.push(Op::Mount(Mount {
            source: Some(Path::new("/").join(dir)),
            target: root.join(dir),
            fstype: None,
            flags: MsFlags::MS_MOVE,
            data: None,
        }));
    }
    mounts::apply(sys, &plan).map_err(|e| step(&plan, e))?;
    let fail = |what: &str| {
        let what = what.to_string();
        move |errno| BootError::Step { what, errno }
    };
    sys.chdir(root).map_err(fail("chdir /sysroot"))?;
    sys.mount(
        Some(Path::new(".")),
        Path::new("/"),
        None,
        MsFlags::MS_MOVE,
        None,
    )
    .map_err(fail("move /sysroot to /"))?;
    sys.chroot(Path::new(".")).map_err(fail("chroot"))?;
    sys.chdir(Path::new("/")).map_err(fail("chdir /"))
}

/// Makes fds 0, 1 and 2 the console if the kernel could not open it for
/// us (an initramfs without `/dev/console`).
pub fn ensure_console() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        match nix::fcntl::open(
            "/dev/console",
            OFlag::O_RDWR | OFlag::O_NOCTTY,
            Mode::empty(),
        ) {
            Ok(console) => {
                if console.as_raw_fd() != fd {
                    // SAFETY: dup2 onto a closed standard descriptor.
                    unsafe { libc::dup2(console.as_raw_fd(), fd) };
                } else {
                    let _ = console.into_raw_fd();
                }
            }
            Err(_) => return,
        }
    }
}

/// Loads the modules listed in [`MODULES_LOAD_LIST`] for kernel `release`;
/// failures are logged, not fatal.
pub fn load_modules(sys: &dyn Syscall, release: &str) {
    let list = match std::fs::read_to_string(MODULES_LOAD_LIST) {
        Ok(text) => modules::parse_load_list(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            crate::log!("cannot read {MODULES_LOAD_LIST}: {e}");
            return;
        }
    };
    for e in modules::load_all(sys, &modules::module_dir(release), &list) {
        crate::log!("{}", podvisor_errors::ErrorChain(&e));
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Guest uptime (CLOCK_BOOTTIME) in milliseconds.
pub fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// What the VM leaves to containers, recorded once at boot before any
/// container starts: runtime profiles size a container's runtime to its
/// share of `mem_available` ([`crate::runtime_profiles`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmResources {
    /// `MemTotal` of `/proc/meminfo`, in bytes: the RAM the kernel manages.
    pub mem_total: u64,
    /// `MemAvailable`, in bytes: what is left for containers once the
    /// kernel, the initramfs and the agent have taken theirs.
    pub mem_available: u64,
    /// CPUs the agent may run on (its affinity mask; else
    /// `/sys/devices/system/cpu/online`; at least 1).
    pub cpus_online: u32,
}

impl VmResources {
    /// Reads them from `/proc/meminfo` and the CPU affinity. A value that
    /// cannot be read is 0 (memory) or 1 (CPUs), and logged.
    pub fn read() -> VmResources {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_else(|e| {
            crate::log!("cannot read /proc/meminfo: {e}");
            String::new()
        });
        let (mem_total, mem_available) = parse_meminfo(&meminfo);
        let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
            .ok()
            .map(|set| {
                (0..nix::sched::CpuSet::count())
                    .filter(|&i| set.is_set(i).unwrap_or(false))
                    .count() as u32
            })
            .filter(|&n| n > 0)
            .or_else(|| {
                std::fs::read_to_string("/sys/devices/system/cpu/online")
                    .ok()
                    .and_then(|text| parse_cpu_list(&text))
            });
        VmResources {
            mem_total: mem_total.unwrap_or(0),
            mem_available: mem_available.or(mem_total).unwrap_or(0),
            cpus_online: cpus.unwrap_or(1).max(1),
        }
    }
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn parse_meminfo(text: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kib = rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
            kib.checked_mul(1024)
        })
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// How many CPUs a kernel CPU list names (`0-3,6`: 5).
pub fn parse_cpu_list(text: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in text.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi) = (lo.parse::<u32>().ok()?, hi.parse::<u32>().ok()?);
        n = n.checked_add(hi.checked_sub(lo)?.checked_add(1)?)?;
    }
    (n > 0).then_some(n)
}

/// What the agent reports in `Ready`; `boot_steps` are the uptimes at the
/// end of each boot step, for the host's stage breakdown.
pub fn agent_info(kernel_release: String, boot_steps: Vec<(String, u64)>) -> AgentInfo {
    AgentInfo {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_release,
        boottime_ms: uptime_ms(),
        boot_steps,
    }
}

/// Syncs and powers the VM off. If that fails, exits: the kernel then
/// panics on PID 1's death and `panic=-1` resets the VM.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    crate::log!("power off failed: {}", Errno::last());
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::RecordingSyscall;

    #[test]
    fn switch_root_moves_the_mounts_then_the_root() {
        let sys = RecordingSyscall::new().fail("mkdir /sysroot/dev", Errno::EEXIST);
        switch_root(&sys).unwrap();
        let calls = sys.calls();
        assert_eq!(calls[1], "mount tmpfs /sysroot tmpfs - mode=0755");
        assert!(calls.contains(&"mount /dev /sysroot/dev - MOVE -".to_string()));
        assert_eq!(
            calls[calls.len() - 4..],
            [
                "chdir /sysroot",
                "mount . / - MOVE -",
                "chroot .",
                "chdir /"
            ]
        );
    }

    #[test]
    fn basics_tolerate_already_mounted_file_systems() {
        let sys = RecordingSyscall::new().fail("mount devtmpfs", Errno::EBUSY);
        mount_basics(&sys).unwrap();
        assert_eq!(sys.calls().len(), mounts::boot_plan().len());
        let sys = RecordingSyscall::new().fail("mount proc", Errno::ENODEV);
        assert_eq!(
            mount_basics(&sys).unwrap_err().to_string(),
            "boot: mount proc on /proc: ENODEV: No such device"
        );
    }

    #[test]
    fn memory_and_cpus_are_read_from_the_kernels_files() {
        let meminfo = "MemTotal:        1004112 kB\nMemFree:          950000 kB\nMemAvailable:     931000 kB\n";
        assert_eq!(
            parse_meminfo(meminfo),
            (Some(1004112 * 1024), Some(931000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: lots\n"), (None, None));
        assert_eq!(parse_cpu_list("0-3,6\n"), Some(5));
        assert_eq!(parse_cpu_list("0\n"), Some(1));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list(""), None);
        // This machine's own values are sane.
        let vm = VmResources::read();
        assert!(
            vm.mem_available > 0 && vm.mem_available <= vm.mem_total,
            "{vm:?}"
        );
        assert!(vm.cpus_online >= 1, "{vm:?}");
    }

    #[test]
    fn the_initramfs_stays_bound_under_run_for_lazy_modules() {
        let sys = RecordingSyscall::new();
        keep_initramfs(&sys);
        assert_eq!(
            sys.calls(),
            [
                "mkdir /run/podvisor 755",
                "mkdir /run/podvisor/initramfs 700",
                "mount / /run/podvisor/initramfs - BIND -",
            ]
        );
        // A failure is only logged.
        keep_initramfs(&RecordingSyscall::new().fail("mount", Errno::EPERM));
    }
}
