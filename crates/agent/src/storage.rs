//! Making the mounts a host lists, once they are checked
//! ([`mount_spec`]): shared mounts, made once each for the whole VM
//! ([`SharedMounts`]); the plan of a container's root; and the plan of the
//! mounts inside it, which its cloned child makes after the standard ones
//! (`/proc`, `/dev`, `/sys`) and before `pivot_root`.
//!
//! Disks are found through a [`DiskFinder`] (waiting for hot-plugged ones)
//! and mounts made through [`Syscall`], so all of it is unit-tested.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::MntFlags;
use nix::sys::stat::Mode;

use podvisor_proto::{Mount, StartError, StartErrorKind};

use crate::disks::DiskFinder;
use crate::mount_spec::{self, describe_target};
use crate::mounts::{self, ContainerDirs, Op};
use crate::path_lookup::resolve_in_root;
use crate::syscall::Syscall;

fn mount_error(message: String) -> StartError {
    StartError {
        kind: StartErrorKind::Mount,
        message,
    }
}

/// The node of `m`'s disk or encrypted volume mapping, if it comes from one.
fn find_disk(disks: &dyn DiskFinder, m: &Mount) -> Result<Option<PathBuf>, StartError> {
    if let Some(volume) = mount_spec::encrypted(m) {
        return disks.mapping(volume).map(Some).ok_or_else(|| {
            mount_error(format!(
                "{}: encrypted volume {volume} is not open",
                describe_target(&m.target)
            ))
        });
    }
    if let Some(uuid) = mount_spec::pmem(m) {
        return disks
            .find_pmem(uuid)
            .map(Some)
            .map_err(|e| mount_error(format!("{}: {e}", describe_target(&m.target))));
    }
    match mount_spec::disk(m) {
        None => Ok(None),
        Some(serial) => disks
            .find(serial)
            .map(Some)
            .map_err(|e| mount_error(format!("{}: {e}", describe_target(&m.target)))),
    }
}

/// The shared mounts made so far, by name, with what each was made from.
#[derive(Debug, Default)]
pub struct SharedMounts {
    made: HashMap<String, Mount>,
}

impl SharedMounts {
    /// Whether the shared mount `name` is made.
    pub fn is_made(&self, name: &str) -> bool {
        self.made.contains_key(name)
    }

    /// Makes each of `mounts` (checked, all shared) not made yet. One that
    /// is made already is skipped when it is the same mount and refused
    /// when it is another under the same name.
    pub fn make(
        &mut self,
        sys: &dyn Syscall,
        disks: &dyn DiskFinder,
        mounts: &[&Mount],
    ) -> Result<(), StartError> {
        for m in mounts {
            let Some(name) = m.shared_name() else {
                continue;
            };
            match self.made.get(name) {
                Some(made) if made == *m => continue,
                Some(_) => {
                    return Err(StartError {
                        kind: StartErrorKind::InvalidSpec,
                        message: format!(
                            "shared mount {name:?} is already made from another mount"
                        ),
                    });
                }
                None => {}
            }
            let device = find_disk(disks, m)?;
            let dir = mount_spec::shared_dir(name);
            let mut plan = vec![
                Op::Mkdir {
                    path: "/run/podvisor".into(),
                    mode: 0o755,
                },
                Op::Mkdir {
                    path: mounts::SHARED_DIR.into(),
                    mode: 0o755,
                },
                Op::Mkdir {
                    path: dir.clone(),
                    mode: 0o755,
                },
            ];
            plan.extend(mount_spec::ops(
                m,
                device.as_deref(),
                &dir,
                &ContainerDirs::new(name),
            )?);
            mounts::apply(sys, &plan).map_err(|(i, errno)| {
                let from = device
                    .as_ref()
                    .map(|d| format!(" ({})", d.display()))
                    .unwrap_or_default();
                mount_error(format!(
                    "shared mount {name}{from}: {}: {errno}",
                    plan[i].describe()
                ))
            })?;
            if let (Some(uuid), Some(device)) = (mount_spec::pmem(m), &device) {
                report_dax(disks, name, uuid, device, &dir, m);
            }
            self.made.insert(name.to_string(), (*m).clone());
        }
        Ok(())
    }
}

/// Says on the console whether the pmem layer just mounted on `dir` maps
/// its files with DAX (the kernel turns DAX off, and the mount still
/// works, when the device cannot do it: its pages are then cached in the
/// guest like a virtio-blk disk's).
fn report_dax(
    disks: &dyn DiskFinder,
    name: &str,
    uuid: &str,
    device: &Path,
    dir: &Path,
    m: &Mount,
) {
    let asked = m.options.iter().any(|o| o == "dax=always" || o == "dax");
    let from = format!("layer {name}: {} (EROFS {uuid})", device.display());
    match disks.dax(dir) {
        Some(true) => crate::log!("{from} mounted with DAX"),
        Some(false) if asked => crate::log!(
            "{from} mounted without DAX: the kernel turned it off; its pages are cached in the guest"
        ),
        Some(false) => crate::log!("{from} mounted without DAX"),
        None => {}
    }
}

impl SharedMounts {
    /// Unmounts the shared mounts made from encrypted volume `volume` and
    /// forgets them; returns what failed.
    pub fn unmake_volume(&mut self, sys: &dyn Syscall, volume: &str) -> Vec<String> {
        let names: Vec<String> = self
            .made
            .iter()
            .filter(|(_, m)| mount_spec::encrypted(m) == Some(volume))
            .map(|(name, _)| name.clone())
            .collect();
        let mut errors = Vec::new();
        for name in names {
            let dir = mount_spec::shared_dir(&name);
            let r = match sys.umount2(&dir, MntFlags::empty()) {
                Err(Errno::EBUSY) => sys.umount2(&dir, MntFlags::MNT_DETACH),
                r => r,
            };
            if let Err(e) = r {
                errors.push(format!("unmounting {}: {e}", dir.display()));
            }
            self.made.remove(&name);
        }
        errors
    }
}

/// Opens `rel` (a checked sub-path: relative, no `.`/`..`) inside the
/// directory `root` as an `O_PATH` descriptor, creating missing
/// directories (mode 0755) on the way. Every step is resolved with
/// `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` from `root`, so a
/// symbolic link there (`../../etc`, `/etc`) is followed as if `root` were
/// `/` and never leads out of it.
pub fn open_beneath(root: &Path, rel: &str) -> std::io::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let comps: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    if comps.is_empty() {
        return Err(Errno::EINVAL.into());
    }
    let mut last = None;
    for i in 0..comps.len() {
        let prefix = comps[..=i].join("/");
        let dir_only = i + 1 < comps.len();
        match openat2_in_root(&root_fd, &prefix, dir_only) {
            Ok(fd) => last = Some(fd),
            Err(Errno::ENOENT) => {
                let parent = if i == 0 {
                    root_fd.try_clone()?
                } else {
                    openat2_in_root(&root_fd, &comps[..i].join("/"), true)?
                };
                match nix::sys::stat::mkdirat(&parent, comps[i], Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                last = Some(openat2_in_root(&root_fd, &prefix, dir_only)?);
            }
            Err(e) => return Err(e.into()),
        }
    }
    last.ok_or_else(|| Errno::EINVAL.into())
}

fn openat2_in_root(root: &OwnedFd, path: &str, dir: bool) -> Result<OwnedFd, Errno> {
    let mut flags = libc::O_PATH | libc::O_CLOEXEC;
    if dir {
        flags |= libc::O_DIRECTORY;
    }
    openat2_resolved_in_root(root, path, flags)
}

/// Opens the regular file `rel` inside `root` for reading, resolved as if
/// `root` were `/` (a symlink never leads out of it; no magic links).
pub fn open_file_beneath(root: &Path, rel: &str) -> std::io::Result<std::fs::File> {
    use nix::fcntl::OFlag;
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let fd = openat2_resolved_in_root(
        &root_fd,
        rel,
        libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK,
    )?;
    let file = std::fs::File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

fn openat2_resolved_in_root(root: &OwnedFd, path: &str, flags: i32) -> Result<OwnedFd, Errno> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let path = std::ffi::CString::new(path).map_err(|_| Errno::EINVAL)?;
    // SAFETY: `open_how` is plain data; zero is valid for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    loop {
        // SAFETY: valid descriptor, NUL-terminated path and `how` of the
        // size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        match Errno::result(fd) {
            // SAFETY: the kernel returned a new descriptor we now own.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Where the `k`-th staged sub-path of a container is bound.
pub fn staged_dir(dirs: &ContainerDirs, k: usize) -> PathBuf {
    dirs.base.join("subpaths").join(k.to_string())
}

/// For each `SharedPath` bind of `inside` (in order): opens the path in its
/// shared mount ([`open_beneath`]) and binds what it found, through
/// `/proc/self/fd/N`, onto a directory (or file) of the container's own
/// tmpfs, which the container's child then binds onto the target. Nothing
/// can swap a symbolic link in between: the bind is of the opened inode.
/// Returns the staged paths, in order.
pub fn stage_shared_paths(
    sys: &dyn Syscall,
    inside: &[&Mount],
    dirs: &ContainerDirs,
) -> Result<Vec<PathBuf>, StartError> {
    use std::os::fd::AsRawFd;
    let mut staged = Vec::new();
    for m in inside {
        let podvisor_proto::MountSource::SharedPath { name, path } = &m.source else {
            continue;
        };
        let fail = |e: String| {
            mount_error(format!(
                "{}: path {path:?} of shared mount {name:?}: {e}",
                describe_target(&m.target)
            ))
        };
        let fd =
            open_beneath(&mount_spec::shared_dir(name), path).map_err(|e| fail(e.to_string()))?;
        let is_dir = nix::sys::stat::fstat(&fd)
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
            .map_err(|e| fail(e.to_string()))?;
        let at = staged_dir(dirs, staged.len());
        let mut plan = vec![Op::Mkdir {
            path: dirs.base.join("subpaths"),
            mode: 0o700,
        }];
        if is_dir {
            plan.push(Op::Mkdir {
                path: at.clone(),
                mode: 0o755,
            });
        } else {
            std::fs::File::create(&at).map_err(|e| fail(e.to_string()))?;
        }
        plan.push(Op::Mount(mounts::Mount {
            source: Some(format!("/proc/self/fd/{}", fd.as_raw_fd()).into()),
            target: at.clone(),
            fstype: None,
            flags: nix::mount::MsFlags::MS_BIND,
            data: None,
        }));
        mounts::apply(sys, &plan)
            .map_err(|(i, errno)| fail(format!("{}: {errno}", plan[i].describe())))?;
        staged.push(at);
    }
    Ok(staged)
}

/// The mount calls of the container's root on `dirs.rootfs` (its disk, if
/// it comes from one, found first).
pub fn root_plan(
    disks: &dyn DiskFinder,
    root: &Mount,
    dirs: &ContainerDirs,
) -> Result<Vec<Op>, StartError> {
    let device = find_disk(disks, root)?;
    mount_spec::ops(root, device.as_deref(), &dirs.rootfs, dirs)
}

/// What the container's child makes for the mounts inside its root, in
/// order: the directories each target needs, then its mount calls. Targets
/// are resolved in the mounted root (`dirs.rootfs`) as the container would
/// see them, so a symlink in the image never leads out of it.
///
/// `staged` are the staged `SharedPath` sources ([`stage_shared_paths`]),
/// in order.
pub fn inside_plan(
    disks: &dyn DiskFinder,
    inside: &[&Mount],
    dirs: &ContainerDirs,
    staged: &[PathBuf],
) -> Result<Vec<Op>, StartError> {
    let mut plan = Vec::new();
    let mut staged = staged.iter();
    for m in inside {
        let podvisor_proto::MountTarget::Container { path } = &m.target else {
            continue;
        };
        let target = resolve_in_root(&dirs.rootfs, Path::new(path)).map_err(|e| {
            mount_error(format!(
                "resolving the mount target {path:?} in the container: {e}"
            ))
        })?;
        if target == dirs.rootfs {
            return Err(StartError {
                kind: StartErrorKind::InvalidSpec,
                message: format!("the mount target {path:?} resolves to the container's root"),
            });
        }
        let device = match &m.source {
            podvisor_proto::MountSource::SharedPath { .. } => Some(
                staged
                    .next()
                    .cloned()
                    .ok_or_else(|| mount_error("a sub-path was not staged (a bug)".into()))?,
            ),
            _ => find_disk(disks, m)?,
        };
        plan.extend(mounts::mkdirs_under(&dirs.rootfs, &target));
        plan.extend(mount_spec::ops(m, device.as_deref(), &target, dirs)?);
    }
    Ok(plan)
}

#[cfg(test)]
#[path = "storage_tests.rs"]
mod tests;
