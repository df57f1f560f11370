//! Watches over HTTP: newline-delimited JSON WatchEvents served from the
//! pod cache, with selectors, resuming after a revision, and bookmarks.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use podvisor_api::{EventType, Pod, Status, WatchEvent};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::pod_cache::{Changes, PodCache, PodChange};

/// How often an idle watch tells its client how far the store has moved.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);
/// Changes read from the cache at a time.
const BATCH: usize = 512;

/// Which pods a list or watch covers.
#[derive(Clone, Debug, Default)]
pub struct PodSelector {
    pub namespace: Option<String>,
    pub node_name: Option<String>,
    pub labels: Vec<(String, String)>,
    /// The namespaces the caller may see (a user token's scope); `None`:
    /// all.
    pub visible_namespaces: Option<Vec<String>>,
}

impl PodSelector {
    /// From a namespace and the `fieldSelector`/`labelSelector` of a query.
    pub fn parse(
        namespace: Option<String>,
        field_selector: Option<&str>,
        label_selector: Option<&str>,
    ) -> Result<PodSelector, ApiError> {
        let mut selector = PodSelector {
            namespace,
            ..Default::default()
        };
        if let Some(fs) = field_selector.filter(|s| !s.is_empty()) {
            for term in fs.split(',') {
                let (field, value) = term
                    .split_once("==")
                    .or_else(|| term.split_once('='))
                    .ok_or_else(|| unsupported_field_selector(fs))?;
                match field.trim() {
                    "spec.nodeName" => selector.node_name = Some(value.trim().to_string()),
                    "metadata.namespace" if selector.namespace.is_none() => {
                        selector.namespace = Some(value.trim().to_string())
                    }
                    _ => return Err(unsupported_field_selector(fs)),
                }
            }
        }
        if let Some(ls) = label_selector.filter(|s| !s.is_empty()) {
            for term in ls.split(',') {
                let (k, v) = term
                    .split_once("==")
                    .or_else(|| term.split_once('='))
                    .filter(|(k, _)| !k.ends_with('!'))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "labelSelector {ls:?} is not supported: podvisor supports key=value[,key=value...]"
                        ))
                    })?;
                selector
                    .labels
                    .push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Ok(selector)
    }

    pub fn matches(&self, pod: &Pod) -> bool {
        if let Some(ns) = &self.namespace
            && pod.metadata.namespace() != ns
        {
            return false;
        }
        if let Some(visible) = &self.visible_namespaces
            && !visible.iter().any(|v| v == pod.metadata.namespace())
        {
            return false;
        }
        if let Some(node) = &self.node_name
            && pod.spec.node_name.as_deref() != Some(node.as_str())
        {
            return false;
        }
        self.labels
            .iter()
            .all(|(k, v)| pod.metadata.labels.get(k) == Some(v))
    }
}

fn unsupported_field_selector(fs: &str) -> ApiError {
    ApiError::bad_request(format!(
        "fieldSelector {fs:?} is not supported: podvisor supports spec.nodeName=HOST and metadata.namespace=NS"
    ))
}

/// The response of a watch: changes after `from` (or, without it, an
/// ADDED event per current pod, then changes), until the client leaves.
/// A watch from a revision the cache has not reached is refused by
/// [`reached`] first.
pub fn serve_watch(cache: PodCache, selector: PodSelector, from: Option<i64>) -> Response {
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(stream_events(cache, selector, from, tx));
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|o| o.map(Ok::<_, std::convert::Infallible>))
    }));
    (
        [(header::CONTENT_TYPE, "application/json;stream=watch")],
        body,
    )
        .into_response()
}

fn line(kind: EventType, object: serde_json::Value) -> Bytes {
    let mut out = serde_json::to_vec(&WatchEvent { kind, object }).expect("events serialize");
    out.push(b'\n');
    out.into()
}

fn pod_value(pod: &Pod) -> serde_json::Value {
    serde_json::to_value(pod).expect("pods serialize")
}

/// What `change` means to a watcher with `selector`.
fn event_for(selector: &PodSelector, change: &PodChange) -> Option<Bytes> {
    let was = change.prev.as_ref().filter(|p| selector.matches(p));
    let is = change.cur.as_ref().filter(|p| selector.matches(p));
    match (was, is) {
        (None, Some(cur)) => Some(line(EventType::Added, pod_value(cur))),
        (Some(_), Some(cur)) => Some(line(EventType::Modified, pod_value(cur))),
        (Some(prev), None) => {
            // The last state, at the revision of its removal (or of the
            // change that took it out of the selection).
            let mut last = (**prev).clone();
            last.metadata.resource_version = Some(change.revision.to_string());
            Some(line(EventType::Deleted, pod_value(&last)))
        }
        (None, None) => None,
    }
}

async fn stream_events(
    cache: PodCache,
    selector: PodSelector,
    from: Option<i64>,
    tx: mpsc::Sender<Bytes>,
) {
    let mut updates = cache.subscribe();
    updates.borrow_and_update();
    let mut pos = match from {
        Some(rev) => rev,
        None => {
            let (mut pods, rev) = cache.snapshot();
            pods.retain(|p| selector.matches(p));
            pods.sort_by_key(|a| a.key());
            for pod in pods {
                if tx
                    .send(line(EventType::Added, pod_value(&pod)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            rev
        }
    };
    let mut reported = pos;
    loop {
        updates.borrow_and_update();
        match cache.changes_after(pos, BATCH) {
            Changes::Gone { oldest } => {
                let status = Status::new(
                    410,
                    "Gone",
                    format!(
                        "resourceVersion {pos} is too old: this server keeps changes after {oldest}; list again and watch from the listed resourceVersion"
                    ),
                );
                let _ = tx
                    .send(line(
                        EventType::Error,
                        serde_json::to_value(status).expect("status"),
                    ))
                    .await;
                return;
            }
            Changes::Some(changes, upto) => {
                let full = changes.len() == BATCH;
                for change in &changes {
                    if let Some(event) = event_for(&selector, change) {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                        reported = change.revision;
                    }
                }
                pos = upto;
                if full {
                    continue;
                }
            }
        }
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(BOOKMARK_INTERVAL) => {
                if pos > reported {
                    let bookmark = serde_json::json!({"metadata": {"resourceVersion": pos.to_string()}});
                    if tx.send(line(EventType::Bookmark, bookmark)).await.is_err() {
                        return;
                    }
                    reported = pos;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

/// How long a watch from a revision ahead of the cache waits for it (the
/// cache follows the store a moment behind), as Kubernetes does.
pub const FUTURE_REVISION_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Waits up to `within` for `cache` to reach revision `rev`; a revision
/// it does not reach is an error (504, as Kubernetes' "Too large resource
/// version"), never a watch that stays silent.
pub async fn reached(
    cache: &PodCache,
    rev: i64,
    within: std::time::Duration,
) -> Result<(), ApiError> {
    let mut updates = cache.subscribe();
    let wait = async {
        while cache.revision() < rev {
            if updates.changed().await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(within, wait).await;
    let current = cache.revision();
    if current >= rev {
        return Ok(());
    }
    Err(ApiError::new(
        axum::http::StatusCode::GATEWAY_TIMEOUT,
        "Timeout",
        format!("Too large resource version: {rev}, current: {current}"),
    ))
}
