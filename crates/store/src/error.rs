//! Errors of the store, shared by both backends.

use crate::{LeaseId, Revision};

/// What went wrong with a store operation. Messages name the store (its URL)
/// and the key, lease or revision at fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL given to [`crate::open`] is malformed or unsupported.
    #[error("invalid store URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },

    /// The store cannot be reached or did not answer in time (etcd down, the
    /// SQLite file locked for longer than the busy timeout, a watch whose
    /// connection dropped).
    #[error("store {url} is unavailable: {reason}")]
    Unavailable { url: String, reason: String },

    /// A watch asked for history that is no longer kept: events up to
    /// `oldest - 1` were dropped. List again and watch from the listed
    /// revision.
    #[error(
        "watch after revision {requested}: that history was compacted (the oldest kept revision is {oldest}); list again and watch from the listed revision"
    )]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },

    /// The lease expired, was revoked, or never existed.
    #[error("lease {0} not found: it expired or was revoked")]
    LeaseNotFound(LeaseId),

    /// The request itself is invalid (an empty key, a negative revision, a
    /// zero TTL).
    #[error("store {url}: invalid request: {reason}")]
    InvalidRequest { url: String, reason: String },

    /// The backend failed in a way the caller cannot fix by retrying later
    /// (a file that is not a podvisor store, a corrupt database, an
    /// unexpected server answer).
    #[error("store {url}: {reason}")]
    Backend { url: String, reason: String },
}
