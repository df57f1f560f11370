//! The host side of pod volume disks, used by the host daemon and
//! `podvisor run`: the files behind a pod's volume disks (virtio-blk), made
//! here and attached by the caller.
//!
//! - [`create_sparse`]: an empty sparse file (an encrypted volume's disk:
//!   the guest writes only ciphertext to it).
//! - [`format_ext4`]: a plain volume, an ext4 file system made by Debian's
//!   `mkfs.ext4` (package `e2fsprogs`).
//! - [`FormatImage::make`]: the empty ext4 file system an encrypted volume
//!   is formatted from. The host cannot format what it must not read, so it
//!   makes an empty file system in a sparse file (nothing secret in it) and
//!   lists its data extents ([`data_extents`]); the guest copies only those
//!   through its dm-crypt mapping. The options ([`MKFS_OPTIONS`]) make sure
//!   nothing in the holes has to read as zero: the inode tables and the
//!   journal are initialized lazily (`lazy_itable_init`,
//!   `lazy_journal_init`: mkfs neither zeroes them nor relies on their
//!   contents, and the kernel zeroes the inode tables after the first
//!   mount), no discard is assumed to zero anything, and there is no resize
//!   inode (whose reserved blocks would otherwise have to be valid). The
//!   tests prove it: the extents copied over random bytes give a file
//!   system `e2fsck -fn` finds clean.
//! - [`check_serial`]: the rules of a virtio-blk serial naming a disk.
//!
//! Every file is written under a temporary name and renamed into place
//! (then the directory synced), so a crash never leaves a half-made
//! volume under the final name.
//!
//! A format image is cached per size: every encrypted volume of that size
//! gets the same empty file system, so the same ext4 UUID and directory
//! hash seed (neither is secret; a guest mounts by device, not by UUID).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Block size of every file system made here: dm-crypt's sector size in
/// the guest (4096), so a volume's size must be a multiple of it.
pub const BLOCK_SIZE: u64 = 4096;

/// Smallest volume: ext4 with a journal needs a few MiB.
pub const MIN_SIZE: u64 = 8 << 20;

/// The size of the disk of a volume asked to hold `requested` bytes: at
/// least [`MIN_SIZE`], rounded up to [`BLOCK_SIZE`] (as a provisioner
/// rounds a claim up to what its storage offers).
pub fn disk_size(requested: u64) -> u64 {
    requested.max(MIN_SIZE).div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// Most extents a format image may have (the wire limit,
/// `podvisor_proto::volumes::MAX_FORMAT_EXTENTS`).
pub const MAX_EXTENTS: usize = 16384;

/// Longest virtio-blk serial.
pub const MAX_SERIAL_LEN: usize = 20;

/// `mkfs.ext4` options of plain volumes and format images.
pub const MKFS_OPTIONS: &[&str] = &[
    "-F",
    "-q",
    "-t",
    "ext4",
    "-b",
    "4096",
    "-m",
    "0",
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
    "-O",
    "^resize_inode",
];

/// Why a volume file could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume size {size} is not a multiple of {BLOCK_SIZE} bytes or below {MIN_SIZE}")]
    BadSize { size: u64 },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mkfs.ext4 not found: install the Debian package e2fsprogs")]
    NoMkfs,
    #[error("mkfs.ext4 failed on {} ({status}): {stderr}", path.display())]
    Mkfs {
        path: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("the format image {} has {count} data extents, more than {MAX_EXTENTS}", path.display())]
    TooManyExtents { path: PathBuf, count: usize },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VolumeError + use<> {
    let path = path.to_path_buf();
    move |source| VolumeError::Io { what, path, source }
}

fn check_size(size: u64) -> Result<(), VolumeError> {
    if size < MIN_SIZE || !size.is_multiple_of(BLOCK_SIZE) {
        return Err(VolumeError::BadSize { size });
    }
    Ok(())
}

/// Whether `serial` may name a volume disk: 1 to [`MAX_SERIAL_LEN`] bytes
/// of ASCII letters, digits, `-`, `_`, `.`, not starting with `-` (what the
/// agent accepts).
pub fn check_serial(serial: &str) -> bool {
    !serial.is_empty()
        && serial.len() <= MAX_SERIAL_LEN
        && !serial.starts_with('-')
        && serial != "."
        && serial != ".."
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A file beside `path` to build it in, removed on drop unless kept.
struct Temp {
    path: PathBuf,
    keep: bool,
}

impl Temp {
    fn beside(path: &Path) -> Temp {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Temp {
            path: path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id())),
            keep: false,
        }
    }

    /// Syncs the file, renames it to `to` and syncs the directory.
    fn commit(mut self, to: &Path) -> Result<(), VolumeError> {
        std::fs::File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(io_err("syncing", &self.path))?;
        std::fs::rename(&self.path, to).map_err(io_err("renaming into", to))?;
        self.keep = true;
        let dir = to
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", dir))
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn sparse_at(path: &Path, size: u64) -> Result<(), VolumeError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("creating", path))?;
    f.set_len(size).map_err(io_err("sizing", path))
}

/// Makes the directory `path` goes in (and its parents), that one mode
/// 0700: a volume's data is its owner's only.
fn private_parent(path: &Path) -> Result<(), VolumeError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("restricting", dir))
}

/// Makes `path` an empty sparse file of `size` bytes, mode 0600 (an
/// encrypted volume's disk), in a 0700 directory made if missing.
/// Replaces a file already there.
pub fn create_sparse(path: &Path, size: u64) -> Result<(), VolumeError> {
    check_size(size)?;
    private_parent(path)?;
    let temp = Temp::beside(path);
    sparse_at(&temp.path, size)?;
    temp.commit(path)
}

/// The `mkfs.ext4` to run: on `PATH`, else in `/usr/sbin` or `/sbin`
/// (not on a non-root user's `PATH` on Debian).
fn mkfs() -> Result<PathBuf, VolumeError> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
        .ok_or(VolumeError::NoMkfs)
}

fn run_mkfs(path: &Path) -> Result<(), VolumeError> {
    let out = Command::new(mkfs()?)
        .args(MKFS_OPTIONS)
        .arg(path)
        .env("LC_ALL", "C")
        .output()
        .map_err(io_err("running mkfs.ext4 on", path))?;
    if !out.status.success() {
        return Err(VolumeError::Mkfs {
            path: path.to_path_buf(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Makes `path` a plain volume: an empty ext4 file system of `size` bytes
/// in a sparse file, mode 0600, in a 0700 directory made if missing.
/// Replaces a file already there.
pub fn format_ext4(path: &Path, size: u64) -> Result<(), VolumeError> {
    check_size(size)?;
    private_parent(path)?;
    let temp = Temp::beside(path);
    sparse_at(&temp.path, size)?;
    run_mkfs(&temp.path)?;
    temp.commit(path)
}

/// The data extents of a (sparse) file, `(offset, length)`, sorted and
/// disjoint, found with `lseek(SEEK_DATA/SEEK_HOLE)`.
pub fn data_extents(path: &Path) -> Result<Vec<(u64, u64)>, VolumeError> {
    let f = std::fs::File::open(path).map_err(io_err("opening", path))?;
    let size = f.metadata().map_err(io_err("reading", path))?.len();
    let fd = f.as_raw_fd();
    let mut extents = Vec::new();
    let mut at: u64 = 0;
    while at < size {
        // SAFETY: lseek on a descriptor we own; no memory involved.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(io_err("seeking in", path)(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io_err("seeking in", path)(io::Error::last_os_error()));
        }
        let (data, hole) = (data as u64, (hole as u64).min(size));
        if hole > data {
            extents.push((data, hole - data));
        }
        at = hole;
    }
    Ok(extents)
}

/// An empty ext4 file system an encrypted volume is formatted from, and
/// the only parts of it that must be copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatImage {
    /// The image file (attach it read-only).
    pub path: PathBuf,
    /// Its size: the volume's.
    pub size: u64,
    /// Its data extents, `(offset, length)` in bytes, sorted, disjoint.
    pub extents: Vec<(u64, u64)>,
}

impl FormatImage {
    /// The format image of `size` bytes in `dir` (a cache: made once per
    /// size, as `format-ext4-v1-<size>.img`, mode 0600).
    pub fn make(dir: &Path, size: u64) -> Result<FormatImage, VolumeError> {
        check_size(size)?;
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let path = dir.join(format!("format-ext4-v1-{size}.img"));
        let cached = std::fs::metadata(&path).is_ok_and(|m| m.len() == size);
        if !cached {
            let temp = Temp::beside(&path);
            sparse_at(&temp.path, size)?;
            run_mkfs(&temp.path)?;
            temp.commit(&path)?;
        }
        let extents = data_extents(&path)?;
        if extents.len() > MAX_EXTENTS {
            return Err(VolumeError::TooManyExtents {
                path,
                count: extents.len(),
            });
        }
        Ok(FormatImage {
            path,
            size,
            extents,
        })
    }

    /// Bytes the guest copies to format a volume.
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|(_, len)| len).sum()
    }
}

#[cfg(test)]
mod tests;
