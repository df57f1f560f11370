//! The Host object: a machine whose host daemon runs pod VMs.

use serde::{Deserialize, Serialize};

use chrono::{DateTime, Utc};

use crate::meta::{ListMeta, ObjectMeta};

/// A host, registered by its host daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Host {
    #[serde(default = "v1")]
    pub api_version: String,
    #[serde(default = "host_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: HostSpec,
    /// Kept by the server: ready while the host's heartbeat lease lives.
    #[serde(default)]
    pub status: HostStatus,
}

fn v1() -> String {
    "v1".into()
}
fn host_kind() -> String {
    "Host".into()
}

/// What the host daemon declares about its machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostSpec {
    /// What pods may use in total.
    pub capacity: HostCapacity,
    /// The daemon's HTTP endpoint for logs and exec, `http://IP:PORT`.
    pub address: String,
    /// The shared filesystem its volume directory is on, by a name the
    /// hosts sharing it agree on: a volume first attached on such a host
    /// lives there, and its pods may run on any host naming the same
    /// storage. `None`: volumes live on this host's own storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_storage: Option<String>,
}

/// Resources of a host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostCapacity {
    /// Millicores.
    pub cpu: u64,
    /// Bytes.
    pub memory: u64,
}

/// Liveness of a host, kept by the server, and what its daemon last
/// reported with a heartbeat ([`HostReport`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostStatus {
    #[serde(default)]
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<DateTime<Utc>>,
    /// Why the host is not ready (`HeartbeatLeaseExpired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The TTL of the host's heartbeat lease, set by the server: heartbeat
    /// at least every third of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration_seconds: Option<u64>,
    /// Kernel samepage merging, for a host whose daemon runs it for its
    /// pods (`podvisor host --ksm`); `None` for one that does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ksm: Option<HostKsm>,
}

/// Kernel samepage merging (KSM) on a host: what it saves and what it
/// costs. The counters are the machine's (`/sys/kernel/mm/ksm`), so they
/// count every process whose memory is mergeable, not only pod VMs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostKsm {
    /// ksmd is merging (`run` is 1).
    pub enabled: bool,
    /// Pages kept once for the pages merged into them.
    pub pages_shared: u64,
    /// Pages merged into a kept one: the pages saved.
    pub pages_sharing: u64,
    /// Pages scanned and found unique so far.
    pub pages_unshared: u64,
    /// Completed passes of ksmd over all mergeable memory.
    pub full_scans: u64,
    /// Empty pages merged into the kernel's zero page instead (KSM's
    /// `use_zero_pages`; the count is there from Linux 6.10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_pages: Option<u64>,
    /// The memory saved: `pagesSharing` and `zeroPages` pages, in bytes.
    pub saved_bytes: u64,
    /// The memory saved less what KSM's own bookkeeping takes, in bytes
    /// (the kernel's `general_profit`, Linux 6.4 and later); negative
    /// while KSM costs more than it saves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profit_bytes: Option<i64>,
    /// CPU time ksmd has used since the machine booted, in seconds: what
    /// merging costs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ksmd_cpu_seconds: Option<f64>,
    /// How fast ksmd scans: pages per wake-up (`pages_to_scan`) ...
    pub pages_to_scan: u64,
    /// ... and milliseconds between wake-ups (`sleep_millisecs`).
    pub sleep_millisecs: u64,
}

/// What a host daemon reports with its heartbeat (the body of `PUT
/// /api/v1/hosts/{name}/heartbeat`); the server puts it into the host's
/// status. A heartbeat without a body leaves the status's reported parts
/// as they were.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostReport {
    /// KSM on the host; `None`: the daemon does not run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ksm: Option<HostKsm>,
}

/// A list of hosts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HostList {
    #[serde(default = "v1")]
    pub api_version: String,
    #[serde(default = "host_list_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ListMeta,
    pub items: Vec<Host>,
}

/// An empty list with its `apiVersion` and `kind` set, as it is served.
impl Default for HostList {
    fn default() -> HostList {
        HostList {
            api_version: v1(),
            kind: host_list_kind(),
            metadata: ListMeta::default(),
            items: Vec::new(),
        }
    }
}

fn host_list_kind() -> String {
    "HostList".into()
}

/// Header of `POST /api/v1/hosts` carrying the secret that the host
/// daemon's own endpoint (logs and exec of its pods) accepts: the server
/// presents it as `Authorization: Bearer SECRET` when it proxies a user's
/// request there, and the daemon refuses every other caller. The daemon
/// makes a new one each time it starts. The server keeps it apart from the
/// Host object and never serves it.
pub const ENDPOINT_TOKEN_HEADER: &str = "x-podvisor-endpoint-token";

/// Checks an endpoint secret as the server accepts it: 32 to 256 characters
/// of `A-Z a-z 0-9 - _` (what a random token in hex or URL-safe base64 is
/// made of, and safe in an HTTP header).
pub fn validate_endpoint_token(token: &str) -> Result<(), String> {
    if !(32..=256).contains(&token.len()) {
        return Err(format!(
            "the {ENDPOINT_TOKEN_HEADER} header must be 32 to 256 characters, not {}",
            token.len()
        ));
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "the {ENDPOINT_TOKEN_HEADER} header may hold only A-Z, a-z, 0-9, '-' and '_'"
        ));
    }
    Ok(())
}

impl Host {
    /// A host named `name` with the given capacity and daemon address.
    pub fn new(name: &str, capacity: HostCapacity, address: &str) -> Host {
        Host {
            api_version: v1(),
            kind: host_kind(),
            metadata: ObjectMeta {
                name: name.to_string(),
                ..Default::default()
            },
            spec: HostSpec {
                capacity,
                address: address.to_string(),
                volume_storage: None,
            },
            status: HostStatus::default(),
        }
    }
}
