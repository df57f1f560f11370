//! The scheduler (run by the leader only): assigns each pending pod to a
//! ready host with room for its VM (CPU millicores and memory: the host's
//! capacity minus the VM sizes of the pods already assigned to it that have
//! not ended) and none of the host ports it publishes taken by such a pod,
//! preferring the least allocated host. The assignment is a
//! compare-and-swap on the pod, so no pod is ever assigned twice. A pod that
//! fits nowhere stays Pending with reason `Unschedulable` and a message
//! saying why for each host.
//!
//! Persistent volumes: a pod naming persistentVolumeClaims is bound only
//! when every claim exists in its namespace, none is attached to another
//! live pod, and then only to a host that reaches the volumes' data: the
//! host holding it (`status.host`, once set), or any host whose
//! `volumeStorage` names the shared storage holding it (`status.storage`,
//! set instead when the volume is first attached on such a host). Before
//! the pod is bound, each volume is attached to it (a compare-and-swap on
//! the volume: `attachedTo`, where its data is, phase Bound); a pass also attaches the volumes of pods pinned
//! with `spec.nodeName` (or leaves them Pending with the reason), and
//! detaches volumes whose pod is gone, was made again (another uid) or
//! has ended. Every attach and detach is in the volume's audit log. A
//! leader dying between the steps leaves nothing the next pass does not
//! finish or undo.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use podvisor_api::quantity::format_bytes;
use podvisor_api::{
    Host, HostPort, PersistentVolumeClaim, Pod, PodPhase, PodStatus, Quantity, Resources,
    VolumeAttachment, VolumeAuditEntry,
};
use podvisor_store::Store;

use crate::error::ApiError;
use crate::keys;
use crate::objects;
use crate::pod_cache::PodCache;

/// Reason of a pod that fits on no host.
pub const UNSCHEDULABLE: &str = "Unschedulable";
/// A pass also runs this often without any change (hosts may have changed).
const IDLE_PASS: Duration = Duration::from_secs(1);

/// Schedules forever.
pub async fn run(store: Arc<dyn Store>, cache: PodCache) {
    let mut updates = cache.subscribe();
    loop {
        updates.borrow_and_update();
        match pass(store.as_ref(), &cache).await {
            // The next pass must see this pass's assignments in the cache,
            // or it would count their hosts' room twice.
            Ok(written) => {
                while cache.revision() < written {
                    if updates.changed().await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "scheduling pass failed; retrying"),
        }
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(IDLE_PASS) => {}
        }
    }
}

/// Room on one host.
struct Room {
    host: Host,
    used: Resources,
    /// The host ports taken, each with the pod that holds it.
    ports: Vec<(HostPort, String)>,
}

/// What a pod needs of its host.
struct Demand {
    size: Resources,
    ports: Vec<HostPort>,
}

impl Demand {
    fn of(pod: &Pod) -> Result<Self, podvisor_api::QuantityError> {
        Ok(Self {
            size: pod.spec.vm_size()?,
            ports: pod.spec.host_ports(),
        })
    }
}

impl Room {
    fn new(host: Host) -> Self {
        Self {
            host,
            used: Resources::default(),
            ports: Vec::new(),
        }
    }

    /// Counts `demand` of pod `key` as taken.
    fn take(&mut self, key: &str, demand: Demand) {
        self.used.cpu += demand.size.cpu;
        self.used.memory += demand.size.memory;
        self.ports
            .extend(demand.ports.into_iter().map(|p| (p, key.to_string())));
    }

    /// The first of `wanted` this host has given to another pod, and that pod.
    fn taken_port(&self, wanted: &[HostPort]) -> Option<(HostPort, &str)> {
        wanted.iter().find_map(|w| {
            self.ports
                .iter()
                .find(|(p, _)| p.conflicts_with(w))
                .map(|(_, holder)| (*w, holder.as_str()))
        })
    }

    fn free(&self) -> Resources {
        Resources {
            cpu: self.host.spec.capacity.cpu.saturating_sub(self.used.cpu),
            memory: self
                .host
                .spec
                .capacity
                .memory
                .saturating_sub(self.used.memory),
        }
    }

    fn fits(&self, demand: &Demand) -> bool {
        let free = self.free();
        free.cpu >= demand.size.cpu
            && free.memory >= demand.size.memory
            && self.taken_port(&demand.ports).is_none()
    }

    /// Higher is better: the share of the host left after placing `size`.
    fn score(&self, size: Resources) -> f64 {
        let free = self.free();
        let cap = self.host.spec.capacity;
        (free.cpu - size.cpu) as f64 / cap.cpu.max(1) as f64
            + (free.memory - size.memory) as f64 / cap.memory.max(1) as f64
    }

    /// Why `demand` does not fit here.
    fn why_not(&self, demand: &Demand) -> String {
        let size = demand.size;
        let name = &self.host.metadata.name;
        if !self.host.status.ready {
            return format!("{name}: NotReady");
        }
        let free = self.free();
        let cap = self.host.spec.capacity;
        let mut lacks = Vec::new();
        if free.cpu < size.cpu {
            lacks.push(format!(
                "not enough cpu (needs {}, {} free of {})",
                Quantity::from_millicores(size.cpu),
                Quantity::from_millicores(free.cpu),
                Quantity::from_millicores(cap.cpu)
            ));
        }
        if free.memory < size.memory {
            lacks.push(format!(
                "not enough memory (needs {}, {} free of {})",
                format_bytes(size.memory),
                format_bytes(free.memory),
                format_bytes(cap.memory)
            ));
        }
        if let Some((port, holder)) = self.taken_port(&demand.ports) {
            lacks.push(format!("host port {port} is taken by pod {holder}"));
        }
        format!("{name}: {}", lacks.join(", "))
    }
}

/// One scheduling pass over the pending pods. Returns the revision of its
/// last write (0 if none).
pub async fn pass(store: &dyn Store, cache: &PodCache) -> Result<i64, ApiError> {
    let mut written = 0;
    let (hosts, _) = objects::list::<Host>(store, keys::HOSTS).await?;
    let (pods, _) = cache.snapshot();
    let storage: HashMap<String, Option<String>> = hosts
        .iter()
        .map(|h| (h.metadata.name.clone(), h.spec.volume_storage.clone()))
        .collect();
    let mut rooms: HashMap<String, Room> = hosts
        .into_iter()
        .map(|h| (h.metadata.name.clone(), Room::new(h)))
        .collect();
    let mut volumes = Volumes::load(store, &pods).await?;
    for pod in &pods {
        if pod.spec.node_name.is_some()
            && !pod.spec.claims().is_empty()
            && !pod.status.phase.is_terminal()
            && pod.metadata.deletion_timestamp.is_none()
            && let Some(w) = volumes.attach_pinned(store, pod, &storage).await?
        {
            written = written.max(w);
        }
    }
    let mut pending = Vec::new();
    for pod in &pods {
        match &pod.spec.node_name {
            Some(host) if !pod.status.phase.is_terminal() => {
                if let (Some(room), Ok(demand)) = (rooms.get_mut(host), Demand::of(pod)) {
                    room.take(&pod.key(), demand);
                }
            }
            Some(_) => {}
            None if pod.metadata.deletion_timestamp.is_none() => pending.push(pod.clone()),
            None => {}
        }
    }
    if pending.is_empty() {
        return Ok(written);
    }
    pending.sort_by(|a, b| {
        (a.metadata.creation_timestamp, a.key()).cmp(&(b.metadata.creation_timestamp, b.key()))
    });
    let mut names: Vec<String> = rooms.keys().cloned().collect();
    names.sort();
    // Decide every placement first (reserving room as we go), then write
    // them concurrently: the writes are to different keys, and a store
    // round trip per pod in series would bound throughput.
    let mut writes = Vec::new();
    for pod in pending {
        let key = keys::pod(pod.metadata.namespace(), &pod.metadata.name);
        let demand = match Demand::of(&pod) {
            Ok(demand) => demand,
            Err(e) => {
                writes.push(unschedulable(key, &pod, e.to_string()));
                continue;
            }
        };
        let on_host = match volumes.constraint(&pod) {
            Ok(on_host) => on_host,
            Err(message) => {
                writes.push(unschedulable(key, &pod, message));
                continue;
            }
        };
        let best = names
            .iter()
            .filter(|n| {
                on_host
                    .as_ref()
                    .is_none_or(|p| p.admits(n, storage.get(*n).cloned().flatten().as_deref()))
            })
            .filter_map(|n| rooms.get(n))
            .filter(|r| r.host.status.ready && r.fits(&demand))
            .max_by(|a, b| a.score(demand.size).total_cmp(&b.score(demand.size)))
            .map(|r| r.host.metadata.name.clone());
        match best {
            Some(host) => {
                let host_storage = storage.get(&host).cloned().flatten();
                if let Err(message) = volumes
                    .attach_all(store, &pod, &host, host_storage.as_deref())
                    .await?
                {
                    writes.push(unschedulable(key, &pod, message));
                    continue;
                }
                let mut bound = (*pod).clone();
                bound.spec.node_name = Some(host.clone());
                if bound.status.reason.as_deref() == Some(UNSCHEDULABLE) {
                    bound.status = PodStatus::default();
                }
                // Reserved even if the write then fails (the pod changed
                // meanwhile): the next pass counts from the cache again.
                let room = rooms.get_mut(&host).expect("chosen host is known");
                room.take(&pod.key(), demand);
                writes.push(Some((key, bound, pod.metadata.revision())));
            }
            None if matches!(on_host, Some(Placement::Host(_))) => {
                let Some(Placement::Host(host)) = on_host else {
                    unreachable!("matched above")
                };
                let why = match rooms.get(&host) {
                    Some(room) => room.why_not(&demand),
                    None => format!("{host}: not registered"),
                };
                writes.push(unschedulable(
                    key,
                    &pod,
                    format!("its volumes are on host {host}, which has no room: {why}"),
                ));
            }
            None if matches!(on_host, Some(Placement::Storage(_))) => {
                let Some(Placement::Storage(s)) = on_host else {
                    unreachable!("matched above")
                };
                let reasons: Vec<String> = names
                    .iter()
                    .filter(|n| storage.get(*n).cloned().flatten().as_deref() == Some(s.as_str()))
                    .filter_map(|n| rooms.get(n))
                    .map(|r| r.why_not(&demand))
                    .collect();
                let message = if reasons.is_empty() {
                    format!("its volumes are on storage {s}, which no registered host has")
                } else {
                    format!(
                        "its volumes are on storage {s}, and no host with it has room: {}",
                        reasons.join("; ")
                    )
                };
                writes.push(unschedulable(key, &pod, message));
            }
            None => {
                let reasons: Vec<String> = names
                    .iter()
                    .filter_map(|n| rooms.get(n))
                    .map(|r| r.why_not(&demand))
                    .collect();
                let message = if reasons.is_empty() {
                    "0/0 hosts have room: no host is registered".to_string()
                } else {
                    format!(
                        "0/{} hosts have room: {}",
                        reasons.len(),
                        reasons.join("; ")
                    )
                };
                writes.push(unschedulable(key, &pod, message));
            }
        }
    }
    let mut results =
        futures_util::stream::iter(writes.into_iter().flatten())
            .map(|(key, pod, expected)| async move {
                objects::update_if(store, &key, &pod, expected).await
            })
            .buffer_unordered(CONCURRENT_WRITES);
    while let Some(result) = results.next().await {
        if let Some(done) = result? {
            written = written.max(done.metadata.revision());
        }
    }
    Ok(written)
}

/// Store writes a pass keeps in flight at once.
const CONCURRENT_WRITES: usize = 32;

/// The write that marks `pod` Pending/Unschedulable with `message`, unless
/// it says that already.
fn unschedulable(key: String, pod: &Pod, message: String) -> Option<(String, Pod, i64)> {
    if pod.status.reason.as_deref() == Some(UNSCHEDULABLE)
        && pod.status.message.as_deref() == Some(&message)
    {
        return None;
    }
    let mut marked = pod.clone();
    marked.status = PodStatus {
        phase: PodPhase::Pending,
        reason: Some(UNSCHEDULABLE.into()),
        message: Some(message),
        ..Default::default()
    };
    Some((key, marked, pod.metadata.revision()))
}

/// The volumes as a pass sees them, by `NAMESPACE/NAME`, with the claims
/// this pass gave to pods.
struct Volumes {
    by_key: HashMap<String, PersistentVolumeClaim>,
}

fn volume_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Volumes {
    /// Lists the volumes and detaches those whose pod is gone, was made
    /// again or has ended.
    async fn load(store: &dyn Store, pods: &[Arc<Pod>]) -> Result<Volumes, ApiError> {
        let (list, _) = objects::list::<PersistentVolumeClaim>(store, keys::VOLUMES).await?;
        let live: HashMap<String, &Pod> = pods.iter().map(|p| (p.key(), p.as_ref())).collect();
        let mut by_key = HashMap::new();
        for mut pvc in list {
            let ns = pvc.metadata.namespace().to_string();
            if let Some(a) = pvc.status.attached_to.clone() {
                let why = match live.get(&volume_key(&ns, &a.pod)) {
                    None => Some("the pod is gone"),
                    Some(p) if p.metadata.uid.as_deref() != Some(a.pod_uid.as_str()) => {
                        Some("the pod was deleted and made again")
                    }
                    Some(p) if p.status.phase.is_terminal() => Some("the pod has ended"),
                    Some(_) => None,
                };
                if let Some(why) = why
                    && let Some(detached) = detach(store, &pvc, &a, why).await?
                {
                    pvc = detached;
                }
            }
            by_key.insert(volume_key(&ns, &pvc.metadata.name), pvc);
        }
        Ok(Volumes { by_key })
    }

    /// Where a pending pod must go (its volumes' host or shared storage),
    /// or why it cannot be bound now.
    fn constraint(&self, pod: &Pod) -> Result<Option<Placement>, String> {
        let ns = pod.metadata.namespace();
        let uid = pod.metadata.uid.as_deref().unwrap_or("");
        let mut host: Option<(Placement, &str)> = None;
        for claim in pod.spec.claims() {
            let Some(pvc) = self.by_key.get(&volume_key(ns, claim)) else {
                return Err(format!("persistentvolumeclaim {claim:?} not found"));
            };
            if let Some(a) = &pvc.status.attached_to
                && a.pod_uid != uid
            {
                return Err(format!("volume {claim:?} is in use by pod {ns}/{}", a.pod));
            }
            let here = match (&pvc.status.host, &pvc.status.storage) {
                (Some(h), _) => Some(Placement::Host(h.clone())),
                (None, Some(s)) => Some(Placement::Storage(s.clone())),
                (None, None) => None,
            };
            if let Some(h) = here {
                match &host {
                    Some((other, first)) if *other != h => {
                        return Err(format!(
                            "volumes {first:?} and {claim:?} are in different places ({other}, {h})"
                        ));
                    }
                    Some(_) => {}
                    None => host = Some((h, claim)),
                }
            }
        }
        Ok(host.map(|(h, _)| h))
    }

    /// Attaches every volume of `pod` to it on `host`, or none: why not.
    async fn attach_all(
        &mut self,
        store: &dyn Store,
        pod: &Pod,
        host: &str,
        host_storage: Option<&str>,
    ) -> Result<Result<(), String>, ApiError> {
        let ns = pod.metadata.namespace().to_string();
        let mut done: Vec<(PersistentVolumeClaim, VolumeAttachment)> = Vec::new();
        for claim in pod.spec.claims() {
            match attach(store, &ns, claim, pod, host, host_storage).await? {
                Ok((pvc, newly)) => {
                    if newly && let Some(a) = pvc.status.attached_to.clone() {
                        done.push((pvc.clone(), a));
                    }
                    self.by_key.insert(volume_key(&ns, claim), pvc);
                }
                Err(message) => {
                    // Undo this pod's attachments: another pod may wait
                    // for one of them.
                    for (pvc, a) in done {
                        if let Some(detached) =
                            detach(store, &pvc, &a, "the pod could not get all its volumes").await?
                        {
                            self.by_key
                                .insert(volume_key(&ns, &detached.metadata.name), detached);
                        }
                    }
                    return Ok(Err(message));
                }
            }
        }
        Ok(Ok(()))
    }

    /// For a pod bound to a host already (pinned with `spec.nodeName`):
    /// attaches its volumes there, or marks it Pending with the reason
    /// (clearing that reason once they are attached). The revision of
    /// its write, if any.
    async fn attach_pinned(
        &mut self,
        store: &dyn Store,
        pod: &Pod,
        storage: &HashMap<String, Option<String>>,
    ) -> Result<Option<i64>, ApiError> {
        let ns = pod.metadata.namespace();
        let uid = pod.metadata.uid.as_deref().unwrap_or("");
        let host = pod.spec.node_name.clone().unwrap_or_default();
        let attached = pod.spec.claims().iter().all(|c| {
            self.by_key
                .get(&volume_key(ns, c))
                .and_then(|v| v.status.attached_to.as_ref())
                .is_some_and(|a| a.pod_uid == uid)
        });
        let key = keys::pod(ns, &pod.metadata.name);
        let outcome = if attached {
            Ok(())
        } else {
            let host_storage = storage.get(&host).cloned().flatten();
            match self.constraint(pod) {
                Err(message) => Err(message),
                Ok(Some(p)) if !p.admits(&host, host_storage.as_deref()) => Err(format!(
                    "its volumes are on {p}, not on host {host} (its spec.nodeName)"
                )),
                Ok(_) => {
                    self.attach_all(store, pod, &host, host_storage.as_deref())
                        .await?
                }
            }
        };
        let write = match outcome {
            Ok(()) if pod.status.reason.as_deref() == Some(UNSCHEDULABLE) => {
                let mut cleared = pod.clone();
                cleared.status = PodStatus::default();
                Some((key, cleared, pod.metadata.revision()))
            }
            Ok(()) => None,
            Err(message) if pod.status.phase == PodPhase::Pending => {
                unschedulable(key, pod, message)
            }
            Err(message) => {
                tracing::warn!(pod = %pod.key(), %message, "a running pod's volumes cannot be attached");
                None
            }
        };
        match write {
            Some((key, pod, expected)) => Ok(objects::update_if(store, &key, &pod, expected)
                .await?
                .map(|p| p.metadata.revision())),
            None => Ok(None),
        }
    }
}

/// Where a pod's volumes are: on one host's own storage, or on shared
/// storage any host naming it can reach.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Placement {
    Host(String),
    Storage(String),
}

impl Placement {
    /// Whether host `name`, whose volume storage is `storage`, can reach
    /// the volumes.
    fn admits(&self, name: &str, storage: Option<&str>) -> bool {
        match self {
            Placement::Host(h) => h == name,
            Placement::Storage(s) => storage == Some(s.as_str()),
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placement::Host(h) => write!(f, "host {h}"),
            Placement::Storage(s) => write!(f, "storage {s}"),
        }
    }
}

/// Attaches volume `namespace/claim` to `pod` on `host` (a
/// compare-and-swap on the volume): the volume and whether it was newly
/// attached, or why not.
async fn attach(
    store: &dyn Store,
    namespace: &str,
    claim: &str,
    pod: &Pod,
    host: &str,
    host_storage: Option<&str>,
) -> Result<Result<(PersistentVolumeClaim, bool), String>, ApiError> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let name = pod.metadata.name.clone();
    let mut problem = None;
    let mut newly = false;
    let updated =
        objects::update::<PersistentVolumeClaim>(store, &keys::volume(namespace, claim), |pvc| {
            newly = false;
            problem = None;
            if let Some(a) = &pvc.status.attached_to {
                if a.pod_uid != uid {
                    problem = Some(format!(
                        "volume {claim:?} is in use by pod {namespace}/{}",
                        a.pod
                    ));
                } else if a.host != host {
                    problem = Some(format!(
                        "volume {claim:?} is attached to this pod on host {}",
                        a.host
                    ));
                }
                return Ok(objects::Change::Keep);
            }
            if let Some(h) = &pvc.status.host
                && h != host
            {
                problem = Some(format!("volume {claim:?} is on host {h}, not {host}"));
                return Ok(objects::Change::Keep);
            }
            if let Some(s) = &pvc.status.storage
                && host_storage != Some(s.as_str())
            {
                problem = Some(format!(
                    "volume {claim:?} is on storage {s}, which host {host} does not have"
                ));
                return Ok(objects::Change::Keep);
            }
            pvc.status.attached_to = Some(VolumeAttachment {
                pod: name.clone(),
                pod_uid: uid.clone(),
                host: host.to_string(),
            });
            // Where its data will be: the shared storage of the host, or
            // the host itself.
            if pvc.status.host.is_none() && pvc.status.storage.is_none() {
                match host_storage {
                    Some(s) => pvc.status.storage = Some(s.to_string()),
                    None => pvc.status.host = Some(host.to_string()),
                }
            }
            pvc.status.phase = "Bound".into();
            newly = true;
            Ok(objects::Change::Write)
        })
        .await?;
    let Some(pvc) = updated else {
        return Ok(Err(format!("persistentvolumeclaim {claim:?} not found")));
    };
    if let Some(problem) = problem {
        return Ok(Err(problem));
    }
    if newly {
        let mut entry = VolumeAuditEntry::new(
            "attach",
            "scheduler",
            format!("attached to pod {namespace}/{name} on host {host}"),
        );
        entry.pod = Some(name);
        entry.pod_uid = Some(uid);
        crate::api::volumes::audit_or_warn(
            store,
            namespace,
            claim,
            &crate::api::volumes::uid_of(&pvc),
            &entry,
        )
        .await;
    }
    Ok(Ok((pvc, newly)))
}

/// Detaches `pvc` if it is still attached as `was`: the volume after.
async fn detach(
    store: &dyn Store,
    pvc: &PersistentVolumeClaim,
    was: &VolumeAttachment,
    why: &str,
) -> Result<Option<PersistentVolumeClaim>, ApiError> {
    let ns = pvc.metadata.namespace().to_string();
    let name = pvc.metadata.name.clone();
    let mut changed = false;
    let updated =
        objects::update::<PersistentVolumeClaim>(store, &keys::volume(&ns, &name), |now| {
            changed = now.status.attached_to.as_ref() == Some(was);
            if !changed {
                return Ok(objects::Change::Keep);
            }
            now.status.attached_to = None;
            Ok(objects::Change::Write)
        })
        .await?;
    if changed && let Some(after) = &updated {
        let mut entry = VolumeAuditEntry::new(
            "detach",
            "scheduler",
            format!("detached from pod {ns}/{}: {why}", was.pod),
        );
        entry.pod = Some(was.pod.clone());
        entry.pod_uid = Some(was.pod_uid.clone());
        crate::api::volumes::audit_or_warn(
            store,
            &ns,
            &name,
            &crate::api::volumes::uid_of(after),
            &entry,
        )
        .await;
    }
    Ok(updated)
}
