//! Runtime profiles on the wire: what the host tells the agent about a
//! container's share of the pod VM ([`RuntimeSizing`]), and what the agent
//! chose for the container's language runtime ([`AppliedProfile`]).
//!
//! The host knows the pod: its containers and their resources, the
//! measured facts of a training run, the class-data archive it built. The
//! agent knows the VM and the image as the container sees it: the memory
//! the guest left for containers, the CPUs online, the program `argv[0]`
//! resolves to inside the container's root, a JDK's `release` file, a Go
//! binary's build information. So the host sends the share and the facts,
//! and the agent detects the runtime, computes its settings with
//! `podvisor-runtime-profile`, puts them in the process's environment (a
//! setting the user gave wins) and reports them in
//! [`GuestMessage::ProfileApplied`](crate::GuestMessage::ProfileApplied)
//! before `Started`. Image files are read in the guest only: the host
//! never parses a file of an untrusted image for this.

use serde::{Deserialize, Serialize};

/// Parts per million: a whole VM's worth of memory.
pub const WHOLE_VM_PPM: u32 = 1_000_000;

/// Most reasons an [`AppliedProfile`] carries; most environment entries.
pub const MAX_PROFILE_LINES: usize = 32;

/// Longest reason or setting value, in bytes.
pub const MAX_PROFILE_LINE: usize = 1024;

/// How to size a container's runtime. Absent from the container spec, the
/// runtime keeps its own defaults (the pod's annotation
/// `podvisor.io/runtime-profile: none`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeSizing {
    /// The container's share of the memory the VM leaves to containers
    /// (its RAM less what the guest kernel and agent use at boot), in
    /// parts per million ([`WHOLE_VM_PPM`] for a pod of one container).
    pub memory_share_ppm: u32,
    /// CPUs the container may use (its CPU limit rounded up); `None`: all
    /// of the VM's. The agent never gives more than the VM has online.
    pub cpus: Option<u32>,
    /// Classes a training run of this image's JVM loaded, if one ran.
    pub loaded_classes: Option<u64>,
    /// Most threads alive at once in that training run.
    pub peak_threads: Option<u64>,
    /// A JVM class-data archive built for this image, as an absolute path
    /// inside the container's root; the agent starts a JVM with it mapped
    /// at its base address.
    pub jvm_archive: Option<String>,
}

impl RuntimeSizing {
    /// The whole VM for one container, with nothing measured.
    pub fn whole_vm() -> RuntimeSizing {
        RuntimeSizing {
            memory_share_ppm: WHOLE_VM_PPM,
            cpus: None,
            loaded_classes: None,
            peak_threads: None,
            jvm_archive: None,
        }
    }
}

/// What the agent chose for a container's runtime and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedProfile {
    /// The runtime found, with its version where the agent read one
    /// (`JVM 17.0.15`, `Go go1.19.8`, `Node.js`, `CPython`).
    pub runtime: String,
    /// The environment variables set, as `(name, value)`; empty when the
    /// runtime was found but left alone (see `reasons`).
    pub env: Vec<(String, String)>,
    /// What was chosen and why, one line each.
    pub reasons: Vec<String>,
}
