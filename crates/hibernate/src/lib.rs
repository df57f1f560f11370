//! Hibernation of pod VMs, the host side. So far: the sealed snapshot
//! ([`sealed`]), the file a hibernated pod's VM state is kept in:
//! compressed, encrypted and authenticated under a key of its own that
//! never touches the host's disk; and a pod VM saved into one and woken
//! from it ([`pod`]). The host daemon does not use them yet: its commands,
//! the idle policy and wake on the first packet are not built.

pub mod pod;
pub mod sealed;

pub use pod::{HibernateError, NotHibernated, Saved, Snapshot, hibernate, save, wake};

pub use sealed::{
    OpenedSnapshot, SealError, SealSummary, SealedWriter, SharedSealedWriter, SnapshotKey,
};
