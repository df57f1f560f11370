//! Making every layer of an image a committed layer disk with a catalog
//! entry, fetching each one at most once across all processes sharing the
//! cache and catalog.
//!
//! For each layer, in three phases:
//! 1. *Claim*: a layer with an entry and a disk is ready. Otherwise this
//!    process tries to create the layer's lock key (attached to its lease);
//!    if another process holds it, the layer is theirs for now.
//! 2. *Fetch mine*: the claimed layers are fetched, verified and converted
//!    (a few at a time) but not committed; when all succeeded they are
//!    committed together (disk first, then entry, then unlock), so a pull
//!    that fails alone leaves the cache and catalog as they were. On a
//!    failure every prepared disk is dropped and the locks released.
//! 3. *Wait for theirs*: until the entry appears (done) or the lock vanishes
//!    (the holder failed or died and its lease expired); then this process
//!    races to take the lock over and fetches the layer itself.
//!
//! A process never waits for others while it holds uncommitted layers, so
//! two pulls sharing layers cannot wait for each other.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::blob_source::BlobSource;
use crate::cache::{LayerCache, LayerDisk, PreparedLayer};
use crate::catalog::{Catalog, LayerEntry, LayerHold, now};
use crate::convert::LayerBlob;
use crate::progress::{CountingReader, LayerEvent, PullProgress};
use crate::{ChainId, Digest, ImageError};

/// How many layers one process fetches at once.
const PARALLEL_FETCHES: usize = 3;

/// One layer to materialize.
#[derive(Clone, Debug)]
pub(crate) struct LayerPlan {
    pub blob: LayerBlob,
    pub diff_id: Digest,
    pub parent: Option<ChainId>,
    pub chain_id: ChainId,
}

/// The layer plans of an image with these blobs and DiffIDs, bottom first.
pub(crate) fn plan_layers(blobs: &[LayerBlob], diff_ids: &[Digest]) -> Vec<LayerPlan> {
    let mut parent: Option<ChainId> = None;
    let mut plans = Vec::new();
    for (blob, diff_id) in blobs.iter().zip(diff_ids) {
        let chain_id = ChainId::extend(parent.as_ref(), diff_id);
        plans.push(LayerPlan {
            blob: blob.clone(),
            diff_id: diff_id.clone(),
            parent: parent.clone(),
            chain_id: chain_id.clone(),
        });
        parent = Some(chain_id);
    }
    plans
}

enum Claim {
    Ready(LayerDisk),
    Mine,
    Theirs(i64),
}

/// Makes every layer of `plans` a layer disk with a catalog entry. Returns
/// the disks, bottom first, and a hold (`use` keys, taken before anything
/// else) that keeps them from GC until the caller releases it.
pub(crate) async fn materialize(
    cache: &LayerCache,
    catalog: &Catalog,
    plans: &[LayerPlan],
    source: Arc<dyn BlobSource>,
    progress: Arc<dyn PullProgress>,
    what: &str,
) -> Result<(Vec<LayerDisk>, LayerHold), ImageError> {
    let chains: Vec<ChainId> = plans.iter().map(|p| p.chain_id.clone()).collect();
    let hold = catalog.hold_layers(&chains, what, true).await?;
    progress.layers(&plans.iter().map(|p| p.blob.clone()).collect::<Vec<_>>());

    // 1. Claim.
    let mut claims = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        claims.push(claim(cache, catalog, plan).await?);
        match &claims[i] {
            Claim::Ready(_) => progress.layer(i, LayerEvent::Cached),
            Claim::Theirs(_) => {
                let holder = catalog.lock_holder(&plan.chain_id).await?;
                progress.layer(
                    i,
                    LayerEvent::Waiting(holder.unwrap_or_else(crate::catalog::Holder::unknown)),
                );
            }
            Claim::Mine => {}
        }
    }

    // 2. Fetch mine, commit them together.
    let mine: Vec<usize> = (0..plans.len())
        .filter(|&i| matches!(claims[i], Claim::Mine))
        .collect();
    let results: Vec<(usize, Result<Option<PreparedLayer>, ImageError>)> =
        futures_util::stream::iter(mine.iter().copied())
            .map(|i| {
                let (source, progress) = (source.clone(), progress.clone());
                async move { (i, prepare(cache, &plans[i], i, source, progress).await) }
            })
            .buffer_unordered(PARALLEL_FETCHES)
            .collect()
            .await;
    let mut prepared = Vec::new();
    let mut first_error: Option<(usize, ImageError)> = None;
    for (i, result) in results {
        match result {
            Ok(p) => prepared.push((i, p)),
            Err(e) => {
                if first_error.as_ref().is_none_or(|(j, _)| i < *j) {
                    first_error = Some((i, e));
                }
            }
        }
    }
    if let Some((_, e)) = first_error {
        drop(prepared);
        for &i in &mine {
            let _ = catalog.unlock(&plans[i].chain_id).await;
        }
        return Err(e);
    }
    prepared.sort_by_key(|(i, _)| *i);
    let mut commit_error = None;
    for (i, layer) in prepared {
        if commit_error.is_some() {
            let _ = catalog.unlock(&plans[i].chain_id).await;
            continue;
        }
        match commit(cache, catalog, &plans[i], layer).await {
            Ok(disk) => {
                progress.layer(i, LayerEvent::Done { size: disk.size });
                claims[i] = Claim::Ready(disk);
            }
            Err(e) => commit_error = Some(e),
        }
        let _ = catalog.unlock(&plans[i].chain_id).await;
    }
    if let Some(e) = commit_error {
        return Err(e);
    }

    // 3. Wait for theirs; take over from holders that went away.
    let mut disks = Vec::new();
    for (i, claim) in claims.into_iter().enumerate() {
        let disk = match claim {
            Claim::Ready(disk) => disk,
            Claim::Mine => unreachable!("all claimed layers were committed"),
            Claim::Theirs(rev) => {
                wait_or_take_over(
                    cache,
                    catalog,
                    &plans[i],
                    i,
                    rev,
                    source.clone(),
                    progress.clone(),
                )
                .await?
            }
        };
        disks.push(disk);
    }
    Ok((disks, hold))
}

/// Phase 1 for one layer.
async fn claim(
    cache: &LayerCache,
    catalog: &Catalog,
    plan: &LayerPlan,
) -> Result<Claim, ImageError> {
    if catalog.layer(&plan.chain_id).await?.is_some()
        && let Some(disk) = cache.get(&plan.chain_id)
    {
        return Ok(Claim::Ready(disk));
    }
    match catalog.try_lock(&plan.chain_id, "fetch").await? {
        Ok(()) => {
            // The holder before us may have finished just now.
            if catalog.layer(&plan.chain_id).await?.is_some()
                && let Some(disk) = cache.get(&plan.chain_id)
            {
                catalog.unlock(&plan.chain_id).await?;
                return Ok(Claim::Ready(disk));
            }
            Ok(Claim::Mine)
        }
        Err((_, rev)) => Ok(Claim::Theirs(rev)),
    }
}

/// Fetches, verifies and converts one layer this process holds the lock
/// of. `None` if its disk is already in the cache without an entry (a
/// holder died between the two): then only the entry is missing.
async fn prepare(
    cache: &LayerCache,
    plan: &LayerPlan,
    index: usize,
    source: Arc<dyn BlobSource>,
    progress: Arc<dyn PullProgress>,
) -> Result<Option<PreparedLayer>, ImageError> {
    if cache.get(&plan.chain_id).is_some() {
        return Ok(None);
    }
    progress.layer(index, LayerEvent::Fetching);
    let reader = source.open(&plan.blob).await?;
    let reader = CountingReader::new(reader, index, progress.clone());
    let (cache, plan) = (cache.clone(), plan.clone());
    let prepared = tokio::task::spawn_blocking(move || {
        let prepared = cache.prepare_layer(&plan.blob, &plan.diff_id, plan.parent.as_ref(), reader);
        if prepared.is_ok() {
            progress.layer(index, LayerEvent::Building);
        }
        prepared
    })
    .await
    .map_err(|e| ImageError::io("layer conversion task", std::io::Error::other(e)))??;
    Ok(Some(prepared))
}

/// Commits a prepared disk (or adopts one already there) and records it.
async fn commit(
    cache: &LayerCache,
    catalog: &Catalog,
    plan: &LayerPlan,
    prepared: Option<PreparedLayer>,
) -> Result<LayerDisk, ImageError> {
    let disk = match prepared {
        Some(p) => tokio::task::spawn_blocking(move || p.commit())
            .await
            .map_err(|e| ImageError::io("layer commit task", std::io::Error::other(e)))??,
        None => cache
            .get(&plan.chain_id)
            .ok_or_else(|| ImageError::DamagedCacheEntry {
                path: cache.layers_dir().join(plan.chain_id.hex()),
                reason: "the layer disk vanished while this process held its lock".into(),
            })?,
    };
    record(catalog, plan, &disk).await?;
    Ok(disk)
}

/// Writes (or refreshes) the catalog entry of a committed disk.
async fn record(catalog: &Catalog, plan: &LayerPlan, disk: &LayerDisk) -> Result<(), ImageError> {
    let t = now();
    let refreshed = catalog
        .update_layer(&plan.chain_id, |e| {
            e.size = disk.size;
            e.last_used = t;
        })
        .await?;
    if !refreshed {
        catalog
            .put_layer(&LayerEntry {
                chain_id: plan.chain_id.clone(),
                diff_id: plan.diff_id.clone(),
                parent: plan.parent.clone(),
                blob: plan.blob.clone(),
                size: disk.size,
                created: t,
                last_used: t,
                used_by: Vec::new(),
            })
            .await?;
    }
    Ok(())
}

/// Phase 3 for one layer another process claimed.
async fn wait_or_take_over(
    cache: &LayerCache,
    catalog: &Catalog,
    plan: &LayerPlan,
    index: usize,
    mut rev: i64,
    source: Arc<dyn BlobSource>,
    progress: Arc<dyn PullProgress>,
) -> Result<LayerDisk, ImageError> {
    loop {
        catalog
            .wait_layer_change(&plan.chain_id, rev, Duration::from_secs(2))
            .await;
        match claim(cache, catalog, plan).await? {
            Claim::Ready(disk) => {
                progress.layer(index, LayerEvent::DoneElsewhere);
                return Ok(disk);
            }
            Claim::Theirs(r) => rev = r,
            Claim::Mine => {
                let result =
                    match prepare(cache, plan, index, source.clone(), progress.clone()).await {
                        Ok(p) => commit(cache, catalog, plan, p).await,
                        Err(e) => Err(e),
                    };
                let _ = catalog.unlock(&plan.chain_id).await;
                let disk = result?;
                progress.layer(index, LayerEvent::Done { size: disk.size });
                return Ok(disk);
            }
        }
    }
}
