//! Hibernation of pod VMs, the host side. So far: the sealed snapshot
//! ([`sealed`]), the file a hibernated pod's VM state is kept in:
//! compressed, encrypted and authenticated under a key of its own that
//! never touches the host's disk. Hibernating and waking pods (the host
//! daemon's commands, the idle policy, wake on the first packet) are not
//! built yet.

pub mod sealed;

pub use sealed::{
    OpenedSnapshot, SealError, SealSummary, SealedWriter, SharedSealedWriter, SnapshotKey,
};
