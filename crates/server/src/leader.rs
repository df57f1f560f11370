//! Leader election among server replicas: the replica holding the leader
//! key (attached to its store lease) runs the scheduler and the host
//! liveness checks; the others wait to take over when its lease ends.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use podvisor_store::{LeaseKeeper, Store, WatchEvent};

use crate::keys;

/// Runs `work` whenever this replica is the leader, stopping it when the
/// leadership is lost. Never returns.
pub async fn run_elected<F, Fut>(store: Arc<dyn Store>, ttl: Duration, identity: String, work: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match store.get(keys::LEADER).await {
            Ok(Some(kv)) => {
                wait_for_vacancy(store.as_ref(), kv.mod_revision, ttl).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "leader election: cannot read the leader key");
                tokio::time::sleep(ttl / 2).await;
                continue;
            }
        }
        let keeper = match LeaseKeeper::start(store.clone(), ttl).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "leader election: cannot get a lease");
                tokio::time::sleep(ttl / 2).await;
                continue;
            }
        };
        match store
            .create(keys::LEADER, identity.as_bytes(), Some(keeper.id()))
            .await
        {
            Ok(Ok(_)) => {
                tracing::info!(
                    replica = identity,
                    "this replica now runs the scheduler and host liveness checks"
                );
                let task = tokio::spawn(work());
                keeper.lost().await;
                task.abort();
                tracing::warn!(
                    replica = identity,
                    "lost the leader lease; scheduler and liveness checks stopped here"
                );
            }
            Ok(Err(_)) => {
                let _ = keeper.revoke().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election: cannot create the leader key");
                drop(keeper);
                tokio::time::sleep(ttl / 2).await;
            }
        }
    }
}

/// Waits until the leader key is deleted (its holder's lease ended), or a
/// TTL passes.
async fn wait_for_vacancy(store: &dyn Store, seen: i64, ttl: Duration) {
    let Ok(mut events) = store.watch(keys::LEADER, seen).await else {
        tokio::time::sleep(ttl / 2).await;
        return;
    };
    let deadline = tokio::time::sleep(ttl);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Ok(WatchEvent::Delete { key, .. })) if key == keys::LEADER => return,
                Some(Ok(_)) => continue,
                _ => return,
            },
            _ = &mut deadline => return,
        }
    }
}
