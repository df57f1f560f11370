//! Mount plans as data: what the agent mounts at boot, for each container
//! (on the agent's side), and inside the container's mount namespace before
//! `pivot_root`. (The mounts a host lists are turned into such plans by the
//! module that checks them, which builds on this one.)
//!
//! A plan is a list of [`Op`]s applied in order by [`apply`] through the
//! [`Syscall`] trait, so the plans are unit-tested as values and the cloned
//! child only walks a prepared list (no allocation there).

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::stat::{Mode, SFlag};

use crate::syscall::Syscall;

/// Where shared mounts are made: `<SHARED_DIR>/<name>` (named for what
/// they all are today, layer disks).
pub const SHARED_DIR: &str = "/run/podvisor/layers";
/// Where container state lives: `<CONTAINERS_DIR>/<id>/{upper,work,rootfs,pts}`.
pub const CONTAINERS_DIR: &str = "/run/podvisor/containers";

/// One `mount(2)` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: Option<PathBuf>,
    pub target: PathBuf,
    pub fstype: Option<String>,
    pub flags: MsFlags,
    pub data: Option<String>,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a directory; an existing one is fine.
    Mkdir { path: PathBuf, mode: u32 },
    /// Mount something.
    Mount(Mount),
    /// Create a character device node.
    Mknod {
        path: PathBuf,
        major: u64,
        minor: u64,
        mode: u32,
    },
    /// Create a symbolic link `link` → `target`.
    Symlink { target: PathBuf, link: PathBuf },
}

impl Op {
    /// The path this step creates or mounts on, for error messages.
    pub fn target(&self) -> &Path {
        match self {
            Op::Mkdir { path, .. } | Op::Mknod { path, .. } => path,
            Op::Mount(m) => &m.target,
            Op::Symlink { link, .. } => link,
        }
    }

    /// A short description for error messages, e.g. `mount overlay on /x`.
    pub fn describe(&self) -> String {
        match self {
            Op::Mkdir { path, .. } => format!("mkdir {}", path.display()),
            Op::Mount(m) => format!(
                "mount {} on {}",
                m.fstype.as_deref().unwrap_or("(bind/move)"),
                m.target.display()
            ),
            Op::Mknod { path, .. } => format!("mknod {}", path.display()),
            Op::Symlink { link, .. } => format!("symlink {}", link.display()),
        }
    }
}

fn mkdir(path: impl Into<PathBuf>, mode: u32) -> Op {
    Op::Mkdir {
        path: path.into(),
        mode,
    }
}

fn mount(
    source: Option<&str>,
    target: impl Into<PathBuf>,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Op {
    Op::Mount(Mount {
        source: source.map(PathBuf::from),
        target: target.into(),
        fstype: fstype.map(str::to_string),
        flags,
        data: data.map(str::to_string),
    })
}

/// Applies `ops` in order; on failure returns the index of the failed step
/// and its errno. Does not allocate (safe in the cloned child).
pub fn apply(sys: &dyn Syscall, ops: &[Op]) -> Result<(), (usize, Errno)> {
    for (i, op) in ops.iter().enumerate() {
        let result = match op {
            Op::Mkdir { path, mode } => match sys.mkdir(path, Mode::from_bits_truncate(*mode)) {
                Err(Errno::EEXIST) => Ok(()),
                r => r,
            },
            Op::Mount(m) => sys.mount(
                m.source.as_deref(),
                &m.target,
                m.fstype.as_deref(),
                m.flags,
                m.data.as_deref(),
            ),
            Op::Mknod {
                path,
                major,
                minor,
                mode,
            } => sys.mknod(
                path,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(*mode),
                libc::makedev(*major as u32, *minor as u32),
            ),
            Op::Symlink { target, link } => sys.symlink(target, link),
        };
        result.map_err(|e| (i, e))?;
    }
    Ok(())
}

/// The file systems PID 1 mounts at boot, on the initramfs root.
pub fn boot_plan() -> Vec<Op> {
    let nosuid = MsFlags::MS_NOSUID;
    let hard = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    vec![
        mkdir("/proc", 0o555),
        mount(Some("proc"), "/proc", Some("proc"), hard, None),
        mkdir("/sys", 0o555),
        mount(Some("sysfs"), "/sys", Some("sysfs"), hard, None),
        mkdir("/dev", 0o755),
        mount(
            Some("devtmpfs"),
            "/dev",
            Some("devtmpfs"),
            nosuid,
            Some("mode=0755"),
        ),
        mkdir("/dev/pts", 0o755),
        mount(
            Some("devpts"),
            "/dev/pts",
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
        mkdir("/dev/shm", 0o1777),
        mount(
            Some("shm"),
            "/dev/shm",
            Some("tmpfs"),
            hard,
            Some("mode=1777"),
        ),
        mkdir("/run", 0o755),
        mount(
            Some("tmpfs"),
            "/run",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ]
}

/// Paths of one container's state on the agent's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDirs {
    /// `/run/podvisor/containers/<id>` (a tmpfs).
    pub base: PathBuf,
    /// The overlay mount: the container's root before `pivot_root`.
    pub rootfs: PathBuf,
    /// The container's own devpts instance, bound to its `/dev/pts`.
    pub pts: PathBuf,
}

impl ContainerDirs {
    /// The directories of container `id` (already validated as a file name).
    pub fn new(id: &str) -> Self {
        let base = Path::new(CONTAINERS_DIR).join(id);
        Self {
            rootfs: base.join("rootfs"),
            pts: base.join("pts"),
            base,
        }
    }

    /// The overlay's upper directory (on the container's tmpfs).
    pub fn upper(&self) -> PathBuf {
        self.base.join("upper")
    }

    /// The overlay's work directory (on the container's tmpfs).
    pub fn work(&self) -> PathBuf {
        self.base.join("work")
    }

    /// Mount points to detach when the container is gone, innermost first.
    pub fn teardown(&self) -> [&Path; 3] {
        [&self.pts, &self.rootfs, &self.base]
    }
}

/// What the agent mounts for a container in its own namespace: a tmpfs with
/// the overlay's upper and work dirs, the container's root on `rootfs/`
/// (`root`: the mount calls of the spec's root mount), and a fresh devpts
/// instance whose pty the terminal of the container comes from.
pub fn container_plan(dirs: &ContainerDirs, root: Vec<Op>) -> Vec<Op> {
    let mut ops = vec![
        mkdir("/run/podvisor", 0o755),
        mkdir(CONTAINERS_DIR, 0o755),
        mkdir(&dirs.base, 0o755),
        mount(
            Some("tmpfs"),
            &dirs.base,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        ),
        mkdir(dirs.upper(), 0o755),
        mkdir(dirs.work(), 0o755),
        mkdir(&dirs.rootfs, 0o755),
        mkdir(&dirs.pts, 0o755),
    ];
    ops.extend(root);
    ops.push(mount(
        Some("devpts"),
        &dirs.pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,gid=5,mode=0620,ptmxmode=0666"),
    ));
    ops
}

/// The directories under the container's root `root` to create, outermost
/// first, so that `target` (a path under it) exists.
pub fn mkdirs_under(root: &Path, target: &Path) -> Vec<Op> {
    let Ok(rel) = target.strip_prefix(root) else {
        return vec![];
    };
    let mut dir = root.to_path_buf();
    rel.components()
        .map(|c| {
            dir.push(c);
            mkdir(&dir, 0o755)
        })
        .collect()
}

/// Device nodes every container gets: name, major, minor.
const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// What the container's child does in its new mount namespace before
/// `pivot_root`: make every mount private, bind the root on itself, and
/// mount `/proc`, a tmpfs `/dev` with the standard nodes and links, the
/// container's devpts on `/dev/pts`, `/dev/shm`, and a read-only `/sys`.
/// Expects umask 0 (node modes are exact).
pub fn rootfs_plan(dirs: &ContainerDirs) -> Vec<Op> {
    let root = &dirs.rootfs;
    let r = |p: &str| root.join(p);
    let hard = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut ops = vec![
        mount(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None),
        Op::Mount(Mount {
            source: Some(root.clone()),
            target: root.clone(),
            fstype: None,
            flags: MsFlags::MS_BIND | MsFlags::MS_REC,
            data: None,
        }),
        mkdir(r("proc"), 0o555),
        mount(Some("proc"), r("proc"), Some("proc"), hard, None),
        mkdir(r("dev"), 0o755),
        mount(
            Some("tmpfs"),
            r("dev"),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            Some("mode=755,size=65536k"),
        ),
    ];
    for (name, major, minor) in DEVICES {
        ops.push(Op::Mknod {
            path: r("dev").join(name),
            major,
            minor,
            mode: 0o666,
        });
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        ops.push(Op::Symlink {
            target: target.into(),
            link: r("dev").join(link),
        });
    }
    ops.extend([
        mkdir(r("dev/pts"), 0o755),
        Op::Mount(Mount {
            source: Some(dirs.pts.clone()),
            target: r("dev/pts"),
            fstype: None,
            flags: MsFlags::MS_BIND,
            data: None,
        }),
        mkdir(r("dev/shm"), 0o1777),
        mount(
            Some("shm"),
            r("dev/shm"),
            Some("tmpfs"),
            hard,
            Some("mode=1777,size=65536k"),
        ),
        mkdir(r("sys"), 0o555),
        mount(
            Some("sysfs"),
            r("sys"),
            Some("sysfs"),
            hard | MsFlags::MS_RDONLY,
            None,
        ),
    ]);
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::RecordingSyscall;

    fn mounts(ops: &[Op]) -> Vec<&Mount> {
        ops.iter()
            .filter_map(|op| match op {
                Op::Mount(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn container_tmpfs_is_mounted_before_its_subdirectories_are_made() {
        let dirs = ContainerDirs::new("c1");
        let root = mount(
            Some("overlay"),
            &dirs.rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some("lowerdir=/run/podvisor/layers/pvl0"),
        );
        let plan = container_plan(&dirs, vec![root]);
        let tmpfs = plan
            .iter()
            .position(|op| matches!(op, Op::Mount(m) if m.target == dirs.base))
            .unwrap();
        let upper = plan
            .iter()
            .position(|op| op.target() == dirs.base.join("upper"))
            .unwrap();
        assert!(tmpfs < upper);
        assert!(
            matches!(plan.last(), Some(Op::Mount(m)) if m.data.as_deref().unwrap().contains("newinstance"))
        );
    }

    #[test]
    fn rootfs_plan_makes_mounts_private_first_and_sys_read_only() {
        let dirs = ContainerDirs::new("c1");
        let sys = RecordingSyscall::new();
        apply(&sys, &rootfs_plan(&dirs)).unwrap();
        let calls = sys.calls();
        assert_eq!(calls[0], "mount - / - REC|PRIVATE -");
        assert_eq!(
            calls[1],
            "mount /run/podvisor/containers/c1/rootfs /run/podvisor/containers/c1/rootfs - BIND|REC -"
        );
        assert!(
            calls.contains(
                &"mknod /run/podvisor/containers/c1/rootfs/dev/null c 1:3 666".to_string()
            )
        );
        assert!(calls.contains(
            &"symlink /run/podvisor/containers/c1/rootfs/dev/ptmx -> pts/ptmx".to_string()
        ));
        assert!(calls.contains(
            &"mount /run/podvisor/containers/c1/pts /run/podvisor/containers/c1/rootfs/dev/pts - BIND -".to_string()
        ));
        assert_eq!(
            calls.last().unwrap(),
            "mount sysfs /run/podvisor/containers/c1/rootfs/sys sysfs RDONLY|NOSUID|NODEV|NOEXEC -"
        );
    }

    #[test]
    fn apply_tolerates_existing_directories_and_reports_the_failed_step() {
        let dirs = ContainerDirs::new("c1");
        let sys = RecordingSyscall::new()
            .fail("mkdir", Errno::EEXIST)
            .fail("mount proc", Errno::EPERM);
        let plan = rootfs_plan(&dirs);
        let (index, errno) = apply(&sys, &plan).unwrap_err();
        assert_eq!(errno, Errno::EPERM);
        assert_eq!(
            plan[index].describe(),
            "mount proc on /run/podvisor/containers/c1/rootfs/proc"
        );
    }

    #[test]
    fn directories_under_the_root_are_made_outermost_first() {
        let root = Path::new("/r");
        let ops = mkdirs_under(root, Path::new("/r/srv/data"));
        let paths: Vec<_> = ops.iter().map(|op| op.target().to_path_buf()).collect();
        assert_eq!(
            paths,
            [PathBuf::from("/r/srv"), PathBuf::from("/r/srv/data")]
        );
        assert!(mkdirs_under(root, Path::new("/elsewhere")).is_empty());
    }

    #[test]
    fn boot_plan_mounts_the_basics() {
        let targets: Vec<_> = mounts(&boot_plan())
            .iter()
            .map(|m| m.target.clone())
            .collect();
        assert_eq!(
            targets,
            ["/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/run"].map(PathBuf::from)
        );
    }
}
