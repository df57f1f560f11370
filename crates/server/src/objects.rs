//! Typed access to pods and hosts in the store: JSON values whose
//! `metadata.resourceVersion` is the key's `mod_revision`, and
//! read-modify-write updates by compare-and-swap, so that several server
//! replicas on one store never overwrite each other's changes.

use podvisor_api::{Host, ObjectMeta, PersistentVolumeClaim, Pod};
use podvisor_store::{KeyValue, Revision, Store};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A pod, a host or a volume.
pub trait Object: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// `pod` or `host`, for messages.
    const KIND: &'static str;
    fn meta_mut(&mut self) -> &mut ObjectMeta;
}

impl Object for Pod {
    const KIND: &'static str = "pod";
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Object for Host {
    const KIND: &'static str = "host";
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Object for PersistentVolumeClaim {
    const KIND: &'static str = "persistentvolumeclaim";
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Reads a stored object, setting its resourceVersion from the key.
pub fn decode<T: Object>(kv: &KeyValue) -> Result<T, ApiError> {
    let mut obj: T = serde_json::from_slice(&kv.value).map_err(|e| {
        ApiError::internal(format!(
            "the store holds an unreadable {} at {}: {e}",
            T::KIND,
            kv.key
        ))
    })?;
    obj.meta_mut().resource_version = Some(kv.mod_revision.to_string());
    Ok(obj)
}

/// The stored form of an object (without resourceVersion, which is the
/// store's).
pub fn encode<T: Object>(obj: &T) -> Vec<u8> {
    let mut obj = obj.clone();
    obj.meta_mut().resource_version = None;
    serde_json::to_vec(&obj).expect("API objects serialize to JSON")
}

/// The object at `key`, if any.
pub async fn get<T: Object>(store: &dyn Store, key: &str) -> Result<Option<T>, ApiError> {
    match store.get(key).await? {
        Some(kv) => Ok(Some(decode(&kv)?)),
        None => Ok(None),
    }
}

/// All objects under `prefix` and the revision of the listing.
pub async fn list<T: Object>(
    store: &dyn Store,
    prefix: &str,
) -> Result<(Vec<T>, Revision), ApiError> {
    let (kvs, rev) = store.list(prefix).await?;
    let objects = kvs.iter().map(decode).collect::<Result<Vec<T>, _>>()?;
    Ok((objects, rev))
}

/// What an update function decided.
pub enum Change {
    /// Write the object as changed.
    Write,
    /// Leave it as it is (no write, no new revision).
    Keep,
}

/// How many compare-and-swap attempts an update makes before giving up.
const MAX_ATTEMPTS: usize = 64;

/// Reads the object at `key`, lets `change` modify it, and writes it back
/// if its revision has not moved meanwhile (else reads again and retries).
/// `Ok(None)` if the object does not exist.
pub async fn update<T: Object>(
    store: &dyn Store,
    key: &str,
    mut change: impl FnMut(&mut T) -> Result<Change, ApiError>,
) -> Result<Option<T>, ApiError> {
    for _ in 0..MAX_ATTEMPTS {
        let Some(kv) = store.get(key).await? else {
            return Ok(None);
        };
        let mut obj: T = decode(&kv)?;
        match change(&mut obj)? {
            Change::Keep => return Ok(Some(obj)),
            Change::Write => {}
        }
        match store.update(key, &encode(&obj), kv.mod_revision).await? {
            Ok(rev) => {
                obj.meta_mut().resource_version = Some(rev.to_string());
                return Ok(Some(obj));
            }
            Err(None) => return Ok(None),
            Err(Some(_)) => continue,
        }
    }
    Err(ApiError::conflict(format!(
        "{} {key}: too many concurrent changes, try again",
        T::KIND
    )))
}

/// Writes `obj` at `key` only if the key is still at `expected`: the new
/// object, or `None` if it moved (or is gone).
pub async fn update_if<T: Object>(
    store: &dyn Store,
    key: &str,
    obj: &T,
    expected: Revision,
) -> Result<Option<T>, ApiError> {
    match store.update(key, &encode(obj), expected).await? {
        Ok(rev) => {
            let mut obj = obj.clone();
            obj.meta_mut().resource_version = Some(rev.to_string());
            Ok(Some(obj))
        }
        Err(_) => Ok(None),
    }
}
