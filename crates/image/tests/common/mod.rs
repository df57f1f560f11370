//! Helpers shared by the integration tests: a cache in a temp dir, a view
//! of the cache directory, and a read-only loop mount of a layer disk.

#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use podvisor_image::LayerCache;
use tempfile::TempDir;

/// A scratch directory with a layer cache in `cache/` and room for sources.
pub struct Env {
    pub dir: TempDir,
    pub cache: LayerCache,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::open(&dir.path().join("cache")).unwrap();
        Env { dir, cache }
    }

    /// A path for a source file or directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every path under `layers/` (dot entries and their contents included).
    pub fn snapshot(&self) -> Vec<String> {
        let root = self.cache.layers_dir();
        let mut out = Vec::new();
        walk(&root, &root, &mut out);
        out.sort();
        out
    }

    /// The entry directories (complete disks) in `layers/`.
    pub fn disk_dirs(&self) -> Vec<String> {
        fs::read_dir(self.cache.layers_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect()
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        out.push(p.strip_prefix(root).unwrap().display().to_string());
        if e.file_type().unwrap().is_dir() {
            walk(root, &p, out);
        }
    }
}

/// A layer disk mounted read-only (`mount -o loop,ro -t erofs`), unmounted on drop.
pub struct Mounted {
    dir: TempDir,
}

impl Mounted {
    pub fn new(disk: &Path) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-o", "loop,ro", "-t", "erofs"])
            .arg(disk)
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "these tests loop-mount EROFS disks (root and loop devices needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mounted { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Every path in the disk.
    pub fn list(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(self.dir.path(), self.dir.path(), &mut out);
        out.sort();
        out
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The value of xattr `name` on `path` (not following symlinks).
pub fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return None;
    }
    buf.truncate(len as usize);
    Some(buf)
}
