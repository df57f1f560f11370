//! VM templates: booted, paused VMs whose RAM is a file, that pods fork
//! from instead of booting; making, choosing, using and removing them, and
//! starting a pod VM by fork from one ([`fork`]).
//!
//! The hierarchy: a *base* template per (kernel, initramfs, vCPUs, memory,
//! …) is the guest booted with its agent idle; an *image* template is a
//! base with an image's layer disks attached and mounted; a *warm*
//! template also has the container's process started and warmed. A pod
//! forks from the deepest template that serves it ([`select`]); `run
//! --template auto` makes missing base and image templates on demand (warm
//! ones only by `template create --warm`, since the process and its
//! environment end up in every clone).
//!
//! A template is valid while its inputs ([`meta::Inputs`]: guest artifacts
//! digest, VMM version and device layout, layer disks) are unchanged; a
//! stale one is rebuilt, never used. Files: metadata and saved device
//! states under `<run dir>/templates/` (host-local, like the RAM files,
//! which live on tmpfs: `/dev/shm/podvisor/templates/<run dir id>/` by
//! default). A RAM file that running clones map is never written or
//! removed ([`manage::remove`] refuses and names them).

pub mod build;
pub mod files;
pub mod fork;
pub mod inputs;
pub mod manage;
pub mod meta;
pub mod select;

use std::path::{Path, PathBuf};

pub use files::TemplateDirs;
pub use fork::{ForkRequest, from_template, pod_recipe};
pub use manage::{CreateRequest, TemplateStatus, WarmRequest};
pub use meta::{Recipe, TemplateKind, TemplateMeta};
pub use select::{Chosen, TemplateChoice};

use podvisor_podvm::{NodeConfig, PodVmError};

/// Subdirectory of the run directory holding template metadata and states.
pub const TEMPLATES_SUBDIR: &str = "templates";

/// Where this host's templates live: metadata under the run directory,
/// RAM in a subdirectory of the template RAM directory named after the run
/// directory (several run directories may share one RAM directory).
pub fn dirs(cfg: &NodeConfig) -> TemplateDirs {
    let run_dir = std::fs::canonicalize(&cfg.run_dir).unwrap_or_else(|_| cfg.run_dir.clone());
    TemplateDirs {
        meta: cfg.run_dir.join(TEMPLATES_SUBDIR),
        ram_root: cfg.template_ram_dir.clone(),
        ram: cfg.template_ram_dir.join(files::owner_id(&run_dir)),
        run_dir,
    }
}

/// Errors of making, finding, using and removing templates.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{what} {path}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template metadata {path} is unreadable: {reason}")]
    BadMetadata { path: PathBuf, reason: String },
    #[error(
        "invalid template name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    BadName(String),
    #[error("no template named {0:?} (see `podvisor template ls`)")]
    NotFound(String),
    #[error("template {name:?} does not fit this pod: {reason}")]
    Mismatch { name: String, reason: String },
    #[error("template {name:?} is corrupt: {reason}")]
    Corrupt { name: String, reason: String },
    #[error("layer disk {chain_id}: {reason}")]
    LayerMissing { chain_id: String, reason: String },
    #[error(
        "template {name:?} is in use: its RAM file is mapped by running pods (QEMU pids {}); stop them first",
        pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
    )]
    InUse { name: String, pids: Vec<u32> },
    #[error("template {name:?} already exists with another recipe; remove it first")]
    Exists { name: String },
    /// The base template's guest did not boot; a cold boot would fail alike.
    #[error(transparent)]
    Boot(PodVmError),
    #[error("template VM")]
    Vm(#[source] PodVmError),
    #[error("the template's guest: {0}")]
    Guest(String),
    #[error("warming the template's process: {0}")]
    WarmUp(String),
    #[error(transparent)]
    Artifacts(#[from] podvisor_guest::GuestError),
    #[error(transparent)]
    Layers(#[from] podvisor_image::ImageError),
    /// Getting the template's image (pull, import) failed.
    #[error(transparent)]
    Image(podvisor_image::ImageError),
    #[error(transparent)]
    Random(#[from] podvisor_store::RandomError),
    #[error(transparent)]
    Vmm(#[from] podvisor_vmm::VmmError),
    #[error(transparent)]
    Spec(#[from] podvisor_podvm::container::ContainerSpecError),
}

impl TemplateError {
    pub(crate) fn io(what: &str, path: &Path, source: std::io::Error) -> TemplateError {
        TemplateError::Io {
            what: what.to_string(),
            path: path.to_path_buf(),
            source,
        }
    }
}
