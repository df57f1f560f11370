//! What a template is: how it was made ([`Recipe`]), what it was made from
//! ([`Inputs`], the validity key), and where its files are
//! ([`TemplateMeta`], stored as `<name>.json`).

use std::path::{Path, PathBuf};

use podvisor_proto::{AgentInfo, ProcessSpec};
use podvisor_vmm::{BlockDevice, Device, PciLayout};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::TemplateError;

/// Version of the metadata format; other versions are not read.
pub const META_FORMAT: u32 = 1;

/// The level of a template in the hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateKind {
    /// Kernel and agent booted and idle.
    Base,
    /// A base with an image's layer disks attached.
    Image,
    /// An image template with the container's process started and warm.
    Warm,
}

impl std::fmt::Display for TemplateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TemplateKind::Base => "base",
            TemplateKind::Image => "image",
            TemplateKind::Warm => "warm",
        })
    }
}

/// Everything that decides what a template holds. Two pods with equal
/// recipes (up to their level) fork from the same template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    /// Hypervisor backend and accelerator.
    pub backend: String,
    pub accel: String,
    /// The `--kernel` and `--agent` choices (`None`: found automatically).
    pub kernel: Option<PathBuf>,
    pub agent: Option<PathBuf>,
    /// Extra guest kernel arguments.
    pub kernel_args: Vec<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Image and warm templates: the image's layers, bottom first (ChainIDs).
    pub layers: Vec<String>,
    /// Warm templates: the container process started before saving.
    pub warm: Option<WarmRecipe>,
}

/// How the process of a warm template was started and warmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmRecipe {
    pub process: ProcessSpec,
    /// Wait for this text in the process's output before saving.
    pub until: Option<String>,
    /// Then let it run this long (milliseconds).
    pub settle_ms: u64,
}

impl Recipe {
    /// The level this recipe makes.
    pub fn kind(&self) -> TemplateKind {
        match (&self.warm, self.layers.is_empty()) {
            (Some(_), _) => TemplateKind::Warm,
            (None, false) => TemplateKind::Image,
            (None, true) => TemplateKind::Base,
        }
    }

    /// The base template this one is made from.
    pub fn base(&self) -> Recipe {
        Recipe {
            layers: vec![],
            warm: None,
            ..self.clone()
        }
    }

    /// The image template this one is made from (itself if it is one).
    pub fn image(&self) -> Recipe {
        Recipe {
            warm: None,
            ..self.clone()
        }
    }

    /// SHA-256 hex of the recipe's JSON (field order is fixed).
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{:x}", Sha256::digest(&json))
    }

    /// The name `run --template auto` gives a template of this recipe:
    /// its level and 12 hex digits of the recipe's digest. A warm recipe
    /// is named by its process, not by how long it was warmed.
    pub fn auto_name(&self) -> String {
        let mut key = self.clone();
        if let Some(w) = key.warm.as_mut() {
            w.until = None;
            w.settle_ms = 0;
        }
        format!("{}-{}", self.kind(), &key.digest()[..12])
    }

    /// Whether a pod whose recipe is `pod` may fork from a template made
    /// from `self`: everything up to this template's level is equal. A
    /// warm process matches when everything but its terminal size does.
    pub fn serves(&self, pod: &Recipe) -> bool {
        let level = |r: &Recipe| Recipe {
            layers: if self.layers.is_empty() {
                vec![]
            } else {
                r.layers.clone()
            },
            warm: None,
            ..r.clone()
        };
        if level(self) != level(pod) {
            return false;
        }
        match (&self.warm, &pod.warm) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(t), Some(p)) => same_process(&t.process, &p.process),
        }
    }
}

/// Process specs equal up to the terminal's size (the clone's terminal is
/// resized after the fork).
pub fn same_process(a: &ProcessSpec, b: &ProcessSpec) -> bool {
    let shape = |p: &ProcessSpec| ProcessSpec {
        terminal: p
            .terminal
            .map(|_| podvisor_proto::TerminalSize { rows: 0, cols: 0 }),
        ..p.clone()
    };
    shape(a) == shape(b)
}

/// What a template was made from. It is valid while every input is
/// unchanged; a template with other inputs is rebuilt, never used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    /// [`podvisor_guest::GuestArtifacts::inputs_digest`]: kernel, agent
    /// (so its version), modules.
    pub guest: String,
    /// The VMM's version and podvisor's device layout for it.
    pub vmm: String,
    /// The layer disks attached (image and warm templates).
    pub layers: Vec<LayerInput>,
}

/// A layer disk as a template saw it: a guest that has read a disk must
/// never see other bytes behind the same ChainID, so the file's identity
/// counts too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInput {
    pub chain_id: String,
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    pub inode: u64,
}

/// A disk a template's clones must be started with, in this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateDisk {
    /// The disk's device id (`layer<i>`; empty in metadata written
    /// before devices had ids).
    #[serde(default)]
    pub id: String,
    pub path: PathBuf,
    pub serial: String,
    pub read_only: bool,
}

/// A template as stored: `<templates dir>/<name>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub format: u32,
    pub name: String,
    pub kind: TemplateKind,
    pub recipe: Recipe,
    pub inputs: Inputs,
    /// The image it was made from, for people.
    pub image: Option<String>,
    /// What the template's agent reported.
    pub agent: AgentInfo,
    /// Guest RAM (on tmpfs): clones map it copy-on-write.
    pub ram_file: PathBuf,
    /// Saved device state.
    pub state_file: PathBuf,
    pub state_sha256: String,
    pub state_bytes: u64,
    /// Disks present when the state was saved.
    pub disks: Vec<TemplateDisk>,
    /// The PCI addresses of the devices when the state was saved: a clone
    /// must have them at the same ones.
    #[serde(default)]
    pub pci: PciLayout,
    /// Seconds since the epoch when it was made.
    pub created_unix: u64,
    /// How long making it took (milliseconds).
    pub build_ms: u64,
    /// RAM files of older builds of this name that clones still mapped
    /// when it was rebuilt; `prune` removes them once unused.
    #[serde(default)]
    pub retired: Vec<PathBuf>,
}

impl TemplateMeta {
    /// The devices a clone needs besides every pod VM's own: the disks
    /// present when the state was saved.
    pub fn devices(&self) -> Vec<Device> {
        self.disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                Device::Block(BlockDevice {
                    id: if d.id.is_empty() {
                        format!("layer{i}")
                    } else {
                        d.id.clone()
                    },
                    path: d.path.clone(),
                    read_only: d.read_only,
                    serial: d.serial.clone(),
                })
            })
            .collect()
    }

    /// Reads and checks a metadata file.
    pub fn read(path: &Path) -> Result<TemplateMeta, TemplateError> {
        let bytes = std::fs::read(path).map_err(|e| TemplateError::io("read", path, e))?;
        let meta: TemplateMeta =
            serde_json::from_slice(&bytes).map_err(|e| TemplateError::BadMetadata {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        if meta.format != META_FORMAT {
            return Err(TemplateError::BadMetadata {
                path: path.to_path_buf(),
                reason: format!("format {} (this podvisor reads {META_FORMAT})", meta.format),
            });
        }
        Ok(meta)
    }

    /// Writes the metadata atomically (temporary file, sync, rename).
    pub fn write(&self, path: &Path) -> Result<(), TemplateError> {
        use std::io::Write;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        let mut f =
            std::fs::File::create(&tmp).map_err(|e| TemplateError::io("create", &tmp, e))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| TemplateError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| TemplateError::io("rename", &tmp, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Recipe {
        Recipe {
            backend: "qemu".into(),
            accel: "tcg".into(),
            kernel: None,
            agent: None,
            kernel_args: vec![],
            cpus: 1,
            memory_mib: 256,
            layers: vec!["sha256:aa".into(), "sha256:bb".into()],
            warm: None,
        }
    }

    fn process(args: &[&str]) -> ProcessSpec {
        ProcessSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: String::new(),
            terminal: None,
            stdin: true,
        }
    }

    #[test]
    fn levels_and_names() {
        let image = recipe();
        assert_eq!(image.kind(), TemplateKind::Image);
        assert_eq!(image.base().kind(), TemplateKind::Base);
        assert!(image.auto_name().starts_with("image-"));
        assert!(image.base().auto_name().starts_with("base-"));
        assert_eq!(image.auto_name().len(), "image-".len() + 12);
        assert_ne!(image.auto_name(), image.base().auto_name());
        let warm = Recipe {
            warm: Some(WarmRecipe {
                process: process(&["sh"]),
                until: Some("ready".into()),
                settle_ms: 500,
            }),
            ..recipe()
        };
        assert_eq!(warm.kind(), TemplateKind::Warm);
        assert_eq!(warm.image(), image);
        // Named by its process, not by how it was warmed.
        let other_wait = Recipe {
            warm: Some(WarmRecipe {
                until: None,
                settle_ms: 0,
                ..warm.warm.clone().unwrap()
            }),
            ..warm.clone()
        };
        assert_eq!(warm.auto_name(), other_wait.auto_name());
    }

    #[test]
    fn which_templates_serve_a_pod() {
        let pod = Recipe {
            warm: Some(WarmRecipe {
                process: process(&["sh"]),
                until: None,
                settle_ms: 0,
            }),
            ..recipe()
        };
        let image = recipe();
        assert!(image.base().serves(&pod));
        assert!(image.serves(&pod));
        let mut warm = pod.clone();
        warm.warm.as_mut().unwrap().settle_ms = 900;
        assert!(warm.serves(&pod));
        // Another command, other layers, other memory: no.
        let mut other = pod.clone();
        other.warm.as_mut().unwrap().process = process(&["sleep"]);
        assert!(!other.serves(&pod));
        assert!(!warm.serves(&image));
        let mut layers = image.clone();
        layers.layers.pop();
        assert!(!layers.serves(&pod));
        assert!(layers.base().serves(&pod));
        let bigger = Recipe {
            memory_mib: 512,
            ..image.base()
        };
        assert!(!bigger.serves(&pod));
        // Terminal size does not matter, having one does.
        let mut tty = pod.clone();
        tty.warm.as_mut().unwrap().process.terminal =
            Some(podvisor_proto::TerminalSize { rows: 5, cols: 9 });
        let mut tty2 = tty.clone();
        tty2.warm.as_mut().unwrap().process.terminal =
            Some(podvisor_proto::TerminalSize { rows: 50, cols: 90 });
        assert!(tty.serves(&tty2));
        assert!(!tty.serves(&pod));
    }
}
