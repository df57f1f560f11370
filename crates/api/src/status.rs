//! Error bodies (`Status`) and watch events, as the API sends them.

use serde::{Deserialize, Serialize};

/// The body of every error response:
/// `{"kind":"Status","code":404,"reason":"NotFound","message":"..."}`,
/// and of answers that carry no object (a pod removed, hibernated,
/// woken): code 200, reason `Success` (see [`Status::success`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// `Status`.
    pub kind: String,
    /// The HTTP status code.
    pub code: u16,
    /// A CamelCase word: `NotFound`, `AlreadyExists`, `Invalid`,
    /// `Unauthorized`, `Forbidden`, `Conflict`, `Gone`, ...
    pub reason: String,
    /// What is wrong, naming the thing at fault.
    pub message: String,
}

impl Status {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> Status {
        Status {
            kind: "Status".into(),
            code,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// An answer saying something was done: code 200, reason `Success`.
    pub fn success(message: impl Into<String>) -> Status {
        Status::new(200, "Success", message)
    }
}

/// What happened to an object in a watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    /// The object appeared (or started to match the watch's selector).
    Added,
    /// The object changed.
    Modified,
    /// The object is gone (or stopped matching the selector); `object` is
    /// its last state.
    Deleted,
    /// The watch failed; `object` is a [`Status`] (code 410 `Gone`: the
    /// revision asked for is too old, list again).
    Error,
    /// Nothing for this watcher, but the store moved on: `object` carries
    /// only `metadata.resourceVersion`, to resume from.
    Bookmark,
}

/// One line of a watch response (newline-delimited JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The object (a Pod), a Status for ERROR, or `{"metadata":
    /// {"resourceVersion": ..}}` for BOOKMARK.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub object: serde_json::Value,
}
