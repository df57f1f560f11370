//! Errors: [`ApiError`] is what a request gets back (a Kubernetes-style
//! `Status` body); [`ServerError`] is what starting or initializing the
//! server can fail with.

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use podvisor_api::Status;
use podvisor_store::StoreError;

/// An error answer of the API: an HTTP status, a reason word and a message
/// naming the problem.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NotFound", message)
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "Conflict", message)
    }
    pub fn already_exists(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "AlreadyExists", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }
    pub fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::GONE, "Gone", message)
    }
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            message,
        )
    }
    pub fn bad_gateway(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, "BadGateway", message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message)
    }

    /// The `Status` body of this error.
    pub fn status(&self) -> Status {
        Status::new(self.code.as_u16(), self.reason, self.message.clone())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code, axum::Json(self.status())).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable { .. } => ApiError::unavailable(e.to_string()),
            StoreError::Compacted { .. } => ApiError::gone(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

/// Why the server could not start or be initialized.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("the store holds a value that is not a podvisor object at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Random(#[from] podvisor_store::RandomError),
}
