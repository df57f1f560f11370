//! The scheduler (run by the leader only): assigns each pending pod to a
//! ready host with room for its VM (CPU millicores and memory: the host's
//! capacity minus the VM sizes of the pods already assigned to it that have
//! not ended) and none of the host ports it publishes taken by such a pod,
//! preferring the least allocated host. The assignment is a
//! compare-and-swap on the pod, so no pod is ever assigned twice. A pod that
//! fits nowhere stays Pending with reason `Unschedulable` and a message
//! saying why for each host.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use podvisor_api::quantity::format_bytes;
use podvisor_api::{Host, HostPort, Pod, PodPhase, PodStatus, Quantity, Resources};
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
    let mut rooms: HashMap<String, Room> = hosts
        .into_iter()
        .map(|h| (h.metadata.name.clone(), Room::new(h)))
        .collect();
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
        let best = names
            .iter()
            .filter_map(|n| rooms.get(n))
            .filter(|r| r.host.status.ready && r.fits(&demand))
            .max_by(|a, b| a.score(demand.size).total_cmp(&b.score(demand.size)))
            .map(|r| r.host.metadata.name.clone());
        match best {
            Some(host) => {
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
