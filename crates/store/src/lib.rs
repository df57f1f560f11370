//! The state store of podvisor: string keys with byte values, store-wide
//! revisions, compare-and-swap, watch from a past revision, and leases that
//! delete their keys when they expire. The image catalog (fetch leases,
//! catalog entries) and the management server (pods, hosts, heartbeats) are
//! built on the [`Store`] trait.
//!
//! Two backends, chosen at run time by [`open`]'s URL:
//! - [`SqliteStore`] (`sqlite:/path/to/file.db` or a bare path): an embedded
//!   SQLite file that several processes on one host share.
//! - [`EtcdStore`] (`etcd://host:port[,host:port...][?prefix=/ns/]`): an
//!   etcd 3.4+ cluster, for several hosts.
//!
//! `docs/STORE.md` describes the guarantees and their limits.
//!
//! The crate is also the lowest one the host-side crates share, so it holds
//! their one source of random bytes ([`random_bytes`], [`random_hex`]),
//! which fails rather than ever yielding zeros.

mod error;
mod etcd;
mod lease_keeper;
mod random;
mod sqlite;
mod url;

use std::sync::Arc;
use std::time::Duration;

pub use error::StoreError;
pub use etcd::EtcdStore;
pub use lease_keeper::LeaseKeeper;
pub use random::{RandomError, fill_random, random_bytes, random_hex};
pub use sqlite::{SqliteOptions, SqliteStore};
pub use url::StoreUrl;

/// A store-wide revision: every change (put, delete, a lease's key deleted)
/// gets a new one, strictly greater than all before it.
pub type Revision = i64;

/// The id of a lease granted by [`Store::grant_lease`].
pub type LeaseId = i64;

/// One key and its value as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision at which the key was created (since it was last absent).
    pub create_revision: Revision,
    /// Revision of the last change to the key.
    pub mod_revision: Revision,
    /// The lease the key is attached to: the key is deleted when it ends.
    pub lease: Option<LeaseId>,
}

/// A change seen by [`Store::watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or changed; `mod_revision` is the revision of
    /// the change.
    Put(KeyValue),
    /// The key was deleted (by a delete or by the end of its lease).
    Delete { key: String, revision: Revision },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// The events of one watch, in revision order.
///
/// An `Err` item ends the watch: nothing follows it and the channel closes.
/// It is [`StoreError::Compacted`] if the watcher fell so far behind that
/// history it had not seen yet was dropped (re-list, then watch from the
/// listed revision), or [`StoreError::Unavailable`] if the connection to the
/// store was lost (watch again from the revision of the last event
/// received: nothing is missed). Dropping the receiver stops the watch.
pub type WatchStream = tokio::sync::mpsc::Receiver<Result<WatchEvent, StoreError>>;

/// A key-value store with revisions, watch and leases. See the crate docs
/// and `docs/STORE.md` for the semantics shared by both backends.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The value of `key`, if present.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// All keys under `prefix`, sorted by key, and the revision of that
    /// snapshot (to watch from). An empty prefix lists every key.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    /// Sets `key` to `value`, attached to `lease` (or to no lease: a lease
    /// the key had before is detached). Returns the revision of the change.
    /// [`StoreError::LeaseNotFound`] if the lease has ended.
    async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError>;

    /// Creates `key` only if absent: `Ok(Ok(rev))` if created,
    /// `Ok(Err(existing))` if it exists.
    async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Result<Revision, KeyValue>, StoreError>;

    /// Compare-and-swap on `mod_revision`: sets `value` if the key's
    /// `mod_revision` is `expected`, keeping the key's lease. `Ok(Ok(new_rev))`,
    /// or `Ok(Err(current))` (`None` if the key is gone).
    async fn update(
        &self,
        key: &str,
        value: &[u8],
        expected: Revision,
    ) -> Result<Result<Revision, Option<KeyValue>>, StoreError>;

    /// Deletes `key`: the revision of the deletion, or `None` if it was absent.
    async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError>;

    /// Deletes `key` only if its `mod_revision` is `expected`; true if deleted.
    async fn delete_if(&self, key: &str, expected: Revision) -> Result<bool, StoreError>;

    /// A new lease that ends `ttl` after its grant or last keep-alive.
    /// etcd rounds the TTL up to whole seconds and to its minimum (2 s for
    /// etcd 3.4's default configuration).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Restarts the lease's TTL. [`StoreError::LeaseNotFound`] once it has
    /// expired or was revoked.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Ends the lease now, deleting its keys (with Delete events).
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Events for keys under `prefix` with revision > `after`, in revision
    /// order: first the history, then live ones (see [`WatchStream`]).
    /// `Err(Compacted)` if history after `after` is no longer kept: the
    /// caller re-lists (like Kubernetes' "resourceVersion too old").
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError>;

    /// The store's latest revision.
    async fn current_revision(&self) -> Result<Revision, StoreError>;
}

/// Opens the store named by `url`: `sqlite:/path/to/file.db` (or a bare
/// path), `etcd://127.0.0.1:2379[,host:port...]`, optionally with
/// `?prefix=/podvisor/` to keep every key under that prefix in etcd.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    match StoreUrl::parse(url)? {
        StoreUrl::Sqlite { path } => Ok(Arc::new(
            SqliteStore::open(&path, SqliteOptions::default()).await?,
        )),
        StoreUrl::Etcd {
            endpoints,
            namespace,
        } => Ok(Arc::new(EtcdStore::connect(&endpoints, &namespace).await?)),
    }
}

/// Checks that `key` is usable as a key: non-empty.
fn check_key(url: &str, key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidRequest {
            url: url.to_string(),
            reason: "the key is empty".to_string(),
        });
    }
    Ok(())
}

/// Checks that a watch's start revision is not negative.
fn check_after(url: &str, prefix: &str, after: Revision) -> Result<(), StoreError> {
    if after < 0 {
        return Err(StoreError::InvalidRequest {
            url: url.to_string(),
            reason: format!(
                "watch of {prefix:?} after revision {after}: revisions are never negative"
            ),
        });
    }
    Ok(())
}

/// Checks that a lease TTL is at least a millisecond.
fn check_ttl(url: &str, ttl: Duration) -> Result<(), StoreError> {
    if ttl < Duration::from_millis(1) {
        return Err(StoreError::InvalidRequest {
            url: url.to_string(),
            reason: format!("lease TTL {ttl:?} is shorter than 1 ms"),
        });
    }
    Ok(())
}
