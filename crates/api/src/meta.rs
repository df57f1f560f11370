//! Object metadata shared by every kind (pods, hosts): names, labels,
//! revisions and timestamps, with Kubernetes' JSON field names.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A point in time, serialized as RFC 3339 in UTC (`2025-01-02T03:04:05Z`).
pub type Time = DateTime<Utc>;

/// The namespace of a pod whose metadata names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Metadata of an object. The server sets `uid`, `resourceVersion`,
/// `creationTimestamp` and `deletionTimestamp`; what a client sends there
/// is ignored on create.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// The object's name, unique in its namespace (for hosts: cluster-wide).
    #[serde(default)]
    pub name: String,
    /// The pod's namespace (`default` if not given). Hosts have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form notes; stored, never acted upon.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Unique id of this incarnation of the object (a deleted and re-created
    /// pod gets a new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The store revision of the object's last change, as a decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<DateTime<Utc>>,
    /// Set when deletion was asked for while a host still runs the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<DateTime<Utc>>,
}

impl ObjectMeta {
    /// The namespace, `default` if none is set.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }

    /// `resourceVersion` as a number (0 if absent or not a number).
    pub fn revision(&self) -> i64 {
        self.resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Metadata of a list: the store revision the list was read at, to watch
/// from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ListMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

impl ListMeta {
    /// `resourceVersion` as a number (0 if absent or not a number).
    pub fn revision(&self) -> i64 {
        self.resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}
