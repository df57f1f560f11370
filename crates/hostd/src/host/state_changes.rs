//! The runtime's pods' state changes, for the daemon to report: the latest
//! state of each pod that changed since it was last taken, pods in the
//! order they first changed. It holds at most one state per pod, however
//! long nobody takes them (a channel of every change would grow while the
//! daemon is busy, and a test or tool that never reads it would grow
//! without end).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::PodState;

#[derive(Default)]
struct Changes {
    pending: Mutex<Pending>,
    changed: Notify,
    /// The runtime is gone: nothing more will change.
    closed: AtomicBool,
}

#[derive(Default)]
struct Pending {
    order: VecDeque<String>,
    latest: HashMap<String, PodState>,
}

/// The runtime's end: where pod tasks put their new states.
pub(crate) struct StateChanges {
    changes: Arc<Changes>,
}

/// The daemon's end of the runtime's state changes.
pub struct ChangeFeed {
    changes: Arc<Changes>,
}

/// A new pair of ends.
pub(crate) fn state_changes() -> (StateChanges, ChangeFeed) {
    let changes = Arc::new(Changes::default());
    (
        StateChanges {
            changes: changes.clone(),
        },
        ChangeFeed { changes },
    )
}

impl StateChanges {
    /// Pod `uid` is now in `state` (replacing a state of it not taken yet).
    pub(crate) fn send(&self, uid: String, state: PodState) {
        let mut pending = self.changes.pending.lock().unwrap();
        if pending.latest.insert(uid.clone(), state).is_none() {
            pending.order.push_back(uid);
        }
        drop(pending);
        self.changes.changed.notify_one();
    }
}

impl Drop for StateChanges {
    fn drop(&mut self) {
        self.changes.closed.store(true, Ordering::SeqCst);
        self.changes.changed.notify_one();
    }
}

impl ChangeFeed {
    /// The next pod whose state changed, with its latest state; `None`
    /// once the runtime is gone and everything was taken.
    pub async fn recv(&mut self) -> Option<(String, PodState)> {
        loop {
            let changed = self.changes.changed.notified();
            {
                let mut pending = self.changes.pending.lock().unwrap();
                if let Some(uid) = pending.order.pop_front() {
                    let state = pending
                        .latest
                        .remove(&uid)
                        .expect("a pending pod has a state");
                    return Some((uid, state));
                }
            }
            if self.changes.closed.load(Ordering::SeqCst) {
                return None;
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::PodPhase;

    fn state(phase: PodPhase, message: &str) -> PodState {
        PodState {
            phase,
            message: Some(message.into()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_feed_holds_the_latest_state_of_each_pod_in_the_order_they_changed() {
        let (tx, mut feed) = state_changes();
        for i in 0..10_000 {
            let uid = ["b", "a", "c"][i % 3];
            tx.send(uid.into(), state(PodPhase::Running, &i.to_string()));
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            let (uid, s) = feed.recv().await.unwrap();
            got.push((uid, s.message.unwrap()));
        }
        let want = [("b", "9999"), ("a", "9997"), ("c", "9998")];
        assert_eq!(
            got,
            want.map(|(u, m)| (u.to_string(), m.to_string())).to_vec()
        );
        // A later change is waited for; the runtime's end going ends it.
        let wait = tokio::spawn(async move {
            let first = feed.recv().await;
            (first, feed.recv().await)
        });
        tokio::task::yield_now().await;
        tx.send("a".into(), state(PodPhase::Succeeded, "done"));
        drop(tx);
        let (first, then) = wait.await.unwrap();
        assert_eq!(first.unwrap().1.phase, PodPhase::Succeeded);
        assert!(then.is_none());
    }
}
