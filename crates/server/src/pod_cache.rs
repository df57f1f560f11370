//! The pod watch cache: one store watch per server, fanned out to every
//! HTTP watcher, the scheduler and the liveness checks (as kube-apiserver's
//! watch cache does). It holds the current pods and the recent history of
//! changes with each change's previous state, so a filtered watch can say
//! ADDED when a pod starts matching (e.g. it was assigned to the watching
//! host) and DELETED with the last state. Everything in it is derived from
//! the store in revision order, so every replica's cache is a prefix of the
//! same history.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podvisor_api::Pod;
use podvisor_store::{Revision, Store, StoreError, WatchEvent};
use tokio::sync::watch;

use crate::error::ServerError;
use crate::keys;
use crate::objects::decode;

/// One change to one pod.
#[derive(Debug)]
pub struct PodChange {
    pub revision: Revision,
    pub key: String,
    /// The pod before the change (`None`: it was created).
    pub prev: Option<Arc<Pod>>,
    /// The pod after the change (`None`: it was deleted).
    pub cur: Option<Arc<Pod>>,
}

struct State {
    pods: HashMap<String, Arc<Pod>>,
    changes: VecDeque<Arc<PodChange>>,
    /// Every change after this revision is in `changes`.
    oldest: Revision,
    /// The cache reflects the store up to this revision.
    revision: Revision,
}

/// The shared cache; cheap to clone.
#[derive(Clone)]
pub struct PodCache {
    state: Arc<Mutex<State>>,
    capacity: usize,
    /// The latest revision, for waiters.
    revision_tx: Arc<watch::Sender<Revision>>,
}

/// What a reader asking for changes after a revision gets.
pub enum Changes {
    /// The changes after the revision asked for (possibly none yet).
    Some(Vec<Arc<PodChange>>, Revision),
    /// The history after that revision is no longer kept.
    Gone { oldest: Revision },
}

impl PodCache {
    /// Lists the pods and starts following the store. `capacity` changes
    /// are kept for watchers that resume.
    pub async fn start(store: Arc<dyn Store>, capacity: usize) -> Result<PodCache, ServerError> {
        let (pods, revision) = load(store.as_ref()).await?;
        let (revision_tx, _) = watch::channel(revision);
        let cache = PodCache {
            state: Arc::new(Mutex::new(State {
                pods,
                changes: VecDeque::new(),
                oldest: revision,
                revision,
            })),
            capacity: capacity.max(1),
            revision_tx: Arc::new(revision_tx),
        };
        tokio::spawn(cache.clone().follow(store));
        Ok(cache)
    }

    /// A receiver that changes whenever the cache moves on.
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.revision_tx.subscribe()
    }

    /// The current pods and the revision they are at.
    pub fn snapshot(&self) -> (Vec<Arc<Pod>>, Revision) {
        let state = self.state.lock().unwrap();
        (state.pods.values().cloned().collect(), state.revision)
    }

    /// The revision the cache is at.
    pub fn revision(&self) -> Revision {
        self.state.lock().unwrap().revision
    }

    /// The changes after `after`, at most `limit` of them.
    pub fn changes_after(&self, after: Revision, limit: usize) -> Changes {
        let state = self.state.lock().unwrap();
        if after < state.oldest {
            return Changes::Gone {
                oldest: state.oldest,
            };
        }
        let start = state.changes.partition_point(|c| c.revision <= after);
        let out: Vec<_> = state
            .changes
            .iter()
            .skip(start)
            .take(limit)
            .cloned()
            .collect();
        let upto = out.last().map_or(state.revision.max(after), |c| c.revision);
        Changes::Some(out, upto)
    }

    fn apply(&self, event: WatchEvent) {
        let mut state = self.state.lock().unwrap();
        let revision = event.revision();
        if revision <= state.revision {
            return; // already seen (a re-watch after a reconnect)
        }
        let (key, cur) = match event {
            WatchEvent::Put(kv) => match decode::<Pod>(&kv) {
                Ok(pod) => (kv.key, Some(Arc::new(pod))),
                Err(e) => {
                    tracing::error!(key = kv.key, error = %e, "ignoring an unreadable pod");
                    state.revision = revision;
                    return;
                }
            },
            WatchEvent::Delete { key, .. } => (key, None),
        };
        let prev = match &cur {
            Some(pod) => state.pods.insert(key.clone(), pod.clone()),
            None => state.pods.remove(&key),
        };
        state.changes.push_back(Arc::new(PodChange {
            revision,
            key,
            prev,
            cur,
        }));
        while state.changes.len() > self.capacity {
            if let Some(old) = state.changes.pop_front() {
                state.oldest = old.revision;
            }
        }
        state.revision = revision;
        drop(state);
        self.revision_tx.send_replace(revision);
    }

    /// Replaces everything after the store dropped history the cache had
    /// not seen: watchers resuming from before now get 410 Gone.
    fn reset(&self, pods: HashMap<String, Arc<Pod>>, revision: Revision) {
        let mut state = self.state.lock().unwrap();
        state.pods = pods;
        state.changes.clear();
        state.oldest = revision;
        state.revision = revision;
        drop(state);
        self.revision_tx.send_replace(revision);
    }

    async fn follow(self, store: Arc<dyn Store>) {
        loop {
            let after = self.revision();
            let mut events = match store.watch(keys::PODS, after).await {
                Ok(events) => events,
                Err(StoreError::Compacted { .. }) => {
                    self.reload(store.as_ref()).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pod cache: cannot watch the store; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(event) = events.recv().await {
                match event {
                    Ok(event) => self.apply(event),
                    Err(StoreError::Compacted { .. }) => {
                        self.reload(store.as_ref()).await;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "pod cache: store watch ended; resuming");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
        }
    }

    async fn reload(&self, store: &dyn Store) {
        loop {
            match load(store).await {
                Ok((pods, revision)) => return self.reset(pods, revision),
                Err(e) => {
                    tracing::warn!(error = %e, "pod cache: cannot list pods; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

async fn load(store: &dyn Store) -> Result<(HashMap<String, Arc<Pod>>, Revision), ServerError> {
    let (kvs, revision) = store.list(keys::PODS).await?;
    let mut pods = HashMap::new();
    for kv in kvs {
        match decode::<Pod>(&kv) {
            Ok(pod) => {
                pods.insert(kv.key, Arc::new(pod));
            }
            Err(e) => {
                return Err(ServerError::Corrupt {
                    key: kv.key,
                    reason: e.message,
                });
            }
        }
    }
    Ok((pods, revision))
}
