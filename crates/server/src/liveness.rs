//! Host liveness: a host whose heartbeat lease ended is marked NotReady
//! and its pods are reported as phase Unknown, reason NodeLost; a pod being
//! deleted on such a host is removed at once (no one is left to stop it).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use podvisor_api::{Host, Pod, PodPhase};
use podvisor_store::Store;

use crate::error::ApiError;
use crate::keys;
use crate::objects::{self, Change};
use crate::pod_cache::PodCache;

/// How often the leader compares hosts with their leases.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Reason of a host whose lease ended.
pub const LEASE_EXPIRED: &str = "HeartbeatLeaseExpired";
/// Reason of a pod whose host is NotReady.
pub const NODE_LOST: &str = "NodeLost";

/// Checks hosts forever (run by the leader only).
pub async fn run(store: Arc<dyn Store>, cache: PodCache) {
    loop {
        if let Err(e) = check(store.as_ref(), &cache).await {
            tracing::warn!(error = %e, "host liveness check failed; retrying");
        }
        tokio::time::sleep(CHECK_INTERVAL).await;
    }
}

async fn check(store: &dyn Store, cache: &PodCache) -> Result<(), ApiError> {
    let (hosts, _) = objects::list::<Host>(store, keys::HOSTS).await?;
    let mut not_ready = HashSet::new();
    for host in hosts {
        let name = host.metadata.name.clone();
        if !host.status.ready {
            not_ready.insert(name);
            continue;
        }
        if store.get(&keys::host_lease(&name)).await?.is_some() {
            continue;
        }
        // No lease: mark it NotReady, unless a heartbeat made it live again
        // meanwhile (checked again on each compare-and-swap attempt).
        let key = keys::host(&name);
        let mut lease_back = false;
        loop {
            let Some(kv) = store.get(&key).await? else {
                break;
            };
            let mut host: Host = objects::decode(&kv)?;
            if !host.status.ready {
                break;
            }
            if store.get(&keys::host_lease(&name)).await?.is_some() {
                lease_back = true;
                break;
            }
            host.status.ready = false;
            host.status.reason = Some(LEASE_EXPIRED.into());
            if objects::update_if(store, &key, &host, kv.mod_revision)
                .await?
                .is_some()
            {
                tracing::warn!(host = name, "host lease expired: host is NotReady");
                break;
            }
        }
        if !lease_back {
            not_ready.insert(name);
        }
    }
    if not_ready.is_empty() {
        return Ok(());
    }
    let (pods, _) = cache.snapshot();
    for pod in pods {
        let Some(host) = pod.spec.node_name.as_deref() else {
            continue;
        };
        if !not_ready.contains(host) {
            continue;
        }
        let key = keys::pod(pod.metadata.namespace(), &pod.metadata.name);
        if pod.metadata.deletion_timestamp.is_some() {
            store.delete_if(&key, pod.metadata.revision()).await?;
            continue;
        }
        if pod.status.phase.is_terminal()
            || (pod.status.phase == PodPhase::Unknown
                && pod.status.reason.as_deref() == Some(NODE_LOST))
        {
            continue;
        }
        // The host may have come back since: then it reports for itself.
        let current = objects::get::<Host>(store, &keys::host(host)).await?;
        if current.is_some_and(|h| h.status.ready) {
            continue;
        }
        let message = format!("host {host:?} stopped sending heartbeats");
        objects::update::<Pod>(store, &key, |p| {
            if p.spec.node_name.as_deref() != Some(host) || p.status.phase.is_terminal() {
                return Ok(Change::Keep);
            }
            p.status.phase = PodPhase::Unknown;
            p.status.reason = Some(NODE_LOST.into());
            p.status.message = Some(message.clone());
            for c in &mut p.status.container_statuses {
                c.ready = false;
            }
            Ok(Change::Write)
        })
        .await?;
    }
    Ok(())
}
