//! A pod's images as layer disks in the global cache: every container's
//! image is pulled through the cache (or imported, for a path), the disks
//! of all of them are attached to the pod VM once each, and each container
//! lists its own disks by serial. The layers are held in the catalog for
//! the pod without a lease (GC leaves them alone whatever happens to the
//! daemon) until the pod is deleted ([`release`]).

use std::path::PathBuf;
use std::sync::Arc;

use podvisor_image::progress::NoProgress;
use podvisor_image::pull::{self, PullOptions};
use podvisor_image::{Catalog, ChainId, ImageRef, LayerCache, RuntimeConfig};
use podvisor_proto::LAYER_SERIAL_PREFIX;
use podvisor_vmm::DiskSpec;
use serde::{Deserialize, Serialize};

use super::plan::PodPlan;
use podvisor_podvm::NodeConfig;

/// One container's image: its layers (disk serials, bottom first) and how
/// to run it.
#[derive(Debug, Clone)]
pub struct ContainerImage {
    pub layers: Vec<String>,
    pub config: RuntimeConfig,
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
    pub disks: Vec<DiskSpec>,
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

/// Resolves every container's image: a reference is taken from the
/// catalog if it is there, else pulled through the global cache; an
/// absolute path names an OCI layout or archive to import.
pub async fn resolve(cfg: &NodeConfig, plan: &PodPlan) -> Result<PodImages, ImageProblem> {
    let problem = |container: &str, image: &str, message: String| ImageProblem {
        container: container.to_string(),
        image: image.to_string(),
        message,
    };
    let first = plan.containers.first();
    let (c0, i0) = first.map_or(("", ""), |c| (c.name.as_str(), c.image.as_str()));
    let cache = LayerCache::open(&cfg.cache_dir).map_err(|e| problem(c0, i0, e.to_string()))?;
    let catalog = Catalog::open(&cfg.catalog_url())
        .await
        .map_err(|e| problem(c0, i0, format!("the image catalog: {e}")))?;
    let result = resolve_with(cfg, plan, &cache, &catalog).await;
    if let Err(e) = &result {
        tracing::debug!(pod = %plan.key(), "{e}");
    }
    catalog.close().await;
    result
}

async fn resolve_with(
    cfg: &NodeConfig,
    plan: &PodPlan,
    cache: &LayerCache,
    catalog: &Catalog,
) -> Result<PodImages, ImageProblem> {
    let options = PullOptions {
        registry: cfg.registry.clone(),
        platform: cfg.platform.clone(),
    };
    let holder = format!("pod {} ({})", plan.key(), plan.uid);
    let mut images = PodImages {
        disks: Vec::new(),
        containers: Vec::new(),
        holds: Vec::new(),
    };
    for c in &plan.containers {
        let problem = |message: String| ImageProblem {
            container: c.name.clone(),
            image: c.image.clone(),
            message,
        };
        let pulled = if c.image.starts_with('/') {
            let path = PathBuf::from(&c.image);
            pull::import_into(cache, catalog, &path, None, Arc::new(NoProgress)).await
        } else {
            let reference = ImageRef::parse(&c.image).map_err(|e| problem(e.to_string()))?;
            match pull::cached(cache, catalog, &reference, &holder).await {
                Ok(Some(p)) => Ok(p),
                Ok(None) => {
                    pull::pull(cache, catalog, &reference, &options, Arc::new(NoProgress)).await
                }
                Err(e) => Err(e),
            }
        }
        .map_err(|e| problem(e.to_string()))?;
        let chains: Vec<ChainId> = pulled
            .image
            .layers
            .iter()
            .map(|l| l.chain_id.clone())
            .collect();
        let hold = catalog
            .hold_layers(&chains, &holder, false)
            .await
            .map_err(|e| problem(e.to_string()))?;
        pulled.hold.release().await;
        let id = hold.keep();
        images.holds.push(HeldLayers {
            id,
            chains: chains.clone(),
        });
        let missing = catalog
            .touch_layers(&chains)
            .await
            .map_err(|e| problem(e.to_string()))?;
        if !missing.is_empty() {
            return Err(problem(
                "a layer was removed from the cache while the pod started; retrying".into(),
            ));
        }
        let mut layers = Vec::new();
        for layer in &pulled.image.layers {
            let serial = match images.disks.iter().find(|d| d.path == layer.path) {
                Some(d) => d.serial.clone(),
                None => {
                    let serial = format!("{LAYER_SERIAL_PREFIX}{}", images.disks.len());
                    images.disks.push(DiskSpec {
                        path: layer.path.clone(),
                        read_only: true,
                        serial: serial.clone(),
                    });
                    serial
                }
            };
            layers.push(serial);
        }
        images.containers.push(ContainerImage {
            layers,
            config: pulled.image.config,
        });
    }
    Ok(images)
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
                    tracing::warn!(hold = %h.id, "releasing a pod's layers: {e}");
                }
            }
            catalog.close().await;
        }
        Err(e) => tracing::warn!("releasing a pod's layers: the image catalog: {e}"),
    }
}
