//! Layers podvisor makes itself on top of an image, once per cluster: a
//! JVM's class-data archive built by a training run of the image.
//!
//! A derived layer is named by a *key* its maker computes (what the layer
//! depends on: the image's top ChainID, the command, the flags) because
//! its content, hence its ChainID, is known only once made. Under
//! `catalog/derived/<key>/`:
//! - `lock`: the [`Holder`](crate::catalog::Holder) making it, on its
//!   lease (a dead maker's lock goes with its lease; another may then make
//!   it);
//! - `entry`: [`DerivedEntry`], written after its layer disk is committed
//!   and recorded as a layer of the catalog.
//!
//! The disk is an ordinary layer disk (a tar converted like any layer),
//! whose parent is the image's top layer, so pods hold it, and the cache
//! and GC treat it, as any layer. GC removes it once unused (nothing
//! refers to it as an image does): its entry then names a missing layer,
//! which [`Catalog::derived`] reports as absent, and it is made again.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::blob_source::BlobSource;
use crate::cache::{LayerCache, LayerDisk};
use crate::catalog::{Catalog, LayerHold, now};
use crate::convert::LayerBlob;
use crate::materialize::{LayerPlan, materialize};
use crate::progress::NoProgress;
use crate::{ChainId, Digest, ImageError};

/// A derived layer the catalog records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DerivedEntry {
    /// The maker's key (64 lower-case hex digits).
    pub key: String,
    /// The layer disk.
    pub chain_id: ChainId,
    /// The image layer it sits on.
    pub parent: ChainId,
    /// What its maker measured while making it (for a JVM archive: loaded
    /// classes, threads, the JDK's version).
    pub facts: BTreeMap<String, String>,
    /// Seconds since the Unix epoch when it was made.
    pub created: u64,
}

/// Whether `key` can name a derived layer: 64 lower-case hex digits.
pub fn valid_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn checked(key: &str) -> Result<&str, ImageError> {
    if valid_key(key) {
        Ok(key)
    } else {
        Err(ImageError::CatalogEntry {
            url: String::new(),
            key: key.chars().take(80).collect(),
            reason: "a derived layer's key is 64 lower-case hex digits".into(),
        })
    }
}

fn prefix(key: &str) -> String {
    format!("catalog/derived/{key}/")
}

impl Catalog {
    /// The derived layer `key`, if it is recorded and its layer still is.
    pub async fn derived(&self, key: &str) -> Result<Option<DerivedEntry>, ImageError> {
        let key = checked(key)?;
        let Some((entry, _)) = self
            .get_json::<DerivedEntry>(&format!("{}entry", prefix(key)))
            .await?
        else {
            return Ok(None);
        };
        Ok(self.layer(&entry.chain_id).await?.map(|_| entry))
    }

    /// Takes the lock of derived layer `key` for this process (on its
    /// lease): false if another process holds it (it is making the layer).
    pub async fn try_lock_derived(&self, key: &str, purpose: &str) -> Result<bool, ImageError> {
        let key = checked(key)?;
        self.try_lock_key(&format!("{}lock", prefix(key)), purpose)
            .await
            .map(|r| r.is_ok())
    }

    /// Releases the lock of derived layer `key` if this process holds it.
    pub async fn unlock_derived(&self, key: &str) -> Result<(), ImageError> {
        let key = checked(key)?;
        self.unlock_key(&format!("{}lock", prefix(key))).await
    }

    /// Forgets derived layer `key` (its user found it unusable): the next
    /// maker makes it again. Its layer disk is left to GC.
    pub async fn forget_derived(&self, key: &str) -> Result<(), ImageError> {
        let key = checked(key)?;
        self.delete_key(&format!("{}entry", prefix(key))).await
    }
}

/// Largest tar a derived layer is made from.
pub const MAX_DERIVED_TAR: u64 = 1 << 30;

/// Makes the tar at `tar` (uncompressed; at most [`MAX_DERIVED_TAR`]) a
/// layer disk on top of `parent`, records it as derived layer `key` with
/// `facts`, and holds it for `what` (with this process's lease) until the
/// caller releases the hold. The caller should hold the key's lock.
pub async fn add_derived_layer(
    cache: &LayerCache,
    catalog: &Catalog,
    key: &str,
    parent: &ChainId,
    tar: &Path,
    facts: BTreeMap<String, String>,
    what: &str,
) -> Result<(DerivedEntry, LayerDisk, LayerHold), ImageError> {
    let key = checked(key)?.to_string();
    let io = |e: std::io::Error| ImageError::Io {
        context: format!("derived layer {}", tar.display()),
        source: e,
    };
    let size = std::fs::metadata(tar).map_err(io)?.len();
    if size > MAX_DERIVED_TAR {
        return Err(ImageError::Io {
            context: format!("derived layer {}", tar.display()),
            source: std::io::Error::other(format!(
                "{size} bytes: more than the {MAX_DERIVED_TAR} a derived layer may have"
            )),
        });
    }
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(tar).map_err(io)?;
    std::io::copy(&mut file, &mut hasher).map_err(io)?;
    let diff_id = Digest::from_sha256(hasher.finalize().into());
    let plan = LayerPlan {
        blob: LayerBlob {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: diff_id.clone(),
            size,
        },
        diff_id: diff_id.clone(),
        parent: Some(parent.clone()),
        chain_id: ChainId::extend(Some(parent), &diff_id),
    };
    let source = Arc::new(TarFile {
        path: tar.to_path_buf(),
    });
    let (mut disks, hold) =
        materialize(cache, catalog, &[plan], source, Arc::new(NoProgress), what).await?;
    let disk = disks.pop().expect("one plan, one disk");
    let entry = DerivedEntry {
        key: key.clone(),
        chain_id: disk.chain_id.clone(),
        parent: parent.clone(),
        facts,
        created: now(),
    };
    catalog
        .put_derived(&format!("{}entry", prefix(&key)), &entry)
        .await?;
    Ok((entry, disk, hold))
}

/// The tar file a derived layer is made from.
struct TarFile {
    path: PathBuf,
}

#[async_trait::async_trait]
impl BlobSource for TarFile {
    async fn open(&self, _blob: &LayerBlob) -> Result<Box<dyn Read + Send>, ImageError> {
        let file = std::fs::File::open(&self.path).map_err(|e| ImageError::Io {
            context: format!("derived layer {}", self.path.display()),
            source: e,
        })?;
        Ok(Box::new(file))
    }
}
