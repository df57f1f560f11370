//! Paths inside a container root seen from the agent (before the container
//! exists): symlinks are followed as if the root were `/`, so an absolute
//! link in the image never leads out into the guest; and `args[0]` is looked
//! up in the container's `PATH`.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// The `PATH` a container gets when its environment has none (docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How many symlinks one resolution may follow (like the kernel's limit).
const MAX_LINKS: usize = 40;

/// Why `args[0]` could not be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No executable file of that name in any `PATH` directory.
    #[error("executable file not found in $PATH: {0}")]
    NotFound(String),
}

/// Resolves `path` (absolute inside the container) to a host path under
/// `root`, following symlinks with `root` as `/` and `..` stopping at it.
/// Missing components are kept as they are.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut pending: Vec<OsString> = components(path);
    pending.reverse();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate: PathBuf = root.join(resolved.iter().collect::<PathBuf>()).join(&name);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            _ => resolved.push(name),
        }
    }
    Ok(root.join(resolved.iter().collect::<PathBuf>()))
}

/// The normal and `..` components of a path (`.` and `/` dropped).
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// The value of `PATH` in a `KEY=VALUE` environment, or [`DEFAULT_PATH`].
pub fn path_from_env(env: &[String]) -> &str {
    env.iter()
        .rev()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

/// Finds the program to execute for `name` in a container rooted at `root`.
///
/// A name containing `/` is returned as it is (the exec itself reports a
/// missing or unexecutable file). Otherwise each absolute directory of
/// `path_env` is searched for an executable regular file; the result is
/// the path inside the container (`/bin/sh`), not resolved, so that the
/// program sees the `argv[0]`-independent path it expects.
pub fn find_executable(root: &Path, path_env: &str, name: &str) -> Result<String, LookupError> {
    if name.as_bytes().contains(&b'/') {
        return Ok(name.to_string());
    }
    if !name.is_empty() {
        for dir in path_env.split(':').filter(|d| d.starts_with('/')) {
            let candidate = format!("{}/{}", dir.trim_end_matches('/'), name);
            let Ok(host) = resolve_in_root(root, Path::new(&candidate)) else {
                continue;
            };
            let executable = std::fs::metadata(&host)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
            if executable {
                return Ok(candidate);
            }
        }
    }
    Err(LookupError::NotFound(name.to_string()))
}

/// `true` if `name` is a single path component fit to name a directory
/// (container ids, layer serials): not empty, not `.`/`..`, no `/`, `:`,
/// `,` or control characters, at most 128 bytes.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .as_bytes()
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b))
        && !name.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn image() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in ["bin", "usr/bin", "usr/local/bin", "etc"] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        fs::write(r.join("bin/busybox"), b"#!").unwrap();
        fs::set_permissions(r.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("busybox", r.join("bin/sh")).unwrap();
        symlink("/bin/busybox", r.join("usr/bin/env")).unwrap();
        fs::write(r.join("usr/bin/data"), b"x").unwrap();
        fs::set_permissions(r.join("usr/bin/data"), fs::Permissions::from_mode(0o644)).unwrap();
        // An absolute link that would escape the root if followed on the host.
        symlink("/etc", r.join("usr/local/bin/escape")).unwrap();
        root
    }

    #[test]
    fn finds_programs_through_relative_and_absolute_links() {
        let root = image();
        assert_eq!(
            find_executable(root.path(), DEFAULT_PATH, "sh").unwrap(),
            "/bin/sh"
        );
        assert_eq!(
            find_executable(root.path(), DEFAULT_PATH, "env").unwrap(),
            "/usr/bin/env"
        );
    }

    #[test]
    fn missing_or_unexecutable_programs_are_not_found() {
        let root = image();
        let err = find_executable(root.path(), DEFAULT_PATH, "nope").unwrap_err();
        assert_eq!(err.to_string(), "executable file not found in $PATH: nope");
        assert!(find_executable(root.path(), DEFAULT_PATH, "data").is_err());
        assert!(find_executable(root.path(), "relative:bin", "sh").is_err());
    }

    #[test]
    fn names_with_a_slash_are_used_as_they_are() {
        let root = image();
        assert_eq!(find_executable(root.path(), "", "./x").unwrap(), "./x");
        assert_eq!(
            find_executable(root.path(), "", "/no/such").unwrap(),
            "/no/such"
        );
    }

    #[test]
    fn resolution_stays_inside_the_root() {
        let root = image();
        let r = root.path();
        assert_eq!(
            resolve_in_root(r, Path::new("/usr/bin/env")).unwrap(),
            r.join("bin/busybox")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/usr/local/bin/escape/passwd")).unwrap(),
            r.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/../../etc/./passwd")).unwrap(),
            r.join("etc/passwd")
        );
        symlink("loop", r.join("loop")).unwrap();
        assert!(resolve_in_root(r, Path::new("/loop")).is_err());
    }

    #[test]
    fn path_comes_from_the_environment_or_the_default() {
        assert_eq!(path_from_env(&["A=1".into(), "PATH=/x:/y".into()]), "/x:/y");
        assert_eq!(path_from_env(&[]), DEFAULT_PATH);
    }

    #[test]
    fn safe_names() {
        assert!(is_safe_name("pvl0"));
        assert!(is_safe_name("my-container_1.2"));
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a,b",
            "-x",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(!is_safe_name(bad), "{bad:?}");
        }
    }
}
