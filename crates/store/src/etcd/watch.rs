//! etcd watches: an etcd watch from `after + 1`, relayed into a
//! [`WatchStream`]. A compacted start revision is detected before `watch`
//! returns; a dropped connection ends the stream with `Unavailable` (no
//! transparent resume: the caller watches again from its last revision).

use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions, WatchResponseStream};
use tokio::sync::mpsc;

use super::{EtcdStore, REQUEST_TIMEOUT, map_error, unavailable};
use crate::{KeyValue, Revision, StoreError, WatchEvent, WatchStream};

/// Events buffered in a [`WatchStream`] before the relay waits for the reader.
const WATCH_CHANNEL: usize = 256;
/// How long to wait for etcd to report the compaction revision of a watch
/// known to start before it (etcd checks unsynced watchers every 100 ms).
const COMPACTION_REPORT_WAIT: Duration = Duration::from_secs(3);

pub(super) async fn start(
    store: &EtcdStore,
    prefix: &str,
    after: Revision,
) -> Result<WatchStream, StoreError> {
    let url = store.url.clone();
    let what = format!("watch {prefix:?} after revision {after}");
    let mut client = store.client.watch_client();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(after + 1);
    let stream = store
        .call(
            &what,
            None,
            client.watch(store.full_key(prefix), Some(options)),
        )
        .await?;
    let (requests, mut responses) = stream.split();
    // The first answer confirms the watch and carries the current revision.
    let created = next(&url, &what, &mut responses).await?;
    if created.canceled() {
        return Err(canceled_error(&url, &what, after, &created));
    }
    let current = created.header().map(|h| h.revision()).unwrap_or(0);
    // etcd reports a compacted start revision asynchronously, as a
    // cancellation after the creation; a read at that revision tells now.
    if after < current && is_compacted(store, after + 1).await? {
        let oldest = wait_compaction_report(&mut responses)
            .await
            .unwrap_or(current);
        return Err(StoreError::Compacted {
            requested: after,
            oldest,
        });
    }
    let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
    let relay = Relay {
        url,
        what,
        namespace: store.namespace.clone(),
        seen: after,
    };
    tokio::spawn(relay.run(requests, responses, tx));
    Ok(rx)
}

/// Whether history at `revision` was compacted away.
async fn is_compacted(store: &EtcdStore, revision: Revision) -> Result<bool, StoreError> {
    let mut kv = store.kv.clone();
    let options = GetOptions::new().with_count_only().with_revision(revision);
    match tokio::time::timeout(REQUEST_TIMEOUT, kv.get(vec![0u8], Some(options))).await {
        Ok(Ok(_)) => Ok(false),
        Ok(Err(e))
            if e.to_string()
                .contains("required revision has been compacted") =>
        {
            Ok(true)
        }
        Ok(Err(e)) => Err(map_error(&store.url, "check watch history", None, e)),
        Err(_) => Err(unavailable(
            &store.url,
            format!("check watch history: no answer within {REQUEST_TIMEOUT:?}"),
        )),
    }
}

/// The compaction revision etcd reports when it cancels a watch that
/// starts before it, if it does so in time.
async fn wait_compaction_report(responses: &mut WatchResponseStream) -> Option<Revision> {
    tokio::time::timeout(COMPACTION_REPORT_WAIT, async {
        while let Ok(Some(resp)) = responses.message().await {
            if resp.compact_revision() != 0 {
                return Some(resp.compact_revision());
            }
            if resp.canceled() {
                return None;
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

async fn next(
    url: &str,
    what: &str,
    responses: &mut WatchResponseStream,
) -> Result<etcd_client::WatchResponse, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, responses.message()).await {
        Ok(Ok(Some(resp))) => Ok(resp),
        Ok(Ok(None)) => Err(unavailable(url, format!("{what}: etcd closed the watch"))),
        Ok(Err(e)) => Err(map_error(url, what, None, e)),
        Err(_) => Err(unavailable(
            url,
            format!("{what}: no answer within {REQUEST_TIMEOUT:?}"),
        )),
    }
}

fn canceled_error(
    url: &str,
    what: &str,
    seen: Revision,
    resp: &etcd_client::WatchResponse,
) -> StoreError {
    if resp.compact_revision() != 0 {
        return StoreError::Compacted {
            requested: seen,
            oldest: resp.compact_revision(),
        };
    }
    StoreError::Backend {
        url: url.to_string(),
        reason: format!("{what}: etcd canceled the watch: {}", resp.cancel_reason()),
    }
}

/// Relays one etcd watch into a [`WatchStream`].
struct Relay {
    url: String,
    what: String,
    namespace: String,
    /// Revision of the last event relayed (or the watch's `after`).
    seen: Revision,
}

impl Relay {
    /// Runs until the receiver is dropped or the watch ends; `_requests`
    /// is held so that etcd keeps the watch open.
    async fn run(
        mut self,
        _requests: etcd_client::WatchRequestSender,
        mut responses: WatchResponseStream,
        tx: mpsc::Sender<Result<WatchEvent, StoreError>>,
    ) {
        loop {
            let message = tokio::select! {
                m = responses.message() => m,
                _ = tx.closed() => return,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    let reason = format!(
                        "{}: etcd closed the watch after revision {}; watch again from there",
                        self.what, self.seen
                    );
                    let _ = tx.send(Err(unavailable(&self.url, reason))).await;
                    return;
                }
                Err(e) => {
                    // Whatever broke the stream, the watch is lost, not the data.
                    let reason = format!(
                        "{}: the watch was lost after revision {} ({}); watch again from there",
                        self.what,
                        self.seen,
                        super::describe(&e)
                    );
                    let _ = tx.send(Err(unavailable(&self.url, reason))).await;
                    return;
                }
            };
            if resp.canceled() {
                let _ = tx
                    .send(Err(canceled_error(&self.url, &self.what, self.seen, &resp)))
                    .await;
                return;
            }
            for event in resp.events() {
                let item = self.convert(event);
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        }
    }

    fn convert(&mut self, event: &etcd_client::Event) -> Result<WatchEvent, StoreError> {
        let bad = |reason: String| StoreError::Backend {
            url: self.url.clone(),
            reason: format!("{}: {reason}", self.what),
        };
        let kv = event
            .kv()
            .ok_or_else(|| bad("an event without a key".into()))?;
        let key = kv
            .key()
            .strip_prefix(self.namespace.as_bytes())
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or_else(|| {
                bad(format!(
                    "key {:?} is not UTF-8 under the namespace",
                    String::from_utf8_lossy(kv.key())
                ))
            })?
            .to_string();
        self.seen = kv.mod_revision();
        Ok(match event.event_type() {
            EventType::Put => WatchEvent::Put(KeyValue {
                key,
                value: kv.value().to_vec(),
                create_revision: kv.create_revision(),
                mod_revision: kv.mod_revision(),
                lease: (kv.lease() != 0).then_some(kv.lease()),
            }),
            EventType::Delete => WatchEvent::Delete {
                key,
                revision: kv.mod_revision(),
            },
        })
    }
}
