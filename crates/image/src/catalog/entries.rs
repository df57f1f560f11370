//! The values the catalog stores (JSON).

use serde::{Deserialize, Serialize};

use crate::convert::LayerBlob;
use crate::{ChainId, Digest, RuntimeConfig};

/// A layer disk the cache holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerEntry {
    pub chain_id: ChainId,
    pub diff_id: Digest,
    /// ChainID of the layer below, whose disk holds the rest of the stack.
    pub parent: Option<ChainId>,
    /// The blob the disk was built from.
    pub blob: LayerBlob,
    /// Bytes of the disk.
    pub size: u64,
    /// Seconds since the Unix epoch when the entry was made.
    pub created: u64,
    /// Seconds since the Unix epoch of the last pull or pod start using it.
    pub last_used: u64,
    /// Manifests that include this layer: its reference count.
    pub used_by: Vec<Digest>,
}

/// An image manifest whose layers are all in the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub digest: Digest,
    pub config_digest: Digest,
    pub config: RuntimeConfig,
    /// `os/architecture` from the config.
    pub platform: String,
    /// Layer disks, bottom first.
    pub layers: Vec<ChainId>,
    /// Bytes of all its disks.
    pub size: u64,
    pub created: u64,
    pub last_used: u64,
}

/// What a reference (`registry/repo:tag`, `...@sha256:`, or an imported
/// image's name) resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefEntry {
    pub reference: String,
    pub manifest: Digest,
    /// The image index the reference named, if any.
    pub index: Option<Digest>,
    /// Seconds since the Unix epoch of the pull or import that set it.
    pub updated: u64,
}

/// Who holds a lock or uses a layer: for messages and stale-state checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// What for: `fetch`, `gc`, `pull REF`, `pod ID`...
    #[serde(default)]
    pub what: String,
}

impl Holder {
    /// This process.
    pub fn this_process() -> Holder {
        Holder {
            host: hostname(),
            pid: std::process::id(),
            what: String::new(),
        }
    }

    pub(crate) fn unknown() -> Holder {
        Holder {
            host: "?".into(),
            pid: 0,
            what: String::new(),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {}", self.pid, self.host)?;
        if !self.what.is_empty() {
            write!(f, " ({})", self.what)?;
        }
        Ok(())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
