//! A pod's images as layer disks in the global cache: every container's
//! image is resolved, the disks of all of them are attached to the pod VM
//! once each, and each container lists its own disks by serial.

use std::path::Path;

use podvisor_image::{LayerCache, RuntimeConfig};
use podvisor_proto::LAYER_SERIAL_PREFIX;
use podvisor_vmm::DiskSpec;

use super::plan::PodPlan;

/// One container's image: its layers (disk serials, bottom first) and how
/// to run it.
#[derive(Debug, Clone)]
pub struct ContainerImage {
    pub layers: Vec<String>,
    pub config: RuntimeConfig,
}

/// The disks of a pod VM and what each container uses of them.
#[derive(Debug, Clone)]
pub struct PodImages {
    pub disks: Vec<DiskSpec>,
    /// In the order of the plan's containers.
    pub containers: Vec<ContainerImage>,
}

/// An image that could not be made ready.
#[derive(Debug, Clone, thiserror::Error)]
#[error("image {image:?} of container {container}: {message}")]
pub struct ImageProblem {
    pub container: String,
    pub image: String,
    pub message: String,
}

/// Resolves every container's image in the cache at `cache_dir`: an
/// absolute path names an OCI layout or archive, imported into the cache
/// (layers already there are reused). Runs the imports on the blocking pool.
pub async fn resolve(cache_dir: &Path, plan: &PodPlan) -> Result<PodImages, ImageProblem> {
    let cache_dir = cache_dir.to_path_buf();
    let plan = plan.clone();
    tokio::task::spawn_blocking(move || resolve_blocking(&cache_dir, &plan))
        .await
        .unwrap_or_else(|e| {
            Err(ImageProblem {
                container: String::new(),
                image: String::new(),
                message: format!("image task failed: {e}"),
            })
        })
}

fn resolve_blocking(cache_dir: &Path, plan: &PodPlan) -> Result<PodImages, ImageProblem> {
    let mut disks: Vec<DiskSpec> = Vec::new();
    let mut containers = Vec::new();
    for c in &plan.containers {
        let problem = |message: String| ImageProblem {
            container: c.name.clone(),
            image: c.image.clone(),
            message,
        };
        if !c.image.starts_with('/') {
            return Err(problem(
                "pulling images by reference is not available in this build: \
                 give the absolute path of an OCI image layout or archive"
                    .into(),
            ));
        }
        let cache = LayerCache::open(cache_dir).map_err(|e| problem(e.to_string()))?;
        let image = podvisor_image::import(&cache, Path::new(&c.image), None)
            .map_err(|e| problem(e.to_string()))?;
        let mut layers = Vec::new();
        for layer in &image.layers {
            let serial = match disks.iter().find(|d| d.path == layer.path) {
                Some(d) => d.serial.clone(),
                None => {
                    let serial = format!("{LAYER_SERIAL_PREFIX}{}", disks.len());
                    disks.push(DiskSpec {
                        path: layer.path.clone(),
                        read_only: true,
                        serial: serial.clone(),
                    });
                    serial
                }
            };
            layers.push(serial);
        }
        containers.push(ContainerImage {
            layers,
            config: image.config,
        });
    }
    Ok(PodImages { disks, containers })
}
