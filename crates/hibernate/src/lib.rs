//! Hibernation of pod VMs, the host side: the sealed snapshot
//! ([`sealed`]), the file a hibernated pod's VM state is kept in:
//! compressed, encrypted and authenticated under a key of its own that
//! never touches the host's disk; and a pod VM saved into one and woken
//! from it ([`pod`]). The host daemon (`podvisor-hostd`) decides when, and
//! hands the keys to the management server.

pub mod pod;
pub mod sealed;

pub use pod::{HibernateError, NotHibernated, Saved, Snapshot, WakeFrom, hibernate, save, wake};

pub use sealed::{
    OpenedSnapshot, SealError, SealSummary, SealedWriter, SharedSealedWriter, SnapshotKey,
};
