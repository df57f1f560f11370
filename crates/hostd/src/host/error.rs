//! The host runtime's errors.

use podvisor_podvm::PodVmError;

use super::records::RecordError;

/// Errors of the host runtime; the HTTP layer maps them to status codes.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No such pod or container here.
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit the pod's state (e.g. exec into a
    /// container that is not running).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    /// This host's sandboxes do not offer it (`ack-without-vm` has no logs
    /// and no exec).
    #[error("{0}")]
    NotImplemented(String),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    PodVm(#[from] PodVmError),
    #[error(transparent)]
    Hibernate(Box<podvisor_hibernate::HibernateError>),
    /// Pod networking could not be opened (its state directory is locked
    /// by another process, its configuration is unreadable, ...).
    #[error(transparent)]
    Network(#[from] podvisor_net::pod_network::PodNetworkError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
