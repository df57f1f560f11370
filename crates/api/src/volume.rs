//! Volumes: what a pod declares (`spec.volumes`, each container's
//! `volumeMounts`) and the persistent volumes of a namespace
//! ([`PersistentVolumeClaim`], Kubernetes' shape; podvisor has no separate
//! PersistentVolume object: a claim *is* the volume), plus the messages of
//! the key release of encrypted volumes (a pod start's instance id, the
//! key request and its answer).
//!
//! An encrypted volume's key is released by the server only to the pod
//! entitled to it, sealed to a key pair made inside the pod's VM (see
//! `podvisor_proto::volumes`); the host daemon that relays it sees only
//! ciphertext.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::meta::{ListMeta, ObjectMeta};
use crate::quantity::Quantity;

/// The annotation of a [`PersistentVolumeClaim`] asking for an encrypted
/// volume (`"true"`).
pub const ENCRYPTED_ANNOTATION: &str = "podvisor.io/encrypted";

/// A volume of a pod (`spec.volumes[]`): exactly one source is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Volume {
    /// A DNS-1123 label, unique in the pod.
    pub name: String,
    /// Scratch space that lives as long as the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolumeSource>,
    /// A persistent volume of the pod's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
}

/// `emptyDir`: a disk on the host (the default) or, with `medium: Memory`,
/// a tmpfs in the pod VM's memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmptyDirVolumeSource {
    /// `""` (disk) or `Memory`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub medium: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<Quantity>,
}

/// `persistentVolumeClaim`: the volume named `claimName` in the pod's
/// namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PersistentVolumeClaimVolumeSource {
    pub claim_name: String,
    /// Mount it read-only in every container.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// A container's use of a pod volume (`containers[].volumeMounts[]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeMount {
    /// The pod volume's name.
    pub name: String,
    /// Absolute path in the container, without `..`.
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// A directory inside the volume to mount instead of its root:
    /// relative, without `..`; made if missing.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sub_path: String,
}

/// A persistent volume of a namespace, asked for as Kubernetes users ask
/// for storage. podvisor makes the volume itself (there is no provisioner
/// or PersistentVolume object): a disk file of `resources.requests.storage`
/// on the storage of the host that first attaches it, ext4 inside;
/// encrypted (dm-crypt in the guest, the key released by the server) with
/// the [`ENCRYPTED_ANNOTATION`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PersistentVolumeClaim {
    #[serde(default = "v1")]
    pub api_version: String,
    #[serde(default = "pvc_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: PersistentVolumeClaimSpec,
    #[serde(default)]
    pub status: PersistentVolumeClaimStatus,
}

fn v1() -> String {
    "v1".into()
}
fn pvc_kind() -> String {
    "PersistentVolumeClaim".into()
}

/// What the user asks for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PersistentVolumeClaimSpec {
    /// `ReadWriteOnce` or `ReadWriteOncePod` (both mean: one pod at a
    /// time); empty means `ReadWriteOnce`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_modes: Vec<String>,
    pub resources: VolumeResourceRequirements,
    /// `Filesystem` (the only mode) or unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
    /// Unset, empty or `podvisor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// `resources.requests.storage`: the volume's size.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeResourceRequirements {
    #[serde(default)]
    pub requests: BTreeMap<String, Quantity>,
}

/// What the server knows of a volume. Only the server writes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PersistentVolumeClaimStatus {
    /// `Pending` until a pod first used it, then `Bound`.
    #[serde(default)]
    pub phase: String,
    /// `storage`: the size.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capacity: BTreeMap<String, Quantity>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// It holds a file system: never format it again. For an encrypted
    /// volume set when the server released its key with the order to
    /// format; for a plain one when the host reported it formatted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub formatted: bool,
    /// No key will be released again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// The host whose storage holds the volume's data (set when it is
    /// first attached on a host with storage of its own); pods using it
    /// run there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The shared storage holding the volume's data (set when it is first
    /// attached on a host whose `volumeStorage` names one); pods using it
    /// run on any host naming that storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// The pod it is attached to (read-write, at most one at a time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<VolumeAttachment>,
}

/// The pod a volume is attached to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeAttachment {
    /// The pod's name (in the volume's namespace).
    pub pod: String,
    pub pod_uid: String,
    pub host: String,
}

/// A list of volumes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct PersistentVolumeClaimList {
    #[serde(default = "v1")]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ListMeta,
    pub items: Vec<PersistentVolumeClaim>,
}

/// A start of a pod's VM, issued by the server to the pod's host
/// (`POST .../pods/NAME/instances`): key requests name it, and the server
/// releases keys for one instance once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodInstance {
    pub instance: String,
    /// The pod's uid the instance belongs to.
    pub pod_uid: String,
}

/// A pod's request for its encrypted volumes' keys, relayed by its host
/// (`POST .../pods/NAME/volumekeys`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeKeyRequest {
    /// The instance id of this start of the pod.
    pub instance: String,
    /// The guest's X25519 public key, base64 (standard, padded).
    pub public_key: String,
    /// Names of the volumes (claims) asked for.
    pub volumes: Vec<String>,
}

/// The server's answer: the released keys sealed to the guest's public
/// key under the context `namespace/pod/uid/instance`
/// (`podvisor_proto::volumes::seal`), and per volume what was decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeKeyResponse {
    /// base64 of the sealed envelope; `None` when nothing was released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
    /// Volumes whose keys are in `sealed`.
    #[serde(default)]
    pub released: Vec<ReleasedVolume>,
    /// Volumes refused, with why.
    #[serde(default)]
    pub refused: Vec<RefusedVolume>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleasedVolume {
    pub volume: String,
    /// The guest formats it first (the server has now recorded it as
    /// formatted).
    pub format: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RefusedVolume {
    pub volume: String,
    /// `KeyDenied`.
    pub reason: String,
    /// What check failed, for the container's status and the audit log.
    pub message: String,
}

/// One entry of a volume's audit log (append-only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeAuditEntry {
    pub time: DateTime<Utc>,
    /// `create`, `release`, `refuse`, `revoke`, `format`, `delete`,
    /// `attach`, `detach`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The host (or user) that asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A volume's audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct VolumeAuditLog {
    pub volume: String,
    pub namespace: String,
    pub entries: Vec<VolumeAuditEntry>,
}

impl PersistentVolumeClaim {
    /// An empty claim named `name` in `namespace` of `storage` bytes
    /// (a quantity such as `1Gi`).
    pub fn new(namespace: &str, name: &str, storage: &str, encrypted: bool) -> Self {
        let mut metadata = ObjectMeta {
            name: name.to_string(),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        };
        if encrypted {
            metadata
                .annotations
                .insert(ENCRYPTED_ANNOTATION.into(), "true".into());
        }
        let mut requests = BTreeMap::new();
        requests.insert("storage".to_string(), Quantity::new(storage));
        PersistentVolumeClaim {
            api_version: v1(),
            kind: pvc_kind(),
            metadata,
            spec: PersistentVolumeClaimSpec {
                access_modes: vec!["ReadWriteOnce".into()],
                resources: VolumeResourceRequirements { requests },
                ..Default::default()
            },
            status: PersistentVolumeClaimStatus::default(),
        }
    }

    /// `NAMESPACE/NAME`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    /// Whether the user asked for an encrypted volume (the annotation).
    pub fn wants_encryption(&self) -> bool {
        self.metadata
            .annotations
            .get(ENCRYPTED_ANNOTATION)
            .is_some_and(|v| v == "true")
    }

    /// `spec.resources.requests.storage`, if set.
    pub fn storage(&self) -> Option<&Quantity> {
        self.spec.resources.requests.get("storage")
    }

    /// The size in bytes (0 if unset or unreadable).
    pub fn size_bytes(&self) -> u64 {
        self.storage().and_then(|q| q.bytes().ok()).unwrap_or(0)
    }

    /// Why `self` (as applied) may not replace `current` (as stored):
    /// the spec and the encryption annotation are immutable, and resizing
    /// is not supported. `None` if only labels and other annotations
    /// changed.
    pub fn change_problem(&self, current: &PersistentVolumeClaim) -> Option<String> {
        if self.storage() != current.storage() && self.size_bytes() != current.size_bytes() {
            return Some(format!(
                "spec.resources.requests.storage: resizing is not supported (the volume is {}, asked for {})",
                current
                    .storage()
                    .map_or("unset".to_string(), |q| q.to_string()),
                self.storage()
                    .map_or("unset".to_string(), |q| q.to_string())
            ));
        }
        let mut a = self.spec.clone();
        a.resources = current.spec.resources.clone();
        if a != current.spec {
            return Some(
                "spec: a PersistentVolumeClaim's spec is immutable: delete and re-create it".into(),
            );
        }
        if self.wants_encryption() != current.wants_encryption() {
            return Some(format!(
                "metadata.annotations[{ENCRYPTED_ANNOTATION}]: a volume cannot change between plain and encrypted"
            ));
        }
        None
    }
}

impl VolumeAuditEntry {
    /// An entry of `action` now, by `by`, saying `message`.
    pub fn new(action: &str, by: &str, message: impl Into<String>) -> Self {
        VolumeAuditEntry {
            time: Utc::now(),
            action: action.to_string(),
            pod: None,
            pod_uid: None,
            instance: None,
            by: Some(by.to_string()),
            message: Some(message.into()),
        }
    }
}

impl Volume {
    /// The claim this volume names, if it is a persistentVolumeClaim volume.
    pub fn claim(&self) -> Option<&str> {
        self.persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.as_str())
    }
}

impl crate::pod::PodSpec {
    /// The claims the pod's volumes name, in order.
    pub fn claims(&self) -> Vec<&str> {
        self.volumes.iter().filter_map(Volume::claim).collect()
    }
}
