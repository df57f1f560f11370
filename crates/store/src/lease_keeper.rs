//! [`LeaseKeeper`]: a lease kept alive by a background task for as long as
//! its holder lives.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::{LeaseId, Store, StoreError};

/// A lease kept alive from a background task (a keep-alive every third of
/// the TTL) until it is dropped, which revokes it (deleting its keys).
///
/// The lease counts as lost, and [`LeaseKeeper::lost`] completes, when the
/// store says it is gone ([`StoreError::LeaseNotFound`]) or when no
/// keep-alive has succeeded for a whole TTL (the store may have expired it
/// meanwhile). A holder that loses its lease must stop acting on it: other
/// processes may already have taken over.
pub struct LeaseKeeper {
    id: LeaseId,
    store: Arc<dyn Store>,
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    revoked: bool,
}

impl LeaseKeeper {
    /// Grants a lease of `ttl` and starts keeping it alive.
    pub async fn start(store: Arc<dyn Store>, ttl: Duration) -> Result<LeaseKeeper, StoreError> {
        let id = store.grant_lease(ttl).await?;
        let (lost_tx, lost) = watch::channel(false);
        let task = tokio::spawn(keep_alive_loop(store.clone(), id, ttl, lost_tx));
        Ok(LeaseKeeper {
            id,
            store,
            lost,
            task,
            revoked: false,
        })
    }

    /// The lease, to attach keys to.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Whether the lease has been lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Completes when the lease is lost (at once if it already is).
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        // An error means the keep-alive task ended, which it does only
        // after reporting the loss.
        let _ = lost.wait_for(|lost| *lost).await;
    }

    /// Stops the keep-alives and revokes the lease now, deleting its keys.
    pub async fn revoke(mut self) -> Result<(), StoreError> {
        self.task.abort();
        self.revoked = true;
        match self.store.revoke(self.id).await {
            Err(StoreError::LeaseNotFound(_)) => Ok(()),
            other => other,
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
        if self.revoked {
            return;
        }
        // Best effort: revoke from a task if a runtime is still there; if
        // not, the lease simply expires after its TTL.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (store, id) = (self.store.clone(), self.id);
            handle.spawn(async move {
                if let Err(e) = store.revoke(id).await
                    && !matches!(e, StoreError::LeaseNotFound(_))
                {
                    tracing::warn!(lease = id, error = %e, "could not revoke a dropped lease");
                }
            });
        }
    }
}

async fn keep_alive_loop(
    store: Arc<dyn Store>,
    id: LeaseId,
    ttl: Duration,
    lost: watch::Sender<bool>,
) {
    let interval = (ttl / 3).max(Duration::from_millis(10));
    let retry = (interval / 4).max(Duration::from_millis(10));
    let mut last_ok = Instant::now();
    let mut wait = interval;
    loop {
        tokio::time::sleep(wait).await;
        // A keep-alive that hangs must not hide the loss past the TTL.
        let remaining = ttl.saturating_sub(last_ok.elapsed());
        let outcome = tokio::time::timeout(remaining, store.keep_alive(id)).await;
        match outcome {
            Ok(Ok(())) => {
                last_ok = Instant::now();
                wait = interval;
                continue;
            }
            Ok(Err(StoreError::LeaseNotFound(_))) => {
                tracing::warn!(lease = id, "lease expired or was revoked");
                let _ = lost.send(true);
                return;
            }
            Ok(Err(e)) => tracing::debug!(lease = id, error = %e, "keep-alive failed; retrying"),
            Err(_) => tracing::debug!(lease = id, "keep-alive got no answer in time"),
        }
        if last_ok.elapsed() >= ttl {
            tracing::warn!(
                lease = id,
                "no keep-alive succeeded for a whole TTL: lease lost"
            );
            let _ = lost.send(true);
            return;
        }
        wait = retry;
    }
}
