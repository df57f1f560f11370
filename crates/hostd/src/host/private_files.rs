//! Files that hold a pod's spec, environment, logs or keys are the
//! daemon's only: directories are made mode 0700 and files 0600 as they
//! are created (never created open and restricted afterwards, so there is
//! no moment another user could open them), and what an older daemon
//! left with wider modes is restricted once at start
//! ([`restrict_tree`]).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of a private directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of a private file.
pub const FILE_MODE: u32 = 0o600;

/// Makes `dir` and its missing parents, each made mode 0700. An existing
/// directory is left as it is ([`restrict_tree`] fixes those at start).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Opens `path` for appending, creating it mode 0600.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Creates (or truncates) `path` for writing, creating it mode 0600.
pub fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
}

/// What [`restrict_tree`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restricted {
    pub dirs: usize,
    pub files: usize,
}

/// Takes group and other permissions off `root` and everything under it
/// (directories and regular files; symbolic links are not followed, and
/// sockets and the like are left). Returns what was changed.
pub fn restrict_tree(root: &Path) -> io::Result<Restricted> {
    let mut done = Restricted::default();
    restrict(root, &mut done)?;
    Ok(done)
}

fn restrict(path: &Path, done: &mut Restricted) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        // Removed meanwhile (a pod ending): nothing to restrict.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mode = meta.permissions().mode();
    if meta.is_dir() {
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
            done.dirs += 1;
        }
        for entry in std::fs::read_dir(path)? {
            restrict(&entry?.path(), done)?;
        }
    } else if meta.is_file() && mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
        done.files += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn made_private_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_dir_all(&nested).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&nested), 0o700);
        let f = nested.join("f.log");
        open_append(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        let g = nested.join("g.json");
        create(&g).unwrap();
        assert_eq!(mode(&g), 0o600);
    }

    #[test]
    fn an_older_daemons_open_files_are_restricted() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("pods/uid-1");
        std::fs::create_dir_all(pod.join("logs")).unwrap();
        std::fs::write(pod.join("pod.json"), b"{}").unwrap();
        std::fs::write(pod.join("logs/c.log"), b"out").unwrap();
        std::fs::write(dir.path().join("elsewhere"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), pod.join("link")).unwrap();
        for p in [&pod, &pod.join("logs")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for p in [pod.join("pod.json"), pod.join("logs/c.log")] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::set_permissions(
            dir.path().join("elsewhere"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let done = restrict_tree(&dir.path().join("pods")).unwrap();
        assert_eq!(mode(&pod), 0o700);
        assert_eq!(mode(&pod.join("logs")), 0o700);
        assert_eq!(mode(&pod.join("pod.json")), 0o600);
        assert_eq!(mode(&pod.join("logs/c.log")), 0o600);
        // The link's target is not the daemon's business.
        assert_eq!(mode(&dir.path().join("elsewhere")), 0o644);
        assert_eq!(done.files, 2);
        assert!(done.dirs >= 2, "{done:?}");
        // Once restricted there is nothing more to do.
        assert_eq!(
            restrict_tree(&dir.path().join("pods")).unwrap(),
            Restricted::default()
        );
    }
}
