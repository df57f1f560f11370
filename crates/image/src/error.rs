//! The one error type of the crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while importing an image or managing the
/// layer-disk cache. Messages name the layer (by its blob digest) and the
/// tar entry or file at fault, so a user can tell which input is bad.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O operation failed; `context` says what was being done to what.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// A string that should be a digest is not `sha256:<64 lowercase hex>`.
    #[error("invalid digest `{value}`: {reason}")]
    InvalidDigest { value: String, reason: String },

    /// A digest uses an algorithm podvisor does not verify yet.
    #[error("unsupported digest algorithm `{algorithm}` in `{value}` (only sha256 is supported)")]
    UnsupportedDigestAlgorithm { algorithm: String, value: String },

    /// The import source is not a layout or archive podvisor understands, or
    /// is malformed (bad JSON, missing blob, inconsistent manifest...).
    #[error("{path}: {reason}")]
    BadSource { path: PathBuf, reason: String },

    /// The import source archive ends early.
    #[error("{path}: truncated archive: {detail}")]
    TruncatedArchive { path: PathBuf, detail: String },

    /// `select` matched no image of the source.
    #[error("no image `{select}` in {path}; it holds: {}", available.join(", "))]
    ImageNotFound {
        path: PathBuf,
        select: String,
        available: Vec<String>,
    },

    /// No `select` was given and the source holds several images (or none).
    #[error("{path} holds {} images, choose one of: {}", available.len(), available.join(", "))]
    AmbiguousImage {
        path: PathBuf,
        available: Vec<String>,
    },

    /// A blob is shorter than its descriptor says.
    #[error("{what} is truncated: got {actual} of {expected} bytes")]
    Truncated {
        what: String,
        expected: u64,
        actual: u64,
    },

    /// A blob is longer than its descriptor says.
    #[error(
        "{what}: size mismatch: descriptor says {expected} bytes, blob has more ({actual} or more)"
    )]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },

    /// A blob's sha256 is not the digest its descriptor names.
    #[error("{what}: digest mismatch: expected {expected}, content hashes to {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    /// The uncompressed layer does not hash to the DiffID in the image config.
    #[error(
        "layer {layer}: DiffID mismatch: config says {expected}, uncompressed layer hashes to {actual}"
    )]
    DiffIdMismatch {
        layer: String,
        expected: String,
        actual: String,
    },

    /// A layer's media type is not one podvisor can decompress.
    #[error("layer {layer}: unknown layer media type `{media_type}`")]
    UnknownMediaType { layer: String, media_type: String },

    /// The uncompressed layer is larger than the cache's limit.
    #[error(
        "layer {layer}: decompression limit exceeded: uncompressed layer is larger than {limit} bytes"
    )]
    DecompressionLimit { layer: String, limit: u64 },

    /// The (decompressed) layer stream cannot be read as a tar archive.
    #[error("layer {layer}: reading the layer stream")]
    LayerStream {
        layer: String,
        #[source]
        source: io::Error,
    },

    /// A tar entry would write outside the layer or through a symlink.
    #[error("layer {layer}: unsafe entry `{entry}`: {reason}")]
    UnsafeEntry {
        layer: String,
        entry: String,
        reason: String,
    },

    /// A tar entry is malformed or of a kind podvisor does not unpack.
    #[error("layer {layer}: bad entry `{entry}`: {reason}")]
    BadEntry {
        layer: String,
        entry: String,
        reason: String,
    },

    /// `mkfs.erofs` failed or could not be run.
    #[error("mkfs.erofs for layer {layer}: {reason}")]
    Mkfs { layer: String, reason: String },

    /// A layer disk whose block at 4 KiB (a file's data, which the image
    /// chose) starts with the signature of an NVDIMM info block: a guest's
    /// pmem driver would take the disk for a BTT, PFN or device-DAX
    /// namespace instead of mapping it as it is.
    #[error(
        "layer {layer}: its disk's block at 4 KiB starts with {signature:?}, the signature of \
         an NVDIMM info block, which a guest's pmem driver would take for another kind of device"
    )]
    NvdimmInfoBlock {
        layer: String,
        signature: &'static str,
    },

    /// A string that should be an image reference is not one.
    #[error("invalid image reference `{value}`: {reason}")]
    InvalidReference { value: String, reason: String },

    /// A string that should be a platform is not `os/arch[/variant]`.
    #[error("invalid platform `{value}`: expected os/arch or os/arch/variant, e.g. linux/amd64")]
    InvalidPlatform { value: String },

    /// An image index has no manifest for the requested platform.
    #[error("{reference} has no image for {platform}; it has: {}", available.join(", "))]
    PlatformNotFound {
        reference: String,
        platform: String,
        available: Vec<String>,
    },

    /// The docker config file with registry credentials is malformed.
    #[error("registry credentials in {path}: {reason}")]
    BadCredentials { path: PathBuf, reason: String },

    /// The registry refused access.
    #[error("registry {registry}: unauthorized: {reason}")]
    Unauthorized { registry: String, reason: String },

    /// The registry has no such repository, tag or manifest.
    #[error("image {reference} not found in its registry")]
    NotFound { reference: String },

    /// The registry could not be reached or answered with an error.
    #[error("registry {registry}: {reason}")]
    Registry { registry: String, reason: String },

    /// A manifest, index or config from a registry is malformed or unsupported.
    #[error("image {reference}: {reason}")]
    BadRemoteImage { reference: String, reason: String },

    /// The catalog's store failed.
    #[error("image catalog {url}")]
    Catalog {
        url: String,
        #[source]
        source: podvisor_store::StoreError,
    },

    /// A catalog value cannot be read.
    #[error("image catalog {url}: entry {key} is unreadable: {reason}")]
    CatalogEntry {
        url: String,
        key: String,
        reason: String,
    },

    /// `image rm` of a name the catalog does not have.
    #[error("no image `{name}` in the catalog")]
    NotInCatalog { name: String },

    /// A pull kept losing its layers to concurrent GC.
    #[error(
        "{what}: layers were removed by garbage collection {attempts} times while being pulled; try again"
    )]
    Contention { what: String, attempts: usize },

    /// The filesystem of the cache is full.
    #[error(
        "no space left on the filesystem of the cache {cache}: {cause}; free some space (e.g. `podvisor image gc`) and pull again"
    )]
    NoSpace { cache: PathBuf, cause: String },

    /// A cache entry exists but is unreadable or inconsistent.
    #[error("layer cache entry {path}: {reason}")]
    DamagedCacheEntry { path: PathBuf, reason: String },

    /// An image argument that is neither an existing path nor a reference.
    #[error("image {arg:?} is neither an existing path nor a valid image reference")]
    UnknownSource {
        arg: String,
        #[source]
        source: Box<ImageError>,
    },

    /// A relative path names an image where only absolute ones may.
    #[error("image {arg:?}: a relative path cannot name an image here; give an absolute path")]
    RelativeSource { arg: String },

    /// An image argument spelled as a path names nothing.
    #[error(
        "image {:?} not found: no such OCI layout directory or image archive",
        path.display().to_string()
    )]
    SourceNotFound { path: PathBuf },

    /// An image's layers kept vanishing from the cache while it was made
    /// ready for a pod.
    #[error(
        "image {image}: its layers vanished from the cache {attempts} times while it was made ready (garbage collection, or disks deleted from the cache directory); try again"
    )]
    LayersVanished { image: String, attempts: usize },

    /// No random bytes for a catalog token or hold id.
    #[error(transparent)]
    Random(#[from] podvisor_store::RandomError),
}

impl ImageError {
    /// Whether the error comes from a full filesystem (ENOSPC), however it
    /// was reported (a write, a tar entry, mkfs.erofs' message).
    pub fn is_no_space(&self) -> bool {
        const TEXT: &str = "No space left on device";
        let io_full =
            |e: &io::Error| e.raw_os_error() == Some(libc::ENOSPC) || e.to_string().contains(TEXT);
        match self {
            ImageError::Io { source, .. } | ImageError::LayerStream { source, .. } => {
                io_full(source)
            }
            ImageError::Mkfs { reason, .. } | ImageError::BadEntry { reason, .. } => {
                reason.contains(TEXT)
            }
            ImageError::NoSpace { .. } => true,
            _ => false,
        }
    }

    /// Turns an out-of-space error into [`ImageError::NoSpace`] naming the
    /// cache; other errors pass unchanged.
    pub fn with_no_space_hint(self, cache: &std::path::Path) -> ImageError {
        if self.is_no_space() && !matches!(self, ImageError::NoSpace { .. }) {
            ImageError::NoSpace {
                cache: cache.to_path_buf(),
                cause: self.to_string(),
            }
        } else {
            self
        }
    }

    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> ImageError {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}
