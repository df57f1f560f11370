//! Which template a pod forks from, making missing or stale levels on
//! demand, and the fork itself.

use std::future::Future;
use std::io::Cursor;
use std::pin::Pin;
use std::time::{Duration, Instant};

use podvisor_guest::GuestArtifacts;
use podvisor_vmm::{Device, MemoryBacking};

use super::build::{self, Build};
use super::files::{self, TemplateDirs, TemplateLock};
use super::meta::{Recipe, TemplateKind, TemplateMeta};
use super::{TemplateError, inputs};
use podvisor_podvm::NodeConfig;
use podvisor_podvm::{LoadSpec, PodVm, PodVmSpec};

/// How a pod uses templates (`podvisor run --template`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TemplateChoice {
    /// Fork from the deepest template that serves the pod, making missing
    /// base and image templates on demand.
    #[default]
    Auto,
    /// Boot cold; share no memory with other pods.
    None,
    /// Fork from this template (rebuilt first if stale).
    Named(String),
}

impl std::str::FromStr for TemplateChoice {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TemplateChoice::Auto),
            "none" => Ok(TemplateChoice::None),
            name => {
                files::check_name(name)?;
                Ok(TemplateChoice::Named(name.to_string()))
            }
        }
    }
}

/// A template chosen for a pod. It stays locked (shared: it cannot be
/// rebuilt or removed) until this is dropped, which the caller does once
/// the clone runs.
pub struct Chosen {
    pub meta: TemplateMeta,
    /// Time spent making templates on demand for this pod.
    pub built: Duration,
    _lock: TemplateLock,
}

/// Finds the template for a pod whose full recipe is `pod` (with its
/// process as a warm recipe). `Auto`: a valid warm template for exactly
/// this process if one exists, else the image template, made (with its
/// base) if missing or stale. `Named`: that template, if it serves the pod.
pub async fn choose(
    cfg: &NodeConfig,
    pod: &Recipe,
    guest: &GuestArtifacts,
    image: Option<&str>,
    choice: &TemplateChoice,
) -> Result<Chosen, TemplateError> {
    let dirs = super::dirs(cfg);
    dirs.create()?;
    match choice {
        TemplateChoice::None => Err(TemplateError::NotFound("none".into())),
        TemplateChoice::Named(name) => {
            let meta = TemplateMeta::read(&dirs.meta_file(name)).map_err(|e| match e {
                TemplateError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    TemplateError::NotFound(name.clone())
                }
                other => other,
            })?;
            if !meta.recipe.serves(pod) {
                return Err(TemplateError::Mismatch {
                    name: name.clone(),
                    reason: mismatch(&meta.recipe, pod),
                });
            }
            ensure(cfg, &dirs, name, &meta.recipe, guest, meta.image.clone()).await
        }
        TemplateChoice::Auto => {
            let stored: Vec<TemplateMeta> = dirs
                .list()
                .into_iter()
                .filter_map(|(_, m)| m.ok())
                .collect();
            let warm = stored
                .iter()
                .find(|m| m.kind == TemplateKind::Warm && m.recipe.serves(pod));
            if let Some(m) = warm {
                return ensure(cfg, &dirs, &m.name, &m.recipe, guest, m.image.clone()).await;
            }
            let recipe = pod.image();
            let name = named_for(&stored, &recipe);
            ensure(cfg, &dirs, &name, &recipe, guest, image.map(str::to_string)).await
        }
    }
}

/// The name of a stored template made from exactly `recipe`, preferring
/// the one `auto` would give it; that name if there is none.
fn named_for(stored: &[TemplateMeta], recipe: &Recipe) -> String {
    let auto = recipe.auto_name();
    stored
        .iter()
        .filter(|m| m.recipe == *recipe)
        .map(|m| m.name.clone())
        .min_by_key(|n| *n != auto)
        .unwrap_or(auto)
}

/// Why a template's recipe does not serve a pod, for people.
fn mismatch(t: &Recipe, pod: &Recipe) -> String {
    if (t.cpus, t.memory_mib) != (pod.cpus, pod.memory_mib) {
        return format!(
            "it has {} vCPUs and {} MiB, the pod asks for {} and {}",
            t.cpus, t.memory_mib, pod.cpus, pod.memory_mib
        );
    }
    if (&t.kernel, &t.agent, &t.kernel_args, &t.accel, &t.backend)
        != (
            &pod.kernel,
            &pod.agent,
            &pod.kernel_args,
            &pod.accel,
            &pod.backend,
        )
    {
        return "it was made with another kernel, agent, kernel arguments or accelerator".into();
    }
    if !t.layers.is_empty() && t.layers != pod.layers {
        return "it was made for another image (other layers)".into();
    }
    "its warm process runs another command, environment, user or directory".into()
}

/// The valid template `name` made from `recipe`, built (or rebuilt) first
/// if it is missing or stale; locked until the result is dropped.
pub async fn ensure_named(
    cfg: &NodeConfig,
    name: &str,
    recipe: &Recipe,
    guest: &GuestArtifacts,
    image: Option<String>,
) -> Result<Chosen, TemplateError> {
    let dirs = super::dirs(cfg);
    dirs.create()?;
    ensure(cfg, &dirs, name, recipe, guest, image).await
}

type EnsureFuture<'a> = Pin<Box<dyn Future<Output = Result<Chosen, TemplateError>> + Send + 'a>>;

/// The valid template `name` made from `recipe`, locked shared; built (or
/// rebuilt) first if it is missing or stale. An image template's base is
/// ensured the same way.
fn ensure<'a>(
    cfg: &'a NodeConfig,
    dirs: &'a TemplateDirs,
    name: &'a str,
    recipe: &'a Recipe,
    guest: &'a GuestArtifacts,
    image: Option<String>,
) -> EnsureFuture<'a> {
    Box::pin(async move {
        let mut built = Duration::ZERO;
        loop {
            let lock = TemplateLock::acquire(dirs, name, false).await?;
            let now = inputs::current(cfg, &dirs.meta, recipe, guest)?;
            let old = match usable(dirs, name, recipe, &now) {
                Ok(meta) => {
                    return Ok(Chosen {
                        meta,
                        built,
                        _lock: lock,
                    });
                }
                Err(old) => old,
            };
            drop(lock);
            let lock = TemplateLock::acquire(dirs, name, true).await?;
            if usable(dirs, name, recipe, &now).is_ok() {
                continue; // made by someone else meanwhile
            }
            if let Some((_, reasons)) = &old {
                tracing::warn!(
                    "template {name} is stale ({}); rebuilding it",
                    reasons.join("; ")
                );
            }
            let started = Instant::now();
            let b = Build {
                name,
                recipe,
                guest,
                inputs: now,
                image: image.clone(),
            };
            let meta = if recipe.kind() == TemplateKind::Base {
                build::base(cfg, dirs, b).await?
            } else {
                let base_recipe = recipe.base();
                let stored: Vec<TemplateMeta> = dirs
                    .list()
                    .into_iter()
                    .filter_map(|(_, m)| m.ok())
                    .collect();
                let base_name = named_for(&stored, &base_recipe);
                let base = ensure(cfg, dirs, &base_name, &base_recipe, guest, None).await?;
                build::child(cfg, dirs, b, &base.meta).await?
            };
            build::commit(dirs, meta, old.map(|(m, _)| m))?;
            built += started.elapsed();
            drop(lock);
        }
    })
}

/// The stored template `name` if it may be used for `recipe` with inputs
/// `now`; else the old metadata (if readable) and why it may not.
#[allow(clippy::result_large_err)]
fn usable(
    dirs: &TemplateDirs,
    name: &str,
    recipe: &Recipe,
    now: &super::meta::Inputs,
) -> Result<TemplateMeta, Option<(TemplateMeta, Vec<String>)>> {
    let meta = TemplateMeta::read(&dirs.meta_file(name)).map_err(|_| None)?;
    let mut reasons = inputs::stale_reasons(&meta.inputs, now);
    if meta.recipe != *recipe {
        reasons.push("it was made from another recipe".into());
    }
    if let Err(e) = files::check_ram_file(&meta) {
        reasons.push(podvisor_errors::chain(&e));
    }
    if reasons.is_empty() {
        Ok(meta)
    } else {
        Err(Some((meta, reasons)))
    }
}

/// Forks a pod from a chosen template: checks the saved state (a corrupt
/// or truncated one is never used), loads a clone mapping the template's
/// RAM copy-on-write with the template's disks at the template's PCI
/// addresses, gives it its own identity, and hot-plugs the image's layer
/// disks the template lacks.
pub async fn fork(
    cfg: &NodeConfig,
    chosen: &Chosen,
    pod_id: &str,
    hostname: &str,
    guest: &GuestArtifacts,
    layers: &[Device],
) -> Result<PodVm, TemplateError> {
    let meta = &chosen.meta;
    let state = files::read_checked_state(meta)?;
    files::check_ram_file(meta)?;
    let spec = PodVmSpec {
        id: pod_id.to_string(),
        cpus: meta.recipe.cpus,
        memory_mib: meta.recipe.memory_mib,
        guest: guest.clone(),
        devices: meta.devices(),
        pci: meta.pci.clone(),
        memory: MemoryBacking::File {
            path: meta.ram_file.clone(),
            shared: false,
        },
        memory_merge: false,
        die_with_parent: true,
        netns: None,
    };
    let load = LoadSpec {
        state: Box::new(Cursor::new(state)),
        agent: meta.agent.clone(),
    };
    let mut pod = PodVm::load(cfg, spec, load)
        .await
        .map_err(TemplateError::Vm)?;
    pod.set_identity(hostname, cfg.boot_timeout)
        .await
        .map_err(TemplateError::Vm)?;
    for disk in layers.iter().skip(meta.disks.len()) {
        pod.add_device(disk.clone())
            .await
            .map_err(TemplateError::Vm)?;
    }
    Ok(pod)
}
