//! A call the host runtime made to the management server that failed:
//! what was asked, and whether asking again may work. Shared by the
//! keepers of snapshot keys ([`super::hibernation::KeyCustody`]) and the
//! volume authority ([`super::volumes::VolumeAuthority`]).

/// A failed call to the management server.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct ServerCallError {
    pub what: String,
    /// The server could not be reached (or failed on its side): asking
    /// again may work. Otherwise it answered no.
    pub retryable: bool,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Turns a client error of the call `what` into a [`ServerCallError`]:
/// retryable when there was no answer or the server's own failure (5xx).
pub fn server_call_error(
    what: String,
) -> impl FnOnce(podvisor_api::ClientError) -> ServerCallError {
    move |e| ServerCallError {
        what,
        retryable: e.code().is_none_or(|c| c >= 500),
        source: Box::new(e),
    }
}
