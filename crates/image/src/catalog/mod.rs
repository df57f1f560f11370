//! The image catalog on a [`Store`]: which images (references, manifest
//! digests) are made of which layer disks, with sizes, reference counts and
//! last use; and the coordination keys that make every layer fetched once
//! across processes and hosts.
//!
//! Keys (all under `catalog/`):
//! - `layer/<chainid-hex>/entry`: [`LayerEntry`], written only after the
//!   disk is committed in the cache directory.
//! - `layer/<chainid-hex>/lock`: [`Holder`] of the process fetching (or
//!   deleting) that layer, attached to its lease.
//! - `layer/<chainid-hex>/use/<id>`: a pull in progress or a running pod
//!   using the layer ([`LayerHold`]); GC never removes a layer that has one.
//! - `manifest/<digest-hex>`: [`ManifestEntry`].
//! - `ref/<reference>`: [`RefEntry`], the manifest a reference resolved to.
//! - `owner/<token>`: every process using the catalog, attached to its lease;
//!   staging directories carry the token so a dead owner's leftovers can be
//!   told from a live one's.
//!
//! Users of a layer *touch* its entry (a compare-and-swap) after putting
//! their `use` key, and GC deletes an entry only if it is unchanged since it
//! checked the layer's uses and references: so a layer is either seen in use
//! by GC, or found gone by its user (who fetches it again), never both
//! missed.

mod entries;
mod holds;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use podvisor_store::{KeyValue, LeaseKeeper, Revision, Store, StoreError, WatchEvent};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use entries::{Holder, LayerEntry, ManifestEntry, RefEntry};
pub use holds::LayerHold;

use crate::{ChainId, Digest, ImageError};

/// TTL of a process's lease: how long after a holder dies others take over.
pub const LEASE_TTL: Duration = Duration::from_secs(5);

const ROOT: &str = "catalog/";

/// A connection to the catalog, with this process's lease.
#[derive(Clone)]
pub struct Catalog {
    store: Arc<dyn Store>,
    url: String,
    lease: Arc<LeaseKeeper>,
    token: String,
    holder: Holder,
}

impl Catalog {
    /// The default catalog of a cache directory: an SQLite file in it.
    pub fn default_url(cache_dir: &std::path::Path) -> String {
        format!("sqlite:{}", cache_dir.join("catalog.db").display())
    }

    /// Opens the store at `url` and registers this process as an owner.
    pub async fn open(url: &str) -> Result<Catalog, ImageError> {
        let err = |e: StoreError| ImageError::Catalog {
            url: url.to_string(),
            source: e,
        };
        let store = podvisor_store::open(url).await.map_err(err)?;
        let lease = LeaseKeeper::start(store.clone(), LEASE_TTL)
            .await
            .map_err(err)?;
        let token = random_token()?;
        let holder = Holder::this_process();
        let catalog = Catalog {
            store,
            url: url.to_string(),
            lease: Arc::new(lease),
            token,
            holder,
        };
        catalog
            .put_json(&catalog.owner_key(&catalog.token), &catalog.holder, true)
            .await?;
        Ok(catalog)
    }

    /// The store URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// This process's token: names its staging directories and keys.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// This process as a holder of locks and uses.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// Whether the process that registered `token` is alive (its lease holds).
    pub async fn owner_alive(&self, token: &str) -> Result<bool, ImageError> {
        Ok(self.get(&self.owner_key(token)).await?.is_some())
    }

    /// Revokes this process's lease now, releasing its locks and uses.
    pub async fn close(self) {
        if let Ok(lease) = Arc::try_unwrap(self.lease) {
            let _ = lease.revoke().await;
        }
    }

    // ---- keys ----

    fn owner_key(&self, token: &str) -> String {
        format!("{ROOT}owner/{token}")
    }
    pub(crate) fn layer_prefix(chain: &ChainId) -> String {
        format!("{ROOT}layer/{}/", chain.hex())
    }
    fn entry_key(chain: &ChainId) -> String {
        format!("{}entry", Catalog::layer_prefix(chain))
    }
    fn lock_key(chain: &ChainId) -> String {
        format!("{}lock", Catalog::layer_prefix(chain))
    }
    fn manifest_key(digest: &Digest) -> String {
        format!("{ROOT}manifest/{}", digest.hex())
    }
    fn ref_key(reference: &str) -> String {
        format!("{ROOT}ref/{reference}")
    }

    // ---- layers ----

    /// The catalog entry of a layer and its revision, if it has one.
    pub async fn layer(
        &self,
        chain: &ChainId,
    ) -> Result<Option<(LayerEntry, Revision)>, ImageError> {
        Ok(self
            .get_json::<LayerEntry>(&Catalog::entry_key(chain))
            .await?
            .map(|(e, kv)| (e, kv.mod_revision)))
    }

    /// Every layer entry, ordered by ChainID.
    pub async fn layers(&self) -> Result<Vec<LayerEntry>, ImageError> {
        let (kvs, _) = self.list(&format!("{ROOT}layer/")).await?;
        Ok(kvs
            .iter()
            .filter(|kv| kv.key.ends_with("/entry"))
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    /// Records a layer whose disk is committed (overwrites a stale entry).
    pub(crate) async fn put_layer(&self, entry: &LayerEntry) -> Result<(), ImageError> {
        self.put_json(&Catalog::entry_key(&entry.chain_id), entry, false)
            .await
    }

    /// Changes a layer entry with `f` by compare-and-swap, retrying on
    /// conflicts. `Ok(false)` if the entry does not exist.
    pub(crate) async fn update_layer(
        &self,
        chain: &ChainId,
        f: impl Fn(&mut LayerEntry),
    ) -> Result<bool, ImageError> {
        let key = Catalog::entry_key(chain);
        loop {
            let Some((mut entry, kv)) = self.get_json::<LayerEntry>(&key).await? else {
                return Ok(false);
            };
            f(&mut entry);
            let bytes = serde_json::to_vec(&entry).expect("entry serializes");
            match self
                .store
                .update(&key, &bytes, kv.mod_revision)
                .await
                .map_err(|e| self.err(e))?
            {
                Ok(_) => return Ok(true),
                Err(None) => return Ok(false),
                Err(Some(_)) => continue,
            }
        }
    }

    /// Deletes a layer entry if unchanged since `revision`.
    pub(crate) async fn delete_layer_if(
        &self,
        chain: &ChainId,
        revision: Revision,
    ) -> Result<bool, ImageError> {
        self.store
            .delete_if(&Catalog::entry_key(chain), revision)
            .await
            .map_err(|e| self.err(e))
    }

    /// Takes the lock of a layer for this process: `Ok(Ok(()))` if taken,
    /// `Ok(Err(holder))` if another holds it.
    pub(crate) async fn try_lock(
        &self,
        chain: &ChainId,
        purpose: &str,
    ) -> Result<Result<(), (Holder, Revision)>, ImageError> {
        self.try_lock_key(&Catalog::lock_key(chain), purpose).await
    }

    /// Creates lock `key` for this process on its lease: `Ok(Ok(()))` if
    /// taken, `Ok(Err(holder))` if another holds it.
    pub(crate) async fn try_lock_key(
        &self,
        key: &str,
        purpose: &str,
    ) -> Result<Result<(), (Holder, Revision)>, ImageError> {
        let mut holder = self.holder.clone();
        holder.what = purpose.to_string();
        let bytes = serde_json::to_vec(&holder).expect("holder serializes");
        match self
            .store
            .create(key, &bytes, Some(self.lease.id()))
            .await
            .map_err(|e| self.err(e))?
        {
            Ok(_) => Ok(Ok(())),
            Err(kv) => Ok(Err((
                serde_json::from_slice(&kv.value).unwrap_or_else(|_| Holder::unknown()),
                kv.mod_revision,
            ))),
        }
    }

    /// Releases a lock this process holds.
    pub(crate) async fn unlock(&self, chain: &ChainId) -> Result<(), ImageError> {
        self.unlock_key(&Catalog::lock_key(chain)).await
    }

    /// Deletes lock `key` if this process holds it.
    pub(crate) async fn unlock_key(&self, key: &str) -> Result<(), ImageError> {
        if let Some(kv) = self.get(key).await?
            && kv.lease == Some(self.lease.id())
        {
            self.store
                .delete_if(key, kv.mod_revision)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Deletes `key`, whatever its value.
    pub(crate) async fn delete_key(&self, key: &str) -> Result<(), ImageError> {
        if let Some(kv) = self.get(key).await? {
            self.store
                .delete_if(key, kv.mod_revision)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Writes a derived layer's entry (not on a lease: it outlives us).
    pub(crate) async fn put_derived(
        &self,
        key: &str,
        entry: &crate::derived::DerivedEntry,
    ) -> Result<(), ImageError> {
        self.put_json(key, entry, false).await
    }

    /// Waits until something changes under the layer's keys after
    /// `after` (its entry appears, its lock goes), or `timeout` passes.
    pub(crate) async fn wait_layer_change(
        &self,
        chain: &ChainId,
        after: Revision,
        timeout: Duration,
    ) {
        let prefix = Catalog::layer_prefix(chain);
        let (entry, lock) = (Catalog::entry_key(chain), Catalog::lock_key(chain));
        let wait = async {
            let Ok(mut events) = self.store.watch(&prefix, after).await else {
                // No watch: the caller polls.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            };
            while let Some(event) = events.recv().await {
                match event {
                    Ok(WatchEvent::Put(kv)) if kv.key == entry => return,
                    Ok(WatchEvent::Delete { key, .. }) if key == lock || key == entry => return,
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }

    // ---- images ----

    /// Every manifest entry.
    pub async fn manifests(&self) -> Result<Vec<ManifestEntry>, ImageError> {
        let (kvs, _) = self.list(&format!("{ROOT}manifest/")).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    /// The manifest entry of `digest`.
    pub async fn manifest(&self, digest: &Digest) -> Result<Option<ManifestEntry>, ImageError> {
        Ok(self
            .get_json(&Catalog::manifest_key(digest))
            .await?
            .map(|(m, _)| m))
    }

    /// Every reference entry.
    pub async fn refs(&self) -> Result<Vec<RefEntry>, ImageError> {
        let (kvs, _) = self.list(&format!("{ROOT}ref/")).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    /// The reference entry of a (normalised) reference.
    pub async fn reference(&self, reference: &str) -> Result<Option<RefEntry>, ImageError> {
        Ok(self
            .get_json(&Catalog::ref_key(reference))
            .await?
            .map(|(r, _)| r))
    }

    /// Records a manifest (its layers already reference it) and, if given, a
    /// reference pointing at it.
    pub(crate) async fn put_image(
        &self,
        manifest: &ManifestEntry,
        reference: Option<&RefEntry>,
    ) -> Result<(), ImageError> {
        self.put_json(&Catalog::manifest_key(&manifest.digest), manifest, false)
            .await?;
        if let Some(r) = reference {
            self.put_json(&Catalog::ref_key(&r.reference), r, false)
                .await?;
        }
        Ok(())
    }

    /// Deletes a reference entry; true if it existed.
    pub(crate) async fn delete_ref(&self, reference: &str) -> Result<bool, ImageError> {
        Ok(self
            .store
            .delete(&Catalog::ref_key(reference))
            .await
            .map_err(|e| self.err(e))?
            .is_some())
    }

    /// Deletes a manifest entry.
    pub(crate) async fn delete_manifest(&self, digest: &Digest) -> Result<(), ImageError> {
        self.store
            .delete(&Catalog::manifest_key(digest))
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Keys under a layer's `use/`.
    pub(crate) async fn layer_uses(&self, chain: &ChainId) -> Result<Vec<Holder>, ImageError> {
        let (kvs, _) = self
            .list(&format!("{}use/", Catalog::layer_prefix(chain)))
            .await?;
        Ok(kvs
            .iter()
            .map(|kv| serde_json::from_slice(&kv.value).unwrap_or_else(|_| Holder::unknown()))
            .collect())
    }

    /// The lock holder of a layer, if locked.
    pub(crate) async fn lock_holder(&self, chain: &ChainId) -> Result<Option<Holder>, ImageError> {
        Ok(self
            .get_json(&Catalog::lock_key(chain))
            .await?
            .map(|(h, _)| h))
    }

    // ---- plumbing ----

    fn err(&self, e: StoreError) -> ImageError {
        ImageError::Catalog {
            url: self.url.clone(),
            source: e,
        }
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn lease_id(&self) -> i64 {
        self.lease.id()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, ImageError> {
        self.store.get(key).await.map_err(|e| self.err(e))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), ImageError> {
        self.store.list(prefix).await.map_err(|e| self.err(e))
    }

    pub(crate) async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, KeyValue)>, ImageError> {
        let Some(kv) = self.get(key).await? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(&kv.value).map_err(|e| ImageError::CatalogEntry {
            url: self.url.clone(),
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Some((value, kv)))
    }

    async fn put_json<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        leased: bool,
    ) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec(value).expect("catalog values serialize");
        let lease = leased.then(|| self.lease.id());
        self.store
            .put(key, &bytes, lease)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// 16 random hex digits.
pub(crate) fn random_token() -> Result<String, ImageError> {
    Ok(podvisor_store::random_hex(8)?)
}
