//! `import`: an image from a local layout or archive into the layer cache.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cache::{LayerCache, LayerDisk, PreparedLayer};
use crate::layout::{ResolvedImage, resolve};
use crate::source::Source;
use crate::{ChainId, Digest, ImageError};

/// An imported image: its layers are disks in the cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Image {
    /// The tag or ref name it was found under, if the source gave one.
    pub name: Option<String>,
    /// Digest of the manifest (for a legacy `docker save` archive, which has
    /// none, of the equivalent OCI manifest podvisor derives).
    pub manifest_digest: Digest,
    /// Digest of the image config (what docker calls the image ID).
    pub config_digest: Digest,
    /// How to run it.
    pub config: RuntimeConfig,
    /// Layer disks, bottom first.
    pub layers: Vec<LayerDisk>,
}

/// The parts of the image config that say how to start a container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=value` strings.
    pub env: Vec<String>,
    /// Empty means `/`.
    pub working_dir: String,
    /// `user[:group]`, names or numbers; empty means root.
    pub user: String,
}

/// Imports an image from an OCI image-layout directory, an OCI archive (a
/// tar of a layout, as `skopeo copy ... oci-archive:` writes), or a
/// `docker save` archive (the legacy `manifest.json` + `layer.tar` form or
/// the newer one embedding an OCI layout); archives may be gzip- or
/// zstd-compressed.
///
/// `select` names the image when the source holds several (a tag such as
/// `busybox:latest`, an `org.opencontainers.image.ref.name`, or a manifest
/// digest); with `None` the source must hold exactly one.
///
/// Every layer is verified and converted before any is committed, so a bad
/// layer leaves the cache as it was; layers already cached are reused
/// without reading their blobs.
pub fn import(
    cache: &LayerCache,
    source: &Path,
    select: Option<&str>,
) -> Result<Image, ImageError> {
    let source = Source::open(source, &cache.staging_dir(), &cache.temp_prefix("archive"))?;
    let resolved = resolve(&source, select)?;
    let config = runtime_config(&resolved);

    enum Step {
        Cached(LayerDisk),
        New(PreparedLayer),
    }
    let mut steps = Vec::new();
    let mut parent: Option<ChainId> = None;
    for ((blob, path), diff_id) in resolved.layers.iter().zip(&resolved.diff_ids) {
        let chain_id = ChainId::extend(parent.as_ref(), diff_id);
        match cache.get(&chain_id) {
            Some(disk) => steps.push(Step::Cached(disk)),
            None => {
                let (reader, _) = source.open_file(path)?;
                steps.push(Step::New(cache.prepare_layer(
                    blob,
                    diff_id,
                    parent.as_ref(),
                    reader,
                )?));
            }
        }
        parent = Some(chain_id);
    }
    let mut layers = Vec::new();
    for step in steps {
        layers.push(match step {
            Step::Cached(disk) => disk,
            Step::New(prepared) => prepared.commit()?,
        });
    }
    Ok(Image {
        name: resolved.name,
        manifest_digest: resolved.manifest_digest,
        config_digest: resolved.config_digest,
        config,
        layers,
    })
}

fn runtime_config(resolved: &ResolvedImage) -> RuntimeConfig {
    RuntimeConfig::from_config(&resolved.config)
}

impl RuntimeConfig {
    /// The runtime part of an image config.
    pub fn from_config(config: &oci_spec::image::ImageConfiguration) -> RuntimeConfig {
        let Some(c) = config.config() else {
            return RuntimeConfig::default();
        };
        RuntimeConfig {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().unwrap_or_default(),
            user: c.user().clone().unwrap_or_default(),
        }
    }
}

/// The DiffIDs of an image config, bottom first; the reason if unusable.
pub(crate) fn diff_ids_of(
    config: &oci_spec::image::ImageConfiguration,
) -> Result<Vec<Digest>, String> {
    let rootfs = config.rootfs();
    if rootfs.typ() != "layers" {
        return Err(format!("unsupported rootfs type `{}`", rootfs.typ()));
    }
    rootfs
        .diff_ids()
        .iter()
        .map(|d| Digest::parse(d).map_err(|e| e.to_string()))
        .collect()
}
