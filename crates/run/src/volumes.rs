//! Named volumes of `podvisor run` (`-v NAME:/path[:ro]`), as docker's
//! local volumes: an ext4 disk file per name in the volume directory, made
//! on first use and kept after the run, attached to the pod VM as a
//! virtio-blk disk and bind-mounted into the container. One run uses a
//! volume at a time (a lock on its file; QEMU's own image lock backs it
//! up). A host directory cannot be shared into a VM this way: `-v
//! /host/dir:/path` is refused with a clear error.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use podvisor_proto::{Mount, MountSource, MountTarget, add_volume_mounts, volume_mount_name};
use podvisor_vmm::BlockDevice;

/// Size of a new named volume: a sparse file, so only what is written
/// takes space.
pub const DEFAULT_VOLUME_BYTES: u64 = 10 << 30;

/// One `-v NAME:/path[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedVolume {
    pub name: String,
    /// Absolute path in the container.
    pub path: String,
    pub read_only: bool,
}

/// Parses `NAME:/path`, `NAME:/path:ro` or `NAME:/path:rw`.
pub fn parse_volume_arg(s: &str) -> Result<NamedVolume, String> {
    let mut parts = s.split(':');
    let name = parts.next().unwrap_or_default();
    let Some(path) = parts.next() else {
        return Err(format!(
            "{s:?}: expected NAME:/path[:ro] (a named volume and where it goes)"
        ));
    };
    let read_only = match parts.next() {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(other) => return Err(format!("{s:?}: unknown mode {other:?} (ro or rw)")),
    };
    if parts.next().is_some() {
        return Err(format!("{s:?}: expected NAME:/path[:ro]"));
    }
    if name.starts_with('/') || name.starts_with('.') {
        return Err(format!(
            "{s:?}: a host directory cannot be shared into a pod VM; use a named volume \
             (NAME:/path), which podvisor keeps as a disk"
        ));
    }
    let ok_name = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok_name {
        return Err(format!(
            "{s:?}: volume name {name:?} must be 1-64 letters, digits, '_', '.' or '-', \
             starting with a letter or digit"
        ));
    }
    let ok_path = path.starts_with('/')
        && path != "/"
        && !path.split('/').any(|c| c == ".." || c == ".")
        && path.len() <= 4096;
    if !ok_path {
        return Err(format!(
            "{s:?}: the container path {path:?} must be absolute, not /, without . or .."
        ));
    }
    Ok(NamedVolume {
        name: name.into(),
        path: path.into(),
        read_only,
    })
}

/// The named volumes of one run, ready and locked for it.
pub struct RunVolumes {
    pub disks: Vec<BlockDevice>,
    /// The mounts to add to the container (shared ones before its root,
    /// binds after).
    shared: Vec<Mount>,
    binds: Vec<Mount>,
    /// Held while the run lasts.
    _locks: Vec<File>,
}

/// Errors of named volumes.
#[derive(Debug, thiserror::Error)]
pub enum RunVolumeError {
    #[error("volume {name} is in use by another podvisor run")]
    InUse { name: String },
    #[error("volume {name}: {what}")]
    Io {
        name: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {name}: cannot make its disk")]
    Disk {
        name: String,
        #[source]
        source: podvisor_volume::VolumeError,
    },
    #[error("volume {name} is named twice")]
    Twice { name: String },
}

impl RunVolumes {
    /// Makes (first use) and locks the disks of `volumes` in `dir`.
    pub fn open(dir: &Path, volumes: &[NamedVolume]) -> Result<RunVolumes, RunVolumeError> {
        let mut out = RunVolumes {
            disks: vec![],
            shared: vec![],
            binds: vec![],
            _locks: vec![],
        };
        for (i, v) in volumes.iter().enumerate() {
            if volumes[..i].iter().any(|o| o.name == v.name) {
                return Err(RunVolumeError::Twice {
                    name: v.name.clone(),
                });
            }
            let io = |what: &str| {
                let (name, what) = (v.name.clone(), what.to_string());
                move |source| RunVolumeError::Io { name, what, source }
            };
            let path: PathBuf = dir.join(format!("{}.img", v.name));
            if !path.exists() {
                podvisor_volume::format_ext4(&path, DEFAULT_VOLUME_BYTES).map_err(|source| {
                    RunVolumeError::Disk {
                        name: v.name.clone(),
                        source,
                    }
                })?;
            }
            let file = File::open(&path).map_err(io("open its disk"))?;
            // SAFETY: flock on a descriptor this function owns.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(RunVolumeError::InUse {
                        name: v.name.clone(),
                    });
                }
                return Err(io("lock its disk")(e));
            }
            out._locks.push(file);
            let serial = format!("pvv{i}");
            out.disks.push(BlockDevice {
                id: format!("vol-{serial}"),
                path,
                read_only: false,
                serial: serial.clone(),
            });
            out.shared.push(Mount {
                source: MountSource::Disk { serial },
                fstype: "ext4".into(),
                target: MountTarget::Shared {
                    name: volume_mount_name(&v.name),
                },
                options: vec!["nosuid".into(), "nodev".into()],
                read_only: false,
            });
            out.binds
                .push(Mount::volume_bind(&v.name, None, &v.path, v.read_only));
        }
        Ok(out)
    }

    /// Adds the volumes' mounts to a container's image mounts.
    pub fn add_mounts(&self, mounts: &mut Vec<Mount>) {
        add_volume_mounts(mounts, self.shared.clone(), self.binds.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_arguments_are_named_volumes_with_absolute_paths() {
        assert_eq!(
            parse_volume_arg("data:/var/lib/data").unwrap(),
            NamedVolume {
                name: "data".into(),
                path: "/var/lib/data".into(),
                read_only: false
            }
        );
        assert!(parse_volume_arg("data:/d:ro").unwrap().read_only);
        assert!(!parse_volume_arg("data:/d:rw").unwrap().read_only);
        let e = parse_volume_arg("/etc:/host-etc").unwrap_err();
        assert!(e.contains("a host directory cannot be shared"), "{e}");
        for bad in [
            "data",
            "data:rel",
            "data:/",
            "data:/a/../b",
            "data:/d:rx",
            "-x:/d",
            ":/d",
            "a b:/d",
            "d:/x:ro:z",
        ] {
            assert!(parse_volume_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn volume_mounts_go_around_the_root() {
        let dir = tempfile::tempdir().unwrap();
        // No mkfs needed for the mount layout: an existing file is used as is.
        std::fs::write(dir.path().join("v.img"), b"").unwrap();
        let vols =
            RunVolumes::open(dir.path(), &[parse_volume_arg("v:/data:ro").unwrap()]).unwrap();
        let mut mounts = podvisor_proto::image_mounts(&["pvl0".into()]);
        vols.add_mounts(&mut mounts);
        assert_eq!(
            mounts[1].target,
            MountTarget::Shared {
                name: "vol-v".into()
            }
        );
        assert_eq!(mounts[2].target, MountTarget::Root);
        assert_eq!(
            mounts[3].target,
            MountTarget::Container {
                path: "/data".into()
            }
        );
        assert!(mounts[3].read_only);
        // A second run cannot take it while this one holds it.
        let again = RunVolumes::open(dir.path(), &[parse_volume_arg("v:/d").unwrap()]);
        assert!(
            matches!(again, Err(RunVolumeError::InUse { .. })),
            "{:?}",
            again.err()
        );
        drop(vols);
        assert!(RunVolumes::open(dir.path(), &[parse_volume_arg("v:/d").unwrap()]).is_ok());
    }
}
