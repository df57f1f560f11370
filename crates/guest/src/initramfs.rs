//! The pod VM's initramfs: the agent as `/init`, the kernel modules it loads
//! and the list saying in which order, as a cpio "newc" archive.
//!
//! Layout (the contract with the agent, see `docs/ARCHITECTURE.md`):
//!
//! - `/init`: the static agent binary, mode 0755;
//! - `/dev/console`: character device 5:1, so the kernel can open the console
//!   before anything mounts devtmpfs;
//! - empty `/dev /proc /sys /run /tmp /etc/podvisor` mount points and dirs;
//! - `/lib/modules/<release>/<path>` for each module, `<path>` as in
//!   `modules.dep`;
//! - [`MODULES_LOAD_LIST`] (`/etc/podvisor/modules.load`): those `<path>`s,
//!   one per line, in load order (dependencies first);
//! - lists of modules the agent loads later, when it needs them (each a
//!   [`LazyModules`], e.g. `/etc/podvisor/modules.volumes`), in the same
//!   format, their modules in `/lib/modules/<release>/` too.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use podvisor_proto::MODULES_LOAD_LIST;

use crate::GuestError;
use crate::cpio::{CpioError, CpioWriter};
use crate::modules::ResolvedModule;

/// Path of the agent inside the archive: the kernel runs `/init`.
pub const INIT_PATH: &str = "init";
/// Device number of `/dev/console`.
pub const CONSOLE_DEVICE: (u32, u32) = (5, 1);

/// Directories every initramfs has, with their permission bits.
const BASE_DIRECTORIES: [(&str, u32); 6] = [
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("etc/podvisor", 0o755),
];

/// A kernel module file to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    /// Path relative to `/lib/modules/<release>/`, as in `modules.dep`.
    pub relative_path: String,
    /// The `.ko` file's contents, without a module signature.
    pub data: Vec<u8>,
}

/// The marker the kernel's `sign-file` appends after a module signature.
const MODULE_SIGNATURE_MARKER: &[u8] = b"~Module signature appended~\n";

/// Removes the signature `sign-file` appended to a module, if any: the
/// module, then the signature, then a 12-byte `struct module_signature`
/// (whose last four bytes are the signature length, big-endian), then the
/// marker. Checking the signature costs a pod VM tens of milliseconds of
/// RSA under emulation and protects nothing: the host builds the initramfs
/// and the guest trusts the host anyway (as Kata's module-free guest kernels
/// do). An unsigned module loads with the kernel's "module verification
/// failed" taint (notice level: silent under `quiet`) unless the guest
/// enforces signatures, which the kernel command line does not ask for.
/// A module whose trailer does not add up is kept as it is.
pub fn strip_module_signature(mut data: Vec<u8>) -> Vec<u8> {
    const INFO_LEN: usize = 12;
    let Some(body) = data.strip_suffix(MODULE_SIGNATURE_MARKER) else {
        return data;
    };
    let Some(info_at) = body.len().checked_sub(INFO_LEN) else {
        return data;
    };
    let info = &body[info_at..];
    let signer_len = usize::from(info[3]);
    let key_id_len = usize::from(info[4]);
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    match info_at.checked_sub(sig_len + signer_len + key_id_len) {
        Some(module_len) => {
            data.truncate(module_len);
            data
        }
        None => data,
    }
}

/// Modules the agent loads only when it needs them, and the list file
/// naming them (same format as [`MODULES_LOAD_LIST`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyModules {
    /// Absolute path of the list inside the initramfs.
    pub list: String,
    /// The modules, in load order.
    pub modules: Vec<ModuleFile>,
}

/// Everything an initramfs is built from, read into memory so that the bytes
/// hashed for the cache key are exactly the bytes archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsContents {
    /// The kernel release the modules belong to.
    pub kernel_release: String,
    /// The agent binary.
    pub agent: Vec<u8>,
    /// The modules, in load order.
    pub modules: Vec<ModuleFile>,
    /// Module lists the agent loads later.
    pub lazy: Vec<LazyModules>,
}

fn read_modules(modules: &[ResolvedModule]) -> Result<Vec<ModuleFile>, GuestError> {
    modules
        .iter()
        .map(|module| {
            let data = std::fs::read(&module.path)
                .map_err(|e| GuestError::io("read kernel module", &module.path, e))?;
            Ok(ModuleFile {
                relative_path: module.relative_path.clone(),
                data: strip_module_signature(data),
            })
        })
        .collect()
}

fn load_list(modules: &[ModuleFile]) -> String {
    modules
        .iter()
        .map(|module| format!("{}\n", module.relative_path))
        .collect()
}

impl InitramfsContents {
    /// [`InitramfsContents::load`] plus module lists to load later:
    /// `(list path, modules)`.
    pub fn load_with_lazy(
        kernel_release: &str,
        agent: &Path,
        modules: &[ResolvedModule],
        lazy: &[(&str, Vec<ResolvedModule>)],
    ) -> Result<InitramfsContents, GuestError> {
        let mut contents = InitramfsContents::load(kernel_release, agent, modules)?;
        for (list, modules) in lazy {
            contents.lazy.push(LazyModules {
                list: list.to_string(),
                modules: read_modules(modules)?,
            });
        }
        Ok(contents)
    }

    /// Reads the agent binary at `agent` and every module in `modules` (in
    /// load order) for a kernel of release `kernel_release`.
    pub fn load(
        kernel_release: &str,
        agent: &Path,
        modules: &[ResolvedModule],
    ) -> Result<InitramfsContents, GuestError> {
        let agent = std::fs::read(agent).map_err(|e| GuestError::io("read agent", agent, e))?;
        let modules = read_modules(modules)?;
        Ok(InitramfsContents {
            kernel_release: kernel_release.to_owned(),
            agent,
            modules,
            lazy: Vec::new(),
        })
    }

    /// The text of [`MODULES_LOAD_LIST`]: each module's relative path on a
    /// line of its own, in load order.
    pub fn modules_load_list(&self) -> String {
        load_list(&self.modules)
    }

    /// Every module file to archive, each path once.
    fn all_modules(&self) -> Vec<&ModuleFile> {
        let mut seen = BTreeSet::new();
        self.modules
            .iter()
            .chain(self.lazy.iter().flat_map(|l| &l.modules))
            .filter(|m| seen.insert(m.relative_path.as_str()))
            .collect()
    }

    /// Path inside the archive (without the leading `/`) of a module.
    fn module_archive_path(&self, module: &ModuleFile) -> String {
        format!(
            "lib/modules/{}/{}",
            self.kernel_release, module.relative_path
        )
    }

    /// Writes the archive to `out`, returning `out` when the trailer is written.
    pub fn write<W: Write>(&self, out: W) -> Result<W, CpioError> {
        let load_list_path = MODULES_LOAD_LIST.trim_start_matches('/');
        let all_modules = self.all_modules();
        let module_paths: Vec<String> = all_modules
            .iter()
            .map(|module| self.module_archive_path(module))
            .collect();
        let lazy_lists: Vec<&str> = self
            .lazy
            .iter()
            .map(|l| l.list.trim_start_matches('/'))
            .collect();

        // Every directory that holds something, parents before children:
        // "a" sorts before "a/b" in a BTreeSet.
        let mut directories: BTreeSet<&str> = BTreeSet::new();
        let release_dir = format!("lib/modules/{}", self.kernel_release);
        let files = module_paths
            .iter()
            .map(String::as_str)
            .chain([load_list_path, release_dir.as_str()])
            .chain(lazy_lists.iter().copied());
        for file in files {
            let mut rest = file;
            while let Some((parent, _)) = rest.rsplit_once('/') {
                directories.insert(parent);
                rest = parent;
            }
        }
        directories.insert(&release_dir);
        for (dir, _) in BASE_DIRECTORIES {
            directories.insert(dir);
        }
        let mode_of = |dir: &str| {
            BASE_DIRECTORIES
                .iter()
                .find(|(base, _)| *base == dir)
                .map_or(0o755, |(_, mode)| *mode)
        };

        let mut cpio = CpioWriter::new(out);
        for dir in directories {
            cpio.directory(dir, mode_of(dir))?;
        }
        let (major, minor) = CONSOLE_DEVICE;
        cpio.char_device("dev/console", 0o600, major, minor)?;
        cpio.file(INIT_PATH, 0o755, &self.agent)?;
        for (module, path) in all_modules.iter().zip(&module_paths) {
            cpio.file(path, 0o644, &module.data)?;
        }
        cpio.file(load_list_path, 0o644, self.modules_load_list().as_bytes())?;
        for (lazy, path) in self.lazy.iter().zip(&lazy_lists) {
            cpio.file(path, 0o644, load_list(&lazy.modules).as_bytes())?;
        }
        cpio.finish()
    }
}

#[cfg(test)]
#[path = "initramfs_tests.rs"]
mod tests;
