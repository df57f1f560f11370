//! Safe extraction of a layer tar into a staging directory, converting OCI
//! whiteouts to their overlayfs form.
//!
//! The tar crate's own `unpack` is not used: every entry goes through
//! [`normalize`] (no `..`, leading `/` and `./` dropped), every parent
//! directory is checked with `symlink_metadata` so nothing is ever written
//! through a symlink, files are created with `O_NOFOLLOW | O_EXCL`, and
//! hardlinks may only point at entries already extracted in this layer. The
//! staging directory belongs to this process alone, so checks made on it stay
//! true until the entry is written.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tar::{Archive, EntryType};

use crate::ImageError;
use crate::fsops::{mknod, set_mtime, set_xattr};

/// Name prefix of an OCI whiteout file.
const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the OCI opaque-directory marker.
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The xattr that makes a directory opaque for overlayfs.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Turns a tar entry name into a path relative to the layer root.
/// Leading `/`, `.` components and empty components are dropped; `..` is
/// refused. An empty result means the layer root itself.
pub(crate) fn normalize(name: &[u8]) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(name)).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("path has a `..` component".to_string()),
            Component::Normal(part) => out.push(part),
            Component::Prefix(_) => return Err("unexpected path prefix".to_string()),
        }
    }
    Ok(out)
}

/// What a tar entry's final name component means for overlayfs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Whiteout<'a> {
    /// Not a marker: an ordinary entry.
    None,
    /// `.wh.NAME`: NAME is deleted; becomes a 0/0 character device NAME.
    Delete(&'a OsStr),
    /// `.wh..wh..opq`: the parent directory hides everything below it.
    Opaque,
    /// Another `.wh..wh.` name (AUFS metadata): dropped.
    Ignored,
}

/// Classifies the last component of an entry name.
pub(crate) fn classify(file_name: &OsStr) -> Result<Whiteout<'_>, String> {
    let bytes = file_name.as_bytes();
    if bytes == OPAQUE_MARKER.as_bytes() {
        return Ok(Whiteout::Opaque);
    }
    if bytes.starts_with(b".wh..wh.") {
        return Ok(Whiteout::Ignored);
    }
    match bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        None => Ok(Whiteout::None),
        Some(b"") | Some(b".") | Some(b"..") => Err("whiteout names no file".to_string()),
        Some(name) => Ok(Whiteout::Delete(OsStr::from_bytes(name))),
    }
}

/// Totals of one extraction.
#[derive(Debug, Default)]
pub(crate) struct UnpackStats {
    pub entries: u64,
}

/// Extracts every entry of `archive` under `root` (an existing empty
/// directory). `layer` names the layer in errors.
pub(crate) fn unpack<R: Read>(
    archive: &mut Archive<R>,
    root: &Path,
    layer: &str,
) -> Result<UnpackStats, ImageError> {
    let mut unpacker = Unpacker {
        root,
        layer,
        dir_times: Vec::new(),
    };
    let mut stats = UnpackStats::default();
    let stream_err = |source| ImageError::LayerStream {
        layer: layer.to_string(),
        source,
    };
    for entry in archive.entries().map_err(stream_err)? {
        let mut entry = entry.map_err(stream_err)?;
        unpacker.entry(&mut entry)?;
        stats.entries += 1;
    }
    unpacker.finish()?;
    Ok(stats)
}

/// Ownership, mode, time and xattrs of one entry.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: (i64, i64),
    xattrs: Vec<(String, Vec<u8>)>,
}

struct Unpacker<'a> {
    root: &'a Path,
    layer: &'a str,
    /// Directory mtimes, applied at the end (writing children changes them).
    dir_times: Vec<(PathBuf, (i64, i64))>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw_name = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw_name).into_owned();
        let unsafe_entry = |reason: String| ImageError::UnsafeEntry {
            layer: self.layer.to_string(),
            entry: name.clone(),
            reason,
        };
        let bad_entry = |reason: String| ImageError::BadEntry {
            layer: self.layer.to_string(),
            entry: name.clone(),
            reason,
        };
        let io_err = |what: &str, e: io::Error| {
            ImageError::io(format!("layer {}: entry `{name}`: {what}", self.layer), e)
        };

        let rel = normalize(&raw_name).map_err(unsafe_entry)?;
        let meta = read_meta(entry).map_err(bad_entry)?;
        let kind = entry.header().entry_type();

        let Some(file_name) = rel.file_name() else {
            // The layer root itself (`./`).
            if kind != EntryType::Directory {
                return Err(bad_entry("the layer root must be a directory".to_string()));
            }
            apply_meta(self.root, &meta, true).map_err(|e| io_err("set metadata", e))?;
            self.dir_times.push((self.root.to_path_buf(), meta.mtime));
            return Ok(());
        };
        let whiteout = classify(file_name).map_err(bad_entry)?;
        let parent = self.prepare_parent(&rel).map_err(|e| match e {
            ParentError::Symlink(p) => unsafe_entry(format!(
                "would be written through symlink `{}`",
                p.display()
            )),
            ParentError::NotDir(p) => {
                bad_entry(format!("parent `{}` is not a directory", p.display()))
            }
            ParentError::Io(e) => io_err("create parent directories", e),
        })?;

        match whiteout {
            Whiteout::Ignored => return Ok(()),
            Whiteout::Opaque => {
                set_xattr(&parent, OPAQUE_XATTR, b"y")
                    .map_err(|e| io_err("set opaque xattr", e))?;
                return Ok(());
            }
            Whiteout::Delete(target) => {
                let path = parent.join(target);
                clear(&path, false).map_err(|e| io_err("replace existing entry", e))?;
                mknod(&path, libc::S_IFCHR, 0).map_err(|e| io_err("create whiteout device", e))?;
                let whiteout_meta = Meta {
                    mode: 0,
                    xattrs: Vec::new(),
                    ..meta
                };
                apply_meta(&path, &whiteout_meta, false).map_err(|e| io_err("set metadata", e))?;
                return Ok(());
            }
            Whiteout::None => {}
        }

        let path = parent.join(file_name);
        match kind {
            EntryType::Directory => {
                let kept = clear(&path, true).map_err(|e| io_err("replace existing entry", e))?;
                if !kept {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&path)
                        .map_err(|e| io_err("create directory", e))?;
                }
                apply_meta(&path, &meta, true).map_err(|e| io_err("set metadata", e))?;
                self.dir_times.push((path, meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous => {
                clear(&path, false).map_err(|e| io_err("replace existing entry", e))?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(|e| io_err("create file", e))?;
                let expected = entry.size();
                let written =
                    io::copy(entry, &mut file).map_err(|source| ImageError::LayerStream {
                        layer: self.layer.to_string(),
                        source,
                    })?;
                if written != expected {
                    return Err(bad_entry(format!(
                        "truncated: tar header says {expected} bytes, stream ended after {written}"
                    )));
                }
                drop(file);
                apply_meta(&path, &meta, true).map_err(|e| io_err("set metadata", e))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad_entry("symlink without a target".to_string()))?
                    .into_owned();
                clear(&path, false).map_err(|e| io_err("replace existing entry", e))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|e| io_err("create symlink", e))?;
                apply_meta(&path, &meta, false).map_err(|e| io_err("set metadata", e))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad_entry("hardlink without a target".to_string()))?
                    .into_owned();
                let target_name = String::from_utf8_lossy(&target).into_owned();
                let target_rel = normalize(&target).map_err(|r| {
                    unsafe_entry(format!(
                        "hardlink target `{target_name}` escapes the layer: {r}"
                    ))
                })?;
                if target_rel == rel || target_rel.as_os_str().is_empty() {
                    return Err(unsafe_entry(format!(
                        "hardlink to `{target_name}` links to itself or the layer root"
                    )));
                }
                let target_path = self.existing(&target_rel).ok_or_else(|| {
                    unsafe_entry(format!(
                        "hardlink target `{target_name}` is outside the layer or not extracted yet"
                    ))
                })?;
                clear(&path, false).map_err(|e| io_err("replace existing entry", e))?;
                fs::hard_link(&target_path, &path).map_err(|e| io_err("create hardlink", e))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (file_type, dev) = match kind {
                    EntryType::Fifo => (libc::S_IFIFO, 0),
                    _ => {
                        let header = entry.header();
                        let major = header.device_major().ok().flatten().unwrap_or(0);
                        let minor = header.device_minor().ok().flatten().unwrap_or(0);
                        let file_type = if kind == EntryType::Char {
                            libc::S_IFCHR
                        } else {
                            libc::S_IFBLK
                        };
                        (file_type, libc::makedev(major, minor))
                    }
                };
                clear(&path, false).map_err(|e| io_err("replace existing entry", e))?;
                mknod(&path, file_type, dev).map_err(|e| io_err("create device node", e))?;
                apply_meta(&path, &meta, true).map_err(|e| io_err("set metadata", e))?;
            }
            other => return Err(bad_entry(format!("unsupported tar entry type {other:?}"))),
        }
        Ok(())
    }

    /// Makes sure every parent of `rel` is a real directory under the root
    /// (creating missing ones, 0755 root:root) and returns the parent's path.
    fn prepare_parent(&self, rel: &Path) -> Result<PathBuf, ParentError> {
        let mut current = self.root.to_path_buf();
        let mut walked = PathBuf::new();
        let parent = rel.parent().unwrap_or(Path::new(""));
        for part in parent.components() {
            current.push(part);
            walked.push(part);
            match fs::symlink_metadata(&current) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => return Err(ParentError::Symlink(walked)),
                Ok(_) => return Err(ParentError::NotDir(walked)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&current)
                        .map_err(ParentError::Io)?;
                    fs::set_permissions(&current, fs::Permissions::from_mode(0o755))
                        .map_err(ParentError::Io)?;
                }
                Err(e) => return Err(ParentError::Io(e)),
            }
        }
        Ok(current)
    }

    /// The path of an already-extracted non-directory `rel`, reached without
    /// crossing a symlink; `None` if there is no such entry.
    fn existing(&self, rel: &Path) -> Option<PathBuf> {
        let mut current = self.root.to_path_buf();
        let count = rel.components().count();
        for (i, part) in rel.components().enumerate() {
            current.push(part);
            let file_type = fs::symlink_metadata(&current).ok()?.file_type();
            let last = i + 1 == count;
            if (!last && !file_type.is_dir()) || (last && file_type.is_dir()) {
                return None;
            }
        }
        Some(current)
    }

    /// Sets directory mtimes, deepest first, once nothing changes them any more.
    fn finish(mut self) -> Result<(), ImageError> {
        self.dir_times
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (path, mtime) in &self.dir_times {
            set_mtime(path, *mtime).map_err(|e| {
                ImageError::io(
                    format!("layer {}: set mtime of {}", self.layer, path.display()),
                    e,
                )
            })?;
        }
        Ok(())
    }
}

enum ParentError {
    Symlink(PathBuf),
    NotDir(PathBuf),
    Io(io::Error),
}

/// Reads ownership, mode, mtime and xattrs, honouring PAX overrides.
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
    let header = entry.header();
    let number = |r: io::Result<u64>, what: &str| r.map_err(|e| format!("bad {what} field: {e}"));
    let mut uid = number(header.uid(), "uid")?;
    let mut gid = number(header.gid(), "gid")?;
    let mode = number(header.mode().map(u64::from), "mode")? as u32 & 0o7777;
    let mut mtime = (number(header.mtime(), "mtime")? as i64, 0i64);
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry
        .pax_extensions()
        .map_err(|e| format!("bad PAX header: {e}"))?
    {
        for ext in extensions {
            let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
            let key = ext.key().map_err(|_| "PAX key is not UTF-8".to_string())?;
            let text = || std::str::from_utf8(ext.value_bytes()).unwrap_or("");
            match key {
                "uid" => {
                    uid = text()
                        .parse()
                        .map_err(|_| format!("bad PAX uid `{}`", text()))?
                }
                "gid" => {
                    gid = text()
                        .parse()
                        .map_err(|_| format!("bad PAX gid `{}`", text()))?
                }
                "mtime" => {
                    mtime = parse_pax_time(text())
                        .ok_or_else(|| format!("bad PAX mtime `{}`", text()))?
                }
                _ => {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        // Overlay metadata comes only from the OCI markers, never from a layer.
                        if !name.starts_with("trusted.overlay.") {
                            xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }
    }
    let id =
        |v: u64, what: &str| u32::try_from(v).map_err(|_| format!("{what} {v} is out of range"));
    Ok(Meta {
        uid: id(uid, "uid")?,
        gid: id(gid, "gid")?,
        mode,
        mtime,
        xattrs,
    })
}

/// Parses a PAX time (`seconds[.fraction]`) into seconds and nanoseconds.
fn parse_pax_time(text: &str) -> Option<(i64, i64)> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: i64 = digits.parse().ok()?;
    // A negative time with a fraction counts back from the second.
    Some(if secs < 0 && nanos > 0 {
        (secs - 1, 1_000_000_000 - nanos)
    } else {
        (secs, nanos)
    })
}

/// Removes whatever is at `path` so a new entry can take its place; an
/// existing directory is kept (and `true` returned) when the new entry is
/// one too, as tar merges directories.
fn clear(path: &Path, new_is_dir: bool) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
        Ok(m) if m.file_type().is_dir() => {
            if new_is_dir {
                Ok(true)
            } else {
                fs::remove_dir_all(path).map(|_| false)
            }
        }
        Ok(_) => fs::remove_file(path).map(|_| false),
    }
}

/// Applies ownership, then mode (chown clears set-id bits), xattrs and mtime.
/// `with_mode` is false for symlinks, whose mode cannot be set.
fn apply_meta(path: &Path, meta: &Meta, with_mode: bool) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))?;
    if with_mode {
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))?;
    }
    for (name, value) in &meta.xattrs {
        set_xattr(path, name, value)?;
    }
    set_mtime(path, meta.mtime)
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
