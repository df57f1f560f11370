//! The mounts a host lists ([`podvisor_proto::Mount`]), checked and turned
//! into mount plans ([`Op`]s).
//!
//! [`check_container`] and [`check_shared`] refuse what the agent cannot
//! or will not mount, before anything is mounted: an unknown type, a
//! source that does not fit the type, an option the agent does not know
//! for the type, a target outside the container root, a reference to a
//! shared mount not listed before it. [`ops`] then gives the `mount(2)`
//! calls of one checked mount once its disk (if any) has been found.
//!
//! | type | source | options |
//! |---|---|---|
//! | `erofs` (read-only) | a disk by serial, or a pmem device by the UUID of the EROFS it holds | `dax`, `dax=always`, `dax=never` |
//! | `tmpfs` | none | `size=`, `nr_inodes=`, `mode=` |
//! | `overlay` (the root only) | shared mounts, bottom first; a fresh upper | none |
//! | `ext4` (shared only) | a disk by serial (a plain volume), or an encrypted volume's open mapping | none |
//! | `bind` (not shared) | a shared mount, or a relative path inside one (`SharedPath`) | none |
//!
//! Every type also takes the flags `nosuid`, `nodev` and `noexec`; a
//! mount from a disk, a pmem device or a mapping is always `nodev`.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use podvisor_proto::{MAX_SERIAL_LEN, Mount, MountSource, MountTarget, StartError, StartErrorKind};

use crate::mounts::{self, ContainerDirs, Op};
use crate::path_lookup::is_safe_name;

/// Most mounts one container spec (or one `MountShared`) may list.
pub const MAX_MOUNTS: usize = 256;

/// Longest option string `mount(2)` takes (one page, with its NUL).
const MAX_MOUNT_DATA: usize = 4095;

/// Longest container path a mount may target.
const MAX_TARGET_LEN: usize = 4096;

fn invalid(message: String) -> StartError {
    StartError {
        kind: StartErrorKind::InvalidSpec,
        message,
    }
}

/// A container's mounts by where they go, each in the order listed.
#[derive(Debug, PartialEq, Eq)]
pub struct ContainerMounts<'a> {
    /// Mounts of the whole VM (the layers), made once each.
    pub shared: Vec<&'a Mount>,
    /// The container's root.
    pub root: &'a Mount,
    /// Mounts inside the container's root, made after it.
    pub inside: Vec<&'a Mount>,
}

/// Checks a container spec's mounts: each one, exactly one root, and every
/// mount inside the container listed after the root.
pub fn check_container(mounts: &[Mount]) -> Result<ContainerMounts<'_>, StartError> {
    check_list(mounts)?;
    let mut shared = Vec::new();
    let mut root = None;
    let mut inside = Vec::new();
    for m in mounts {
        match &m.target {
            MountTarget::Shared { .. } => shared.push(m),
            MountTarget::Root if root.is_some() => {
                return Err(invalid("the container has more than one root mount".into()));
            }
            MountTarget::Root => root = Some(m),
            MountTarget::Container { path } if root.is_none() => {
                return Err(invalid(format!(
                    "the mount on {path:?} is listed before the container's root"
                )));
            }
            MountTarget::Container { .. } => inside.push(m),
        }
    }
    let root = root.ok_or_else(|| invalid("the container has no root mount".into()))?;
    Ok(ContainerMounts {
        shared,
        root,
        inside,
    })
}

/// Checks the mounts of a `MountShared`: each one, all of them shared.
pub fn check_shared(mounts: &[Mount]) -> Result<(), StartError> {
    check_list(mounts)?;
    match mounts.iter().find(|m| m.shared_name().is_none()) {
        Some(m) => Err(invalid(format!(
            "{} is not a shared mount",
            describe_target(&m.target)
        ))),
        None => Ok(()),
    }
}

/// Checks each mount of a list in order: shared names are unique and
/// referred to only after they are listed.
fn check_list(mounts: &[Mount]) -> Result<(), StartError> {
    if mounts.len() > MAX_MOUNTS {
        return Err(invalid(format!(
            "{} mounts listed; at most {MAX_MOUNTS} are allowed",
            mounts.len()
        )));
    }
    let mut shared: HashSet<&str> = HashSet::new();
    for m in mounts {
        check_one(m, &shared)?;
        if let Some(name) = m.shared_name() {
            shared.insert(name);
        }
    }
    Ok(())
}

/// How a target is named in messages.
pub fn describe_target(target: &MountTarget) -> String {
    match target {
        MountTarget::Shared { name } => format!("shared mount {name:?}"),
        MountTarget::Root => "the container's root".into(),
        MountTarget::Container { path } => format!("the mount on {path:?}"),
    }
}

/// Checks one mount; `shared` holds the shared mounts listed before it.
fn check_one(m: &Mount, shared: &HashSet<&str>) -> Result<(), StartError> {
    let what = describe_target(&m.target);
    let bad = |reason: String| invalid(format!("{what}: {reason}"));
    match &m.target {
        MountTarget::Shared { name } => {
            if !is_safe_name(name) {
                return Err(invalid(format!("invalid shared mount name {name:?}")));
            }
            if shared.contains(name.as_str()) {
                return Err(bad("listed twice".into()));
            }
        }
        MountTarget::Root => {}
        MountTarget::Container { path } => container_path(path).map_err(bad)?,
    }
    let known = |name: &str| -> Result<(), StartError> {
        if shared.contains(name) {
            Ok(())
        } else {
            Err(bad(format!(
                "shared mount {name:?} is not listed before it"
            )))
        }
    };
    match (m.fstype.as_str(), &m.source) {
        ("erofs", MountSource::Disk { serial }) => {
            disk_serial(serial).map_err(bad)?;
            if !m.read_only {
                return Err(bad("an erofs mount must be read-only".into()));
            }
        }
        ("erofs", MountSource::Pmem { uuid }) => {
            if crate::disks::parse_uuid(uuid).is_none() {
                return Err(bad(format!(
                    "invalid EROFS UUID {uuid:?} (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, lower case)"
                )));
            }
            if !m.read_only {
                return Err(bad("an erofs mount must be read-only".into()));
            }
        }
        ("tmpfs", MountSource::Anonymous) => {}
        ("overlay", MountSource::Overlay { lower }) => {
            if m.target != MountTarget::Root {
                return Err(bad("an overlay can only be the container's root".into()));
            }
            if lower.is_empty() {
                return Err(bad("the overlay has no lower layers".into()));
            }
            for name in lower {
                known(name)?;
            }
        }
        ("ext4", MountSource::Disk { serial }) => {
            disk_serial(serial).map_err(bad)?;
            if m.shared_name().is_none() {
                return Err(bad("an ext4 volume can only be a shared mount".into()));
            }
        }
        ("ext4", MountSource::Encrypted { volume }) => {
            if !is_safe_name(volume) {
                return Err(bad(format!("invalid volume name {volume:?}")));
            }
            if m.shared_name().is_none() {
                return Err(bad("an ext4 volume can only be a shared mount".into()));
            }
        }
        ("bind", MountSource::Shared { name }) => {
            if m.shared_name().is_some() {
                return Err(bad("a bind mount cannot be shared".into()));
            }
            known(name)?;
        }
        ("bind", MountSource::SharedPath { name, path }) => {
            if m.shared_name().is_some() {
                return Err(bad("a bind mount cannot be shared".into()));
            }
            known(name)?;
            sub_path(path).map_err(bad)?;
        }
        ("erofs" | "tmpfs" | "overlay" | "bind" | "ext4", source) => {
            return Err(bad(format!(
                "a {} mount cannot come from {}",
                m.fstype,
                describe_source(source)
            )));
        }
        (other, _) => {
            return Err(bad(format!(
                "unknown mount type {other:?} (the agent mounts erofs, tmpfs, overlay, ext4 and bind)"
            )));
        }
    }
    options(m).map(drop)
}

fn describe_source(source: &MountSource) -> String {
    match source {
        MountSource::Disk { serial } => format!("a disk ({serial:?})"),
        MountSource::Pmem { uuid } => format!("a pmem device ({uuid})"),
        MountSource::Anonymous => "nothing".into(),
        MountSource::Overlay { .. } => "an overlay of layers".into(),
        MountSource::Shared { name } => format!("shared mount {name:?}"),
        MountSource::Encrypted { volume } => format!("encrypted volume {volume:?}"),
        MountSource::SharedPath { name, path } => {
            format!("path {path:?} of shared mount {name:?}")
        }
    }
}

/// Longest `SharedPath` path.
const MAX_SUB_PATH_LEN: usize = 4096;

/// A path inside a shared mount (a `subPath`): relative, only normal
/// components, at most [`MAX_SUB_PATH_LEN`] bytes.
pub(crate) fn sub_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > MAX_SUB_PATH_LEN || path.contains('\0') {
        return Err("the sub-path is empty, too long or not a usable path".into());
    }
    if path.starts_with('/') {
        return Err(format!("the sub-path {path:?} is not relative"));
    }
    if path.split('/').any(|c| c == "." || c == "..") {
        return Err(format!("the sub-path {path:?} has a `.` or `..` component"));
    }
    Ok(())
}

/// A virtio-blk serial: a safe name of at most [`MAX_SERIAL_LEN`] bytes.
fn disk_serial(serial: &str) -> Result<(), String> {
    if is_safe_name(serial) && serial.len() <= MAX_SERIAL_LEN {
        Ok(())
    } else {
        Err(format!("invalid disk serial {serial:?}"))
    }
}

/// A path inside the container: absolute, only normal components, not `/`.
fn container_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("the target is not an absolute path".into());
    }
    if path.len() > MAX_TARGET_LEN || path.contains('\0') {
        return Err("the target is not a usable path".into());
    }
    let mut normal = 0;
    for c in Path::new(path).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(_) => normal += 1,
            Component::ParentDir | Component::CurDir | Component::Prefix(_) => {
                return Err("the target has a `.` or `..` component".into());
            }
        }
    }
    // `Path::components` drops inner `.`s; the text still has them.
    if path.split('/').any(|c| c == "." || c == "..") {
        return Err("the target has a `.` or `..` component".into());
    }
    if normal == 0 {
        return Err("the target is the container's root itself".into());
    }
    Ok(())
}

/// A mount's options as `mount(2)` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub flags: MsFlags,
    /// The file system's own options, comma-separated, if any.
    pub data: Option<String>,
}

/// The flags and data of `m`'s options; refuses an option the agent does
/// not know for the type.
pub fn options(m: &Mount) -> Result<Options, StartError> {
    let mut flags = MsFlags::empty();
    if m.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    if matches!(
        m.source,
        MountSource::Disk { .. } | MountSource::Pmem { .. } | MountSource::Encrypted { .. }
    ) {
        flags |= MsFlags::MS_NODEV;
    }
    let mut data = Vec::new();
    for option in &m.options {
        match option.as_str() {
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            o if fs_option(&m.fstype, o) => data.push(o),
            o => {
                return Err(invalid(format!(
                    "{}: mount option {o:?} is not one the agent takes for {}",
                    describe_target(&m.target),
                    m.fstype
                )));
            }
        }
    }
    Ok(Options {
        flags,
        data: (!data.is_empty()).then(|| data.join(",")),
    })
}

/// Whether `option` is a setting of file system `fstype` the agent passes on.
fn fs_option(fstype: &str, option: &str) -> bool {
    let (key, value) = option.split_once('=').unwrap_or((option, ""));
    match (fstype, key) {
        ("erofs", "dax") => matches!(value, "" | "always" | "never"),
        ("tmpfs", "size") => size(value, true),
        ("tmpfs", "nr_inodes") => size(value, false),
        ("tmpfs", "mode") => {
            (3..=4).contains(&value.len()) && value.bytes().all(|b| (b'0'..=b'7').contains(&b))
        }
        _ => false,
    }
}

/// A tmpfs size: digits with an optional `k`, `m` or `g` (or `%` where
/// `percent`).
fn size(value: &str, percent: bool) -> bool {
    let digits = value.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G']);
    let digits = if percent {
        digits.strip_suffix('%').unwrap_or(digits)
    } else {
        digits
    };
    (1..=20).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && value.len() - digits.len() <= 1
}

/// Where the agent mounts shared mount `name`.
pub fn shared_dir(name: &str) -> PathBuf {
    Path::new(mounts::SHARED_DIR).join(name)
}

/// The `mount(2)` calls of checked mount `m` on `target`. `device` is the
/// node of its disk (for a disk source) or mapping (an encrypted volume),
/// or the staged directory of a `SharedPath` (see
/// [`crate::storage::stage_shared_paths`]); `dirs` are the container's
/// (for an overlay's upper and work directories).
pub fn ops(
    m: &Mount,
    device: Option<&Path>,
    target: &Path,
    dirs: &ContainerDirs,
) -> Result<Vec<Op>, StartError> {
    let o = options(m)?;
    let call = |source: PathBuf, fstype: Option<&str>, flags, data| {
        Op::Mount(mounts::Mount {
            source: Some(source),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_string),
            flags,
            data,
        })
    };
    let ops = match &m.source {
        MountSource::Disk { .. } | MountSource::Pmem { .. } | MountSource::Encrypted { .. } => {
            let device = device.ok_or_else(|| {
                invalid(format!(
                    "{} has not been looked up (a bug)",
                    describe_source(&m.source)
                ))
            })?;
            vec![call(device.to_path_buf(), Some(&m.fstype), o.flags, o.data)]
        }
        MountSource::Anonymous => vec![call(
            m.fstype.clone().into(),
            Some(&m.fstype),
            o.flags,
            o.data,
        )],
        MountSource::Overlay { lower } => {
            let lower: Vec<String> = lower
                .iter()
                .rev()
                .map(|s| shared_dir(s).display().to_string())
                .collect();
            let data = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.join(":"),
                dirs.upper().display(),
                dirs.work().display()
            );
            if data.len() > MAX_MOUNT_DATA {
                return Err(invalid(format!(
                    "the overlay's options are longer than {MAX_MOUNT_DATA} bytes ({} layers)",
                    lower.len()
                )));
            }
            vec![call("overlay".into(), Some("overlay"), o.flags, Some(data))]
        }
        MountSource::Shared { .. } | MountSource::SharedPath { .. } => {
            let source = match &m.source {
                MountSource::Shared { name } => shared_dir(name),
                _ => device
                    .ok_or_else(|| invalid("the sub-path has not been staged (a bug)".into()))?
                    .to_path_buf(),
            };
            let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
            let mut ops = vec![call(source, None, bind, None)];
            // A bind takes its flags only when remounted.
            if !o.flags.is_empty() {
                ops.push(Op::Mount(mounts::Mount {
                    source: None,
                    target: target.to_path_buf(),
                    fstype: None,
                    flags: MsFlags::MS_BIND | MsFlags::MS_REMOUNT | o.flags,
                    data: None,
                }));
            }
            ops
        }
    };
    Ok(ops)
}

/// The encrypted volumes `mounts` (one container's spec) use: as the
/// source of a mount, or through a shared mount made from one (or named
/// `vol-<volume>`) that a bind or overlay uses.
pub fn volumes_used(mounts: &[Mount]) -> std::collections::BTreeSet<String> {
    use podvisor_proto::VOLUME_MOUNT_PREFIX;
    let mut of_shared: std::collections::HashMap<&str, &str> = Default::default();
    let mut used = std::collections::BTreeSet::new();
    for m in mounts {
        if let MountSource::Encrypted { volume } = &m.source {
            used.insert(volume.clone());
            if let Some(name) = m.shared_name() {
                of_shared.insert(name, volume);
            }
        }
    }
    let mut via = |name: &str| {
        if let Some(v) = of_shared.get(name) {
            used.insert(v.to_string());
        } else if let Some(v) = name.strip_prefix(VOLUME_MOUNT_PREFIX) {
            used.insert(v.to_string());
        }
    };
    for m in mounts {
        match &m.source {
            MountSource::Shared { name } | MountSource::SharedPath { name, .. } => via(name),
            MountSource::Overlay { lower } => lower.iter().for_each(|n| via(n)),
            _ => {}
        }
        if let Some(name) = m.shared_name() {
            via(name);
        }
    }
    used
}

/// The encrypted volume a mount comes from, if any.
pub fn encrypted(m: &Mount) -> Option<&str> {
    match &m.source {
        MountSource::Encrypted { volume } => Some(volume),
        _ => None,
    }
}

/// The EROFS UUID of the pmem device a mount comes from, if any.
pub fn pmem(m: &Mount) -> Option<&str> {
    match &m.source {
        MountSource::Pmem { uuid } => Some(uuid),
        _ => None,
    }
}

/// The disk a mount comes from, if any.
pub fn disk(m: &Mount) -> Option<&str> {
    match &m.source {
        MountSource::Disk { serial } => Some(serial),
        _ => None,
    }
}

#[cfg(test)]
#[path = "mount_spec_tests.rs"]
mod tests;
