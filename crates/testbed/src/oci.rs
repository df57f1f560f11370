//! OCI images built from scratch for tests, without network: layers from
//! the host's static busybox and from files the test describes, written as
//! an OCI image layout, an OCI archive or a `docker save` archive.
//!
//! Layer tars are deterministic (fixed mtimes, no user names, gzip header
//! without time), so two builds of the same layer have the same DiffID and
//! blob digest. Hostile entries ([`Entry::raw_file`](crate::oci::Entry::raw_file) and friends) and
//! tampering options ([`ImageBuilder::wrong_layer_digest`](crate::oci::ImageBuilder::wrong_layer_digest),
//! [`truncate_file`](crate::oci::truncate_file)...)
//! make bad inputs. [`BuiltImage`](crate::oci::BuiltImage) exposes every blob, to push to a registry.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

mod entry;
pub use entry::{
    BUSYBOX_APPLETS, Entry, FIXED_MTIME, HOST_BUSYBOX, busybox_entries, host_program_entries,
    layer_tar,
};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

impl Compression {
    /// The OCI layer media type for this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }

    fn compress(self, tar: &[u8]) -> Vec<u8> {
        match self {
            Compression::None => tar.to_vec(),
            Compression::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(tar).expect("gzip to memory");
                e.finish().expect("gzip to memory")
            }
            Compression::Zstd => zstd::encode_all(tar, 3).expect("zstd to memory"),
        }
    }
}

#[derive(Clone, Debug)]
struct LayerSpec {
    entries: Vec<Entry>,
    compression: Option<Compression>,
}

/// Builds an OCI image from scratch. Layers are listed bottom first.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    layers: Vec<LayerSpec>,
    compression: Compression,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Vec<String>,
    workdir: Option<String>,
    user: Option<String>,
    tag: Option<String>,
    wrong_digest: Vec<usize>,
    wrong_size: Vec<(usize, u64)>,
    wrong_diff_id: Vec<usize>,
    media_types: Vec<(usize, String)>,
    architecture: Option<String>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        ImageBuilder::new()
    }
}

/// A blob of a built image.
#[derive(Clone, Debug)]
pub struct Blob {
    /// `sha256:<hex>`, as the manifest names it.
    pub digest: String,
    pub media_type: String,
    pub data: Vec<u8>,
}

/// What [`ImageBuilder`] made. Digests are `sha256:<hex>` strings, layers
/// bottom first. With a tampering option they are what the manifest and
/// config *claim*.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub tag: Option<String>,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digests: Vec<String>,
    pub diff_ids: Vec<String>,
    pub chain_ids: Vec<String>,
    /// The manifest JSON blob.
    pub manifest: Blob,
    /// The config JSON blob.
    pub config: Blob,
    /// Layer blobs (real content, under the digest the manifest claims).
    pub layers: Vec<Blob>,
    /// The uncompressed layer tars.
    pub layer_tars: Vec<Vec<u8>>,
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// ChainIDs of a stack of DiffIDs, bottom first.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        out.push(match out.last() {
            None => d.clone(),
            Some(parent) => sha256_digest(format!("{parent} {d}").as_bytes()),
        });
    }
    out
}

impl ImageBuilder {
    /// An image with no layers, gzip-compressed, `PATH` set as docker does.
    pub fn new() -> Self {
        ImageBuilder {
            layers: Vec::new(),
            compression: Compression::Gzip,
            entrypoint: None,
            cmd: None,
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ],
            workdir: None,
            user: None,
            tag: None,
            wrong_digest: Vec::new(),
            wrong_size: Vec::new(),
            wrong_diff_id: Vec::new(),
            media_types: Vec::new(),
            architecture: None,
        }
    }

    /// The architecture the config declares (default: the host's).
    pub fn architecture(mut self, arch: &str) -> Self {
        self.architecture = Some(arch.to_string());
        self
    }

    /// Adds a layer with `/bin/busybox` (from the host's busybox-static),
    /// `/bin/<applet> -> /bin/busybox` for [`BUSYBOX_APPLETS`], `/etc/passwd`
    /// (root, app 1000:1000, nobody 65534), `/etc/group` (root, staff 50 with
    /// app, app 1000, nogroup 65534), `/tmp` 1777, `/root`, `/home/app`.
    pub fn busybox_layer(self) -> Self {
        self.layer(busybox_entries())
    }

    /// Adds a layer made of `entries`, compressed as the image default.
    pub fn layer(mut self, entries: Vec<Entry>) -> Self {
        self.layers.push(LayerSpec {
            entries,
            compression: None,
        });
        self
    }

    /// Adds a layer with its own compression.
    pub fn layer_compressed(mut self, entries: Vec<Entry>, compression: Compression) -> Self {
        self.layers.push(LayerSpec {
            entries,
            compression: Some(compression),
        });
        self
    }

    /// Sets the compression of every layer without its own.
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = Some(args.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = Some(args.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Adds `KEY=value` to the config's Env (after the default `PATH`).
    pub fn env(mut self, kv: &str) -> Self {
        self.env.push(kv.to_string());
        self
    }

    pub fn workdir(mut self, dir: &str) -> Self {
        self.workdir = Some(dir.to_string());
        self
    }

    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }

    /// The name (`name:tag`) the image is stored under in layouts and archives.
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = Some(tag.to_string());
        self
    }

    /// The manifest names layer `i` by a digest its content does not have
    /// (the blob is stored under that wrong name, as a tampered blob would be).
    pub fn wrong_layer_digest(mut self, i: usize) -> Self {
        self.wrong_digest.push(i);
        self
    }

    /// The manifest declares `size` bytes for layer `i`.
    pub fn wrong_layer_size(mut self, i: usize, size: u64) -> Self {
        self.wrong_size.push((i, size));
        self
    }

    /// The config gives layer `i` a DiffID its tar does not have.
    pub fn wrong_diff_id(mut self, i: usize) -> Self {
        self.wrong_diff_id.push(i);
        self
    }

    /// The manifest gives layer `i` this media type.
    pub fn layer_media_type(mut self, i: usize, media_type: &str) -> Self {
        self.media_types.push((i, media_type.to_string()));
        self
    }

    /// Builds every blob in memory.
    pub fn build(&self) -> io::Result<BuiltImage> {
        self.build_with(None)
    }

    fn build_with(&self, force: Option<Compression>) -> io::Result<BuiltImage> {
        let mut layer_tars = Vec::new();
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, spec) in self.layers.iter().enumerate() {
            let tar = layer_tar(&spec.entries)?;
            let compression = force.or(spec.compression).unwrap_or(self.compression);
            let data = compression.compress(&tar);
            let mut digest = sha256_digest(&data);
            if self.wrong_digest.contains(&i) {
                digest = sha256_digest(format!("not layer {i}").as_bytes());
            }
            let mut diff_id = sha256_digest(&tar);
            if self.wrong_diff_id.contains(&i) {
                diff_id = sha256_digest(format!("not the diff of layer {i}").as_bytes());
            }
            let media_type = self
                .media_types
                .iter()
                .rev()
                .find(|(j, _)| *j == i)
                .map(|(_, m)| m.clone())
                .unwrap_or_else(|| compression.media_type().to_string());
            layers.push(Blob {
                digest,
                media_type,
                data,
            });
            diff_ids.push(diff_id);
            layer_tars.push(tar);
        }
        let mut config = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": self.architecture.as_deref().unwrap_or(arch()),
            "os": "linux",
            "config": {"Env": self.env},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": self.layers.iter().map(|_| json!({"created": "2023-11-14T22:13:20Z", "created_by": "podvisor-testbed"})).collect::<Vec<_>>(),
        });
        let c = config["config"].as_object_mut().expect("object");
        if let Some(v) = &self.entrypoint {
            c.insert("Entrypoint".into(), json!(v));
        }
        if let Some(v) = &self.cmd {
            c.insert("Cmd".into(), json!(v));
        }
        if let Some(v) = &self.workdir {
            c.insert("WorkingDir".into(), json!(v));
        }
        if let Some(v) = &self.user {
            c.insert("User".into(), json!(v));
        }
        let config_bytes = serde_json::to_vec(&config)?;
        let config = Blob {
            digest: sha256_digest(&config_bytes),
            media_type: OCI_CONFIG.to_string(),
            data: config_bytes,
        };
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(&config, None),
            "layers": layers.iter().enumerate().map(|(i, l)| {
                let size = self.wrong_size.iter().rev().find(|(j, _)| *j == i).map(|(_, s)| *s);
                descriptor(l, size)
            }).collect::<Vec<_>>(),
        });
        let manifest_bytes = serde_json::to_vec(&manifest)?;
        let manifest = Blob {
            digest: sha256_digest(&manifest_bytes),
            media_type: OCI_MANIFEST.to_string(),
            data: manifest_bytes,
        };
        Ok(BuiltImage {
            tag: self.tag.clone(),
            manifest_digest: manifest.digest.clone(),
            config_digest: config.digest.clone(),
            layer_digests: layers.iter().map(|l| l.digest.clone()).collect(),
            chain_ids: chain_ids(&diff_ids),
            diff_ids,
            manifest,
            config,
            layers,
            layer_tars,
        })
    }

    /// Writes (or adds to) an OCI image layout in `dir`: `oci-layout`,
    /// `blobs/sha256/*`, and `index.json` gaining this image's manifest,
    /// annotated with the tag as `org.opencontainers.image.ref.name`.
    pub fn write_layout(&self, dir: &Path) -> io::Result<BuiltImage> {
        let built = self.build()?;
        let index_path = dir.join("index.json");
        let mut index: Value = match fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)?,
            Err(_) => json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
        };
        index["manifests"]
            .as_array_mut()
            .expect("manifests array")
            .push(index_entry(
                &built,
                built
                    .tag
                    .as_deref()
                    .map(|t| vec![(REF_NAME, t.to_string())]),
            ));
        let mut files = blob_files(&built);
        files.push((
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ));
        files.push(("index.json".into(), serde_json::to_vec(&index)?));
        for (rel, data) in files {
            let path = dir.join(rel);
            fs::create_dir_all(path.parent().expect("parent"))?;
            fs::write(path, data)?;
        }
        Ok(built)
    }

    /// Writes an OCI archive: a tar of the layout (what
    /// `skopeo copy ... oci-archive:PATH:TAG` makes).
    pub fn write_oci_archive(&self, path: &Path) -> io::Result<BuiltImage> {
        let built = self.build()?;
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            index_entry(&built, built.tag.as_deref().map(|t| vec![(REF_NAME, t.to_string())]))
        ]});
        let mut files = vec![(
            "oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        )];
        files.push(("index.json".into(), serde_json::to_vec(&index)?));
        files.extend(blob_files(&built));
        write_tar(path, &files)?;
        Ok(built)
    }

    /// Writes a legacy `docker save` archive: `manifest.json`,
    /// `<config-hex>.json`, `<id>/layer.tar` (uncompressed), `repositories`.
    /// The returned layer digests are those of the uncompressed tars.
    pub fn write_docker_archive(&self, path: &Path) -> io::Result<BuiltImage> {
        let built = self.build_with(Some(Compression::None))?;
        let config_name = format!("{}.json", hex_of(&built.config_digest));
        let mut files = vec![(config_name.clone(), built.config.data.clone())];
        let mut layer_paths = Vec::new();
        for (i, chain) in built.chain_ids.iter().enumerate() {
            let id = hex_of(&sha256_digest(format!("layer-id {chain}").as_bytes())).to_string();
            files.push((format!("{id}/VERSION"), b"1.0".to_vec()));
            files.push((
                format!("{id}/json"),
                serde_json::to_vec(&json!({"id": id}))?,
            ));
            files.push((format!("{id}/layer.tar"), built.layers[i].data.clone()));
            layer_paths.push(format!("{id}/layer.tar"));
        }
        let tags: Option<Vec<String>> = built.tag.clone().map(|t| vec![t]);
        let manifest = json!([{"Config": config_name, "RepoTags": tags, "Layers": layer_paths}]);
        files.push(("manifest.json".into(), serde_json::to_vec(&manifest)?));
        write_tar(path, &files)?;
        Ok(built)
    }

    /// Writes a `docker save` archive as Docker 25+ does: an OCI layout
    /// with uncompressed layers plus a `manifest.json` pointing into
    /// `blobs/`, the legacy `<id>/layer.tar` names being symlinks to blobs.
    pub fn write_docker_oci_archive(&self, path: &Path) -> io::Result<BuiltImage> {
        let built = self.build_with(Some(Compression::None))?;
        let mut annotations = Vec::new();
        if let Some(tag) = &built.tag {
            annotations.push((
                "io.containerd.image.name",
                format!("docker.io/library/{tag}"),
            ));
            annotations.push((
                REF_NAME,
                tag.rsplit_once(':')
                    .map(|(_, t)| t)
                    .unwrap_or("latest")
                    .to_string(),
            ));
        }
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            index_entry(&built, Some(annotations))
        ]});
        let mut files = vec![(
            "oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        )];
        files.push(("index.json".into(), serde_json::to_vec(&index)?));
        files.extend(blob_files(&built));
        let manifest = json!([{
            "Config": format!("blobs/sha256/{}", hex_of(&built.config_digest)),
            "RepoTags": built.tag.clone().map(|t| vec![t]),
            "Layers": built.layer_digests.iter().map(|d| format!("blobs/sha256/{}", hex_of(d))).collect::<Vec<_>>(),
        }]);
        files.push(("manifest.json".into(), serde_json::to_vec(&manifest)?));
        write_tar(path, &files)?;
        Ok(built)
    }
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn descriptor(blob: &Blob, size: Option<u64>) -> Value {
    json!({"mediaType": blob.media_type, "digest": blob.digest, "size": size.unwrap_or(blob.data.len() as u64)})
}

fn index_entry(built: &BuiltImage, annotations: Option<Vec<(&str, String)>>) -> Value {
    let mut d = descriptor(&built.manifest, None);
    if let Some(a) = annotations.filter(|a| !a.is_empty()) {
        d["annotations"] = a
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v)))
            .collect();
    }
    d
}

fn blob_files(built: &BuiltImage) -> Vec<(String, Vec<u8>)> {
    std::iter::once(&built.manifest)
        .chain(std::iter::once(&built.config))
        .chain(&built.layers)
        .map(|b| {
            (
                format!("blobs/sha256/{}", hex_of(&b.digest)),
                b.data.clone(),
            )
        })
        .collect()
}

/// Writes `files` as a tar (with parent directory entries).
fn write_tar(path: &Path, files: &[(String, Vec<u8>)]) -> io::Result<()> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    let mut dirs = std::collections::BTreeSet::new();
    for (name, data) in files {
        let mut parent = Path::new(name).parent();
        let mut chain = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            chain.push(p.to_path_buf());
            parent = p.parent();
        }
        for dir in chain.into_iter().rev() {
            if dirs.insert(dir.clone()) {
                Entry::dir(&format!("{}/", dir.display())).append(&mut b)?;
            }
        }
        Entry::file(name, data.clone(), 0o644).append(&mut b)?;
    }
    fs::write(path, b.into_inner()?)
}

/// `len` bytes that no compressor shrinks, the same for the same `seed`
/// (sha256 in counter mode), for layers that must be big on the wire.
pub fn incompressible(len: usize, seed: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u64;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed.as_bytes());
        h.update(counter.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// Where a layout keeps the blob `digest`.
pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(hex_of(digest))
}

/// Cuts the file at `path` down to `len` bytes.
pub fn truncate_file(path: &Path, len: u64) -> io::Result<()> {
    fs::OpenOptions::new().write(true).open(path)?.set_len(len)
}

/// Flips every bit of the byte at `offset` of the file at `path`.
pub fn flip_byte(path: &Path, offset: usize) -> io::Result<()> {
    let mut data = fs::read(path)?;
    data[offset] ^= 0xff;
    fs::write(path, data)
}

/// gzip-compresses `src` into `dst` (e.g. `docker save | gzip`).
pub fn gzip_file(src: &Path, dst: &Path) -> io::Result<()> {
    let mut data = Vec::new();
    fs::File::open(src)?.read_to_end(&mut data)?;
    fs::write(dst, Compression::Gzip.compress(&data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_layer_built_twice_has_the_same_digests() {
        let entries = vec![Entry::dir("etc"), Entry::file("etc/hello", "hi\n", 0o644)];
        let a = ImageBuilder::new().layer(entries.clone()).build().unwrap();
        let b = ImageBuilder::new()
            .layer(entries)
            .cmd(&["x"])
            .build()
            .unwrap();
        assert_eq!(a.diff_ids, b.diff_ids);
        assert_eq!(a.layer_digests, b.layer_digests);
        assert_ne!(a.config_digest, b.config_digest);
    }

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let ids = chain_ids(&["sha256:a".into(), "sha256:b".into()]);
        assert_eq!(ids[0], "sha256:a");
        assert_eq!(ids[1], sha256_digest(b"sha256:a sha256:b"));
    }
}
