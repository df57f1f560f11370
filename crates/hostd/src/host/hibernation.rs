//! What the host runtime keeps and needs to hibernate pods: the record of
//! a hibernated pod ([`Hibernated`]), the pod's hibernation as its state
//! reports it ([`HibernationStatus`]), who keeps the snapshots' keys
//! ([`KeyCustody`]: the management server, never the host's disk), and
//! when a pod counts as idle ([`Activity`]).

use std::time::{Duration, Instant, SystemTime};

use podvisor_hibernate::{Snapshot, SnapshotKey};
use podvisor_proto::ContainerSpec;
use podvisor_vmm::BlockDevice;
use serde::{Deserialize, Serialize};

use super::plan::PodPlan;
use super::server_call::server_call_error as custody_error;

/// A hibernated pod as its record keeps it: the snapshot (not its key)
/// and what its VM is loaded with again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hibernated {
    pub snapshot: Snapshot,
    /// When it went to sleep.
    pub since: SystemTime,
    /// When the VM in the snapshot booted.
    pub booted_at: SystemTime,
    /// The VM's disks (the layers its containers run on, on virtio-blk,
    /// and its volumes).
    pub disks: Vec<BlockDevice>,
    /// The VM's layers on virtio-pmem (records written before they could
    /// be have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmem: Vec<podvisor_vmm::PmemDevice>,
    /// What each container runs (as in [`super::records::VmRecord`]).
    pub containers: Vec<Option<ContainerSpec>>,
    /// The VM's encrypted volumes: their keys were wiped before the save,
    /// and are asked for again after the wake.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encrypted: Vec<podvisor_proto::volumes::EncryptedVolume>,
}

/// The pod's hibernation, as its state reports it (the API's `Hibernated`
/// condition): asleep now, or the last wake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HibernationStatus {
    /// Its VM is in a snapshot now.
    pub asleep: bool,
    /// When it went to sleep or woke.
    pub since: SystemTime,
    /// `Hibernated`, `Idle` (by its `hibernate-after` policy), `Woken`,
    /// `WakeFailed`.
    pub reason: String,
    pub message: String,
}

/// Who the snapshot belongs to: bound into it (authenticated), so that a
/// snapshot never loads as another pod.
pub fn snapshot_context(plan: &PodPlan) -> Vec<u8> {
    format!(
        "podvisor pod {}/{} uid {}",
        plan.namespace, plan.name, plan.uid
    )
    .into_bytes()
}

/// A key that was not handed over or given back.
pub type CustodyError = super::server_call::ServerCallError;

/// Keeps the keys of the pods' snapshots off this host: the host hands a
/// key over when it hibernates a pod and asks for it when it wakes the pod
/// (also after its daemon restarted).
#[async_trait::async_trait]
pub trait KeyCustody: Send + Sync {
    /// Keeps `key` for the pod's snapshot `snapshot` (replacing any
    /// other key of the pod).
    async fn put(
        &self,
        plan: &PodPlan,
        snapshot: &str,
        key: &SnapshotKey,
    ) -> Result<(), CustodyError>;
    /// The key of the pod's snapshot `snapshot`.
    async fn get(&self, plan: &PodPlan, snapshot: &str) -> Result<SnapshotKey, CustodyError>;
    /// Forgets the pod's key (its snapshot is gone).
    async fn delete(&self, plan: &PodPlan) -> Result<(), CustodyError>;
}

/// The management server as the keys' keeper, through its API with the
/// host's token.
pub struct ServerCustody(pub podvisor_api::Client);

#[async_trait::async_trait]
impl KeyCustody for ServerCustody {
    async fn put(
        &self,
        plan: &PodPlan,
        snapshot: &str,
        key: &SnapshotKey,
    ) -> Result<(), CustodyError> {
        let key = podvisor_api::client::SnapshotKey {
            snapshot: snapshot.to_string(),
            key: key.to_hex(),
        };
        self.0
            .put_snapshot_key(&plan.namespace, &plan.name, &key)
            .await
            .map_err(custody_error(format!(
                "the server did not take the key of snapshot {snapshot}"
            )))
    }

    async fn get(&self, plan: &PodPlan, snapshot: &str) -> Result<SnapshotKey, CustodyError> {
        let what = format!("the server did not give the key of snapshot {snapshot}");
        let key = self
            .0
            .get_snapshot_key(&plan.namespace, &plan.name, snapshot)
            .await
            .map_err(custody_error(what.clone()))?;
        if key.snapshot != snapshot {
            return Err(CustodyError {
                what,
                retryable: false,
                source: format!("it answered with the key of snapshot {}", key.snapshot).into(),
            });
        }
        SnapshotKey::from_hex(&key.key).map_err(|e| CustodyError {
            what,
            retryable: false,
            source: Box::new(e),
        })
    }

    async fn delete(&self, plan: &PodPlan) -> Result<(), CustodyError> {
        self.0
            .delete_snapshot_key(&plan.namespace, &plan.name)
            .await
            .map_err(custody_error("the server did not forget the key".into()))
    }
}

/// When a running pod was last used, for its `hibernate-after` policy:
/// traffic to it (frames its NIC took in), an exec session, a log
/// follower.
pub(super) struct Activity {
    /// The NIC's frame count at the last look.
    frames: Option<u64>,
    /// When something last happened.
    last: Instant,
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            frames: None,
            last: Instant::now(),
        }
    }

    /// Something happened now.
    pub fn touch(&mut self) {
        self.last = Instant::now();
    }

    /// Takes a look: `frames` the NIC's count now (`None`: no NIC),
    /// `busy` an exec session or log follower attached. Returns how long
    /// the pod has been idle.
    pub fn look(&mut self, frames: Option<u64>, busy: bool) -> Duration {
        if busy || matches!((self.frames, frames), (Some(a), Some(b)) if a != b) {
            self.touch();
        }
        self.frames = frames;
        self.last.elapsed()
    }
}

/// How often a pod with a `hibernate-after` policy is looked at: a
/// quarter of its idle time, between 250 ms and 10 s.
pub(super) fn idle_check_period(after: Duration) -> Duration {
    (after / 4).clamp(Duration::from_millis(250), Duration::from_secs(10))
}

/// `15.1 MiB`.
pub(super) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_sessions_and_followers_count_as_use() {
        let mut a = Activity::new();
        std::thread::sleep(Duration::from_millis(20));
        // The first look sets the count; the pod was started 20 ms ago.
        assert!(a.look(Some(5), false) >= Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(20));
        assert!(a.look(Some(5), false) >= Duration::from_millis(40));
        assert!(a.look(Some(6), false) < Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(20));
        assert!(a.look(Some(6), true) < Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(20));
        assert!(a.look(None, false) >= Duration::from_millis(20));
    }

    #[test]
    fn the_idle_check_period_is_bounded() {
        assert_eq!(
            idle_check_period(Duration::from_secs(3)),
            Duration::from_millis(750)
        );
        assert_eq!(
            idle_check_period(Duration::from_millis(100)),
            Duration::from_millis(250)
        );
        assert_eq!(
            idle_check_period(Duration::from_secs(3600)),
            Duration::from_secs(10)
        );
    }
}
