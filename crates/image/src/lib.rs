//! OCI image import and the layer-disk cache of podvisor.
//!
//! This crate owns everything between an image on disk and the read-only
//! EROFS *layer disks* a pod VM mounts: reading OCI image layouts and
//! `oci-archive` / `docker save` archives ([`import`]), verifying every blob
//! against its digest and every uncompressed layer against its DiffID,
//! unpacking layers safely with whiteouts converted to overlayfs form,
//! building one EROFS disk per layer with `mkfs.erofs`, and keeping those
//! disks in a cache directory keyed by ChainID ([`LayerCache`]), so images
//! sharing a layer prefix share the disks.
//!
//! Registry pulls ([`pull::pull`], through [`Registry`] on oci-client) and
//! imports into the catalog ([`pull::import_into`]) go through one pipeline
//! that makes each layer once per cluster: the [`catalog`] on a
//! `podvisor-store` (SQLite in the cache directory by default, etcd for a
//! cluster) holds per-layer locks on leases, the entries that map images to
//! layer disks, and the holds of running pods that [`gc`] respects.
//! Leftovers of dead processes are removed by [`cleanup`].
//!
//! [`acquire()`] is what runs pods use: one call from an [`ImageSource`]
//! (the one parser of image arguments) to layer disks held for the pod,
//! and [`LayerAttachments`] names those disks' serials in the VM.

pub mod acquire;
mod blob_source;
mod cache;
pub mod catalog;
pub mod cleanup;
mod convert;
pub mod credentials;
pub mod derived;
mod digest;
mod erofs;
mod error;
mod fsops;
pub mod gc;
mod import;
mod layout;
mod materialize;
mod platform;
pub mod progress;
pub mod pull;
mod reference;
mod registry;
mod source;
mod unpack;

pub use acquire::{
    HeldImage, HoldFor, ImageSource, LAYER_SERIAL_PREFIX, LayerAttachment, LayerAttachments,
    RelativePaths, acquire, layer_serial,
};
pub use cache::{
    DEFAULT_UNCOMPRESSED_LIMIT, DISK_FILE, LAYER_FORMAT, LayerCache, LayerDisk, META_FILE,
    PreparedLayer,
};
pub use catalog::Catalog;
pub use convert::{Compression, LayerBlob};
pub use digest::{ChainId, Digest};
pub use erofs::{DISK_ALIGN, MKFS_EROFS, layer_uuid, padded_size};
pub use error::ImageError;
pub use import::{Image, RuntimeConfig, import};
pub use platform::Platform;
pub use reference::{ImageRef, is_loopback_host};
pub use registry::{Registry, RegistryOptions, RemoteImage};
