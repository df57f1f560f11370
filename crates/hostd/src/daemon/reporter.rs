//! Sends pod statuses to the server: the latest status of each pod wins
//! over older ones not sent yet (the queue holds at most one per pod,
//! however long the server is away), a few pods are sent at once, and a
//! status the server could not take is tried again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podvisor_api::{Client, PodStatus};
use tokio::sync::Notify;

/// How many status updates are in flight at once.
const IN_FLIGHT: usize = 8;

/// A status to report for pod `namespace/name` (uid `uid`).
#[derive(Debug, Clone)]
pub struct Report {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub status: PodStatus,
}

/// The reports waiting to be sent: the latest of each pod.
#[derive(Clone, Default)]
pub struct ReportQueue {
    inner: Arc<QueueInner>,
}

#[derive(Default)]
struct QueueInner {
    pending: Mutex<HashMap<String, Report>>,
    added: Notify,
}

impl ReportQueue {
    /// Queues `report`, replacing one of the same pod not sent yet.
    pub fn send(&self, report: Report) {
        self.inner
            .pending
            .lock()
            .unwrap()
            .insert(report.uid.clone(), report);
        self.inner.added.notify_one();
    }

    /// Everything queued, taken out.
    pub fn take_all(&self) -> HashMap<String, Report> {
        std::mem::take(&mut *self.inner.pending.lock().unwrap())
    }

    /// Waits until something is queued (at once if something is).
    pub async fn added(&self) {
        loop {
            let notified = self.inner.added.notified();
            if !self.inner.pending.lock().unwrap().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// Starts the sender of what goes into the returned queue; it ends when
/// every handle on the queue but its own is gone.
pub fn start(client: Client) -> ReportQueue {
    let queue = ReportQueue::default();
    tokio::spawn(run(client, queue.clone()));
    queue
}

async fn run(client: Client, queue: ReportQueue) {
    let mut pending: HashMap<String, Report> = HashMap::new();
    loop {
        if pending.is_empty() {
            if Arc::strong_count(&queue.inner) == 1 {
                return;
            }
            // Checked again now and then: the last other handle may go
            // while this waits.
            let _ = tokio::time::timeout(Duration::from_secs(5), queue.added()).await;
        }
        // Newer reports replace the ones waiting for a retry.
        pending.extend(queue.take_all());
        if pending.is_empty() {
            continue;
        }
        let uids: Vec<String> = pending.keys().take(IN_FLIGHT).cloned().collect();
        let batch: Vec<Report> = uids.iter().filter_map(|u| pending.remove(u)).collect();
        let sends = batch.into_iter().map(|r| {
            let client = client.clone();
            async move {
                let result = client
                    .update_pod_status(&r.namespace, &r.name, &r.status)
                    .await;
                (r, result)
            }
        });
        let mut retry = false;
        for (r, result) in futures_util::future::join_all(sends).await {
            match result {
                Ok(_) => {}
                // The pod is gone, or no longer this host's: nothing to report.
                Err(e) if matches!(e.code(), Some(403 | 404 | 409)) => {
                    tracing::debug!(pod = %r.name, "status not taken: {e}", e = podvisor_errors::ErrorChain(&e));
                }
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", r.namespace, r.name), "reporting status: {e}", e = podvisor_errors::ErrorChain(&e));
                    retry = true;
                    pending.entry(r.uid.clone()).or_insert(r);
                }
            }
        }
        if retry {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(uid: &str, message: &str) -> Report {
        Report {
            uid: uid.into(),
            namespace: "default".into(),
            name: uid.into(),
            status: PodStatus {
                message: Some(message.into()),
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_queue_holds_the_latest_report_of_each_pod_only() {
        let queue = ReportQueue::default();
        for i in 0..10_000 {
            queue.send(report(&format!("pod-{}", i % 3), &i.to_string()));
        }
        let mut taken: Vec<(String, String)> = queue
            .take_all()
            .into_values()
            .map(|r| (r.uid, r.status.message.unwrap()))
            .collect();
        taken.sort();
        assert_eq!(
            taken,
            [
                ("pod-0".to_string(), "9999".to_string()),
                ("pod-1".to_string(), "9997".to_string()),
                ("pod-2".to_string(), "9998".to_string()),
            ]
        );
        assert!(queue.take_all().is_empty());
    }
}
