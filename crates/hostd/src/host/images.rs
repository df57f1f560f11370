//! A pod's images as layer disks in the global cache: every container's
//! image is acquired through the cache ([`podvisor_image::acquire()`]: a
//! reference from the catalog or pulled, a path imported), the disks of
//! all of them are attached to the pod VM once each, and each container
//! lists its own disks by serial ([`LayerAttachments`]): on virtio-pmem,
//! mounted with DAX, unless the pod asks for isolation or the host has DAX
//! off ([`NodeConfig::layer_bus`]), then on virtio-blk. The layers are
//! held in the catalog for the pod without a lease (GC leaves them alone
//! whatever happens to the daemon) until the pod is deleted ([`release`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use podvisor_image::progress::NoProgress;
use podvisor_image::{
    Catalog, ChainId, HoldFor, ImageSource, LayerAttachments, LayerCache, RelativePaths,
    RuntimeConfig,
};
use podvisor_proto::Mount;
use podvisor_vmm::{BlockDevice, PmemDevice};
use serde::{Deserialize, Serialize};

use super::jvm_archive;
use super::plan::PodPlan;
use podvisor_podvm::container::process_spec;
use podvisor_podvm::{LayerBus, NodeConfig};

/// One container's image: the mounts of its layers (bottom first) and of
/// its root over them, and how to run it.
#[derive(Debug, Clone)]
pub struct ContainerImage {
    pub mounts: Vec<Mount>,
    pub config: RuntimeConfig,
    /// The image's layers, bottom first.
    pub chains: Vec<ChainId>,
    /// The JVM archive key of the container (see [`jvm_archive`]), when
    /// archives are wanted and it runs a JVM.
    pub archive_key: Option<String>,
    /// Its archive layer, when the catalog has one (on top of the image's
    /// layers in `mounts`): its disk's serial and what the training run
    /// measured.
    pub archive: Option<(String, BTreeMap<String, String>)>,
}

/// Layers held in the catalog for a pod, to release when it is deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLayers {
    pub id: String,
    pub chains: Vec<ChainId>,
}

/// The disks of a pod VM and what each container uses of them.
#[derive(Debug, Clone)]
pub struct PodImages {
    /// The layers on virtio-blk (empty when they are on `pmem`).
    pub disks: Vec<BlockDevice>,
    /// The layers on virtio-pmem (empty when they are on `disks`).
    pub pmem: Vec<PmemDevice>,
    /// In the order of the plan's containers.
    pub containers: Vec<ContainerImage>,
    /// One per container.
    pub holds: Vec<HeldLayers>,
}

/// An image that could not be made ready.
#[derive(Debug, Clone, thiserror::Error)]
#[error("image {image:?} of container {container}: {message}")]
pub struct ImageProblem {
    pub container: String,
    pub image: String,
    pub message: String,
}

/// Resolves every container's image (see [`ImageSource::parse_with`]: an
/// existing absolute path names an OCI layout or archive to import, with
/// an optional `:REF`; anything else is a registry reference, whatever the
/// daemon's working directory holds).
///
/// With `archives`, a container that runs a JVM gets its archive key, and
/// the archive layer the catalog has for it is held and attached too.
pub async fn resolve(
    cfg: &NodeConfig,
    plan: &PodPlan,
    archives: bool,
) -> Result<PodImages, ImageProblem> {
    let problem = |container: &str, image: &str, message: String| ImageProblem {
        container: container.to_string(),
        image: image.to_string(),
        message,
    };
    let first = plan.containers.first();
    let (c0, i0) = first.map_or(("", ""), |c| (c.name.as_str(), c.image.as_str()));
    let cache = LayerCache::open(&cfg.cache_dir)
        .map_err(|e| problem(c0, i0, podvisor_errors::chain(&e)))?;
    let catalog = Catalog::open(&cfg.catalog_url()).await.map_err(|e| {
        problem(
            c0,
            i0,
            format!(
                "the image catalog: {e}",
                e = podvisor_errors::ErrorChain(&e)
            ),
        )
    })?;
    let result = resolve_with(cfg, plan, &cache, &catalog, archives).await;
    if let Err(e) = &result {
        tracing::debug!(pod = %plan.key(), "{e}", e = podvisor_errors::ErrorChain(&e));
    }
    catalog.close().await;
    result
}

async fn resolve_with(
    cfg: &NodeConfig,
    plan: &PodPlan,
    cache: &LayerCache,
    catalog: &Catalog,
    archives: bool,
) -> Result<PodImages, ImageProblem> {
    let options = cfg.pull_options();
    let hold_for = HoldFor::durable(format!("pod {} ({})", plan.key(), plan.uid));
    let bus = cfg.layer_bus(plan.isolated);
    let mut layers = LayerAttachments::default();
    let mut containers = Vec::new();
    let mut holds = Vec::new();
    for c in &plan.containers {
        let problem = |e: podvisor_image::ImageError| ImageProblem {
            container: c.name.clone(),
            image: c.image.clone(),
            message: with_causes(&e),
        };
        let source = ImageSource::parse_with(&c.image, RelativePaths::Refused).map_err(problem)?;
        let held = podvisor_image::acquire(
            cache,
            catalog,
            &source,
            &options,
            &hold_for,
            Arc::new(NoProgress),
        )
        .await
        .map_err(problem)?;
        let chains = held.chains();
        let serials = layers.add_image(&held.image);
        holds.push(HeldLayers {
            id: held.hold.keep(),
            chains: chains.clone(),
        });
        let archive_key = match (archives, chains.last()) {
            (true, Some(top)) => process_spec(&held.image.config, &c.overrides())
                .ok()
                .and_then(|p| jvm_archive::archive_key(top, &p)),
            _ => None,
        };
        let archive = match &archive_key {
            Some(key) => {
                archive_layer(cache, catalog, key, &hold_for, &mut layers, &mut holds).await
            }
            None => None,
        };
        // The archive layer goes on top of the image's.
        let mut serials = serials;
        serials.extend(archive.as_ref().map(|(serial, _)| serial.clone()));
        containers.push(ContainerImage {
            mounts: podvisor_podvm::layer_mounts(&layers, &serials, bus),
            config: held.image.config,
            chains,
            archive_key,
            archive,
        });
    }
    let (disks, pmem) = match bus {
        LayerBus::Block => (podvisor_podvm::layer_disks(&layers), vec![]),
        LayerBus::Pmem => (vec![], podvisor_podvm::layer_pmems(&layers)),
    };
    Ok(PodImages {
        disks,
        pmem,
        containers,
        holds,
    })
}

/// The archive layer of `key`, if the catalog has one whose disk is here:
/// held for the pod and attached. A catalog error only costs the archive.
async fn archive_layer(
    cache: &LayerCache,
    catalog: &Catalog,
    key: &str,
    hold_for: &HoldFor,
    layers: &mut LayerAttachments,
    holds: &mut Vec<HeldLayers>,
) -> Option<(String, BTreeMap<String, String>)> {
    let entry = match catalog.derived(key).await {
        Ok(e) => e?,
        Err(e) => {
            tracing::warn!(archive = %key, "looking up a JVM archive: {}", podvisor_errors::ErrorChain(&e));
            return None;
        }
    };
    let disk = cache.get(&entry.chain_id)?;
    let chains = vec![entry.chain_id.clone()];
    let hold = catalog
        .hold_layers(&chains, &hold_for.what, hold_for.leased)
        .await
        .ok()?;
    holds.push(HeldLayers {
        id: hold.keep(),
        chains,
    });
    let serial = layers.add([&disk]).pop()?;
    Some((serial, entry.facts))
}

/// `e` and its causes, as the CLI prints an error (a cause the message
/// already ends with is not repeated).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.ends_with(&text) {
            message = format!("{message}: {text}");
        }
        cause = c.source();
    }
    message
}

/// Releases layers held for a pod (it is deleted, or holds newer ones).
pub async fn release(cfg: &NodeConfig, holds: &[HeldLayers]) {
    if holds.is_empty() {
        return;
    }
    match Catalog::open(&cfg.catalog_url()).await {
        Ok(catalog) => {
            for h in holds {
                if let Err(e) = catalog.release_hold(&h.chains, &h.id).await {
                    tracing::warn!(hold = %h.id, "releasing a pod's layers: {e}", e = podvisor_errors::ErrorChain(&e));
                }
            }
            catalog.close().await;
        }
        Err(e) => tracing::warn!(
            "releasing a pod's layers: the image catalog: {e}",
            e = podvisor_errors::ErrorChain(&e)
        ),
    }
}
