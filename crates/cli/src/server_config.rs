//! The `[server]` section of the config file: which podvisor server the
//! kubectl-like commands talk to, and with which token.
//!
//! ```toml
//! [server]
//! url = "http://127.0.0.1:7443"
//! token_file = "/var/lib/podvisor/server/admin.token"   # or: token = "pv_..."
//! ```

use std::path::PathBuf;

use serde::Deserialize;

/// `[server]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// The server's URL.
    pub url: Option<String>,
    /// The API token itself.
    pub token: Option<String>,
    /// A file holding the API token.
    pub token_file: Option<PathBuf>,
}
