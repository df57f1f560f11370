//! [`LayerHold`]: `use` keys that keep layers from GC while a pull finishes
//! or a pod runs.

use podvisor_store::Store;
use std::sync::Arc;

use super::{Catalog, Holder, now};
use crate::{ChainId, ImageError};

/// Marks layers as in use. Keys attached to the process lease vanish when
/// the process dies; [`LayerHold::release`] (or dropping the hold) removes
/// them sooner. A host daemon that tracks pods durably can take a hold
/// without a lease ([`Catalog::hold_layers`] with `leased: false`) and
/// release it when the pod is deleted, whatever happens to the daemon.
pub struct LayerHold {
    store: Arc<dyn Store>,
    keys: Vec<String>,
    id: String,
    released: bool,
}

impl std::fmt::Debug for LayerHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerHold")
            .field("id", &self.id)
            .field("layers", &self.keys.len())
            .finish()
    }
}

impl LayerHold {
    /// The id under which the hold's keys are stored.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Keeps the hold's keys after this value is gone (for a hold taken
    /// without a lease, which a host daemon releases with
    /// [`Catalog::release_hold`] when the pod is deleted, after any number
    /// of restarts). Returns the hold's id.
    pub fn keep(mut self) -> String {
        self.released = true;
        std::mem::take(&mut self.id)
    }

    /// Removes the hold's keys now.
    pub async fn release(mut self) {
        self.released = true;
        for key in &self.keys {
            let _ = self.store.delete(key).await;
        }
    }
}

impl Drop for LayerHold {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (store, keys) = (self.store.clone(), std::mem::take(&mut self.keys));
            handle.spawn(async move {
                for key in keys {
                    let _ = store.delete(&key).await;
                }
            });
        }
    }
}

impl Catalog {
    /// Marks `chains` as used by `what` (e.g. `pod 1a2b`). GC skips a layer
    /// with such a mark; a user must still [`Catalog::touch_layers`] (or
    /// otherwise change the entries) after taking the hold, to learn whether
    /// GC removed a layer just before.
    pub async fn hold_layers(
        &self,
        chains: &[ChainId],
        what: &str,
        leased: bool,
    ) -> Result<LayerHold, ImageError> {
        let id = format!("{}-{}", self.token(), super::random_token()?);
        let mut holder: Holder = self.holder().clone();
        holder.what = what.to_string();
        let value = serde_json::to_vec(&holder).expect("holder serializes");
        let mut hold = LayerHold {
            store: self.store().clone(),
            keys: Vec::new(),
            id: id.clone(),
            released: false,
        };
        let lease = leased.then(|| self.lease_id());
        for chain in chains {
            let key = format!("{}use/{id}", Catalog::layer_prefix(chain));
            self.store()
                .put(&key, &value, lease)
                .await
                .map_err(|e| self.err(e))?;
            hold.keys.push(key);
        }
        Ok(hold)
    }

    /// Sets the last use of each layer to now; returns the layers that have
    /// no entry (the caller must pull them again).
    pub async fn touch_layers(&self, chains: &[ChainId]) -> Result<Vec<ChainId>, ImageError> {
        let mut missing = Vec::new();
        let t = now();
        for chain in chains {
            if !self.update_layer(chain, |e| e.last_used = t).await? {
                missing.push(chain.clone());
            }
        }
        Ok(missing)
    }

    /// Removes the `use` keys a hold with this id left (a host daemon
    /// releasing a pod's layers after a restart).
    pub async fn release_hold(&self, chains: &[ChainId], id: &str) -> Result<(), ImageError> {
        for chain in chains {
            let key = format!("{}use/{id}", Catalog::layer_prefix(chain));
            self.store().delete(&key).await.map_err(|e| self.err(e))?;
        }
        Ok(())
    }
}
