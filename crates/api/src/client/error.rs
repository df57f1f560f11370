//! [`ClientError`]: what went wrong talking to the server.

use url::Url;

use crate::status::Status;

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL given is not usable.
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The server could not be reached or the connection broke.
    #[error("{method} {url}")]
    Http {
        method: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error.
    #[error("{method} {url}: the server said {} {}: {}", .status.code, .status.reason, .status.message)]
    Api {
        method: &'static str,
        url: String,
        status: Status,
    },
    /// The server's answer could not be read.
    #[error("{url}: unexpected answer from the server: {reason}")]
    Decode { url: String, reason: String },
    /// A watch asked for history the server no longer keeps (HTTP 410):
    /// list again and watch from the listed revision.
    #[error("{url}: {message}")]
    Gone { url: String, message: String },
    /// The WebSocket of an exec failed.
    #[error("exec {url}: {reason}")]
    WebSocket { url: String, reason: String },
}

impl ClientError {
    /// The HTTP status code the server answered with, if it did.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(status.code),
            ClientError::Gone { .. } => Some(410),
            _ => None,
        }
    }

    /// True for a 404 answer.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }
}

/// The error a non-success response carries: its Status body, or one made
/// from the HTTP status if the body is not a Status.
pub(super) async fn error_from_response(
    method: &'static str,
    url: &Url,
    resp: reqwest::Response,
) -> ClientError {
    let code = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    let status = serde_json::from_slice::<Status>(&body).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(&body);
        let text = text.trim();
        Status::new(
            code.as_u16(),
            code.canonical_reason().unwrap_or("Error"),
            if text.is_empty() {
                format!("HTTP {code}")
            } else {
                text.chars().take(500).collect()
            },
        )
    });
    if status.code == 410 {
        return ClientError::Gone {
            url: url.to_string(),
            message: status.message,
        };
    }
    ClientError::Api {
        method,
        url: url.to_string(),
        status,
    }
}
