//! [`PodWatch`]: one watch request's newline-delimited JSON events.

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use super::ClientError;
use crate::pod::Pod;
use crate::status::{EventType, Status, WatchEvent};

/// A change to a pod, as a watch reports it.
#[derive(Clone, Debug, PartialEq)]
pub enum PodEvent {
    /// The pod appeared (or started matching the filter).
    Added(Pod),
    /// The pod changed.
    Modified(Pod),
    /// The pod is gone (or stopped matching the filter): its last state.
    Deleted(Pod),
}

impl PodEvent {
    /// The pod the event carries.
    pub fn pod(&self) -> &Pod {
        match self {
            PodEvent::Added(p) | PodEvent::Modified(p) | PodEvent::Deleted(p) => p,
        }
    }

    /// The store revision of the change.
    pub fn revision(&self) -> i64 {
        self.pod().metadata.revision()
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// An open watch. [`PodWatch::next`] yields events until the connection
/// ends (`None`) or fails; [`PodWatch::revision`] is the revision to resume
/// after.
pub struct PodWatch {
    url: String,
    body: ByteStream,
    buffer: BytesMut,
    revision: i64,
}

impl PodWatch {
    pub(super) fn new(url: String, resp: reqwest::Response, revision: i64) -> PodWatch {
        PodWatch {
            url,
            body: Box::pin(resp.bytes_stream()),
            buffer: BytesMut::new(),
            revision,
        }
    }

    /// The revision of the last event (or bookmark) received: watch again
    /// after it to miss nothing.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The next event; `None` when the server closed the watch.
    /// [`ClientError::Gone`] if the revision asked for is too old.
    pub async fn next(&mut self) -> Option<Result<PodEvent, ClientError>> {
        loop {
            if let Some(pos) = self.buffer.iter().position(|&b| b == b'\n') {
                let line = self.buffer.split_to(pos + 1);
                let line = &line[..pos];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match self.decode(line) {
                    Ok(Some(event)) => return Some(Ok(event)),
                    Ok(None) => continue,
                    Err(e) => return Some(Err(e)),
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(source)) => {
                    return Some(Err(ClientError::Http {
                        method: "GET",
                        url: self.url.clone(),
                        source,
                    }));
                }
                None => return None,
            }
        }
    }

    /// One line: an event, or `None` for a bookmark.
    fn decode(&mut self, line: &[u8]) -> Result<Option<PodEvent>, ClientError> {
        let decode_err = |reason: String| ClientError::Decode {
            url: self.url.clone(),
            reason,
        };
        let event: WatchEvent =
            serde_json::from_slice(line).map_err(|e| decode_err(format!("watch event: {e}")))?;
        let pod = |value: serde_json::Value| -> Result<Pod, ClientError> {
            serde_json::from_value(value)
                .map_err(|e| decode_err(format!("pod in a watch event: {e}")))
        };
        let event = match event.kind {
            EventType::Added => PodEvent::Added(pod(event.object)?),
            EventType::Modified => PodEvent::Modified(pod(event.object)?),
            EventType::Deleted => PodEvent::Deleted(pod(event.object)?),
            EventType::Bookmark => {
                let rv = event
                    .object
                    .pointer("/metadata/resourceVersion")
                    .and_then(|v| v.as_str())
                    .and_then(|v| v.parse::<i64>().ok())
                    .ok_or_else(|| {
                        decode_err("a bookmark without metadata.resourceVersion".into())
                    })?;
                self.revision = self.revision.max(rv);
                return Ok(None);
            }
            EventType::Error => {
                let status: Status = serde_json::from_value(event.object)
                    .map_err(|e| decode_err(format!("error event: {e}")))?;
                return Err(if status.code == 410 {
                    ClientError::Gone {
                        url: self.url.clone(),
                        message: status.message,
                    }
                } else {
                    ClientError::Api {
                        method: "GET",
                        url: self.url.clone(),
                        status,
                    }
                });
            }
        };
        self.revision = self.revision.max(event.revision());
        Ok(Some(event))
    }
}
