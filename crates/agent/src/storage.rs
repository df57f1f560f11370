//! Making the mounts a host lists, once they are checked
//! ([`mount_spec`]): shared mounts, made once each for the whole VM
//! ([`SharedMounts`]); the plan of a container's root; and the plan of the
//! mounts inside it, which its cloned child makes after the standard ones
//! (`/proc`, `/dev`, `/sys`) and before `pivot_root`.
//!
//! Disks are found through a [`DiskFinder`] (waiting for hot-plugged ones)
//! and mounts made through [`Syscall`], so all of it is unit-tested.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

/// The node of `m`'s disk, if it comes from one.
fn find_disk(disks: &dyn DiskFinder, m: &Mount) -> Result<Option<PathBuf>, StartError> {
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
            self.made.insert(name.to_string(), (*m).clone());
        }
        Ok(())
    }
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
pub fn inside_plan(
    disks: &dyn DiskFinder,
    inside: &[&Mount],
    dirs: &ContainerDirs,
) -> Result<Vec<Op>, StartError> {
    let mut plan = Vec::new();
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
        let device = find_disk(disks, m)?;
        plan.extend(mounts::mkdirs_under(&dirs.rootfs, &target));
        plan.extend(mount_spec::ops(m, device.as_deref(), &target, dirs)?);
    }
    Ok(plan)
}

#[cfg(test)]
#[path = "storage_tests.rs"]
mod tests;
