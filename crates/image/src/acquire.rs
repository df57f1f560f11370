//! Getting an image ready for a pod VM, the same way for every user
//! (`podvisor run`, `template create`, the host daemon):
//!
//! - [`ImageSource`] is the one parser of what users name an image by: a
//!   path to an OCI layout or image archive (with an optional `:REF`
//!   choosing one image of it), or a registry reference.
//! - [`acquire`] is the one call that makes its layer disks ready: the
//!   image is taken from the catalog when it is there with all its disks,
//!   else pulled or imported through the cache; its layers are then held
//!   for the caller, marked used, and checked to be still there. A layer
//!   that vanished meanwhile (its entry removed by GC, its disk deleted) is
//!   fetched again, a few times at most, and then reported.
//! - [`LayerAttachments`] is the one place that names the layer disks of a
//!   VM: each disk once, with the virtio-blk serial (`pvl<N>`) the guest
//!   finds it by (also the name of its shared mount), and its EROFS UUID,
//!   by which the guest finds it when it is a virtio-pmem device.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::{LayerCache, LayerDisk};
use crate::catalog::{Catalog, LayerHold};
use crate::progress::PullProgress;
use crate::pull::{self, PullOptions, Pulled};
use crate::reference::ImageRef;
use crate::{ChainId, Image, ImageError};

/// How many times [`acquire`] fetches an image whose layers vanish under it.
const ATTEMPTS: usize = 3;

/// Prefix of the virtio-blk serial of a layer disk: the `i`-th disk of a
/// VM is `pvl<i>`. virtio-blk serials are at most 20 bytes, so ChainIDs do
/// not fit; the guest looks a layer up by the serial its container spec
/// lists.
pub const LAYER_SERIAL_PREFIX: &str = "pvl";

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// A registry reference (`busybox`, `registry:5000/app:v1`, `app@sha256:...`).
    Reference(ImageRef),
    /// An OCI layout directory or an image archive, and which image of it
    /// (`None`: the only one it holds).
    Path {
        path: PathBuf,
        select: Option<String>,
    },
}

/// Whether a relative path may name an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelativePaths {
    /// Taken from the working directory (a command a user types).
    FromWorkingDirectory,
    /// Never: only an absolute path is a path, so a name like `busybox` is
    /// a reference whatever the working directory holds (a host daemon,
    /// whose working directory means nothing to whoever wrote the pod).
    Refused,
}

impl ImageSource {
    /// What `arg` names, relative paths taken from the working directory
    /// (see [`ImageSource::parse_with`]).
    pub fn parse(arg: &str) -> Result<ImageSource, ImageError> {
        ImageSource::parse_with(arg, RelativePaths::FromWorkingDirectory)
    }

    /// What `arg` names: a path that exists (whole, or before a `:REF`
    /// suffix that chooses one of its images) is a layout or archive;
    /// anything else must be a registry reference. An argument spelled as
    /// a path (`/`, `./`, `../`) that does not exist is an error, not a
    /// reference.
    pub fn parse_with(arg: &str, relative: RelativePaths) -> Result<ImageSource, ImageError> {
        let usable = |p: &Path| {
            (relative == RelativePaths::FromWorkingDirectory || p.is_absolute()) && p.exists()
        };
        let whole = Path::new(arg);
        if !arg.is_empty() && usable(whole) {
            return Ok(ImageSource::Path {
                path: whole.to_path_buf(),
                select: None,
            });
        }
        if let Some((path, select)) = arg.split_once(':')
            && !path.is_empty()
            && !select.is_empty()
            && usable(Path::new(path))
        {
            return Ok(ImageSource::Path {
                path: PathBuf::from(path),
                select: Some(select.to_string()),
            });
        }
        if arg.starts_with("./") || arg.starts_with("../") {
            return Err(match relative {
                RelativePaths::FromWorkingDirectory => ImageError::SourceNotFound {
                    path: PathBuf::from(arg),
                },
                RelativePaths::Refused => ImageError::RelativeSource {
                    arg: arg.to_string(),
                },
            });
        }
        if arg.starts_with('/') {
            return Err(ImageError::SourceNotFound {
                path: PathBuf::from(arg),
            });
        }
        let reference = ImageRef::parse(arg).map_err(|e| ImageError::UnknownSource {
            arg: arg.to_string(),
            source: Box::new(e),
        })?;
        Ok(ImageSource::Reference(reference))
    }
}

/// How people name the source: the (normalised) reference, the path, or
/// `PATH:REF`.
impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Reference(r) => r.fmt(f),
            ImageSource::Path { path, select: None } => path.display().fmt(f),
            ImageSource::Path {
                path,
                select: Some(s),
            } => write!(f, "{}:{s}", path.display()),
        }
    }
}

/// For whom [`acquire`] holds an image's layers, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldFor {
    /// Who holds them, as GC and `podvisor image` report it (`pod 1a2b3c`).
    pub what: String,
    /// Whether the hold lives on this process's catalog lease. A leased hold
    /// ends when the process dies (`podvisor run`); one without a lease (a
    /// host daemon's pods, which outlive the daemon) stays until
    /// [`LayerHold::release`] or, after [`LayerHold::keep`],
    /// [`Catalog::release_hold`].
    pub leased: bool,
}

impl HoldFor {
    /// Held by this process for `what`, until it releases or dies.
    pub fn process(what: impl Into<String>) -> HoldFor {
        HoldFor {
            what: what.into(),
            leased: true,
        }
    }

    /// Held for `what` until released, whatever happens to this process.
    pub fn durable(what: impl Into<String>) -> HoldFor {
        HoldFor {
            what: what.into(),
            leased: false,
        }
    }
}

/// An image whose layer disks are in the cache, with the hold that keeps
/// them there.
#[derive(Debug)]
pub struct HeldImage {
    pub image: Image,
    pub hold: LayerHold,
}

impl HeldImage {
    /// The image's layers, bottom first.
    pub fn chains(&self) -> Vec<ChainId> {
        chains(&self.image)
    }
}

/// Gets `source`'s layer disks into the cache and holds them for
/// `hold_for`: a reference is taken from the catalog if it has the image
/// with all its disks, else pulled; a path is imported (what is cached is
/// not converted again). After the hold is taken, every layer must still
/// have its catalog entry and its disk; if one vanished (GC got to it
/// first, or its disk was deleted) the image is fetched again, and after
/// a few such attempts the error says so.
pub async fn acquire(
    cache: &LayerCache,
    catalog: &Catalog,
    source: &ImageSource,
    options: &PullOptions,
    hold_for: &HoldFor,
    progress: Arc<dyn PullProgress>,
) -> Result<HeldImage, ImageError> {
    for attempt in 1..=ATTEMPTS {
        let Pulled { image, hold, .. } = fetch(
            cache,
            catalog,
            source,
            options,
            &hold_for.what,
            progress.clone(),
        )
        .await?;
        let chains = chains(&image);
        let held = catalog
            .hold_layers(&chains, &hold_for.what, hold_for.leased)
            .await?;
        // The fetch's own hold has been replaced by the caller's.
        hold.release().await;
        let mut vanished = catalog.touch_layers(&chains).await?;
        vanished.extend(
            image
                .layers
                .iter()
                .filter(|l| !disk_is_there(cache, l))
                .map(|l| l.chain_id.clone()),
        );
        if vanished.is_empty() {
            return Ok(HeldImage { image, hold: held });
        }
        tracing::info!(
            image = %source,
            attempt,
            layer = %vanished[0],
            "a layer vanished from the cache while the image was made ready; fetching again"
        );
        held.release().await;
    }
    Err(ImageError::LayersVanished {
        image: source.to_string(),
        attempts: ATTEMPTS,
    })
}

/// The image from the catalog, else pulled or imported.
async fn fetch(
    cache: &LayerCache,
    catalog: &Catalog,
    source: &ImageSource,
    options: &PullOptions,
    what: &str,
    progress: Arc<dyn PullProgress>,
) -> Result<Pulled, ImageError> {
    match source {
        ImageSource::Path { path, select } => {
            pull::import_into(cache, catalog, path, select.as_deref(), progress).await
        }
        ImageSource::Reference(reference) => {
            match pull::cached(cache, catalog, reference, what).await? {
                Some(pulled) => Ok(pulled),
                None => pull::pull(cache, catalog, reference, options, progress).await,
            }
        }
    }
}

fn chains(image: &Image) -> Vec<ChainId> {
    image.layers.iter().map(|l| l.chain_id.clone()).collect()
}

/// Whether `layer`'s disk is (still) complete in the cache, where it was.
fn disk_is_there(cache: &LayerCache, layer: &LayerDisk) -> bool {
    cache
        .get(&layer.chain_id)
        .is_some_and(|disk| disk.path == layer.path)
}

/// The serial of the `index`-th layer disk of a VM.
pub fn layer_serial(index: usize) -> String {
    format!("{LAYER_SERIAL_PREFIX}{index}")
}

/// One layer disk as a VM attaches it: read-only, under its serial (a
/// virtio-blk disk's serial, and the name of the layer's shared mount in
/// the guest whichever way it is attached), or as a virtio-pmem device
/// the guest finds by the EROFS UUID in its superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerAttachment {
    pub path: PathBuf,
    pub serial: String,
    /// The disk's EROFS UUID ([`crate::layer_uuid`] of its ChainID).
    pub uuid: String,
    /// Bytes of the disk (a multiple of [`crate::DISK_ALIGN`] for disks of
    /// [`crate::LAYER_FORMAT`]).
    pub size: u64,
}

/// The layer disks of one VM, for the images of all its containers: each
/// disk is attached once, the `i`-th under [`layer_serial`]`(i)`, and each
/// container lists the serials of its own layers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerAttachments {
    disks: Vec<LayerAttachment>,
}

impl LayerAttachments {
    /// Attaches the layer disks `disks` (bottom first) that are not
    /// attached yet; returns the serials of all of them, bottom first (what
    /// a container spec lists).
    pub fn add<'a>(&mut self, disks: impl IntoIterator<Item = &'a LayerDisk>) -> Vec<String> {
        disks
            .into_iter()
            .map(|d| self.add_layer(&d.chain_id, &d.path, d.size))
            .collect()
    }

    /// Attaches the disk of layer `chain_id` at `path`, of `size` bytes,
    /// unless it is attached already; returns its serial.
    pub fn add_layer(&mut self, chain_id: &ChainId, path: &Path, size: u64) -> String {
        if let Some(d) = self.disks.iter().find(|d| d.path == path) {
            return d.serial.clone();
        }
        let serial = layer_serial(self.disks.len());
        self.disks.push(LayerAttachment {
            path: path.to_path_buf(),
            serial: serial.clone(),
            uuid: crate::layer_uuid(chain_id),
            size,
        });
        serial
    }

    /// Attaches `image`'s layers (see [`LayerAttachments::add`]).
    pub fn add_image(&mut self, image: &Image) -> Vec<String> {
        self.add(&image.layers)
    }

    /// The disks in attachment order.
    pub fn disks(&self) -> &[LayerAttachment] {
        &self.disks
    }

    /// The disk attached under `serial`.
    pub fn by_serial(&self, serial: &str) -> Option<&LayerAttachment> {
        self.disks.iter().find(|d| d.serial == serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest;

    #[test]
    fn existing_paths_are_layouts_with_an_optional_ref() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("img");
        std::fs::create_dir(&layout).unwrap();
        let arg = layout.to_str().unwrap();
        assert_eq!(
            ImageSource::parse(arg).unwrap(),
            ImageSource::Path {
                path: layout.clone(),
                select: None
            }
        );
        let with_ref = format!("{arg}:busybox:latest");
        let parsed = ImageSource::parse(&with_ref).unwrap();
        assert_eq!(
            parsed,
            ImageSource::Path {
                path: layout.clone(),
                select: Some("busybox:latest".into())
            }
        );
        assert_eq!(parsed.to_string(), with_ref);
    }

    #[test]
    fn other_arguments_are_normalised_references() {
        let parsed = ImageSource::parse("busybox").unwrap();
        assert_eq!(
            parsed,
            ImageSource::Reference(ImageRef::parse("busybox").unwrap())
        );
        assert_eq!(parsed.to_string(), "docker.io/library/busybox:latest");
        assert!(matches!(
            ImageSource::parse("127.0.0.1:5000/app:v1").unwrap(),
            ImageSource::Reference(_)
        ));
    }

    #[test]
    fn unknown_sources_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.tar");
        let err = ImageSource::parse(missing.to_str().unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "image {:?} not found: no such OCI layout directory or image archive",
                missing.display().to_string()
            )
        );
        for arg in ["./nope", "../nope:v1"] {
            let err = ImageSource::parse(arg).unwrap_err();
            assert!(
                matches!(err, ImageError::SourceNotFound { .. }),
                "{arg}: {err}"
            );
        }
        for arg in ["", "Not A Reference", "UPPER/case"] {
            let err = ImageSource::parse(arg).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("image {arg:?} is neither an existing path nor a valid image reference"),
            );
            // The reason is the source, for the CLI to print after it.
            let cause = std::error::Error::source(&err)
                .expect("a cause")
                .to_string();
            assert!(cause.starts_with("invalid image reference"), "{cause}");
        }
    }

    #[test]
    fn relative_paths_can_be_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("busybox");
        std::fs::create_dir(&layout).unwrap();
        let cwd = std::env::current_dir().unwrap();
        let relative = pathdiff(&layout, &cwd);
        let arg = relative.to_str().unwrap();
        assert!(matches!(
            ImageSource::parse(arg).unwrap(),
            ImageSource::Path { select: None, .. }
        ));
        // Refused, the same relative path names no layout.
        let err = ImageSource::parse_with(arg, RelativePaths::Refused).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::UnknownSource { .. } | ImageError::RelativeSource { .. }
            ),
            "{err}"
        );
        let err = ImageSource::parse_with("./x.tar", RelativePaths::Refused).unwrap_err();
        assert_eq!(
            err.to_string(),
            "image \"./x.tar\": a relative path cannot name an image here; give an absolute path"
        );
        // Absolute paths are paths either way, with or without a :REF.
        let absolute = format!("{}:app:v1", layout.display());
        assert_eq!(
            ImageSource::parse_with(&absolute, RelativePaths::Refused).unwrap(),
            ImageSource::Path {
                path: layout.clone(),
                select: Some("app:v1".into())
            }
        );
        assert!(matches!(
            ImageSource::parse_with("busybox", RelativePaths::Refused).unwrap(),
            ImageSource::Reference(_)
        ));
    }

    /// `path` relative to `base` (both absolute): `../..` up to their
    /// common prefix, then down.
    fn pathdiff(path: &Path, base: &Path) -> PathBuf {
        let (p, b): (Vec<_>, Vec<_>) = (path.components().collect(), base.components().collect());
        let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let mut out = PathBuf::new();
        for _ in common..b.len() {
            out.push("..");
        }
        for c in &p[common..] {
            out.push(c);
        }
        out
    }

    #[test]
    fn layer_disks_are_attached_once_with_serials_in_order() {
        let disk = |n: u8| {
            let diff_id = Digest::sha256_of(&[n]);
            let chain_id = ChainId::extend(None, &diff_id);
            LayerDisk {
                path: PathBuf::from(format!("/c/{}", chain_id.hex())),
                size: u64::from(n) << 21,
                chain_id,
                diff_id,
                parent: None,
            }
        };
        let (a, b, c) = (disk(1), disk(2), disk(3));
        let mut disks = LayerAttachments::default();
        assert_eq!(disks.add([&a, &b]), ["pvl0", "pvl1"]);
        // A second container sharing the bottom layer.
        assert_eq!(disks.add([&a, &c]), ["pvl0", "pvl2"]);
        let attached: Vec<_> = disks
            .disks()
            .iter()
            .map(|d| (d.path.as_path(), d.serial.as_str(), d.size))
            .collect();
        assert_eq!(
            attached,
            [
                (a.path.as_path(), "pvl0", 1 << 21),
                (b.path.as_path(), "pvl1", 2 << 21),
                (c.path.as_path(), "pvl2", 3 << 21)
            ]
        );
        let second = disks.by_serial("pvl1").unwrap();
        assert_eq!(second.uuid, crate::layer_uuid(&b.chain_id));
        assert_eq!(second.uuid.len(), 36);
        assert!(disks.by_serial("pvl3").is_none());
        assert_eq!(layer_serial(7), "pvl7");
    }
}
