//! The key of a hibernated pod's snapshot, kept by the management server
//! for the host the pod is on (`.../pods/NAME/snapshotkey`): the host
//! hands it over when it hibernates the pod, asks for it when it wakes
//! the pod (also after a restart of its daemon), and deletes it when the
//! snapshot is gone. No one else may read or change it, not even an
//! admin; the server keeps it wrapped by its key-encryption key.

use serde::{Deserialize, Serialize};

use super::{Client, ClientError, pod_path};

/// A snapshot's key as the API carries it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotKey {
    /// Which snapshot of the pod (1-64 letters, digits, '-' or '_'): a key
    /// is only released for the snapshot it was stored for.
    pub snapshot: String,
    /// The 32-byte key, as 64 lowercase hex digits.
    pub key: String,
}

impl std::fmt::Debug for SnapshotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotKey")
            .field("snapshot", &self.snapshot)
            .field("key", &"..")
            .finish()
    }
}

impl SnapshotKey {
    /// What is wrong with it, if anything.
    pub fn problem(&self) -> Option<String> {
        let id_ok = !self.snapshot.is_empty()
            && self.snapshot.len() <= 64
            && self
                .snapshot
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !id_ok {
            return Some(format!(
                "snapshot {:?} is not 1-64 letters, digits, '-' or '_'",
                self.snapshot
            ));
        }
        let key_ok = self.key.len() == 64
            && self
                .key
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
        if !key_ok {
            return Some("key is not 64 lowercase hex digits (32 bytes)".into());
        }
        None
    }
}

fn key_path(namespace: &str, name: &str) -> String {
    format!("{}/snapshotkey", pod_path(namespace, name))
}

impl Client {
    /// For the pod's host: gives the server the key of the pod's snapshot
    /// (replacing the one it had).
    pub async fn put_snapshot_key(
        &self,
        namespace: &str,
        name: &str,
        key: &SnapshotKey,
    ) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .call(
                reqwest::Method::PUT,
                &key_path(namespace, name),
                &[],
                Some(key),
            )
            .await?;
        Ok(())
    }

    /// For the pod's host: the key of the pod's snapshot `snapshot`.
    pub async fn get_snapshot_key(
        &self,
        namespace: &str,
        name: &str,
        snapshot: &str,
    ) -> Result<SnapshotKey, ClientError> {
        self.call(
            reqwest::Method::GET,
            &key_path(namespace, name),
            &[("snapshot", snapshot.to_string())],
            None,
        )
        .await
    }

    /// For the pod's host: forgets the key (the snapshot is gone).
    pub async fn delete_snapshot_key(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .call(
                reqwest::Method::DELETE,
                &key_path(namespace, name),
                &[],
                None,
            )
            .await?;
        Ok(())
    }
}
