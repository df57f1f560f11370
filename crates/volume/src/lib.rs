//! The host side of volume disks (used by the host daemon and `podvisor
//! run`): sparse data files, ext4 file systems made with Debian's
//! `mkfs.ext4` for plain volumes, and the format image of an encrypted
//! volume: an empty ext4 whose data extents the guest copies through its
//! dm-crypt mapping (the host never sees the volume's plaintext).
//! Everything is written to a temporary file and renamed into place, so a
//! crash leaves either nothing or a whole disk.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors of volume disks.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.ext4 is not installed (Debian package e2fsprogs)")]
    NoMkfs,
    #[error("mkfs.ext4 failed on {}: {stderr}", path.display())]
    Mkfs { path: PathBuf, stderr: String },
    #[error("a volume of {0} bytes is too small for ext4 (at least 1 MiB)")]
    TooSmall(u64),
}

impl From<std::io::Error> for VolumeError {
    fn from(source: std::io::Error) -> VolumeError {
        VolumeError::Io {
            what: "volume disk",
            path: PathBuf::new(),
            source,
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Io { what, path, source }
}

/// `mkfs.ext4` options that need nothing from the device but what they
/// write: inode tables and the journal are initialized lazily by the
/// kernel, no discard (nothing may be assumed to read as zero), no resize
/// inode (its reserved blocks would be assumed zero).
const MKFS_OPTIONS: &[&str] = &[
    "-F",
    "-q",
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
    "-O",
    "^resize_inode",
];

fn temp_for(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn make_sparse(path: &Path, size: u64) -> Result<(), VolumeError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))?;
    file.set_len(size).map_err(io("size", path))?;
    file.sync_all().map_err(io("sync", path))
}

fn finish(temp: &Path, path: &Path) -> Result<(), VolumeError> {
    std::fs::rename(temp, path).map_err(io("rename into place", path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", dir))?;
    }
    Ok(())
}

fn ensure_dir(path: &Path) -> Result<(), VolumeError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut perms = std::fs::metadata(dir)
            .map_err(io("stat", dir))?
            .permissions();
        perms.set_mode(0o700);
        std::fs::set_permissions(dir, perms).map_err(io("restrict", dir))?;
    }
    Ok(())
}

/// Creates `path`: a sparse file of `size` bytes, mode 0600.
pub fn create_sparse(path: &Path, size: u64) -> Result<(), VolumeError> {
    ensure_dir(path)?;
    let temp = temp_for(path);
    make_sparse(&temp, size)?;
    finish(&temp, path)
}

fn mkfs(path: &Path) -> Result<(), VolumeError> {
    let out = Command::new("mkfs.ext4")
        .args(MKFS_OPTIONS)
        .arg(path)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VolumeError::NoMkfs,
            _ => VolumeError::Io {
                what: "run mkfs.ext4 on",
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    if !out.status.success() {
        return Err(VolumeError::Mkfs {
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Creates `path`: a sparse file of `size` bytes holding an empty ext4.
pub fn format_ext4(path: &Path, size: u64) -> Result<(), VolumeError> {
    if size < 1 << 20 {
        return Err(VolumeError::TooSmall(size));
    }
    ensure_dir(path)?;
    let temp = temp_for(path);
    make_sparse(&temp, size)?;
    if let Err(e) = mkfs(&temp) {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    std::fs::File::open(&temp)
        .and_then(|f| f.sync_all())
        .map_err(io("sync", &temp))?;
    finish(&temp, path)
}

/// The data extents (`offset`, `length`) of a sparse file.
pub fn data_extents(path: &Path) -> Result<Vec<(u64, u64)>, VolumeError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).map_err(io("open", path))?;
    let size = file.metadata().map_err(io("stat", path))?.len();
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a descriptor owned by `file`.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(io("find data in", path)(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io("find a hole in", path)(std::io::Error::last_os_error()));
        }
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    Ok(out)
}

/// An empty ext4 to be copied, extent by extent, through an encrypted
/// volume's mapping in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatImage {
    pub path: PathBuf,
    pub size: u64,
    /// The image's data extents: all that must be copied.
    pub extents: Vec<(u64, u64)>,
}

impl FormatImage {
    /// The format image for volumes of `size` bytes, made in `dir` once
    /// per size and reused.
    pub fn make(dir: &Path, size: u64) -> Result<FormatImage, VolumeError> {
        let path = dir.join(format!("ext4-{size}.img"));
        if !path.exists() {
            format_ext4(&path, size)?;
        }
        let extents = data_extents(&path)?;
        Ok(FormatImage {
            path,
            size,
            extents,
        })
    }
}

/// Copies `image`'s extents into `target` at the same offsets (what the
/// guest does through its mapping; here for tests and tools).
pub fn copy_extents(image: &FormatImage, target: &Path) -> Result<(), VolumeError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut src = std::fs::File::open(&image.path).map_err(io("open", &image.path))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .open(target)
        .map_err(io("open", target))?;
    let mut buf = vec![0u8; 1 << 20];
    for &(off, len) in &image.extents {
        src.seek(SeekFrom::Start(off))
            .map_err(io("seek", &image.path))?;
        dst.seek(SeekFrom::Start(off)).map_err(io("seek", target))?;
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            src.read_exact(&mut buf[..n])
                .map_err(io("read", &image.path))?;
            dst.write_all(&buf[..n]).map_err(io("write", target))?;
            left -= n as u64;
        }
    }
    dst.sync_all().map_err(io("sync", target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e2fsck_clean(path: &Path) -> bool {
        Command::new("e2fsck")
            .args(["-fn"])
            .arg(path)
            .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
            .output()
            .unwrap()
            .status
            .success()
    }

    fn random_file(path: &Path, size: u64) {
        let mut f = std::fs::File::create(path).unwrap();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            for b in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            let n = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
    }

    #[test]
    fn the_format_images_extents_over_garbage_are_a_clean_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 << 20;
        let image = FormatImage::make(dir.path(), size).unwrap();
        let copied: u64 = image.extents.iter().map(|e| e.1).sum();
        assert!(copied < size / 4, "{copied} of {size} bytes to copy");
        let target = dir.path().join("volume");
        random_file(&target, size);
        // Garbage alone is no file system: the check below can fail.
        assert!(!e2fsck_clean(&target));
        copy_extents(&image, &target).unwrap();
        assert!(e2fsck_clean(&target), "e2fsck found problems");
        // Made once per size.
        let again = FormatImage::make(dir.path(), size).unwrap();
        assert_eq!(again, image);
    }

    #[test]
    fn disks_are_private_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/v.img");
        format_ext4(&path, 32 << 20).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 32 << 20);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(e2fsck_clean(&path));
        assert!(matches!(
            format_ext4(&dir.path().join("tiny"), 1000),
            Err(VolumeError::TooSmall(1000))
        ));
        let sparse = dir.path().join("s.img");
        create_sparse(&sparse, 1 << 30).unwrap();
        assert_eq!(std::fs::metadata(&sparse).unwrap().len(), 1 << 30);
        assert!(data_extents(&sparse).unwrap().is_empty());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
