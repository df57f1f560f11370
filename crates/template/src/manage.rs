//! `podvisor template create|ls|rm|prune`: making templates on request,
//! reporting their state, and removing them, never under running clones.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use podvisor_image::progress::NoProgress;
use podvisor_image::{HoldFor, ImageSource};

use super::files::{self, TemplateLock};
use super::meta::{Recipe, TemplateMeta, WarmRecipe};
use super::select;
use super::{TemplateError, inputs};
use podvisor_podvm::NodeConfig;
use podvisor_podvm::container::{ContainerOverrides, process_spec};

/// A template to make.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// Its name; `None`: the name `run --template auto` looks for.
    pub name: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The image of an image or warm template (pulled or imported if it
    /// is not cached); `None` for a base template.
    pub image: Option<ImageSource>,
    /// Start and warm the container's process in the template.
    pub warm: Option<WarmRequest>,
}

/// How a warm template's process is started and warmed.
#[derive(Debug, Clone, Default)]
pub struct WarmRequest {
    /// The process, as `podvisor run` flags would give it.
    pub overrides: ContainerOverrides,
    /// Wait until this text appears in its output...
    pub until: Option<String>,
    /// ...then let it run this long before saving.
    pub settle: Duration,
}

/// Makes (or rebuilds, if stale) the template a request describes; a
/// valid one is left as it is. Returns it and the time spent building.
pub async fn create(
    cfg: &NodeConfig,
    req: CreateRequest,
) -> Result<(TemplateMeta, Duration), TemplateError> {
    if let Some(name) = &req.name {
        files::check_name(name)?;
    }
    let mut recipe = Recipe {
        backend: cfg.hypervisor.name().to_string(),
        accel: cfg.accel.as_str().to_string(),
        kernel: cfg.kernel.clone(),
        agent: cfg.agent.clone(),
        kernel_args: cfg.extra_kernel_args.clone(),
        cpus: req.cpus,
        memory_mib: req.memory_mib,
        layers: vec![],
        warm: None,
    };
    let mut image_name = None;
    let mut held = None;
    match (&req.image, &req.warm) {
        (None, Some(_)) => {
            return Err(TemplateError::Mismatch {
                name: req.name.clone().unwrap_or_default(),
                reason: "a warm template needs an image".into(),
            });
        }
        (None, None) => {}
        (Some(source), warm) => {
            // The layers are held while the template is made.
            let (cache, catalog) = cfg.open_images().await.map_err(TemplateError::Image)?;
            let pod_image = podvisor_image::acquire(
                &cache,
                &catalog,
                source,
                &cfg.pull_options(),
                &HoldFor::process("template create"),
                Arc::new(NoProgress),
            )
            .await
            .map_err(TemplateError::Image)?;
            let image = &pod_image.image;
            recipe.layers = image
                .layers
                .iter()
                .map(|l| l.chain_id.to_string())
                .collect();
            image_name = Some(image.name.clone().unwrap_or_else(|| source.to_string()));
            if let Some(w) = warm {
                recipe.warm = Some(WarmRecipe {
                    process: process_spec(&image.config, &w.overrides)?,
                    until: w.until.clone(),
                    settle_ms: w.settle.as_millis() as u64,
                });
            }
            held = Some((pod_image, catalog));
        }
    }
    let name = req.name.clone().unwrap_or_else(|| recipe.auto_name());
    let dirs = super::dirs(cfg);
    dirs.create()?;
    if let Ok(existing) = TemplateMeta::read(&dirs.meta_file(&name))
        && existing.recipe != recipe
    {
        return Err(TemplateError::Exists { name });
    }
    // Whatever its name, `run --template auto` finds a warm template by
    // its recipe.
    let guest = inputs::guest_for(cfg, &recipe)?;
    let chosen = select::ensure_named(cfg, &name, &recipe, &guest, image_name).await;
    if let Some((image, catalog)) = held {
        image.hold.release().await;
        catalog.close().await;
    }
    let chosen = chosen?;
    Ok((chosen.meta.clone(), chosen.built))
}

/// A stored template and how it stands now.
#[derive(Debug, Clone)]
pub struct TemplateStatus {
    pub meta: TemplateMeta,
    /// Why it would be rebuilt before use; empty when valid.
    pub stale: Vec<String>,
    /// QEMU processes (clones) mapping its RAM file, retired ones included.
    pub users: Vec<u32>,
    /// Memory its RAM file takes on tmpfs (pages the guest touched).
    pub ram_bytes: u64,
}

/// Every template of this host with its state; unreadable metadata is
/// listed as an error under its name.
pub fn list(cfg: &NodeConfig) -> Vec<(String, Result<TemplateStatus, TemplateError>)> {
    let dirs = super::dirs(cfg);
    dirs.list()
        .into_iter()
        .map(|(name, meta)| {
            let status = meta.map(|meta| status(cfg, &dirs.meta, meta));
            (name, status)
        })
        .collect()
}

fn status(cfg: &NodeConfig, dir: &std::path::Path, meta: TemplateMeta) -> TemplateStatus {
    use std::os::unix::fs::MetadataExt;
    let mut stale = match inputs::guest_for(cfg, &meta.recipe)
        .and_then(|guest| inputs::current(cfg, dir, &meta.recipe, &guest))
    {
        Ok(now) => inputs::stale_reasons(&meta.inputs, &now),
        Err(e) => vec![podvisor_errors::chain(&e)],
    };
    if let Err(e) = files::check_ram_file(&meta) {
        stale.push(podvisor_errors::chain(&e));
    }
    if !meta.state_file.is_file() {
        stale.push(format!(
            "state file {} is missing",
            meta.state_file.display()
        ));
    }
    let users = users(&meta);
    let ram_bytes = std::fs::metadata(&meta.ram_file)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    TemplateStatus {
        meta,
        stale,
        users,
        ram_bytes,
    }
}

/// Processes mapping any RAM file of a template.
fn users(meta: &TemplateMeta) -> Vec<u32> {
    let mut pids: Vec<u32> = std::iter::once(&meta.ram_file)
        .chain(&meta.retired)
        .flat_map(|f| files::mapped_by(f))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes template `name` and its files, unless running clones still map
/// its RAM: then nothing is removed and the error names their processes.
pub async fn remove(cfg: &NodeConfig, name: &str) -> Result<(), TemplateError> {
    files::check_name(name)?;
    let dirs = super::dirs(cfg);
    let path = dirs.meta_file(name);
    if !path.exists() {
        return Err(TemplateError::NotFound(name.to_string()));
    }
    let _lock = TemplateLock::acquire(&dirs, name, true).await?;
    let meta = TemplateMeta::read(&path);
    if let Ok(meta) = &meta {
        let pids = users(meta);
        if !pids.is_empty() {
            return Err(TemplateError::InUse {
                name: name.to_string(),
                pids,
            });
        }
        for f in std::iter::once(&meta.ram_file)
            .chain(&meta.retired)
            .chain(std::iter::once(&meta.state_file))
        {
            files::remove_file(f)?;
        }
    }
    files::remove_file(&path)
}

/// What `prune` did.
#[derive(Debug, Default)]
pub struct PruneReport {
    pub removed: Vec<String>,
    /// RAM files that belonged to no template.
    pub orphan_files: Vec<PathBuf>,
    /// Templates that would have gone but are in use, with their users.
    pub in_use: Vec<(String, Vec<u32>)>,
}

/// Removes stale, corrupt and unreadable templates (every unused one with
/// `all`), retired RAM files no clone maps any more, RAM files no template
/// refers to (left by a build that was killed) and those of run
/// directories that are gone. Templates in use are kept.
pub async fn prune(cfg: &NodeConfig, all: bool) -> Result<PruneReport, TemplateError> {
    let mut report = PruneReport::default();
    let dirs = super::dirs(cfg);
    report.orphan_files = dirs.collect_orphans();
    report.orphan_files.extend(unreferenced_ram(&dirs));
    for (name, status) in list(cfg) {
        match status {
            Ok(s) if s.stale.is_empty() && !all => {
                if s.meta
                    .retired
                    .iter()
                    .any(|f| files::mapped_by(f).is_empty())
                {
                    drop_unused_retired(cfg, &name).await?;
                }
            }
            Ok(s) if !s.users.is_empty() => report.in_use.push((name, s.users)),
            _ => match remove(cfg, &name).await {
                Ok(()) => report.removed.push(name),
                Err(TemplateError::InUse { pids, .. }) => report.in_use.push((name, pids)),
                Err(e) => return Err(e),
            },
        }
    }
    Ok(report)
}

/// Removes this run directory's RAM files that no template's metadata
/// names, unless mapped or being built (their template's lock is held).
fn unreferenced_ram(dirs: &super::TemplateDirs) -> Vec<PathBuf> {
    let referenced: Vec<PathBuf> = dirs
        .list()
        .into_iter()
        .filter_map(|(_, m)| m.ok())
        .flat_map(|m| std::iter::once(m.ram_file).chain(m.retired))
        .collect();
    let files: Vec<PathBuf> = std::fs::read_dir(&dirs.ram)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    let mut removed = Vec::new();
    for file in files {
        let Some(name) = file
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ram"))
            .and_then(|n| n.rsplit_once('.'))
            .map(|(name, _build)| name.to_string())
        else {
            continue;
        };
        if referenced.contains(&file) {
            continue;
        }
        let Some(_lock) = TemplateLock::try_exclusive(dirs, &name) else {
            continue; // being built
        };
        if files::mapped_by(&file).is_empty() && files::remove_file(&file).is_ok() {
            removed.push(file);
        }
    }
    removed
}

async fn drop_unused_retired(cfg: &NodeConfig, name: &str) -> Result<(), TemplateError> {
    let dirs = super::dirs(cfg);
    let _lock = TemplateLock::acquire(&dirs, name, true).await?;
    let mut meta = TemplateMeta::read(&dirs.meta_file(name))?;
    let mut kept = Vec::new();
    for f in std::mem::take(&mut meta.retired) {
        if files::mapped_by(&f).is_empty() {
            files::remove_file(&f)?;
        } else {
            kept.push(f);
        }
    }
    meta.retired = kept;
    meta.write(&dirs.meta_file(name))
}
