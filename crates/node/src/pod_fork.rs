//! How `podvisor run` starts its pod VM from a template: which one
//! (`--template`, `--isolated`), the fork, and the fallback to a cold boot
//! when a template cannot be used. A pod never fails because of a template
//! unless the user named one that does not fit, or the guest itself does
//! not boot (a cold boot would fail alike).

use std::time::Instant;

use podvisor_image::Image;
use podvisor_proto::ContainerSpec;

use crate::pod::PodRequest;
use crate::pod_vm::{PodVm, PodVmSpec};
use crate::templates::meta::{Recipe, WarmRecipe};
use crate::templates::{TemplateChoice, TemplateError, TemplateKind, build, manage, select};
use crate::{ImageSource, NodeConfig, NodeError, Timings};

/// The full recipe of a pod: what a template serving it must have been
/// made from, up to its level.
pub fn pod_recipe(
    cfg: &NodeConfig,
    req: &PodRequest,
    image: &Image,
    container: &ContainerSpec,
) -> Recipe {
    Recipe {
        backend: cfg.hypervisor.clone(),
        accel: cfg.accel.as_str().to_string(),
        kernel: cfg.kernel.clone(),
        agent: cfg.agent.clone(),
        kernel_args: cfg.extra_kernel_args.clone(),
        cpus: req.cpus,
        memory_mib: req.memory_mib,
        layers: image
            .layers
            .iter()
            .map(|l| l.chain_id.to_string())
            .collect(),
        warm: Some(WarmRecipe {
            process: container.process.clone(),
            until: None,
            settle_ms: 0,
        }),
    }
}

/// Forks the pod from a template if its choice allows; `None`: boot cold.
/// Returns the VM and whether its container already runs (a warm
/// template's).
pub async fn from_template(
    cfg: &NodeConfig,
    req: &PodRequest,
    image: &Image,
    container: &ContainerSpec,
    cold: &PodVmSpec,
    timings: &mut Timings,
) -> Result<Option<(PodVm, bool)>, NodeError> {
    let choice = match (&req.template, req.isolated) {
        (TemplateChoice::Named(name), true) => {
            return Err(template_error(TemplateError::Mismatch {
                name: name.clone(),
                reason: "the pod asks for isolation, which shares no memory with a template".into(),
            }));
        }
        (_, true) | (TemplateChoice::None, _) => return Ok(None),
        (choice, false) => choice,
    };
    let recipe = pod_recipe(cfg, req, image, container);
    let image_name = image.name.clone().or_else(|| Some(source_name(&req.image)));
    let chosen =
        match select::choose(cfg, &recipe, &cold.guest, image_name.as_deref(), choice).await {
            Ok(chosen) => chosen,
            Err(e) if build::is_boot_failure(&e) => {
                let TemplateError::Boot(e) = e else {
                    unreachable!()
                };
                return Err(e);
            }
            Err(
                e @ (TemplateError::NotFound(_)
                | TemplateError::Mismatch { .. }
                | TemplateError::BadName(_)),
            ) => return Err(template_error(e)),
            Err(e) => {
                tracing::warn!("no VM template for this pod ({e}); booting it cold");
                return Ok(None);
            }
        };
    timings.template_build = chosen.built;
    let name = chosen.meta.name.clone();
    let warm = chosen.meta.kind == TemplateKind::Warm;
    let started = Instant::now();
    let hostname = &container.hostname;
    match select::fork(cfg, &chosen, &cold.id, hostname, &cold.guest, &cold.disks).await {
        Ok(pod) => {
            timings.fork = started.elapsed();
            timings.forked_from = Some(name);
            Ok(Some((pod, warm)))
        }
        Err(e) => {
            tracing::warn!("cannot fork from template {name}: {e}; booting the pod cold instead");
            drop(chosen);
            if matches!(e, TemplateError::Corrupt { .. }) && *choice == TemplateChoice::Auto {
                // Made afresh by the next pod that needs it.
                if manage::remove(cfg, &name).await.is_ok() {
                    tracing::warn!("removed the corrupt template {name}");
                }
            }
            Ok(None)
        }
    }
}

/// How people name an image source.
pub fn source_name(source: &ImageSource) -> String {
    match source {
        ImageSource::Reference(r) => r.clone(),
        ImageSource::Path { path, select: None } => path.display().to_string(),
        ImageSource::Path {
            path,
            select: Some(s),
        } => format!("{}:{s}", path.display()),
    }
}

fn template_error(e: TemplateError) -> NodeError {
    NodeError::Template(Box::new(e))
}
