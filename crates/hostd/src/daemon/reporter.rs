//! Sends pod statuses to the server: the latest status of each pod wins
//! over older ones not sent yet, a few pods are sent at once, and a status
//! the server could not take is tried again.

use std::collections::HashMap;
use std::time::Duration;

use podvisor_api::{Client, PodStatus};
use tokio::sync::mpsc;

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

/// Starts the sender; reports go into the returned channel.
pub fn start(client: Client) -> mpsc::UnboundedSender<Report> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(client, rx));
    tx
}

async fn run(client: Client, mut rx: mpsc::UnboundedReceiver<Report>) {
    let mut pending: HashMap<String, Report> = HashMap::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(r) => {
                    pending.insert(r.uid.clone(), r);
                }
                None => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            pending.insert(r.uid.clone(), r);
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
