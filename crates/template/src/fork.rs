//! How `podvisor run` starts its pod VM from a template: which one
//! (`--template`, `--isolated`), the fork, and the fallback to a cold boot
//! when a template cannot be used. A pod never fails because of a template
//! unless the user named one that does not fit, or the guest itself does
//! not boot (a cold boot would fail alike).

use std::time::Instant;

use podvisor_image::{Image, ImageSource};
use podvisor_podvm::{NodeConfig, PodVm, PodVmSpec, Timings};
use podvisor_proto::ContainerSpec;

use crate::meta::{Recipe, WarmRecipe};
use crate::{TemplateChoice, TemplateError, TemplateKind, build, manage, select};

/// The full recipe of a pod booted cold from `cold`: what a template
/// serving it must have been made from, up to its level.
pub fn pod_recipe(
    cfg: &NodeConfig,
    cold: &PodVmSpec,
    image: &Image,
    container: &ContainerSpec,
) -> Recipe {
    Recipe {
        backend: cfg.hypervisor.name().to_string(),
        accel: cfg.accel.as_str().to_string(),
        kernel: cfg.kernel.clone(),
        agent: cfg.agent.clone(),
        kernel_args: cfg.extra_kernel_args.clone(),
        cpus: cold.cpus,
        memory_mib: cold.memory_mib,
        layers: image
            .layers
            .iter()
            .map(|l| l.chain_id.to_string())
            .collect(),
        // A warm template's container runs with its image's mounts only: a
        // pod that mounts volumes too cannot take it over.
        warm: only_image_mounts(container).then(|| WarmRecipe {
            process: container.process.clone(),
            until: None,
            settle_ms: 0,
        }),
    }
}

/// Whether the container mounts nothing but its image (layers and root).
fn only_image_mounts(container: &ContainerSpec) -> bool {
    container.mounts.iter().all(|m| {
        matches!(m.target, podvisor_proto::MountTarget::Root)
            || (m.fstype == "erofs" && matches!(m.source, podvisor_proto::MountSource::Disk { .. }))
    })
}

/// A pod that may fork from a template.
pub struct ForkRequest<'a> {
    /// Which template (`Auto`: the deepest that serves it).
    pub choice: &'a TemplateChoice,
    /// The pod shares no memory with other pods: never fork.
    pub isolated: bool,
    /// Where its image came from.
    pub source: &'a ImageSource,
    pub image: &'a Image,
    pub container: &'a ContainerSpec,
    /// The pod VM booted cold.
    pub cold: &'a PodVmSpec,
}

/// Forks the pod from a template if its choice allows; `None`: boot cold.
/// Returns the VM and whether its container already runs (a warm
/// template's). A [`TemplateError::Boot`] says the guest itself does not
/// boot, so a cold boot would fail alike.
pub async fn from_template(
    cfg: &NodeConfig,
    req: &ForkRequest<'_>,
    timings: &mut Timings,
) -> Result<Option<(PodVm, bool)>, TemplateError> {
    let ForkRequest {
        choice,
        isolated,
        source,
        image,
        container,
        cold,
    } = *req;
    let choice = match (choice, isolated) {
        (TemplateChoice::Named(name), true) => {
            return Err(TemplateError::Mismatch {
                name: name.clone(),
                reason: "the pod asks for isolation, which shares no memory with a template".into(),
            });
        }
        (_, true) | (TemplateChoice::None, _) => return Ok(None),
        (choice, false) => choice,
    };
    let recipe = pod_recipe(cfg, cold, image, container);
    let image_name = image.name.clone().or_else(|| Some(source.to_string()));
    let chosen =
        match select::choose(cfg, &recipe, &cold.guest, image_name.as_deref(), choice).await {
            Ok(chosen) => chosen,
            Err(e) if build::is_boot_failure(&e) => return Err(e),
            Err(
                e @ (TemplateError::NotFound(_)
                | TemplateError::Mismatch { .. }
                | TemplateError::BadName(_)),
            ) => return Err(e),
            Err(e) => {
                tracing::warn!(
                    "no VM template for this pod ({e}); booting it cold",
                    e = podvisor_errors::ErrorChain(&e)
                );
                return Ok(None);
            }
        };
    timings.template_build = chosen.built;
    let name = chosen.meta.name.clone();
    let warm = chosen.meta.kind == TemplateKind::Warm;
    let started = Instant::now();
    let hostname = &container.hostname;
    match select::fork(cfg, &chosen, &cold.id, hostname, &cold.guest, &cold.devices).await {
        Ok(pod) => {
            timings.fork = started.elapsed();
            timings.forked_from = Some(name);
            Ok(Some((pod, warm)))
        }
        Err(e) => {
            tracing::warn!(
                "cannot fork from template {name}: {e}; booting the pod cold instead",
                e = podvisor_errors::ErrorChain(&e)
            );
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
