//! Where a pod's image comes from, and getting its layer disks: an image
//! reference (from the catalog if it is there, else pulled through the
//! global cache) or a local OCI layout or archive (imported). Either way the
//! layers end up held in the catalog for the pod, under the lease of the
//! process running it, so GC leaves them alone while the pod runs.

use std::path::PathBuf;
use std::sync::Arc;

use podvisor_image::catalog::LayerHold;
use podvisor_image::progress::PullProgress;
use podvisor_image::pull::{self, PullOptions, Pulled};
use podvisor_image::{Catalog, ChainId, Image, ImageError, ImageRef, LayerCache};

use crate::{NodeConfig, PodVmError};

/// A pod's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A registry reference (`busybox`, `registry:5000/app:v1`, `app@sha256:...`).
    Reference(String),
    /// An OCI layout directory or an image archive, and which image of it.
    Path {
        path: PathBuf,
        select: Option<String>,
    },
}

impl std::fmt::Display for ImageSource {
    /// How people name an image source.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::Reference(r) => f.write_str(r),
            ImageSource::Path { path, select: None } => write!(f, "{}", path.display()),
            ImageSource::Path {
                path,
                select: Some(s),
            } => write!(f, "{}:{s}", path.display()),
        }
    }
}

/// A pod's image with its layers held for the pod.
pub struct PodImage {
    pub image: Image,
    pub catalog: Catalog,
    pub hold: LayerHold,
}

/// Gets `source`'s layer disks into the cache (pulling or importing what is
/// missing) and holds them for `holder` (e.g. `pod 1a2b3c`).
pub async fn prepare_image(
    cfg: &NodeConfig,
    source: &ImageSource,
    progress: Arc<dyn PullProgress>,
    holder: &str,
) -> Result<PodImage, PodVmError> {
    let cache = LayerCache::open(&cfg.cache_dir)?;
    let catalog = Catalog::open(&cfg.catalog_url()).await?;
    let options = PullOptions {
        registry: cfg.registry.clone(),
        platform: cfg.platform.clone(),
    };
    let pulled = match source {
        ImageSource::Path { path, select } => {
            pull::import_into(&cache, &catalog, path, select.as_deref(), progress).await?
        }
        ImageSource::Reference(r) => {
            let reference = ImageRef::parse(r)?;
            match pull::cached(&cache, &catalog, &reference, holder).await? {
                Some(p) => p,
                None => pull::pull(&cache, &catalog, &reference, &options, progress).await?,
            }
        }
    };
    let Pulled { image, hold, .. } = pulled;
    // The pull's own hold becomes the pod's.
    let chains: Vec<ChainId> = image.layers.iter().map(|l| l.chain_id.clone()).collect();
    let pod_hold = catalog.hold_layers(&chains, holder, true).await?;
    hold.release().await;
    let missing = catalog.touch_layers(&chains).await?;
    if let Some(chain) = missing.first() {
        return Err(ImageError::DamagedCacheEntry {
            path: cache.layers_dir().join(chain.hex()),
            reason: "the layer was removed from the catalog while the pod started; run again"
                .into(),
        }
        .into());
    }
    Ok(PodImage {
        image,
        catalog,
        hold: pod_hold,
    })
}
