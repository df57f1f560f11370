//! Persistent volumes (`.../persistentvolumeclaims`), pod instances and
//! the key release of encrypted volumes.

use super::{Client, ClientError, pod_path};
use crate::status::Status;
use crate::volume::{
    PersistentVolumeClaim, PersistentVolumeClaimList, PodInstance, VolumeAuditLog,
    VolumeKeyRequest, VolumeKeyResponse,
};

/// What applying a volume did.
#[derive(Clone, Debug)]
pub struct AppliedVolume {
    pub volume: PersistentVolumeClaim,
    /// `created`, `configured` or `unchanged`.
    pub outcome: String,
}

/// `api/v1/namespaces/NS/persistentvolumeclaims/NAME`.
fn volume_path(namespace: &str, name: &str) -> String {
    format!("api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}")
}

impl Client {
    /// Creates a volume (409 if it exists). Its namespace is the claim's.
    pub async fn create_volume(
        &self,
        pvc: &PersistentVolumeClaim,
    ) -> Result<PersistentVolumeClaim, ClientError> {
        let path = format!(
            "api/v1/namespaces/{}/persistentvolumeclaims",
            pvc.metadata.namespace()
        );
        self.call(reqwest::Method::POST, &path, &[], Some(pvc))
            .await
    }

    /// Creates the volume, or updates its labels and annotations (its
    /// spec never changes), saying what happened.
    pub async fn apply_volume(
        &self,
        pvc: &PersistentVolumeClaim,
    ) -> Result<AppliedVolume, ClientError> {
        let path = volume_path(pvc.metadata.namespace(), &pvc.metadata.name);
        let (volume, outcome) = self.put_applied(&path, pvc).await?;
        Ok(AppliedVolume { volume, outcome })
    }

    /// The volumes of `namespace`, or of every namespace with `None`
    /// (admin and host tokens).
    pub async fn list_volumes(
        &self,
        namespace: Option<&str>,
    ) -> Result<PersistentVolumeClaimList, ClientError> {
        let path = match namespace {
            Some(ns) => format!("api/v1/namespaces/{ns}/persistentvolumeclaims"),
            None => "api/v1/persistentvolumeclaims".to_string(),
        };
        self.call(reqwest::Method::GET, &path, &[], None).await
    }

    /// One volume.
    pub async fn get_volume(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PersistentVolumeClaim, ClientError> {
        self.call(
            reqwest::Method::GET,
            &volume_path(namespace, name),
            &[],
            None,
        )
        .await
    }

    /// Deletes a volume (409 while a pod has it attached).
    pub async fn delete_volume(&self, namespace: &str, name: &str) -> Result<Status, ClientError> {
        self.call(
            reqwest::Method::DELETE,
            &volume_path(namespace, name),
            &[],
            None,
        )
        .await
    }

    /// Revokes a volume: no key of it is released again, and its pod's
    /// host is told to close it.
    pub async fn revoke_volume(&self, namespace: &str, name: &str) -> Result<Status, ClientError> {
        let path = format!("{}/revoke", volume_path(namespace, name));
        self.call(reqwest::Method::POST, &path, &[], None).await
    }

    /// The volume's audit log, oldest first.
    pub async fn volume_audit(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<VolumeAuditLog, ClientError> {
        let path = format!("{}/audit", volume_path(namespace, name));
        self.call(reqwest::Method::GET, &path, &[], None).await
    }

    /// For the host a plain volume is attached on: it now holds a file
    /// system.
    pub async fn mark_volume_formatted(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PersistentVolumeClaim, ClientError> {
        let path = format!("{}/formatted", volume_path(namespace, name));
        self.call(reqwest::Method::POST, &path, &[], None).await
    }

    /// For the pod's host, at each start of its VM: a fresh instance id.
    pub async fn new_pod_instance(
        &self,
        namespace: &str,
        pod: &str,
    ) -> Result<PodInstance, ClientError> {
        let path = format!("{}/instances", pod_path(namespace, pod));
        self.call(reqwest::Method::POST, &path, &[], None).await
    }

    /// For the pod's host, relaying the guest's request: the sealed keys
    /// of the pod's encrypted volumes.
    pub async fn request_volume_keys(
        &self,
        namespace: &str,
        pod: &str,
        request: &VolumeKeyRequest,
    ) -> Result<VolumeKeyResponse, ClientError> {
        let path = format!("{}/volumekeys", pod_path(namespace, pod));
        self.call(reqwest::Method::POST, &path, &[], Some(request))
            .await
    }
}
