//! The pod feed: list + watch that reconnects and resumes after the last
//! revision seen, re-listing only when the server no longer has that
//! history (as Kubernetes' reflectors do).

use std::time::Duration;

use tokio::sync::mpsc;

use super::{Client, ClientError, PodEvent, PodFilter};
use crate::pod::Pod;

/// What a pod feed delivers.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum PodFeedEvent {
    /// Every pod matching the filter at `revision`. Sent first (unless the
    /// feed resumes from a given revision) and again whenever the feed had
    /// to re-list: replace what you know with this.
    Synced { pods: Vec<Pod>, revision: i64 },
    /// A change after the last event.
    Changed(PodEvent),
    /// The connection to the server was lost; the feed retries and resumes
    /// by itself. For logging.
    Disconnected { error: String },
}

/// Delay before the first retry after a failure; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

pub(super) fn start(
    client: Client,
    filter: PodFilter,
    from: Option<i64>,
) -> mpsc::Receiver<PodFeedEvent> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        run(client, filter, from, tx).await;
    });
    rx
}

async fn run(client: Client, filter: PodFilter, from: Option<i64>, tx: mpsc::Sender<PodFeedEvent>) {
    let mut revision = from;
    let mut retry = FIRST_RETRY;
    loop {
        let rev = match revision {
            Some(rev) => rev,
            None => match client.list_pods(&filter).await {
                Ok(list) => {
                    let rev = list.metadata.revision();
                    let synced = PodFeedEvent::Synced {
                        pods: list.items,
                        revision: rev,
                    };
                    if tx.send(synced).await.is_err() {
                        return;
                    }
                    revision = Some(rev);
                    rev
                }
                Err(e) => {
                    if !report(&tx, &e).await {
                        return;
                    }
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                    continue;
                }
            },
        };
        let mut watch = match client.watch_pods(&filter, Some(rev)).await {
            Ok(w) => w,
            Err(ClientError::Gone { .. }) => {
                revision = None;
                continue;
            }
            Err(e) => {
                // A revision this server has not reached (another
                // replica's, or a store that went back): list again.
                if e.code() == Some(504) {
                    revision = None;
                }
                if !report(&tx, &e).await {
                    return;
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
                continue;
            }
        };
        retry = FIRST_RETRY;
        loop {
            tokio::select! {
                next = watch.next() => match next {
                    Some(Ok(event)) => {
                        if tx.send(PodFeedEvent::Changed(event)).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(ClientError::Gone { .. })) => {
                        revision = None;
                        break;
                    }
                    Some(Err(e)) => {
                        revision = Some(watch.revision());
                        if !report(&tx, &e).await {
                            return;
                        }
                        tokio::time::sleep(retry).await;
                        break;
                    }
                    None => {
                        // The server ended the watch (a restart, a timeout):
                        // resume after what was seen, bookmarks included.
                        revision = Some(watch.revision());
                        break;
                    }
                },
                _ = tx.closed() => return,
            }
        }
    }
}

/// Sends a `Disconnected` event; false if the receiver is gone.
async fn report(tx: &mpsc::Sender<PodFeedEvent>, e: &ClientError) -> bool {
    let error = podvisor_errors::chain(e);
    tracing::debug!(%error, "pod feed: retrying");
    tx.send(PodFeedEvent::Disconnected { error }).await.is_ok()
}
