//! Where objects live in the store. Every key is under `/registry/`.

/// Prefix of all pods: `/registry/pods/NAMESPACE/NAME`.
pub const PODS: &str = "/registry/pods/";
/// Prefix of all hosts: `/registry/hosts/NAME`.
pub const HOSTS: &str = "/registry/hosts/";
/// Prefix of the hosts' heartbeat leases: `/registry/host-leases/NAME`
/// (the value is the lease id; the key ends with the lease).
pub const HOST_LEASES: &str = "/registry/host-leases/";
/// Prefix of the secrets host daemons' endpoints accept from the server:
/// `/registry/host-endpoint-tokens/NAME` (never served by the API).
pub const HOST_ENDPOINT_TOKENS: &str = "/registry/host-endpoint-tokens/";
/// Prefix of API tokens: `/registry/tokens/SHA256-HEX`.
pub const TOKENS: &str = "/registry/tokens/";
/// Prefix of the keys of hibernated pods' snapshots, wrapped by the
/// server's key-encryption key: `/registry/snapshot-keys/NAMESPACE/NAME`
/// (never served by the API but to the pod's host).
pub const SNAPSHOT_KEYS: &str = "/registry/snapshot-keys/";
/// Prefix of persistent volumes (PersistentVolumeClaims):
/// `/registry/persistentvolumeclaims/NAMESPACE/NAME`.
pub const VOLUMES: &str = "/registry/persistentvolumeclaims/";
/// Prefix of the data keys of encrypted volumes, wrapped by the server's
/// key-encryption key: `/registry/volume-keys/NAMESPACE/NAME` (never
/// served by the API; released only sealed to the entitled pod).
pub const VOLUME_KEYS: &str = "/registry/volume-keys/";
/// Prefix of the volumes' append-only audit logs:
/// `/registry/volume-audit/NAMESPACE/NAME/UID/SEQUENCE` (20 digits).
pub const VOLUME_AUDIT: &str = "/registry/volume-audit/";
/// Prefix of the pods' current instances (starts of their VMs):
/// `/registry/pod-instances/NAMESPACE/NAME`.
pub const POD_INSTANCES: &str = "/registry/pod-instances/";
/// The id of the key-encryption key the cluster's secrets are wrapped with.
pub const KEK_ID: &str = "/registry/key-encryption-key-id";
/// The key whose holder runs the scheduler and the liveness checks.
pub const LEADER: &str = "/registry/leader/controllers";

pub fn pod(namespace: &str, name: &str) -> String {
    format!("{PODS}{namespace}/{name}")
}

pub fn pods_in(namespace: &str) -> String {
    format!("{PODS}{namespace}/")
}

pub fn snapshot_key(namespace: &str, name: &str) -> String {
    format!("{SNAPSHOT_KEYS}{namespace}/{name}")
}

pub fn host(name: &str) -> String {
    format!("{HOSTS}{name}")
}

pub fn host_lease(name: &str) -> String {
    format!("{HOST_LEASES}{name}")
}

pub fn host_endpoint_token(name: &str) -> String {
    format!("{HOST_ENDPOINT_TOKENS}{name}")
}

pub fn token(hash: &str) -> String {
    format!("{TOKENS}{hash}")
}

pub fn volume(namespace: &str, name: &str) -> String {
    format!("{VOLUMES}{namespace}/{name}")
}

pub fn volumes_in(namespace: &str) -> String {
    format!("{VOLUMES}{namespace}/")
}

pub fn volume_key(namespace: &str, name: &str) -> String {
    format!("{VOLUME_KEYS}{namespace}/{name}")
}

/// The prefix of the audit log of one incarnation (uid) of a volume.
pub fn volume_audit(namespace: &str, name: &str, uid: &str) -> String {
    format!("{VOLUME_AUDIT}{namespace}/{name}/{uid}/")
}

pub fn pod_instance(namespace: &str, name: &str) -> String {
    format!("{POD_INSTANCES}{namespace}/{name}")
}
