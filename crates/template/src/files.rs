//! A template's files: where they live, the lock that orders builders,
//! users and removers, the checked state file, the sparse copy of a RAM
//! file, and which processes still map one.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::TemplateError;
use super::meta::TemplateMeta;

/// Where templates live.
#[derive(Debug, Clone)]
pub struct TemplateDirs {
    /// Metadata, states and locks: `<run dir>/templates`.
    pub meta: PathBuf,
    /// The template RAM directory (tmpfs by default), shared by every run
    /// directory of the host.
    pub ram_root: PathBuf,
    /// This run directory's RAM files: `<ram_root>/<owner id>/`, with an
    /// [`OWNER_FILE`] naming the run directory.
    pub ram: PathBuf,
    /// The run directory (canonical).
    pub run_dir: PathBuf,
}

/// File in a RAM subdirectory naming the run directory it belongs to.
pub const OWNER_FILE: &str = "owner";

/// The name of a run directory's RAM subdirectory: 16 hex digits of the
/// SHA-256 of its path.
pub fn owner_id(run_dir: &Path) -> String {
    let digest = Sha256::digest(run_dir.as_os_str().as_encoded_bytes());
    format!("{digest:x}")[..16].to_string()
}

impl TemplateDirs {
    /// The metadata file of template `name`.
    pub fn meta_file(&self, name: &str) -> PathBuf {
        self.meta.join(format!("{name}.json"))
    }

    /// The lock file of template `name`.
    pub fn lock_file(&self, name: &str) -> PathBuf {
        self.meta.join(format!("{name}.lock"))
    }

    /// Files of one build (`generation`) of template `name`.
    pub fn build_files(&self, name: &str, generation: &str) -> (PathBuf, PathBuf) {
        (
            self.ram.join(format!("{name}.{generation}.ram")),
            self.meta.join(format!("{name}.{generation}.state")),
        )
    }

    /// Creates both directories (owner-only: templates hold guest memory)
    /// and records which run directory the RAM subdirectory belongs to.
    pub fn create(&self) -> Result<(), TemplateError> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [&self.meta, &self.ram] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| TemplateError::io("create directory", dir, e))?;
        }
        let owner = self.ram.join(OWNER_FILE);
        if !owner.exists() {
            std::fs::write(&owner, self.run_dir.as_os_str().as_encoded_bytes())
                .map_err(|e| TemplateError::io("write", &owner, e))?;
        }
        Ok(())
    }

    /// Removes the RAM files of run directories that no longer exist (a
    /// test's temporary directory, a host's old run directory): every
    /// subdirectory of the RAM root whose owner's `templates/` is gone,
    /// except files a process still maps. Returns the files removed.
    pub fn collect_orphans(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.ram_root) else {
            return removed;
        };
        for sub in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            let Ok(owner) = std::fs::read(sub.join(OWNER_FILE)) else {
                continue; // not one of ours, or being created
            };
            let owner = PathBuf::from(String::from_utf8_lossy(&owner).into_owned());
            if owner.join(super::TEMPLATES_SUBDIR).exists() || sub == self.ram {
                continue;
            }
            let mut all_gone = true;
            for file in std::fs::read_dir(&sub)
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_else(|_| Vec::new())
            {
                if file.extension().is_some_and(|x| x == "ram") {
                    if mapped_by(&file).is_empty() && std::fs::remove_file(&file).is_ok() {
                        removed.push(file);
                    } else {
                        all_gone = false;
                    }
                }
            }
            if all_gone {
                let _ = std::fs::remove_file(sub.join(OWNER_FILE));
                let _ = std::fs::remove_dir(&sub);
            }
        }
        removed
    }

    /// Every stored template's metadata, by name; unreadable ones as errors.
    pub fn list(&self) -> Vec<(String, Result<TemplateMeta, TemplateError>)> {
        let mut names: Vec<String> = std::fs::read_dir(&self.meta)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let meta = TemplateMeta::read(&self.meta_file(&n));
                (n, meta)
            })
            .collect()
    }
}

/// Checks a template name given by a user.
pub fn check_name(name: &str) -> Result<(), TemplateError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.ends_with(".json")
        && !name.ends_with(".lock");
    if ok {
        Ok(())
    } else {
        Err(TemplateError::BadName(name.to_string()))
    }
}

/// A held lock on a template name: shared while a clone starts from it,
/// exclusive while it is built or removed. Released when dropped.
pub struct TemplateLock {
    _lock: Flock<File>,
}

impl TemplateLock {
    /// Takes the lock exclusively if nobody holds it now.
    pub fn try_exclusive(dirs: &TemplateDirs, name: &str) -> Option<TemplateLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dirs.lock_file(name))
            .ok()?;
        Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .ok()
            .map(|lock| TemplateLock { _lock: lock })
    }

    /// Waits for the lock (in a blocking thread: a build can take a while).
    pub async fn acquire(
        dirs: &TemplateDirs,
        name: &str,
        exclusive: bool,
    ) -> Result<TemplateLock, TemplateError> {
        let path = dirs.lock_file(name);
        tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| TemplateError::io("open", &path, e))?;
            let arg = if exclusive {
                FlockArg::LockExclusive
            } else {
                FlockArg::LockShared
            };
            let lock = Flock::lock(file, arg)
                .map_err(|(_, errno)| TemplateError::io("lock", &path, errno.into()))?;
            Ok(TemplateLock { _lock: lock })
        })
        .await
        .map_err(|e| TemplateError::io("lock", Path::new(name), std::io::Error::other(e)))?
    }
}

/// Creates a new state file (owner-only) to save a state into.
pub fn create_state_file(path: &Path) -> Result<File, TemplateError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| TemplateError::io("create", path, e))
}

/// SHA-256 hex and length of a file, as it is on disk.
pub fn hash_file(path: &Path) -> Result<(String, u64), TemplateError> {
    let mut f = File::open(path).map_err(|e| TemplateError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let n = std::io::copy(&mut f, &mut hasher).map_err(|e| TemplateError::io("read", path, e))?;
    Ok((format!("{:x}", hasher.finalize()), n))
}

/// Reads a template's state file and checks it against its recorded size
/// and digest: a corrupt or truncated state is never handed to the VMM.
pub fn read_checked_state(meta: &TemplateMeta) -> Result<Vec<u8>, TemplateError> {
    let path = &meta.state_file;
    let corrupt = |reason: String| TemplateError::Corrupt {
        name: meta.name.clone(),
        reason,
    };
    let mut bytes = Vec::with_capacity(meta.state_bytes as usize);
    File::open(path)
        .and_then(|f| f.take(meta.state_bytes + 1).read_to_end(&mut bytes))
        .map_err(|e| corrupt(format!("state file {}: {e}", path.display())))?;
    if bytes.len() as u64 != meta.state_bytes {
        return Err(corrupt(format!(
            "state file {} has {} bytes, {} were saved (truncated or overwritten)",
            path.display(),
            bytes.len(),
            meta.state_bytes
        )));
    }
    let digest = format!("{:x}", Sha256::digest(&bytes));
    if digest != meta.state_sha256 {
        return Err(corrupt(format!(
            "state file {} does not match its recorded sha256 (corrupted)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Checks that a template's RAM file is there with the guest's RAM size.
pub fn check_ram_file(meta: &TemplateMeta) -> Result<(), TemplateError> {
    let want = meta.recipe.memory_mib << 20;
    match std::fs::metadata(&meta.ram_file) {
        Ok(md) if md.len() == want => Ok(()),
        Ok(md) => Err(TemplateError::Corrupt {
            name: meta.name.clone(),
            reason: format!(
                "RAM file {} has {} bytes, the guest has {want}",
                meta.ram_file.display(),
                md.len()
            ),
        }),
        Err(e) => Err(TemplateError::Corrupt {
            name: meta.name.clone(),
            reason: format!(
                "RAM file {}: {e} (tmpfs is emptied when the host restarts)",
                meta.ram_file.display()
            ),
        }),
    }
}

/// Copies a RAM file, keeping its holes: only the pages the guest touched
/// take memory in the copy. The copy is a new file; `from` is only read.
pub fn copy_sparse(from: &Path, to: &Path) -> Result<(), TemplateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let src = File::open(from).map_err(|e| TemplateError::io("open", from, e))?;
    let len = src
        .metadata()
        .map_err(|e| TemplateError::io("stat", from, e))?
        .len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| TemplateError::io("create", to, e))?;
    dst.set_len(len)
        .map_err(|e| TemplateError::io("size", to, e))?;
    let fail = |e: nix::errno::Errno| TemplateError::io("copy", from, e.into());
    let mut offset: i64 = 0;
    while (offset as u64) < len {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(src.as_raw_fd(), offset, libc::SEEK_DATA) };
        if data < 0 {
            match nix::errno::Errno::last() {
                nix::errno::Errno::ENXIO => break, // only a hole is left
                e => return Err(fail(e)),
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(fail(nix::errno::Errno::last()));
        }
        let mut pos = data;
        while pos < hole {
            let mut off_in = pos;
            let mut off_out = pos;
            // SAFETY: both descriptors are open; offsets are ours.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    (hole - pos) as usize,
                    0,
                )
            };
            if n <= 0 {
                return Err(fail(if n == 0 {
                    nix::errno::Errno::EIO
                } else {
                    nix::errno::Errno::last()
                }));
            }
            pos += n as i64;
        }
        offset = hole;
    }
    Ok(())
}

/// Processes that map `file` (their `/proc/PID/maps` name it), e.g. the
/// QEMU processes of a template's clones. Processes whose maps cannot be
/// read (other users') are not seen.
pub fn mapped_by(file: &Path) -> Vec<u32> {
    let needle = file.to_string_lossy().into_owned();
    let deleted = format!("{needle} (deleted)");
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| {
                        maps.lines().any(|l| {
                            // The path is the last field, after the inode.
                            let path = l.splitn(6, ' ').nth(5).unwrap_or("").trim_start();
                            path == needle || path == deleted
                        })
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

/// Removes a file; a file already gone is fine.
pub fn remove_file(path: &Path) -> Result<(), TemplateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TemplateError::io("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a.ram");
        let f = File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"page one", 4096).unwrap();
        f.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
        drop(f);
        let to = dir.path().join("b.ram");
        copy_sparse(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&to).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "copy allocated {allocated} bytes");
        // Never onto an existing file.
        assert!(copy_sparse(&from, &to).is_err());
    }

    #[test]
    fn ram_of_vanished_run_dirs_is_collected() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs_for = |run: &Path| TemplateDirs {
            meta: run.join("templates"),
            ram_root: tmp.path().join("ram"),
            ram: tmp.path().join("ram").join(owner_id(run)),
            run_dir: run.to_path_buf(),
        };
        let live = dirs_for(&tmp.path().join("live"));
        let gone = dirs_for(&tmp.path().join("gone"));
        for d in [&live, &gone] {
            d.create().unwrap();
            std::fs::write(d.ram.join("t.1.ram"), b"x").unwrap();
        }
        assert_ne!(live.ram, gone.ram);
        std::fs::remove_dir_all(tmp.path().join("gone")).unwrap();
        assert_eq!(live.collect_orphans(), [gone.ram.join("t.1.ram")]);
        assert!(!gone.ram.exists());
        assert!(live.ram.join("t.1.ram").exists());
        // Directories without an owner file are left alone.
        std::fs::create_dir(tmp.path().join("ram/other")).unwrap();
        assert!(live.collect_orphans().is_empty());
        assert!(tmp.path().join("ram/other").exists());
    }

    #[test]
    fn names_are_checked() {
        for ok in ["web", "base-0a1b2c3d4e5f", "app_v1.2"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "-x", "a/b", "x.json", "../etc", &"a".repeat(65), "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn finds_the_processes_mapping_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapped.ram");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(4096).unwrap();
        assert!(mapped_by(&path).is_empty());
        // SAFETY: a private read-only mapping of a file we own.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        assert_eq!(mapped_by(&path), [std::process::id()]);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(map, 4096) };
        assert!(mapped_by(&path).is_empty());
    }
}
