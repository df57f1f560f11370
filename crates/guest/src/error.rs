//! The error type of this crate: every variant names the file, directory or
//! module at fault, so a message printed on its own tells the user what to fix.

use std::io;
use std::path::PathBuf;

use crate::cpio::CpioError;

/// Why guest boot artifacts could not be found or built.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A file-system operation on a named path failed.
    #[error("cannot {op} {}: {error}", path.display())]
    Io {
        /// What was being done, as a verb phrase ("read", "create directory", …).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },

    /// No kernel image matched `<boot_dir>/vmlinuz-*-cloud-amd64`.
    #[error(
        "no guest kernel found: nothing matches {}/vmlinuz-*-cloud-amd64; \
         install linux-image-cloud-amd64 or pass --kernel",
        boot_dir.display()
    )]
    NoKernel {
        /// The directory that was searched.
        boot_dir: PathBuf,
    },

    /// The kernel image's file name does not say which release it is.
    #[error(
        "cannot tell the kernel release of {}: the file name must be vmlinuz-<release>",
        path.display()
    )]
    KernelName {
        /// The kernel image given.
        path: PathBuf,
    },

    /// The kernel's module directory (or its `modules.dep`) is missing.
    #[error(
        "no modules for kernel {release}: {} does not exist; install the modules \
         package that matches the kernel image",
        modules_dir.display()
    )]
    NoModules {
        /// The kernel release.
        release: String,
        /// Where its modules were expected.
        modules_dir: PathBuf,
    },

    /// A line of `modules.dep` could not be understood.
    #[error("{}:{line}: {reason}", path.display())]
    ModulesDep {
        /// The `modules.dep` file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },

    /// A requested module (or a dependency) is not in `modules.dep`.
    #[error(
        "module {module} does not exist for this kernel (not in {}){}",
        dep_file.display(),
        required_by.as_ref().map(|by| format!("; required by {by}")).unwrap_or_default()
    )]
    UnknownModule {
        /// The module name as requested, or the dependency path as listed.
        module: String,
        /// The `modules.dep` that was searched.
        dep_file: PathBuf,
        /// The module whose dependency list named it, if it was not requested directly.
        required_by: Option<String>,
    },

    /// The dependencies in `modules.dep` form a cycle.
    #[error("module dependency cycle in {}: {}", dep_file.display(), cycle.join(" -> "))]
    ModuleCycle {
        /// The `modules.dep` file.
        dep_file: PathBuf,
        /// Module names along the cycle; the first and last are the same.
        cycle: Vec<String>,
    },

    /// A needed module is compressed; the agent loads raw `.ko` files only.
    #[error(
        "module {module} is compressed ({}); the guest agent loads only uncompressed .ko \
         files with init_module(2): use a kernel whose modules are not compressed",
        path.display()
    )]
    CompressedModule {
        /// The module name.
        module: String,
        /// Its file.
        path: PathBuf,
    },

    /// No statically linked agent binary in any of the places searched.
    #[error(
        "no statically linked podvisor-agent found; looked at: {}. Build it with \
         `{}` or set PODVISOR_AGENT",
        looked.join(", "),
        crate::agent::STATIC_AGENT_BUILD
    )]
    AgentNotFound {
        /// Each place looked at, with why it was looked at.
        looked: Vec<String>,
    },

    /// The agent binary is dynamically linked: the guest has no loader.
    #[error(
        "{} is dynamically linked (ELF interpreter {interpreter}); the guest agent must be \
         statically linked: build it with `{}` and use \
         target/x86_64-unknown-linux-gnu/release/podvisor-agent",
        path.display(),
        crate::agent::STATIC_AGENT_BUILD
    )]
    AgentNotStatic {
        /// The agent binary.
        path: PathBuf,
        /// The dynamic loader it asks for.
        interpreter: String,
    },

    /// The agent binary is not an x86-64 ELF executable.
    #[error(
        "{} cannot be the guest agent: {reason}; build the agent with `{}`",
        path.display(),
        crate::agent::STATIC_AGENT_BUILD
    )]
    AgentNotExecutable {
        /// The file given as the agent.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Writing the cpio archive failed.
    #[error("cannot write initramfs {}: {error}", path.display())]
    Archive {
        /// The archive being written.
        path: PathBuf,
        /// What went wrong.
        error: CpioError,
    },
}

impl GuestError {
    /// Builds an [`GuestError::Io`] for `op` on `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, error: io::Error) -> Self {
        GuestError::Io {
            op,
            path: path.into(),
            error,
        }
    }
}
