//! A pod's volumes on this host: what its plan declares ([`VolumePlan`],
//! [`MountPlan`]), the disks that back them ([`prepare`]: an `emptyDir`'s
//! scratch disk in the pod's directory, a persistent volume's data file in
//! the host's volume directory, an encrypted volume's format image), the
//! container mounts that use them, and the management server's part
//! ([`VolumeAuthority`]: what a claim is, a start's instance id, the key
//! release, whose answer the host relays to the guest without being able
//! to open it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use podvisor_api::{PersistentVolumeClaim, PodInstance, VolumeKeyRequest, VolumeKeyResponse};
use podvisor_proto::volumes::{EncryptedVolume, FormatImage};
use podvisor_proto::{Mount, MountSource, MountTarget, add_volume_mounts, volume_mount_name};
use podvisor_vmm::BlockDevice;
use serde::{Deserialize, Serialize};

use super::plan::{ContainerPlan, PodPlan};
use super::server_call::server_call_error as authority_error;

/// Size of an `emptyDir` disk without a `sizeLimit` (a sparse file: only
/// what is written takes space).
pub const DEFAULT_EMPTY_DIR_BYTES: u64 = 10 << 30;

/// One volume of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumePlan {
    pub name: String,
    pub source: VolumeSource,
}

/// Where a pod volume's file system comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeSource {
    /// `emptyDir`: an ext4 disk of this size in the pod's directory, gone
    /// with the pod.
    ScratchDisk { size_bytes: u64 },
    /// `emptyDir` with `medium: Memory`: a tmpfs in the VM (its size
    /// limit, or the kernel's default of half the VM's memory).
    Memory { size_bytes: Option<u64> },
    /// `persistentVolumeClaim`: the namespace's volume `claim`.
    Claim { claim: String, read_only: bool },
}

/// One container's use of a pod volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPlan {
    pub volume: String,
    /// Absolute path in the container.
    pub path: String,
    pub read_only: bool,
    /// A directory inside the volume instead of its root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

/// Why a pod's volumes cannot be made ready.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: {message}")]
    Refused { volume: String, message: String },
    #[error("volume {volume}: the management server did not answer")]
    Unreachable {
        volume: String,
        #[source]
        source: AuthorityError,
    },
    #[error("volume {volume}: {what}")]
    Disk {
        volume: String,
        what: String,
        #[source]
        source: podvisor_volume::VolumeError,
    },
}

impl VolumeError {
    /// Worth trying again later (the server did not answer).
    pub fn retryable(&self) -> bool {
        matches!(self, VolumeError::Unreachable { .. })
    }
}

/// A failed call to the management server about volumes.
pub type AuthorityError = super::server_call::ServerCallError;

/// The management server's part in a pod's volumes.
#[async_trait::async_trait]
pub trait VolumeAuthority: Send + Sync {
    /// The volume (claim) `name` of `namespace`.
    async fn claim(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PersistentVolumeClaim, AuthorityError>;
    /// Records that the plain volume now holds a file system.
    async fn formatted(&self, namespace: &str, name: &str) -> Result<(), AuthorityError>;
    /// A new instance id for this start of the pod.
    async fn new_instance(&self, plan: &PodPlan) -> Result<PodInstance, AuthorityError>;
    /// Relays the guest's key request.
    async fn request_keys(
        &self,
        plan: &PodPlan,
        request: &VolumeKeyRequest,
    ) -> Result<VolumeKeyResponse, AuthorityError>;
}

/// The management server as the authority, through its API with the
/// host's token.
pub struct ServerAuthority(pub podvisor_api::Client);

#[async_trait::async_trait]
impl VolumeAuthority for ServerAuthority {
    async fn claim(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PersistentVolumeClaim, AuthorityError> {
        self.0
            .get_volume(namespace, name)
            .await
            .map_err(authority_error(format!(
                "get persistentvolumeclaim {namespace}/{name}"
            )))
    }

    async fn formatted(&self, namespace: &str, name: &str) -> Result<(), AuthorityError> {
        self.0
            .mark_volume_formatted(namespace, name)
            .await
            .map_err(authority_error(format!(
                "record volume {namespace}/{name} as formatted"
            )))
            .map(|_| ())
    }

    async fn new_instance(&self, plan: &PodPlan) -> Result<PodInstance, AuthorityError> {
        self.0
            .new_pod_instance(&plan.namespace, &plan.name)
            .await
            .map_err(authority_error(format!(
                "get an instance id for pod {}",
                plan.key()
            )))
    }

    async fn request_keys(
        &self,
        plan: &PodPlan,
        request: &VolumeKeyRequest,
    ) -> Result<VolumeKeyResponse, AuthorityError> {
        self.0
            .request_volume_keys(&plan.namespace, &plan.name, request)
            .await
            .map_err(authority_error(format!(
                "ask for the volume keys of pod {}",
                plan.key()
            )))
    }
}

/// A pod's volumes, ready to attach.
#[derive(Debug, Clone, Default)]
pub struct PreparedVolumes {
    /// The volumes' disks and format images.
    pub disks: Vec<BlockDevice>,
    /// The encrypted volumes whose keys the guest must ask for.
    pub encrypted: Vec<EncryptedVolume>,
    /// Each pod volume's shared mount in the VM.
    shared: HashMap<String, Mount>,
    /// Volumes mounted read-only everywhere (a claim's `readOnly`).
    read_only: Vec<String>,
}

/// Where the host keeps its volumes' files.
#[derive(Debug, Clone)]
pub struct VolumeDirs {
    /// Persistent volumes: `<dir>/<namespace>/<name>-<uid>.img`.
    pub volumes: PathBuf,
    /// Format images of encrypted volumes, one per size, shared.
    pub format_images: PathBuf,
}

/// The data file of persistent volume `claim` (uid `uid`).
pub fn claim_file(dirs: &VolumeDirs, claim: &PersistentVolumeClaim) -> Result<PathBuf, String> {
    let ns = claim.metadata.namespace();
    let name = &claim.metadata.name;
    let uid = claim.metadata.uid.clone().unwrap_or_default();
    let safe = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            && !s.starts_with('.')
    };
    if !safe(ns) || !safe(name) || !safe(&uid) {
        return Err(format!(
            "the server's volume {ns}/{name} (uid {uid:?}) has a name unsafe as a file name"
        ));
    }
    Ok(dirs.volumes.join(ns).join(format!("{name}-{uid}.img")))
}

fn size_of(claim: &PersistentVolumeClaim) -> Result<u64, String> {
    let q = claim
        .status
        .capacity
        .get("storage")
        .or_else(|| claim.spec.resources.requests.get("storage"))
        .ok_or("it has no size")?;
    q.bytes()
        .map(podvisor_volume::disk_size)
        .map_err(|e| format!("its size {} is not a size: {e}", q.as_str()))
}

/// Makes the disks of `plan`'s volumes ready (creating and formatting what
/// is new) and says what to attach. `scratch_dir` is the pod's own
/// directory for `emptyDir` disks.
pub async fn prepare(
    plan: &PodPlan,
    dirs: &VolumeDirs,
    scratch_dir: &Path,
    authority: Option<&dyn VolumeAuthority>,
) -> Result<PreparedVolumes, VolumeError> {
    let mut out = PreparedVolumes::default();
    let disk_err = |volume: &str, what: String| {
        let volume = volume.to_string();
        move |source| VolumeError::Disk {
            volume,
            what,
            source,
        }
    };
    for (i, v) in plan.volumes.iter().enumerate() {
        let serial = format!("pvv{i}");
        let shared = volume_mount_name(&v.name);
        match &v.source {
            VolumeSource::Memory { size_bytes } => {
                let mut options = vec!["nosuid".into(), "nodev".into(), "mode=1777".into()];
                if let Some(s) = size_bytes {
                    options.push(format!("size={s}"));
                }
                out.shared.insert(
                    v.name.clone(),
                    Mount {
                        source: MountSource::Anonymous,
                        fstype: "tmpfs".into(),
                        target: MountTarget::Shared { name: shared },
                        options,
                        read_only: false,
                    },
                );
            }
            VolumeSource::ScratchDisk { size_bytes } => {
                let path = scratch_dir.join(format!("{}.img", v.name));
                if !path.exists() {
                    let (p, size) = (path.clone(), podvisor_volume::disk_size(*size_bytes));
                    blocking(move || podvisor_volume::format_ext4(&p, size))
                        .await
                        .map_err(disk_err(&v.name, "make its scratch disk".into()))?;
                }
                out.add_disk(
                    &v.name,
                    path,
                    serial,
                    MountSource::Disk {
                        serial: String::new(),
                    },
                );
            }
            VolumeSource::Claim { claim, read_only } => {
                let Some(authority) = authority else {
                    return Err(VolumeError::Refused {
                        volume: v.name.clone(),
                        message: "persistent volumes need a management server; this host runs \
                                  without one"
                            .into(),
                    });
                };
                let refused = |message: String| VolumeError::Refused {
                    volume: v.name.clone(),
                    message,
                };
                let pvc = authority
                    .claim(&plan.namespace, claim)
                    .await
                    .map_err(|source| match source.retryable {
                        true => VolumeError::Unreachable {
                            volume: v.name.clone(),
                            source,
                        },
                        false => refused(format!(
                            "persistentvolumeclaim {claim}: {}",
                            podvisor_errors::ErrorChain(&source)
                        )),
                    })?;
                match &pvc.status.attached_to {
                    Some(a) if a.pod_uid == plan.uid => {}
                    Some(a) => {
                        return Err(refused(format!(
                            "persistentvolumeclaim {claim} is attached to pod {}/{}",
                            plan.namespace, a.pod
                        )));
                    }
                    None => {
                        return Err(refused(format!(
                            "persistentvolumeclaim {claim} is not attached to this pod yet"
                        )));
                    }
                }
                let size = size_of(&pvc).map_err(|m| refused(format!("{claim}: {m}")))?;
                let path = claim_file(dirs, &pvc).map_err(refused)?;
                let exists = path.exists();
                if !exists && pvc.status.formatted {
                    return Err(refused(format!(
                        "the data of persistentvolumeclaim {claim} is missing ({}); it held a \
                         file system, so podvisor will not make an empty one in its place",
                        path.display()
                    )));
                }
                if pvc.status.encrypted {
                    if !exists {
                        let p = path.clone();
                        blocking(move || podvisor_volume::create_sparse(&p, size))
                            .await
                            .map_err(disk_err(&v.name, "make its data file".into()))?;
                    }
                    let format_image = if pvc.status.formatted {
                        None
                    } else {
                        let dir = dirs.format_images.clone();
                        let image =
                            blocking(move || podvisor_volume::FormatImage::make(&dir, size))
                                .await
                                .map_err(disk_err(&v.name, "make its format image".into()))?;
                        let fserial = format!("pvf{i}");
                        out.disks.push(BlockDevice {
                            id: format!("fmt{i}"),
                            path: image.path.clone(),
                            read_only: true,
                            serial: fserial.clone(),
                        });
                        Some(FormatImage {
                            serial: fserial,
                            size,
                            extents: image.extents.clone(),
                        })
                    };
                    out.encrypted.push(EncryptedVolume {
                        name: claim.clone(),
                        serial: serial.clone(),
                        format_image,
                    });
                    out.add_disk(
                        &v.name,
                        path,
                        serial,
                        MountSource::Encrypted {
                            volume: claim.clone(),
                        },
                    );
                } else {
                    if !exists {
                        let p = path.clone();
                        blocking(move || podvisor_volume::format_ext4(&p, size))
                            .await
                            .map_err(disk_err(&v.name, "format it".into()))?;
                    }
                    if !pvc.status.formatted {
                        authority
                            .formatted(&plan.namespace, claim)
                            .await
                            .map_err(|source| VolumeError::Unreachable {
                                volume: v.name.clone(),
                                source,
                            })?;
                    }
                    out.add_disk(
                        &v.name,
                        path,
                        serial,
                        MountSource::Disk {
                            serial: String::new(),
                        },
                    );
                }
                if *read_only {
                    out.read_only.push(v.name.clone());
                }
            }
        }
    }
    Ok(out)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, podvisor_volume::VolumeError> + Send + 'static,
) -> Result<T, podvisor_volume::VolumeError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(podvisor_volume::VolumeError::Io {
            what: "a task making a volume disk failed",
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })
    })
}

impl PreparedVolumes {
    /// Attaches `path` as a read-write disk with `serial`, the volume's
    /// shared mount an ext4 from `source` (a `Disk` source gets the
    /// serial).
    fn add_disk(&mut self, volume: &str, path: PathBuf, serial: String, source: MountSource) {
        let source = match source {
            MountSource::Disk { .. } => MountSource::Disk {
                serial: serial.clone(),
            },
            other => other,
        };
        self.disks.push(BlockDevice {
            id: format!("vol-{serial}"),
            path,
            read_only: false,
            serial,
        });
        self.shared.insert(
            volume.to_string(),
            Mount {
                source,
                fstype: "ext4".into(),
                target: MountTarget::Shared {
                    name: volume_mount_name(volume),
                },
                options: vec!["nosuid".into(), "nodev".into()],
                read_only: false,
            },
        );
    }

    /// Adds `container`'s volume mounts to `mounts` (an image's: shared
    /// layers, then the root): each volume's shared mount before the root,
    /// the binds after it.
    pub fn add_mounts(&self, container: &ContainerPlan, mounts: &mut Vec<Mount>) {
        let mut shared = Vec::new();
        let mut binds = Vec::new();
        for m in &container.volume_mounts {
            let Some(s) = self.shared.get(&m.volume) else {
                continue;
            };
            if !shared.contains(s) {
                shared.push(s.clone());
            }
            binds.push(Mount::volume_bind(
                &m.volume,
                m.sub_path.as_deref(),
                &m.path,
                m.read_only || self.read_only.contains(&m.volume),
            ));
        }
        add_volume_mounts(mounts, shared, binds);
    }
}

/// The encrypted volumes (claim names, among `encrypted`) `container`
/// mounts.
pub fn encrypted_claims_of(
    plan: &PodPlan,
    container: &ContainerPlan,
    encrypted: &[EncryptedVolume],
) -> Vec<String> {
    let mut out = Vec::new();
    for m in &container.volume_mounts {
        let Some(v) = plan.volumes.iter().find(|v| v.name == m.volume) else {
            continue;
        };
        if let VolumeSource::Claim { claim, .. } = &v.source
            && encrypted.iter().any(|e| &e.name == claim)
            && !out.contains(claim)
        {
            out.push(claim.clone());
        }
    }
    out
}
