//! A control group for each VMM process: its memory, process count and
//! CPU time bounded by what its VM was given plus the VMM's own overhead,
//! so one VM (or a VMM taken over from its guest) cannot starve the host
//! or the other pods.
//!
//! Both hierarchies are handled: the unified one (cgroup v2, what Debian
//! 12 and systemd use: `/sys/fs/cgroup/podvisor/VM` with `memory.max`,
//! `pids.max`, `cpu.max`) and the legacy one (cgroup v1, one directory per
//! controller: `/sys/fs/cgroup/{memory,pids,cpu}/podvisor/VM`), which some
//! machines (and VMs that run containers) still mount. The VMM joins its
//! group before it executes ([`VmCgroup::join_from_child`]), so it never
//! runs a moment outside it. A group is removed when its VM has exited;
//! groups of VMs that exited while no podvisor process watched them are
//! removed by the next launch ([`CgroupRoot::remove_stale`]).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The directory podvisor's groups live in, under each hierarchy.
pub const PARENT: &str = "podvisor";

/// An empty group older than this whose VM is not known to be starting
/// is left over (its VM exited unwatched).
const STALE_AFTER: Duration = Duration::from_secs(60);

/// Errors of making or joining a group.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup hierarchy with the memory, pids and cpu controllers is mounted at {0}")]
    NoHierarchy(PathBuf),
}

/// What a VMM's group allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory (guest RAM, the VMM's own, page cache it faults in).
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// CPU time per 100 ms period, in microseconds.
    pub cpu_quota_us: u64,
}

/// CPU accounting period of [`Limits::cpu_quota_us`].
pub const CPU_PERIOD_US: u64 = 100_000;

impl Limits {
    /// The limits of a VM of `cpus` vCPUs and `memory_mib` of RAM:
    /// `overhead_mib` on top of its RAM for the VMM itself (device
    /// emulation, and under TCG the translation buffer and soft TLBs);
    /// threads for the vCPUs, I/O workers and the VMM's own; one CPU more
    /// than the vCPUs for device emulation.
    pub fn for_vm(cpus: u32, memory_mib: u64, overhead_mib: u64) -> Limits {
        Limits {
            memory_bytes: (memory_mib + overhead_mib) << 20,
            pids: 256 + u64::from(cpus),
            cpu_quota_us: (u64::from(cpus) + 1) * CPU_PERIOD_US,
        }
    }
}

/// Which hierarchy the machine mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hierarchy {
    /// cgroup v2 at this mount point.
    Unified(PathBuf),
    /// cgroup v1: a mount point per controller.
    Legacy {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
}

/// Where podvisor makes groups: the machine's cgroup mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoot {
    hierarchy: Hierarchy,
}

impl CgroupRoot {
    /// The hierarchy mounted at `/sys/fs/cgroup`.
    pub fn detect() -> Result<CgroupRoot, CgroupError> {
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    /// The hierarchy mounted at `mount`: unified if it has
    /// `cgroup.controllers` with memory, pids and cpu; else legacy if it
    /// has those controllers' directories.
    pub fn detect_at(mount: &Path) -> Result<CgroupRoot, CgroupError> {
        if let Ok(controllers) = std::fs::read_to_string(mount.join("cgroup.controllers")) {
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("memory") && has("pids") && has("cpu") {
                return Ok(CgroupRoot {
                    hierarchy: Hierarchy::Unified(mount.to_path_buf()),
                });
            }
        }
        let (memory, pids, cpu) = (mount.join("memory"), mount.join("pids"), mount.join("cpu"));
        if memory.join("memory.limit_in_bytes").is_file()
            && pids.join("cgroup.procs").is_file()
            && cpu.join("cpu.cfs_quota_us").is_file()
        {
            return Ok(CgroupRoot {
                hierarchy: Hierarchy::Legacy { memory, pids, cpu },
            });
        }
        Err(CgroupError::NoHierarchy(mount.to_path_buf()))
    }

    /// The directories a group named `name` has (one, or one per
    /// controller).
    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        self.parents().into_iter().map(|p| p.join(name)).collect()
    }

    fn parents(&self) -> Vec<PathBuf> {
        match &self.hierarchy {
            Hierarchy::Unified(root) => vec![root.join(PARENT)],
            Hierarchy::Legacy { memory, pids, cpu } => {
                vec![memory.join(PARENT), pids.join(PARENT), cpu.join(PARENT)]
            }
        }
    }

    /// Makes (or resets) group `name` with `limits`. A group of that name
    /// left by an earlier VM is reused if empty.
    pub fn create(&self, name: &str, limits: Limits) -> Result<VmCgroup, CgroupError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| CgroupError::Io { what, path, source }
        };
        if let Hierarchy::Unified(root) = &self.hierarchy {
            // Controllers must be enabled for the children of each level.
            let parent = root.join(PARENT);
            create_dir(&parent).map_err(io("create cgroup", &parent))?;
            for dir in [root.as_path(), parent.as_path()] {
                let control = dir.join("cgroup.subtree_control");
                std::fs::write(&control, "+memory +pids +cpu")
                    .map_err(io("enable controllers in", &control))?;
            }
        }
        for dir in self.dirs(name) {
            create_dir(dir.parent().expect("a group has a parent"))
                .map_err(io("create cgroup", &dir))?;
            create_dir(&dir).map_err(io("create cgroup", &dir))?;
        }
        let group = VmCgroup {
            root: self.clone(),
            name: name.to_string(),
        };
        let write =
            |file: PathBuf, value: String| std::fs::write(&file, value).map_err(io("set", &file));
        match &self.hierarchy {
            Hierarchy::Unified(root) => {
                let dir = root.join(PARENT).join(name);
                write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
                // No swap: a VM's memory must not go to disk behind its back.
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(swap, "0".into())?;
                }
                write(dir.join("pids.max"), limits.pids.to_string())?;
                write(
                    dir.join("cpu.max"),
                    format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                )?;
            }
            Hierarchy::Legacy { memory, pids, cpu } => {
                let m = memory.join(PARENT).join(name);
                write(
                    m.join("memory.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                )?;
                write(
                    pids.join(PARENT).join(name).join("pids.max"),
                    limits.pids.to_string(),
                )?;
                let c = cpu.join(PARENT).join(name);
                write(c.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                write(c.join("cpu.cfs_quota_us"), limits.cpu_quota_us.to_string())?;
            }
        }
        Ok(group)
    }

    /// Removes podvisor's groups that hold no process and were made more
    /// than a minute ago: those of VMs that exited while no podvisor
    /// process watched them (a killed daemon). A group being filled right
    /// now is younger. Returns how many were removed.
    pub fn remove_stale(&self) -> usize {
        let mut removed = 0;
        let now = SystemTime::now();
        for parent in self.parents() {
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE_AFTER);
                // rmdir refuses a group that still holds a process.
                if path.is_dir() && old && std::fs::remove_dir(&path).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

fn create_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// One VMM's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    root: CgroupRoot,
    name: String,
}

impl VmCgroup {
    /// The group a process is in, if it is one of podvisor's (an adopted
    /// VMM's), from `/proc/PID/cgroup`.
    pub fn of_process(root: &CgroupRoot, pid: u32) -> Option<VmCgroup> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let prefix = format!("/{PARENT}/");
        text.lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .find_map(|path| path.strip_prefix(&prefix))
            .filter(|name| !name.is_empty() && !name.contains('/'))
            .map(|name| VmCgroup {
                root: root.clone(),
                name: name.to_string(),
            })
    }

    /// The group's name (the VM's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directories: one on cgroup v2, one per controller on v1.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.root.dirs(&self.name)
    }

    /// The `cgroup.procs` files a process writes itself into to join,
    /// ready for [`join_from_child`] (which may not allocate).
    pub fn procs_files(&self) -> Vec<CString> {
        self.dirs()
            .iter()
            .map(|d| {
                CString::new(d.join("cgroup.procs").as_os_str().as_bytes())
                    .expect("cgroup paths have no NUL")
            })
            .collect()
    }

    /// Removes the group once its process has exited (a group that still
    /// holds one stays; [`CgroupRoot::remove_stale`] gets it later).
    pub fn remove(&self) {
        for dir in self.dirs() {
            if let Err(e) = std::fs::remove_dir(&dir)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::debug!(cgroup = %dir.display(), error = %e, "cgroup not removed");
            }
        }
    }
}

/// Writes the calling process into each of `procs_files`: for a forked
/// child before it executes the VMM, so it is confined from its first
/// instruction. Async-signal-safe: no allocation, only open/write/close.
pub fn join_from_child(procs_files: &[CString]) -> io::Result<()> {
    for file in procs_files {
        // SAFETY: a valid NUL-terminated path; the descriptor is closed
        // below on every path.
        let fd = unsafe { libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // "0" is the writing process itself.
        // SAFETY: writes one byte from a static buffer.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let err = io::Error::last_os_error();
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_cover_the_vm_and_its_vmm() {
        let l = Limits::for_vm(2, 512, 384);
        assert_eq!(l.memory_bytes, 896 << 20);
        assert_eq!(l.pids, 258);
        assert_eq!(l.cpu_quota_us, 300_000);
    }

    #[test]
    fn the_hierarchy_is_recognised_from_what_is_mounted() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            CgroupRoot::detect_at(dir.path()),
            Err(CgroupError::NoHierarchy(_))
        ));
        // cgroup v2 with the controllers podvisor needs.
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .unwrap();
        let root = CgroupRoot::detect_at(dir.path()).unwrap();
        assert_eq!(root.dirs("pod-a"), [dir.path().join("podvisor/pod-a")]);
        // v1: a directory per controller (and a unified mount without
        // controllers, as hybrid systems have).
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("unified")).unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        for (c, f) in [
            ("memory", "memory.limit_in_bytes"),
            ("pids", "cgroup.procs"),
            ("cpu", "cpu.cfs_quota_us"),
        ] {
            std::fs::create_dir(dir.path().join(c)).unwrap();
            std::fs::write(dir.path().join(c).join(f), "").unwrap();
        }
        let root = CgroupRoot::detect_at(dir.path()).unwrap();
        assert_eq!(
            root.dirs("pod-a"),
            [
                dir.path().join("memory/podvisor/pod-a"),
                dir.path().join("pids/podvisor/pod-a"),
                dir.path().join("cpu/podvisor/pod-a"),
            ]
        );
    }
}
