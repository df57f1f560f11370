//! Garbage collection: removing layer disks that no image references and
//! no running pod (or pull in progress) uses, and `image rm`.
//!
//! A layer is deleted under its lock (so no fetch of it runs), and only if
//! its catalog entry is unchanged since GC found no use and no reference
//! (`delete_if` on the revision read before those checks): a user that
//! took a hold and touched the entry meanwhile wins. The entry goes first,
//! then the disk, renamed to `.trash-o<token>-*` and removed (with the
//! layer's format 1 disk, if an older podvisor left one).

use std::collections::HashSet;
use std::fs;

use crate::cache::LayerCache;
use crate::catalog::{Catalog, Holder};
use crate::cleanup::{self, disk_usage};
use crate::reference::ImageRef;
use crate::{ChainId, Digest, ImageError};

/// What a GC or `image rm` did.
#[derive(Clone, Debug, Default)]
pub struct GcReport {
    /// References removed (`image rm`).
    pub untagged: Vec<String>,
    /// Manifests removed (`image rm`).
    pub manifests_removed: Vec<Digest>,
    /// Layer disks removed, with their sizes.
    pub removed: Vec<(ChainId, u64)>,
    /// Unreferenced layers kept because something uses them.
    pub in_use: Vec<(ChainId, Vec<Holder>)>,
    /// Unreferenced layers skipped because another process holds their lock.
    pub busy: Vec<ChainId>,
    /// Leftovers of dead processes removed.
    pub stale: cleanup::Cleaned,
}

impl GcReport {
    /// Bytes freed on the cache's filesystem.
    pub fn bytes_freed(&self) -> u64 {
        self.removed.iter().map(|(_, s)| s).sum::<u64>() + self.stale.bytes
    }
}

/// Removes every layer disk no image references and nothing uses, and
/// leftovers of dead processes.
pub async fn gc(cache: &LayerCache, catalog: &Catalog) -> Result<GcReport, ImageError> {
    let cache = cache.clone().with_owner(catalog.token());
    let mut report = GcReport {
        stale: cleanup::remove_stale(&cache, catalog).await?,
        ..GcReport::default()
    };
    let mut candidates: Vec<ChainId> = Vec::new();
    let mut seen = HashSet::new();
    for entry in catalog.layers().await? {
        seen.insert(entry.chain_id.clone());
        candidates.push(entry.chain_id);
    }
    // Disks without an entry: a process died between commit and record.
    for disk in cache.list()? {
        if !seen.contains(&disk.chain_id) {
            seen.insert(disk.chain_id.clone());
            candidates.push(disk.chain_id);
        }
    }
    // Format 1 disks of layers the catalog no longer has.
    for chain in cache.legacy_chains() {
        if !seen.contains(&chain) {
            seen.insert(chain.clone());
            candidates.push(chain);
        }
    }
    collect(&cache, catalog, &candidates, &mut report).await?;
    Ok(report)
}

/// Removes a reference (or, given `sha256:<hex>`, a manifest and every
/// reference to it); a manifest no reference names any more goes too. Then
/// collects the layers that lost their last referrer.
pub async fn remove_image(
    cache: &LayerCache,
    catalog: &Catalog,
    name: &str,
) -> Result<GcReport, ImageError> {
    let cache = cache.clone().with_owner(catalog.token());
    let mut report = GcReport::default();
    let refs = catalog.refs().await?;
    let manifest = if let Ok(digest) = Digest::parse(name) {
        if catalog.manifest(&digest).await?.is_none() {
            return Err(ImageError::NotInCatalog {
                name: name.to_string(),
            });
        }
        for r in refs.iter().filter(|r| r.manifest == digest) {
            catalog.delete_ref(&r.reference).await?;
            report.untagged.push(r.reference.clone());
        }
        digest
    } else {
        let normalized = ImageRef::parse(name)?.to_string();
        let Some(r) = refs.iter().find(|r| r.reference == normalized) else {
            return Err(ImageError::NotInCatalog {
                name: name.to_string(),
            });
        };
        catalog.delete_ref(&r.reference).await?;
        report.untagged.push(r.reference.clone());
        if refs
            .iter()
            .any(|o| o.reference != normalized && o.manifest == r.manifest)
        {
            return Ok(report);
        }
        r.manifest.clone()
    };
    let Some(entry) = catalog.manifest(&manifest).await? else {
        return Ok(report);
    };
    catalog.delete_manifest(&manifest).await?;
    report.manifests_removed.push(manifest.clone());
    for chain in &entry.layers {
        catalog
            .update_layer(chain, |e| e.used_by.retain(|d| d != &manifest))
            .await?;
    }
    collect(&cache, catalog, &entry.layers, &mut report).await?;
    Ok(report)
}

/// Removes those of `candidates` that nothing references or uses.
async fn collect(
    cache: &LayerCache,
    catalog: &Catalog,
    candidates: &[ChainId],
    report: &mut GcReport,
) -> Result<(), ImageError> {
    let manifests: HashSet<Digest> = catalog
        .manifests()
        .await?
        .into_iter()
        .map(|m| m.digest)
        .collect();
    for chain in candidates {
        // Cheap checks first, without the lock.
        if let Some((entry, _)) = catalog.layer(chain).await?
            && entry.used_by.iter().any(|d| manifests.contains(d))
        {
            continue;
        }
        match catalog.try_lock(chain, "gc").await? {
            Ok(()) => {}
            Err(_) => {
                report.busy.push(chain.clone());
                continue;
            }
        }
        let outcome = collect_locked(cache, catalog, chain, report).await;
        catalog.unlock(chain).await?;
        outcome?;
    }
    Ok(())
}

async fn collect_locked(
    cache: &LayerCache,
    catalog: &Catalog,
    chain: &ChainId,
    report: &mut GcReport,
) -> Result<(), ImageError> {
    let entry = catalog.layer(chain).await?;
    let uses = catalog.layer_uses(chain).await?;
    if !uses.is_empty() {
        report.in_use.push((chain.clone(), uses));
        return Ok(());
    }
    if let Some((entry, revision)) = entry {
        // Referrers are re-read now: a manifest recorded since the list above counts.
        for d in &entry.used_by {
            if catalog.manifest(d).await?.is_some() {
                return Ok(());
            }
        }
        if !catalog.delete_layer_if(chain, revision).await? {
            // Someone touched it meanwhile: it is in use again.
            return Ok(());
        }
    }
    // The disk of this format, and one of format 1 an older podvisor left.
    let mut bytes = None;
    for layers in [cache.layers_dir(), cache.legacy_layers_dir()] {
        if let Some(b) = remove_disk_dir(cache, &layers, chain)? {
            *bytes.get_or_insert(0) += b;
        }
    }
    if let Some(bytes) = bytes {
        report.removed.push((chain.clone(), bytes));
    }
    Ok(())
}

/// Removes `layers/<chain>` (renamed to a `.trash-` name first); returns
/// the bytes it held, `None` if there was none.
fn remove_disk_dir(
    cache: &LayerCache,
    layers: &std::path::Path,
    chain: &ChainId,
) -> Result<Option<u64>, ImageError> {
    let dir = layers.join(chain.hex());
    if !dir.exists() {
        return Ok(None);
    }
    let bytes = disk_usage(&dir);
    let trash = layers.join(format!("{}{}", cache.temp_prefix(".trash-"), chain.hex()));
    fs::rename(&dir, &trash).map_err(|e| {
        ImageError::io(
            format!("rename {} to {}", dir.display(), trash.display()),
            e,
        )
    })?;
    fs::remove_dir_all(&trash)
        .map_err(|e| ImageError::io(format!("remove {}", trash.display()), e))?;
    crate::cache::sync_dir(layers)?;
    Ok(Some(bytes))
}
