//! Finding an image in a source: the OCI image layout (`index.json`,
//! `blobs/`) and the `docker save` `manifest.json`, down to a verified
//! manifest and config and the list of layer blobs.

use std::collections::HashMap;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;

use crate::convert::LayerBlob;
use crate::source::{Source, clean};
use crate::{Digest, ImageError};

const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// An image found in a source, its manifest and config verified.
pub(crate) struct ResolvedImage {
    pub name: Option<String>,
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub config: ImageConfiguration,
    pub diff_ids: Vec<Digest>,
    /// Bottom first: the blob descriptor and where the blob is in the source.
    pub layers: Vec<(LayerBlob, String)>,
}

/// One selectable image of a source.
struct Candidate {
    names: Vec<String>,
    /// OCI: the manifest (or index) descriptor; docker: the manifest.json entry.
    target: Target,
}

enum Target {
    Oci(Box<oci_spec::image::Descriptor>),
    Docker(DockerEntry),
}

impl Candidate {
    /// How to tell the user about this image.
    fn label(&self) -> String {
        match (&self.names.first(), &self.target) {
            (Some(name), _) => name.to_string(),
            (None, Target::Oci(d)) => d.digest().to_string(),
            (None, Target::Docker(e)) => e.config.clone(),
        }
    }

    fn identity(&self) -> String {
        match &self.target {
            Target::Oci(d) => d.digest().to_string(),
            Target::Docker(e) => e.config.clone(),
        }
    }
}

/// An element of a `docker save` `manifest.json`.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Finds the image `select` names (or the only one) in `source`.
pub(crate) fn resolve(source: &Source, select: Option<&str>) -> Result<ResolvedImage, ImageError> {
    let candidates = if source.exists("index.json") {
        oci_candidates(source)?
    } else if source.exists("manifest.json") {
        docker_candidates(source)?
    } else {
        return Err(bad(
            source,
            "neither an OCI image layout (no index.json) nor a docker archive (no manifest.json)",
        ));
    };
    let chosen = choose(source, candidates, select)?;
    let name = match select {
        Some(s) => chosen
            .names
            .iter()
            .find(|n| matches(s, n))
            .cloned()
            .or_else(|| chosen.names.first().cloned()),
        None => chosen.names.first().cloned(),
    };
    match chosen.target {
        Target::Oci(descriptor) => resolve_oci(source, &descriptor, name),
        Target::Docker(entry) => resolve_docker(source, &entry, name),
    }
}

fn bad(source: &Source, reason: impl Into<String>) -> ImageError {
    ImageError::BadSource {
        path: source.path().to_path_buf(),
        reason: reason.into(),
    }
}

fn oci_candidates(source: &Source) -> Result<Vec<Candidate>, ImageError> {
    let bytes = source.read_json_file("index.json")?;
    let index: ImageIndex =
        serde_json::from_slice(&bytes).map_err(|e| bad(source, format!("index.json: {e}")))?;
    Ok(index
        .manifests()
        .iter()
        .map(|d| {
            let annotations = d.annotations().clone().unwrap_or_default();
            let names = [ANNOTATION_REF_NAME, ANNOTATION_CONTAINERD_NAME]
                .iter()
                .filter_map(|k| annotations.get(*k).cloned())
                .collect();
            Candidate {
                names,
                target: Target::Oci(Box::new(d.clone())),
            }
        })
        .collect())
}

fn docker_candidates(source: &Source) -> Result<Vec<Candidate>, ImageError> {
    let bytes = source.read_json_file("manifest.json")?;
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(&bytes).map_err(|e| bad(source, format!("manifest.json: {e}")))?;
    Ok(entries
        .into_iter()
        .map(|e| Candidate {
            names: e.repo_tags.clone().unwrap_or_default(),
            target: Target::Docker(e),
        })
        .collect())
}

/// Picks the candidate `select` names, or the only one.
fn choose(
    source: &Source,
    candidates: Vec<Candidate>,
    select: Option<&str>,
) -> Result<Candidate, ImageError> {
    let mut available: Vec<String> = candidates.iter().map(Candidate::label).collect();
    available.dedup();
    let mut hits: Vec<Candidate> = match select {
        None => candidates,
        Some(s) => candidates
            .into_iter()
            .filter(|c| c.identity() == s || c.names.iter().any(|n| matches(s, n)))
            .collect(),
    };
    let first = hits.first().map(Candidate::identity);
    if hits.is_empty() {
        return Err(match select {
            Some(s) => ImageError::ImageNotFound {
                path: source.path().to_path_buf(),
                select: s.to_string(),
                available,
            },
            None => ImageError::AmbiguousImage {
                path: source.path().to_path_buf(),
                available,
            },
        });
    }
    if hits.iter().any(|c| Some(c.identity()) != first) {
        let mut labels: Vec<String> = hits.iter().map(Candidate::label).collect();
        labels.dedup();
        return Err(ImageError::AmbiguousImage {
            path: source.path().to_path_buf(),
            available: labels,
        });
    }
    Ok(hits.swap_remove(0))
}

/// Whether the user's `select` names the image called `name`:
/// exactly, or after docker's normalisation (`busybox` = `busybox:latest` =
/// `docker.io/library/busybox:latest`), or as a bare tag (`latest`).
pub(crate) fn matches(select: &str, name: &str) -> bool {
    select == name || normalize_ref(select) == normalize_ref(name)
}

fn normalize_ref(reference: &str) -> String {
    let mut r = reference.to_string();
    let last = r.rsplit('/').next().unwrap_or("");
    if !last.contains(':') && !last.contains('@') {
        r.push_str(":latest");
    }
    for prefix in ["docker.io/", "index.docker.io/", "library/"] {
        if let Some(rest) = r.strip_prefix(prefix) {
            r = rest.to_string();
        }
    }
    r
}

/// Reads a blob named by `digest` from `blobs/`, checking size and digest.
fn read_verified_blob(
    source: &Source,
    what: &str,
    digest: &str,
    size: u64,
) -> Result<(Digest, Vec<u8>), ImageError> {
    let digest = Digest::parse(digest)?;
    let bytes = source.read_json_file(&blob_path(&digest))?;
    let what = format!("{what} {digest}");
    check_bytes(&what, &digest, Some(size), &bytes)?;
    Ok((digest, bytes))
}

fn check_bytes(
    what: &str,
    digest: &Digest,
    size: Option<u64>,
    bytes: &[u8],
) -> Result<(), ImageError> {
    let actual = bytes.len() as u64;
    match size {
        Some(expected) if actual < expected => {
            return Err(ImageError::Truncated {
                what: what.to_string(),
                expected,
                actual,
            });
        }
        Some(expected) if actual > expected => {
            return Err(ImageError::SizeMismatch {
                what: what.to_string(),
                expected,
                actual,
            });
        }
        _ => {}
    }
    let got = Digest::sha256_of(bytes);
    if &got != digest {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: digest.to_string(),
            actual: got.to_string(),
        });
    }
    Ok(())
}

fn blob_path(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm(), digest.hex())
}

fn resolve_oci(
    source: &Source,
    descriptor: &oci_spec::image::Descriptor,
    name: Option<String>,
) -> Result<ResolvedImage, ImageError> {
    let mut descriptor = descriptor.clone();
    // Descend through (nested) indexes to this platform's manifest.
    for _ in 0..4 {
        let media_type = descriptor.media_type().to_string();
        if media_type != OCI_INDEX && media_type != DOCKER_LIST {
            break;
        }
        let (_, bytes) = read_verified_blob(
            source,
            "image index",
            descriptor.digest().as_ref(),
            descriptor.size(),
        )?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|e| bad(source, format!("image index: {e}")))?;
        descriptor = pick_platform(index.manifests())
            .ok_or_else(|| {
                bad(
                    source,
                    format!(
                        "image index {} has no linux/{} manifest",
                        descriptor.digest(),
                        host_arch()
                    ),
                )
            })?
            .clone();
    }
    let media_type = descriptor.media_type().to_string();
    if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        return Err(bad(
            source,
            format!("unsupported manifest media type `{media_type}`"),
        ));
    }
    let (manifest_digest, bytes) = read_verified_blob(
        source,
        "manifest",
        descriptor.digest().as_ref(),
        descriptor.size(),
    )?;
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| bad(source, format!("manifest {manifest_digest}: {e}")))?;
    let config_descriptor = manifest.config();
    let (config_digest, config_bytes) = read_verified_blob(
        source,
        "image config",
        config_descriptor.digest().as_ref(),
        config_descriptor.size(),
    )?;
    let config = parse_config(source, &config_digest, &config_bytes)?;
    let mut layers = Vec::new();
    for layer in manifest.layers() {
        let digest = Digest::parse(layer.digest().as_ref())?;
        let path = blob_path(&digest);
        layers.push((
            LayerBlob {
                media_type: layer.media_type().to_string(),
                digest,
                size: layer.size(),
            },
            path,
        ));
    }
    finish(source, name, manifest_digest, config_digest, config, layers)
}

fn resolve_docker(
    source: &Source,
    entry: &DockerEntry,
    name: Option<String>,
) -> Result<ResolvedImage, ImageError> {
    let config_path = clean(&entry.config).ok_or_else(|| {
        bad(
            source,
            format!("config path `{}` leaves the archive", entry.config),
        )
    })?;
    let config_bytes = source.read_json_file(&config_path)?;
    let config_digest = Digest::sha256_of(&config_bytes);
    // The config is named by its digest (`<hex>.json` or `blobs/sha256/<hex>`).
    if let Some(named) = digest_in_name(&config_path) {
        check_bytes(
            &format!("image config {config_path}"),
            &named,
            None,
            &config_bytes,
        )?;
    }
    let config = parse_config(source, &config_digest, &config_bytes)?;
    let diff_ids = diff_ids(source, &config)?;
    if diff_ids.len() != entry.layers.len() {
        return Err(bad(
            source,
            format!(
                "manifest.json lists {} layers, the config has {} DiffIDs",
                entry.layers.len(),
                diff_ids.len()
            ),
        ));
    }
    // Legacy `layer.tar` files are the uncompressed layers, so each blob's
    // digest is its DiffID.
    let mut layers = Vec::new();
    for (path, diff_id) in entry.layers.iter().zip(&diff_ids) {
        let clean_path = clean(path)
            .ok_or_else(|| bad(source, format!("layer path `{path}` leaves the archive")))?;
        let (_, size) = source.open_file(&clean_path)?;
        layers.push((
            LayerBlob {
                media_type: OCI_LAYER_TAR.to_string(),
                digest: diff_id.clone(),
                size,
            },
            clean_path,
        ));
    }
    // There is no manifest: its digest is that of the equivalent OCI
    // manifest, built the same way every time.
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest.to_string(), "size": config_bytes.len()},
        "layers": layers.iter().map(|(b, _)| serde_json::json!({
            "mediaType": b.media_type, "digest": b.digest.to_string(), "size": b.size,
        })).collect::<Vec<_>>(),
    });
    let manifest_digest = Digest::sha256_of(manifest.to_string().as_bytes());
    finish(source, name, manifest_digest, config_digest, config, layers)
}

fn finish(
    source: &Source,
    name: Option<String>,
    manifest_digest: Digest,
    config_digest: Digest,
    config: ImageConfiguration,
    layers: Vec<(LayerBlob, String)>,
) -> Result<ResolvedImage, ImageError> {
    let diff_ids = diff_ids(source, &config)?;
    if diff_ids.len() != layers.len() {
        return Err(bad(
            source,
            format!(
                "manifest {manifest_digest} has {} layers, its config has {} DiffIDs",
                layers.len(),
                diff_ids.len()
            ),
        ));
    }
    Ok(ResolvedImage {
        name,
        manifest_digest,
        config_digest,
        config,
        diff_ids,
        layers,
    })
}

fn parse_config(
    source: &Source,
    digest: &Digest,
    bytes: &[u8],
) -> Result<ImageConfiguration, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| bad(source, format!("image config {digest}: {e}")))
}

fn diff_ids(source: &Source, config: &ImageConfiguration) -> Result<Vec<Digest>, ImageError> {
    let rootfs = config.rootfs();
    if rootfs.typ() != "layers" {
        return Err(bad(
            source,
            format!("unsupported rootfs type `{}`", rootfs.typ()),
        ));
    }
    rootfs.diff_ids().iter().map(|d| Digest::parse(d)).collect()
}

/// The digest a blob path like `blobs/sha256/<hex>` or `<hex>.json` names.
fn digest_in_name(path: &str) -> Option<Digest> {
    let file = path.rsplit('/').next()?;
    let hex = file.strip_suffix(".json").unwrap_or(file);
    Digest::parse(&format!("sha256:{hex}")).ok()
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The manifest for linux on this machine's architecture.
fn pick_platform(
    manifests: &[oci_spec::image::Descriptor],
) -> Option<&oci_spec::image::Descriptor> {
    let wanted: HashMap<&str, &str> = [("os", "linux"), ("architecture", host_arch())].into();
    manifests.iter().find(|d| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == wanted["os"]
                && p.architecture().to_string() == wanted["architecture"]
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_match_after_normalisation() {
        assert!(matches("busybox:latest", "busybox:latest"));
        assert!(matches("busybox", "busybox:latest"));
        assert!(matches("busybox", "docker.io/library/busybox:latest"));
        assert!(matches("localhost:5000/app", "localhost:5000/app:latest"));
        assert!(!matches("busybox:1.36", "busybox:latest"));
        assert!(!matches("alpine", "busybox:latest"));
    }
}
