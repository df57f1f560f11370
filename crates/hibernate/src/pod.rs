//! A pod VM into a sealed snapshot and back: [`hibernate`] saves the
//! running VM under a fresh key into a file of its own (mode 0600, written
//! under a temporary name and renamed only once whole and synced) and
//! stops its QEMU; a snapshot that cannot be written (a full disk) leaves
//! the pod running and says why. [`wake`] authenticates the whole file
//! before a VM starts, loads it onto the devices and PCI slots it was
//! saved with, and gives the guest its own identity again (same hostname;
//! fresh entropy; the host's clock, stepped at once).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use podvisor_podvm::{LoadSpec, NodeConfig, PodVm, PodVmError, PodVmSpec};
use podvisor_proto::AgentInfo;
use podvisor_vmm::{AfterSave, PciLayout};
use serde::{Deserialize, Serialize};

use crate::sealed::{OpenedSnapshot, SealError, SealedWriter, SnapshotKey};

/// A snapshot as a pod's record keeps it: where it is and what loading it
/// needs. Its key is not here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Random, 16 hex digits: names the file and the key the server keeps.
    pub id: String,
    pub path: PathBuf,
    /// The saved VM's PCI slots; the loading VM must have the same.
    pub pci: PciLayout,
    /// What the saved VM's agent said when it was ready.
    pub agent: AgentInfo,
    /// Bytes of VM state, and of the sealed file.
    pub state_bytes: u64,
    pub sealed_bytes: u64,
    /// When it was taken, in milliseconds since the epoch.
    pub taken_unix_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HibernateError {
    #[error("the snapshot could not be written to {}; the pod runs on", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the pod VM stopped after its snapshot failed")]
    Lost(#[source] PodVmError),
    #[error("snapshot {id} ({}) is missing or unreadable", path.display())]
    Missing {
        id: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snapshot {id} was refused")]
    Refused {
        id: String,
        #[source]
        source: SealError,
    },
    #[error("the pod VM did not come back from snapshot {id}")]
    Load {
        id: String,
        #[source]
        source: PodVmError,
    },
    #[error("making a snapshot")]
    Key(#[source] SealError),
    /// This kind of sandbox cannot be hibernated.
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("the hibernation was abandoned")]
    Abandoned(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the snapshot's key was not taken into custody")]
    KeyNotKept(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A hibernation that did not happen: why, and the pod VM if it still
/// runs (the caller keeps serving it).
pub struct NotHibernated {
    pub pod: Option<PodVm>,
    pub error: HibernateError,
}

impl std::fmt::Debug for NotHibernated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotHibernated")
            .field("pod_runs", &self.pod.is_some())
            .field("error", &self.error)
            .finish()
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A pod VM whose state is saved in a sealed snapshot, paused: either
/// [`Saved::commit`] (its QEMU exits; the snapshot is now the pod) once
/// the key is in safe hands, or [`Saved::abort`] (the snapshot goes; the
/// VM runs on).
pub struct Saved {
    pod: PodVm,
    pub snapshot: Snapshot,
    pub key: SnapshotKey,
}

impl std::fmt::Debug for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saved")
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}

impl Saved {
    /// Stops the paused VM: from now on the pod lives in the snapshot.
    /// Returns the snapshot and its key (hand it to whoever keeps it, then
    /// drop it).
    pub async fn commit(self) -> (Snapshot, SnapshotKey) {
        self.pod.kill().await;
        (self.snapshot, self.key)
    }

    /// Deletes the snapshot and lets the VM run on (with a new agent
    /// channel); `why` is what stopped the hibernation.
    pub async fn abort(mut self, why: HibernateError) -> NotHibernated {
        if let Err(e) = remove(&self.snapshot) {
            tracing::warn!(path = %self.snapshot.path.display(), "cannot remove an abandoned snapshot: {e}");
        }
        match self.pod.resume_after_failed_save().await {
            Ok(()) => NotHibernated {
                pod: Some(self.pod),
                error: why,
            },
            Err(e) => {
                tracing::warn!(error = %podvisor_errors::ErrorChain(&why), "hibernation abandoned");
                NotHibernated {
                    pod: None,
                    error: HibernateError::Lost(e),
                }
            }
        }
    }
}

/// Saves `pod` into a new sealed snapshot in `dir` (made 0700 if missing),
/// bound to `context` (who the pod is), and stops its VM. Returns the
/// snapshot and its key, which the caller hands to whoever keeps it and
/// then drops.
pub async fn hibernate(
    pod: PodVm,
    dir: &Path,
    context: &[u8],
) -> Result<(Snapshot, SnapshotKey), NotHibernated> {
    Ok(save(pod, dir, context).await?.commit().await)
}

/// Saves `pod` into a new sealed snapshot in `dir` (made 0700 if missing)
/// under a fresh key, bound to `context` (who the pod is), and leaves it
/// paused ([`Saved`]). A snapshot that cannot be written leaves the pod
/// running and says why.
pub async fn save(mut pod: PodVm, dir: &Path, context: &[u8]) -> Result<Saved, NotHibernated> {
    let fail = |pod, error| NotHibernated {
        pod: Some(pod),
        error,
    };
    let key = match SnapshotKey::generate() {
        Ok(k) => k,
        Err(e) => return Err(fail(pod, HibernateError::Key(e))),
    };
    let id = match podvisor_store::random_hex(8) {
        Ok(id) => id,
        Err(e) => return Err(fail(pod, HibernateError::Key(SealError::Random(e)))),
    };
    let path = dir.join(format!("{id}.sealed"));
    let tmp = dir.join(format!(".{id}.sealed.tmp"));
    let write_error = |source: Box<dyn std::error::Error + Send + Sync>| HibernateError::Write {
        path: path.clone(),
        source,
    };
    let file = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
        });
    let file = match file {
        Ok(f) => f,
        Err(e) => return Err(fail(pod, write_error(Box::new(e)))),
    };
    let writer = match SealedWriter::new(file, &key, context) {
        Ok(w) => w.shared(),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(pod, write_error(Box::new(e))));
        }
    };
    let saved = pod
        .save_state(Box::new(writer.clone()), AfterSave::Paused)
        .await
        .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
        .and_then(|_| {
            let (file, summary) = writer.finish()?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(dir).and_then(|d| d.sync_all())?;
            Ok(summary)
        });
    let summary = match saved {
        Ok(s) => s,
        Err(source) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(match pod.resume_after_failed_save().await {
                Ok(()) => fail(pod, write_error(source)),
                Err(e) => {
                    tracing::warn!(error = %podvisor_errors::ErrorChain(&*source), "the snapshot failed");
                    NotHibernated {
                        pod: None,
                        error: HibernateError::Lost(e),
                    }
                }
            });
        }
    };
    let snapshot = Snapshot {
        id,
        path,
        pci: pod.pci_layout(),
        agent: pod.agent.clone(),
        state_bytes: summary.state_bytes,
        sealed_bytes: summary.sealed_bytes,
        taken_unix_ms: unix_ms(SystemTime::now()),
    };
    Ok(Saved { pod, snapshot, key })
}

/// What a pod wakes from, and as whom.
#[derive(Debug, Clone, Copy)]
pub struct WakeFrom<'a> {
    pub snapshot: &'a Snapshot,
    pub key: &'a SnapshotKey,
    /// Who the pod is, as it was bound into the snapshot.
    pub context: &'a [u8],
    /// The pod's hostname, set again.
    pub hostname: &'a str,
    /// How long the agent may take to confirm its identity.
    pub timeout: Duration,
}

/// Brings the pod back from `snapshot`: authenticates it whole (nothing of
/// a changed file reaches the VMM), loads it with `spec`'s devices at the
/// snapshot's PCI slots, and gives it its identity again within
/// `timeout`. `once_running` runs as soon as the VM runs and its identity
/// is on its way to the agent, before the agent confirms it (sending in
/// the frames that waited for the pod there saves the guest a round trip;
/// the agent reads the identity first).
pub async fn wake(
    cfg: &NodeConfig,
    mut spec: PodVmSpec,
    from: WakeFrom<'_>,
    once_running: impl std::future::Future<Output = ()> + Send,
) -> Result<PodVm, HibernateError> {
    let WakeFrom {
        snapshot,
        key,
        context,
        hostname,
        timeout,
    } = from;
    let id = snapshot.id.clone();
    let started = std::time::Instant::now();
    let file = File::open(&snapshot.path).map_err(|source| HibernateError::Missing {
        id: id.clone(),
        path: snapshot.path.clone(),
        source,
    })?;
    let opened = tokio::task::spawn_blocking({
        let key = key.clone();
        let context = context.to_vec();
        move || OpenedSnapshot::open(file, &key, &context)
    })
    .await
    .expect("the snapshot check does not panic")
    .map_err(|source| HibernateError::Refused {
        id: id.clone(),
        source,
    })?;
    tracing::debug!(snapshot = %id, elapsed = ?started.elapsed(), "snapshot authenticated");
    spec.pci = snapshot.pci.clone();
    let load = LoadSpec {
        state: Box::new(opened),
        agent: snapshot.agent.clone(),
    };
    let load_error = |source| HibernateError::Load {
        id: id.clone(),
        source,
    };
    let mut pod = PodVm::load(cfg, spec, load).await.map_err(load_error)?;
    pod.send_identity(hostname).await.map_err(load_error)?;
    once_running.await;
    pod.identity_confirmed(timeout).await.map_err(load_error)?;
    Ok(pod)
}

/// Deletes the snapshot's file (a woken or deleted pod's).
pub fn remove(snapshot: &Snapshot) -> io::Result<()> {
    match std::fs::remove_file(&snapshot.path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
