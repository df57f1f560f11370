//! The `[server]` section of the config file: which podvisor server the
//! kubectl-like commands talk to, and with which token.
//!
//! ```toml
//! [server]
//! url = "http://127.0.0.1:7443"
//! token_file = "/var/lib/podvisor/server/admin.token"   # or: token = "pv_..."
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The config file used when `PODVISOR_CONFIG` is not set.
const DEFAULT_CONFIG: &str = "/etc/podvisor/config.toml";

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

/// Only the `[server]` table; other keys belong to other commands.
#[derive(Debug, Default, Deserialize)]
struct FileWithServer {
    #[serde(default)]
    server: ServerSection,
}

impl ServerSection {
    /// Reads `[server]` from `$PODVISOR_CONFIG` (which must exist when set)
    /// or /etc/podvisor/config.toml (if it exists).
    pub fn load() -> anyhow::Result<ServerSection> {
        let path = match std::env::var_os("PODVISOR_CONFIG").filter(|v| !v.is_empty()) {
            Some(path) => PathBuf::from(path),
            None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
            None => return Ok(ServerSection::default()),
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read config file {}", path.display()))?;
        let file: FileWithServer =
            toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
        Ok(file.server)
    }
}
