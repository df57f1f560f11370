//! Pulling images from registries and importing local ones through the
//! catalog: resolve, materialize every layer once, then record the image.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::blob_source::{LocalBlobs, RegistryBlobs};
use crate::cache::{LayerCache, LayerDisk};
use crate::catalog::{Catalog, LayerHold, ManifestEntry, RefEntry, now};
use crate::layout::resolve;
use crate::materialize::{LayerPlan, materialize, plan_layers};
use crate::platform::Platform;
use crate::progress::PullProgress;
use crate::reference::ImageRef;
use crate::registry::{Registry, RegistryOptions};
use crate::source::Source;
use crate::{ChainId, Digest, Image, ImageError, RuntimeConfig, cleanup};

/// How many times a pull starts over when GC removed one of its layers
/// between their fetch and the image's record.
const ATTEMPTS: usize = 3;

/// How to pull.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    pub registry: RegistryOptions,
    /// The platform to choose from an image index (default linux/amd64).
    pub platform: Platform,
}

/// An image whose layer disks are in the cache, held from GC until
/// [`Pulled::hold`] is released or dropped.
#[derive(Debug)]
pub struct Pulled {
    pub image: Image,
    /// The image index the reference named, if any.
    pub index_digest: Option<Digest>,
    pub hold: LayerHold,
}

/// Pulls `reference` from its registry into the cache and catalog. Layers
/// already cached are not fetched; layers other processes are fetching are
/// waited for. `what` says who holds the layers (e.g. `pull REF`).
pub async fn pull(
    cache: &LayerCache,
    catalog: &Catalog,
    reference: &ImageRef,
    options: &PullOptions,
    progress: Arc<dyn PullProgress>,
) -> Result<Pulled, ImageError> {
    let cache = cache.clone().with_owner(catalog.token());
    cleanup_quietly(&cache, catalog).await;
    let registry = Registry::connect(&options.registry, reference)?;
    let remote = registry.resolve(reference, &options.platform).await?;
    let plans = plan_layers(&remote.layers, &remote.diff_ids);
    let source = Arc::new(RegistryBlobs {
        registry,
        reference: reference.clone(),
    });
    let manifest = |layers: &[LayerDisk]| ManifestEntry {
        digest: remote.manifest_digest.clone(),
        config_digest: remote.config_digest.clone(),
        config: remote.config.clone(),
        platform: remote.platform.clone(),
        layers: plans.iter().map(|p| p.chain_id.clone()).collect(),
        size: layers.iter().map(|l| l.size).sum(),
        created: now(),
        last_used: now(),
    };
    let reference_entry = RefEntry {
        reference: reference.to_string(),
        manifest: remote.manifest_digest.clone(),
        index: remote.index_digest.clone(),
        updated: now(),
    };
    let what = format!("pull {reference}");
    let (layers, hold) = record(
        &cache,
        catalog,
        &plans,
        source,
        progress,
        &what,
        &manifest,
        Some(&reference_entry),
    )
    .await?;
    Ok(Pulled {
        image: Image {
            name: Some(reference.to_string()),
            manifest_digest: remote.manifest_digest,
            config_digest: remote.config_digest,
            config: remote.config,
            layers,
        },
        index_digest: remote.index_digest,
        hold,
    })
}

/// Imports an image from a local OCI layout or archive (see
/// [`crate::import()`]) into the cache and catalog. Its name, if the source
/// gives one, becomes a reference (normalised as docker does).
pub async fn import_into(
    cache: &LayerCache,
    catalog: &Catalog,
    path: &Path,
    select: Option<&str>,
    progress: Arc<dyn PullProgress>,
) -> Result<Pulled, ImageError> {
    let cache = cache.clone().with_owner(catalog.token());
    cleanup_quietly(&cache, catalog).await;
    let (source, resolved) = {
        let (cache, path, select) = (
            cache.clone(),
            path.to_path_buf(),
            select.map(str::to_string),
        );
        tokio::task::spawn_blocking(move || {
            let source = Source::open(&path, &cache.staging_dir(), &cache.temp_prefix("archive"))?;
            let resolved = resolve(&source, select.as_deref())?;
            Ok::<_, ImageError>((source, resolved))
        })
        .await
        .map_err(|e| ImageError::io("import task", std::io::Error::other(e)))??
    };
    let blobs: Vec<_> = resolved.layers.iter().map(|(b, _)| b.clone()).collect();
    let plans = plan_layers(&blobs, &resolved.diff_ids);
    let paths: HashMap<Digest, String> = resolved
        .layers
        .iter()
        .map(|(b, p)| (b.digest.clone(), p.clone()))
        .collect();
    let config = RuntimeConfig::from_config(&resolved.config);
    let platform = format!(
        "{}/{}",
        resolved.config.os(),
        resolved.config.architecture()
    );
    let name = resolved
        .name
        .as_deref()
        .and_then(|n| ImageRef::parse(n).ok())
        .map(|r| r.to_string());
    let manifest = |layers: &[LayerDisk]| ManifestEntry {
        digest: resolved.manifest_digest.clone(),
        config_digest: resolved.config_digest.clone(),
        config: config.clone(),
        platform: platform.clone(),
        layers: plans.iter().map(|p| p.chain_id.clone()).collect(),
        size: layers.iter().map(|l| l.size).sum(),
        created: now(),
        last_used: now(),
    };
    let reference_entry = name.as_ref().map(|n| RefEntry {
        reference: n.clone(),
        manifest: resolved.manifest_digest.clone(),
        index: None,
        updated: now(),
    });
    let source = Arc::new(LocalBlobs { source, paths });
    let what = format!("import {}", path.display());
    let (layers, hold) = record(
        &cache,
        catalog,
        &plans,
        source,
        progress,
        &what,
        &manifest,
        reference_entry.as_ref(),
    )
    .await?;
    Ok(Pulled {
        image: Image {
            name: name.or(resolved.name),
            manifest_digest: resolved.manifest_digest,
            config_digest: resolved.config_digest,
            config,
            layers,
        },
        index_digest: None,
        hold,
    })
}

/// The image `reference` names if the catalog already has it with all its
/// disks (held and touched), else `None`: what `podvisor run` uses before
/// pulling, as `docker run` does.
pub async fn cached(
    cache: &LayerCache,
    catalog: &Catalog,
    reference: &ImageRef,
    what: &str,
) -> Result<Option<Pulled>, ImageError> {
    let Some(r) = catalog.reference(&reference.to_string()).await? else {
        return Ok(None);
    };
    let Some(m) = catalog.manifest(&r.manifest).await? else {
        return Ok(None);
    };
    let hold = catalog.hold_layers(&m.layers, what, true).await?;
    if !catalog.touch_layers(&m.layers).await?.is_empty() {
        return Ok(None);
    }
    let mut layers = Vec::new();
    for chain in &m.layers {
        match cache.get(chain) {
            Some(disk) => layers.push(disk),
            None => return Ok(None),
        }
    }
    Ok(Some(Pulled {
        image: Image {
            name: Some(r.reference),
            manifest_digest: m.digest,
            config_digest: m.config_digest,
            config: m.config,
            layers,
        },
        index_digest: r.index,
        hold,
    }))
}

/// Materializes the layers, then records the image: each layer gains the
/// manifest as a referrer (a compare-and-swap that fails if GC removed the
/// layer meanwhile, and then the whole thing starts over), then the
/// manifest and reference entries are written.
#[allow(clippy::too_many_arguments)]
async fn record(
    cache: &LayerCache,
    catalog: &Catalog,
    plans: &[LayerPlan],
    source: Arc<dyn crate::blob_source::BlobSource>,
    progress: Arc<dyn PullProgress>,
    what: &str,
    manifest: &(dyn Fn(&[LayerDisk]) -> ManifestEntry + Sync),
    reference: Option<&RefEntry>,
) -> Result<(Vec<LayerDisk>, LayerHold), ImageError> {
    let no_space = |e: ImageError| e.with_no_space_hint(cache.root());
    for _ in 0..ATTEMPTS {
        let (layers, hold) = materialize(
            cache,
            catalog,
            plans,
            source.clone(),
            progress.clone(),
            what,
        )
        .await
        .map_err(no_space)?;
        let entry = manifest(&layers);
        if add_referrer(catalog, &entry.layers, &entry.digest).await? {
            catalog.put_image(&entry, reference).await?;
            // A holder this process took over from left its work behind.
            cleanup_quietly(cache, catalog).await;
            return Ok((layers, hold));
        }
        hold.release().await;
    }
    Err(ImageError::Contention {
        what: what.to_string(),
        attempts: ATTEMPTS,
    })
}

/// Adds `manifest` to each layer's referrers; false if a layer vanished.
async fn add_referrer(
    catalog: &Catalog,
    chains: &[ChainId],
    manifest: &Digest,
) -> Result<bool, ImageError> {
    let t = now();
    for chain in chains {
        let found = catalog
            .update_layer(chain, |e| {
                if !e.used_by.contains(manifest) {
                    e.used_by.push(manifest.clone());
                }
                e.last_used = t;
            })
            .await?;
        if !found {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn cleanup_quietly(cache: &LayerCache, catalog: &Catalog) {
    if let Err(e) = cleanup::remove_stale(cache, catalog).await {
        tracing::warn!("cleaning up stale temporary files in the cache: {e}");
    }
}
