//! Kernel modules: the guest kernel's virtio, EROFS and overlay drivers are
//! modules, loaded by the agent with `init_module(2)` in the order of
//! `/etc/podvisor/modules.load` (dependencies first; written by the `guest`
//! crate when it builds the initramfs).

use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::syscall::Syscall;

/// Why one module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The `.ko` file could not be read.
    #[error("cannot read module {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The kernel refused the module.
    #[error("cannot load module {path}: {errno}")]
    Load { path: PathBuf, errno: Errno },
}

/// Parses the load list: one path per line, relative to the kernel's module
/// directory; blank lines and `#` comments are skipped.
pub fn parse_load_list(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Loads each module of `list` (paths relative to `module_dir`) in order.
/// A module that is already loaded or built in (`EEXIST`) counts as loaded.
/// Failures do not stop the rest: a missing optional driver should not keep
/// the agent from reporting; they are returned for logging.
pub fn load_all(sys: &dyn Syscall, module_dir: &Path, list: &[String]) -> Vec<ModuleError> {
    let mut errors = Vec::new();
    for rel in list {
        let path = module_dir.join(rel.trim_start_matches('/'));
        let image = match std::fs::read(&path) {
            Ok(image) => image,
            Err(source) => {
                errors.push(ModuleError::Read { path, source });
                continue;
            }
        };
        match sys.init_module(&image, c"") {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(errno) => errors.push(ModuleError::Load { path, errno }),
        }
    }
    errors
}

/// Loads the modules of the lazy list `list` (a path like
/// [`podvisor_proto::MODULES_PMEM_LIST`]) for kernel `release` from the
/// initramfs, which the agent keeps at [`crate::boot::INITRAMFS_DIR`];
/// returns the failures, as text for the log.
pub fn load_lazy(list: &str, release: &str) -> Vec<String> {
    let initramfs = Path::new(crate::boot::INITRAMFS_DIR);
    let dir = initramfs.join(
        module_dir(release)
            .strip_prefix("/")
            .unwrap_or(Path::new("")),
    );
    let list = initramfs.join(list.trim_start_matches('/'));
    match std::fs::read_to_string(&list) {
        Ok(text) => load_all(&crate::syscall::LinuxSyscall, &dir, &parse_load_list(&text))
            .iter()
            .map(|e| podvisor_errors::ErrorChain(e).to_string())
            .collect(),
        Err(e) => vec![format!("reading {}: {e}", list.display())],
    }
}

/// The module directory of the running kernel: `/lib/modules/<release>`.
pub fn module_dir(release: &str) -> PathBuf {
    Path::new("/lib/modules").join(release)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::RecordingSyscall;

    #[test]
    fn load_list_skips_blanks_and_comments() {
        let list = parse_load_list("# deps first\nkernel/a.ko\n\n  kernel/b.ko  \n");
        assert_eq!(list, ["kernel/a.ko", "kernel/b.ko"]);
    }

    #[test]
    fn loads_in_order_and_accepts_builtin_modules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kernel")).unwrap();
        for m in ["virtio", "virtio_ring", "erofs"] {
            std::fs::write(dir.path().join(format!("kernel/{m}.ko")), m).unwrap();
        }
        let sys = RecordingSyscall::new().fail("init_module virtio_ring", Errno::EEXIST);
        let list = parse_load_list("kernel/virtio_ring.ko\nkernel/virtio.ko\nkernel/erofs.ko\n");
        let errors = load_all(&sys, dir.path(), &list);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            sys.calls(),
            [
                "init_module virtio_ring \"\"",
                "init_module virtio \"\"",
                "init_module erofs \"\""
            ]
        );
    }

    #[test]
    fn failures_are_reported_and_do_not_stop_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.ko"), "bad").unwrap();
        std::fs::write(dir.path().join("good.ko"), "good").unwrap();
        let sys = RecordingSyscall::new().fail("init_module bad", Errno::ENOEXEC);
        let list = parse_load_list("missing.ko\nbad.ko\ngood.ko");
        let errors = load_all(&sys, dir.path(), &list);
        assert_eq!(errors.len(), 2);
        assert!(errors[0].to_string().starts_with("cannot read module"));
        assert!(errors[1].to_string().contains("ENOEXEC"));
        assert_eq!(sys.calls().last().unwrap(), "init_module good \"\"");
    }
}
