//! Mounts as data: what the agent mounts for a container, as a list of
//! [`Mount`]s in the order they are made.
//!
//! A mount says where its file system comes from ([`MountSource`]), its
//! type, where it goes ([`MountTarget`]), its options and whether it is
//! read-only, in the spirit of containerd's `Mount` (type, source, target,
//! options) and Kata's agent `Storage` (driver, source, fstype, options,
//! mount point). An image's layers are [`Mount::layer`]s: EROFS disks found
//! by their virtio-blk serial and mounted once for the whole VM (or
//! [`Mount::layer_pmem`]s: virtio-pmem devices found by their EROFS UUID,
//! mounted with DAX); the container's root is [`Mount::overlay_root`] over
//! them. A volume, a
//! tmpfs, a bind, a DAX layer or a dm-crypt mapping is another entry or
//! another kind of source, never another message.
//!
//! The agent checks everything: an unknown type, an option it does not
//! know for the type, a target outside the container root, a source naming
//! a shared mount not listed before it are refused with a `StartFailed`.

use serde::{Deserialize, Serialize};

/// Longest virtio-blk serial (the device's `VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL_LEN: usize = 20;

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Where the file system comes from.
    pub source: MountSource,
    /// The file system type: `erofs`, `tmpfs`, `overlay`, `ext4` (a
    /// volume: a disk or an encrypted volume's mapping), or `bind` for a
    /// bind mount of a shared mount (or a path inside one).
    pub fstype: String,
    /// Where it goes.
    pub target: MountTarget,
    /// fstab-style options: flags (`nosuid`, `nodev`, `noexec`) and
    /// `key=value` settings of the type (`dax=always` for erofs, `size=64m`
    /// and `mode=1777` for tmpfs). The agent refuses what it does not know.
    pub options: Vec<String>,
    /// Mount it read-only.
    pub read_only: bool,
}

/// Where a mount's file system comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountSource {
    /// A virtio-blk disk with this serial (at most [`MAX_SERIAL_LEN`]
    /// bytes). The agent waits a few seconds for it: disks probe
    /// asynchronously and hot-plugged ones appear a little after the host
    /// added them.
    Disk { serial: String },
    /// No device: the type makes the file system (`tmpfs`).
    Anonymous,
    /// An overlay of shared mounts listed earlier, named bottom layer
    /// first, with a fresh writable upper directory of the container's own
    /// (gone when the container ends; a restart starts afresh).
    Overlay { lower: Vec<String> },
    /// A shared mount listed earlier, by name (the source of a `bind`).
    Shared { name: String },
    /// The open dm-crypt mapping of the encrypted volume `volume` (see
    /// [`volumes`](crate::volumes)); `ext4`. A mapping that is not open
    /// (no key yet, refused, revoked) is a `StartFailed` (`Mount`): the
    /// host starts such a container only after the volume opened.
    Encrypted { volume: String },
    /// The directory `path` inside the shared mount `name` listed earlier
    /// (a Kubernetes `subPath`; the source of a `bind`): relative, without
    /// `.` or `..` components, at most 4096 bytes; resolved inside that
    /// mount (a symlink there never leads out of it); created, with its
    /// parents, if missing.
    SharedPath { name: String, path: String },
    /// A virtio-pmem device holding the EROFS file system with this UUID
    /// (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lower case; a layer disk's
    /// UUID comes from its ChainID). Mounted with `dax=always`, so file
    /// reads map the host's page cache of the shared file instead of
    /// copying it into guest memory. The agent waits a few seconds for it,
    /// as for a `Disk`.
    Pmem { uuid: String },
}

/// Where a mount goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountTarget {
    /// A mount of the whole VM, shared by its containers, under this name
    /// (a safe file name). It is made once: a later container (or
    /// [`HostMessage::MountShared`](crate::HostMessage::MountShared))
    /// listing the same mount finds it made; one listing another mount
    /// under the same name is refused.
    Shared { name: String },
    /// The container's root file system. A container spec has exactly one.
    Root,
    /// A path inside the container: absolute, without `.` or `..`
    /// components; symlinks in the image are followed inside the
    /// container's root. Made after the root, in the container's own mount
    /// namespace (an exec sees them; they end with the container).
    Container { path: String },
}

impl Mount {
    /// The layer disk with `serial`: EROFS, read-only, shared under its
    /// serial (each disk is mounted once however many containers use it).
    pub fn layer(serial: impl Into<String>) -> Mount {
        let serial = serial.into();
        Mount {
            source: MountSource::Disk {
                serial: serial.clone(),
            },
            fstype: "erofs".into(),
            target: MountTarget::Shared { name: serial },
            options: vec![],
            read_only: true,
        }
    }

    /// The layer disk attached as a virtio-pmem device whose EROFS UUID is
    /// `uuid`: read-only, mounted with `dax=always` (file reads map the
    /// host's page cache of the disk, which every VM mapping it shares),
    /// shared under `name` (each disk is mounted once however many
    /// containers use it).
    pub fn layer_pmem(name: impl Into<String>, uuid: impl Into<String>) -> Mount {
        Mount {
            source: MountSource::Pmem { uuid: uuid.into() },
            fstype: "erofs".into(),
            target: MountTarget::Shared { name: name.into() },
            options: vec!["dax=always".into()],
            read_only: true,
        }
    }

    /// The container's root: an overlay of the shared mounts `lower`,
    /// bottom first, with a writable upper of the container's own.
    pub fn overlay_root(lower: Vec<String>) -> Mount {
        Mount {
            source: MountSource::Overlay { lower },
            fstype: "overlay".into(),
            target: MountTarget::Root,
            options: vec![],
            read_only: false,
        }
    }

    /// The shared mount this one makes, if it makes one.
    pub fn shared_name(&self) -> Option<&str> {
        match &self.target {
            MountTarget::Shared { name } => Some(name),
            _ => None,
        }
    }
}

/// Name prefix of the shared mount of a pod volume: a volume `data` is
/// shared as `vol-data`.
pub const VOLUME_MOUNT_PREFIX: &str = "vol-";

/// The shared mount name of pod volume `volume` (`vol-<volume>`).
pub fn volume_mount_name(volume: &str) -> String {
    format!("{VOLUME_MOUNT_PREFIX}{volume}")
}

impl Mount {
    /// A bind of pod volume `volume` (or of the directory `sub_path`
    /// inside it) at `path` in the container.
    pub fn volume_bind(volume: &str, sub_path: Option<&str>, path: &str, read_only: bool) -> Mount {
        let name = volume_mount_name(volume);
        let source = match sub_path {
            Some(p) => MountSource::SharedPath {
                name,
                path: p.to_string(),
            },
            None => MountSource::Shared { name },
        };
        Mount {
            source,
            fstype: "bind".into(),
            target: MountTarget::Container {
                path: path.to_string(),
            },
            options: vec![],
            read_only,
        }
    }
}

/// Adds a container's volume mounts to its image's (layers, then the
/// root): the volumes' shared mounts before the root, their binds after
/// it, as the agent makes them.
pub fn add_volume_mounts(mounts: &mut Vec<Mount>, shared: Vec<Mount>, binds: Vec<Mount>) {
    let root = mounts
        .iter()
        .position(|m| m.target == MountTarget::Root)
        .unwrap_or(mounts.len());
    mounts.splice(root..root, shared);
    mounts.extend(binds);
}

/// The mounts of a container made from an image whose layer disks have
/// `serials`, bottom layer first: each layer, then the overlay root over
/// them.
pub fn image_mounts(serials: &[String]) -> Vec<Mount> {
    layered_mounts(serials.iter().map(|s| Mount::layer(s.clone())).collect())
}

/// The mounts of a container made from an image whose layer disks are
/// virtio-pmem devices, bottom layer first, each `(name, uuid)`: each
/// layer ([`Mount::layer_pmem`]), then the overlay root over them.
pub fn pmem_image_mounts(layers: &[(String, String)]) -> Vec<Mount> {
    layered_mounts(
        layers
            .iter()
            .map(|(name, uuid)| Mount::layer_pmem(name.clone(), uuid.clone()))
            .collect(),
    )
}

/// `layers` (shared mounts, bottom first), then the overlay root over them.
fn layered_mounts(mut layers: Vec<Mount>) -> Vec<Mount> {
    let lower = layers
        .iter()
        .filter_map(|m| m.shared_name().map(str::to_string))
        .collect();
    layers.push(Mount::overlay_root(lower));
    layers
}
