//! The initramfs cache: a digest over every input of a guest boot, and
//! write-once storage of the initramfs under that digest.
//!
//! `<cache_dir>/guest/initramfs-<first 16 hex digits>.cpio` is built only if
//! absent, written to a temporary file in the same directory, synced and
//! renamed into place, so a reader never sees a partial archive and two
//! builders racing both end with the same complete file.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::GuestError;
use crate::initramfs::InitramfsContents;
use crate::kernel::Kernel;

/// Version of the initramfs layout and of the digest's framing. Bump it when
/// either changes so that cached images and VM templates built from older
/// ones are seen as stale.
pub const FORMAT_VERSION: u32 = 2;

/// Name of the cache subdirectory holding initramfs images.
pub const GUEST_CACHE_SUBDIR: &str = "guest";

/// SHA-256 (hex) over everything a guest boot is made of: the format version,
/// the kernel release and image bytes, the agent bytes, and each module's
/// relative path and bytes in load order. Every item is framed with its
/// length, so no two different input sets hash the same bytes.
pub fn inputs_digest(kernel: &Kernel, contents: &InitramfsContents) -> Result<String, GuestError> {
    let mut hasher = Sha256::new();
    hasher.update(format!("podvisor-guest-inputs v{FORMAT_VERSION}\n"));
    frame(&mut hasher, "release", contents.kernel_release.as_bytes());

    let mut image = File::open(&kernel.image)
        .map_err(|e| GuestError::io("read kernel image", &kernel.image, e))?;
    let image_len = image
        .metadata()
        .map_err(|e| GuestError::io("read kernel image", &kernel.image, e))?
        .len();
    hasher.update(format!("kernel {image_len}\n"));
    let hashed = hash_stream(&mut hasher, &mut image)
        .map_err(|e| GuestError::io("read kernel image", &kernel.image, e))?;
    if hashed != image_len {
        return Err(GuestError::io(
            "read kernel image",
            &kernel.image,
            std::io::Error::other(format!(
                "size changed while hashing ({image_len} then {hashed} bytes)"
            )),
        ));
    }

    frame(&mut hasher, "agent", &contents.agent);
    hasher.update(format!("modules {}\n", contents.modules.len()));
    for module in &contents.modules {
        frame(&mut hasher, "module-path", module.relative_path.as_bytes());
        frame(&mut hasher, "module", &module.data);
    }
    // Nothing for initramfs images without lazy lists: their digest stays.
    for lazy in &contents.lazy {
        frame(&mut hasher, "lazy-list", lazy.list.as_bytes());
        hasher.update(format!("modules {}\n", lazy.modules.len()));
        for module in &lazy.modules {
            frame(&mut hasher, "module-path", module.relative_path.as_bytes());
            frame(&mut hasher, "module", &module.data);
        }
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Adds `label`, the length of `data`, and `data` to the hash.
fn frame(hasher: &mut Sha256, label: &str, data: &[u8]) {
    hasher.update(format!("{label} {}\n", data.len()));
    hasher.update(data);
}

/// Hashes all of `reader`, returning how many bytes it gave.
fn hash_stream(hasher: &mut Sha256, reader: &mut impl Read) -> std::io::Result<u64> {
    let mut buffer = vec![0; 1 << 16];
    let mut total = 0;
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
}

/// Where the initramfs of inputs with digest `digest` is cached.
pub fn initramfs_path(cache_dir: &Path, digest: &str) -> PathBuf {
    let short = digest.get(..16).unwrap_or(digest);
    cache_dir
        .join(GUEST_CACHE_SUBDIR)
        .join(format!("initramfs-{short}.cpio"))
}

/// Makes sure `path` holds the archive of `contents`: returns `Ok(false)` if
/// it already exists, otherwise writes it atomically (temporary file in the
/// same directory, fsync, rename, fsync of the directory) and returns
/// `Ok(true)`.
pub fn store_initramfs(path: &Path, contents: &InitramfsContents) -> Result<bool, GuestError> {
    if path.is_file() {
        return Ok(false);
    }
    let dir = path.parent().ok_or_else(|| {
        GuestError::io(
            "create",
            path,
            std::io::Error::other("path has no parent directory"),
        )
    })?;
    std::fs::create_dir_all(dir).map_err(|e| GuestError::io("create directory", dir, e))?;
    let temp = tempfile::Builder::new()
        .prefix(".initramfs-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| GuestError::io("create a temporary file in", dir, e))?;
    let archive_error = |error| GuestError::Archive {
        path: temp.path().to_owned(),
        error,
    };
    let mut out = contents
        .write(BufWriter::new(temp.as_file()))
        .map_err(archive_error)?;
    out.flush()
        .map_err(|e| GuestError::io("write", temp.path(), e))?;
    drop(out);
    let file = temp.as_file();
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|e| GuestError::io("set permissions of", temp.path(), e))?;
    file.sync_all()
        .map_err(|e| GuestError::io("sync", temp.path(), e))?;
    temp.persist(path)
        .map_err(|e| GuestError::io("rename into place", path, e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| GuestError::io("sync directory", dir, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::initramfs::ModuleFile;

    fn kernel_in(dir: &Path, bytes: &[u8]) -> Kernel {
        let image = dir.join("vmlinuz-1.0-test");
        std::fs::write(&image, bytes).unwrap();
        Kernel {
            image,
            release: "1.0-test".to_owned(),
            modules_dir: dir.join("modules"),
        }
    }

    fn contents() -> InitramfsContents {
        InitramfsContents {
            kernel_release: "1.0-test".to_owned(),
            agent: b"agent".to_vec(),
            modules: vec![ModuleFile {
                relative_path: "kernel/a.ko".to_owned(),
                data: b"a".to_vec(),
            }],
            lazy: vec![],
        }
    }

    #[test]
    fn digest_changes_with_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = kernel_in(dir.path(), b"kernel");
        let base = inputs_digest(&kernel, &contents()).unwrap();
        assert_eq!(base.len(), 64);
        assert!(base.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(inputs_digest(&kernel, &contents()).unwrap(), base);

        let mut variants = Vec::new();
        let mut c = contents();
        c.agent.push(b'!');
        variants.push(inputs_digest(&kernel, &c).unwrap());
        let mut c = contents();
        c.modules[0].data = b"b".to_vec();
        variants.push(inputs_digest(&kernel, &c).unwrap());
        let mut c = contents();
        c.modules[0].relative_path = "kernel/b.ko".to_owned();
        variants.push(inputs_digest(&kernel, &c).unwrap());
        let mut c = contents();
        c.modules.clear();
        variants.push(inputs_digest(&kernel, &c).unwrap());
        let mut c = contents();
        c.kernel_release = "1.1-test".to_owned();
        variants.push(inputs_digest(&kernel, &c).unwrap());
        // Moving bytes between agent and module must not collide.
        let mut c = contents();
        c.agent = b"agenta".to_vec();
        c.modules[0].data.clear();
        variants.push(inputs_digest(&kernel, &c).unwrap());
        let other_kernel = kernel_in(dir.path(), b"kernel2");
        variants.push(inputs_digest(&other_kernel, &contents()).unwrap());

        for (i, variant) in variants.iter().enumerate() {
            assert_ne!(variant, &base, "variant {i} did not change the digest");
        }
        let mut unique = variants.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), variants.len());
    }

    #[test]
    fn missing_kernel_image_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut kernel = kernel_in(dir.path(), b"kernel");
        kernel.image = dir.path().join("vmlinuz-gone");
        let error = inputs_digest(&kernel, &contents()).unwrap_err();
        assert!(error.to_string().contains("vmlinuz-gone"), "{error}");
    }

    #[test]
    fn path_uses_sixteen_digits() {
        let digest = "0123456789abcdef".repeat(4);
        assert_eq!(
            initramfs_path(Path::new("/c"), &digest),
            Path::new("/c/guest/initramfs-0123456789abcdef.cpio")
        );
    }

    #[test]
    fn stores_once_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = initramfs_path(dir.path(), &"ab".repeat(32));
        assert!(store_initramfs(&path, &contents()).unwrap());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes, contents().write(Vec::new()).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        assert!(!store_initramfs(&path, &contents()).unwrap());
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [path.file_name().unwrap()]);
    }
}
