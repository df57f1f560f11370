//! The layer-disk cache:
//! `<cache>/layers-v2/<chainid-hex>/{disk.erofs,layer.json}`.
//!
//! An entry is written under a `.tmp-*` directory in `layers-v2/`, synced,
//! and renamed into place only when complete, so a visible entry is always
//! whole. Two writers racing for the same ChainID both build it; the loser
//! of the rename discards its copy and uses the winner's. Unpacking happens
//! under `layers-v2/.staging/`. Names starting with `.` are never entries.
//!
//! `layer.json` holds `format` ([`LAYER_FORMAT`]), `chain_id`, `diff_id`,
//! `parent` (the ChainID below, or null), `size` (bytes of `disk.erofs`),
//! `uncompressed_size` (bytes of the layer tar), `created` (Unix seconds) and
//! `source` (`media_type`, `digest`, `size` of the blob it was built from).
//!
//! Format 2 disks can be mapped with DAX (no inline file tails, padded to
//! 2 MiB, see [`crate::erofs`]). Format 1 disks (inline tails, unpadded)
//! lived in `<cache>/layers/`: they are never taken for format 2 ones,
//! since they are in another directory (a podvisor of before format 2,
//! sharing the cache, goes on using them there), and a layer GC removes
//! is removed from both ([`LayerCache::legacy_layers_dir`]).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tempfile::TempDir;

use crate::convert::{self, LayerBlob, Staging};
use crate::{ChainId, Digest, ImageError};

/// File name of a layer's EROFS image inside its entry directory.
pub const DISK_FILE: &str = "disk.erofs";
/// File name of a layer's metadata inside its entry directory.
pub const META_FILE: &str = "layer.json";
/// The layout of the disks this cache makes and takes (`format` in
/// `layer.json`): 2 since disks are DAX-able.
pub const LAYER_FORMAT: u32 = 2;
/// Default limit on the uncompressed size of one layer: 16 GiB.
pub const DEFAULT_UNCOMPRESSED_LIMIT: u64 = 16 << 30;

/// A complete layer disk in the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDisk {
    /// Names this layer together with all layers below it.
    pub chain_id: ChainId,
    /// sha256 of the uncompressed layer tar.
    pub diff_id: Digest,
    /// ChainID of the layer below, whose disk holds the rest of the stack.
    pub parent: Option<ChainId>,
    /// The EROFS image.
    pub path: PathBuf,
    /// Size of the EROFS image in bytes.
    pub size: u64,
}

/// Contents of `layer.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayerMeta {
    pub format: u32,
    pub chain_id: ChainId,
    pub diff_id: Digest,
    pub parent: Option<ChainId>,
    /// Bytes of `disk.erofs`.
    pub size: u64,
    /// Bytes of the uncompressed layer tar.
    pub uncompressed_size: u64,
    /// Seconds since the Unix epoch when the disk was built.
    pub created: u64,
    pub source: LayerBlob,
}

/// The local directory holding layer disks by ChainID.
#[derive(Clone, Debug)]
pub struct LayerCache {
    root: PathBuf,
    uncompressed_limit: u64,
    /// Token of the catalog owner writing through this handle; it names the
    /// temporary entries and staging directories (`.tmp-o<token>-*`,
    /// `.staging/o<token>-*`) so leftovers of a dead owner can be found.
    owner: Option<String>,
}

impl LayerCache {
    /// Opens (creating if needed) the cache rooted at `cache_dir`.
    pub fn open(cache_dir: &Path) -> Result<LayerCache, ImageError> {
        let cache = LayerCache {
            root: cache_dir.to_path_buf(),
            uncompressed_limit: DEFAULT_UNCOMPRESSED_LIMIT,
            owner: None,
        };
        let staging = cache.staging_dir();
        fs::create_dir_all(&staging).map_err(|e| {
            ImageError::io(format!("create cache directory {}", staging.display()), e)
        })?;
        Ok(cache)
    }

    /// Sets the largest uncompressed layer this cache accepts; a larger one
    /// fails with [`ImageError::DecompressionLimit`].
    pub fn with_uncompressed_limit(mut self, bytes: u64) -> LayerCache {
        self.uncompressed_limit = bytes;
        self
    }

    /// Names this handle's temporary files after `token` (see
    /// [`crate::cleanup`]).
    pub fn with_owner(mut self, token: &str) -> LayerCache {
        self.owner = Some(token.to_string());
        self
    }

    /// The prefix of a temporary name of kind `kind` (`.tmp-`, `archive-`,
    /// a ChainID prefix...) written through this handle.
    pub(crate) fn temp_prefix(&self, kind: &str) -> String {
        match &self.owner {
            Some(token) if kind.starts_with('.') => format!("{kind}o{token}-"),
            Some(token) => format!("o{token}-{kind}-"),
            None if kind.starts_with('.') => kind.to_string(),
            None => format!("{kind}-"),
        }
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The largest uncompressed layer accepted, in bytes.
    pub fn uncompressed_limit(&self) -> u64 {
        self.uncompressed_limit
    }

    /// `<cache>/layers-v2`: the disks of [`LAYER_FORMAT`].
    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers-v2")
    }

    /// `<cache>/layers`: the disks of format 1 (inline tails, unpadded),
    /// which this cache never uses; GC removes a layer's disk there too.
    pub fn legacy_layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// `<cache>/layers/.staging`, where layers are unpacked.
    pub(crate) fn staging_dir(&self) -> PathBuf {
        self.layers_dir().join(".staging")
    }

    /// The complete disk for `chain_id`, if the cache has one.
    pub fn get(&self, chain_id: &ChainId) -> Option<LayerDisk> {
        self.read_entry(&self.layers_dir().join(chain_id.hex()))
            .ok()
            .filter(|disk| &disk.chain_id == chain_id)
    }

    /// Every complete disk in the cache, ordered by ChainID.
    pub fn list(&self) -> Result<Vec<LayerDisk>, ImageError> {
        let dir = self.layers_dir();
        let read =
            fs::read_dir(&dir).map_err(|e| ImageError::io(format!("list {}", dir.display()), e))?;
        let mut disks = Vec::new();
        for entry in read {
            let entry = entry.map_err(|e| ImageError::io(format!("list {}", dir.display()), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            if let Ok(chain_id) = ChainId::parse(&format!("sha256:{name}")) {
                disks.extend(self.get(&chain_id));
            }
        }
        disks.sort_by(|a, b| a.chain_id.cmp(&b.chain_id));
        Ok(disks)
    }

    /// The ChainIDs of the format 1 disks in [`LayerCache::legacy_layers_dir`]
    /// (for GC; never used as disks).
    pub(crate) fn legacy_chains(&self) -> Vec<ChainId> {
        let Ok(read) = fs::read_dir(self.legacy_layers_dir()) else {
            return Vec::new();
        };
        read.flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| !name.starts_with('.'))
            .filter_map(|name| ChainId::parse(&format!("sha256:{name}")).ok())
            .collect()
    }

    /// Verifies, unpacks and converts one layer blob read from `blob`, and
    /// commits its disk; returns the cached disk at once if there is one.
    /// `parent` is the ChainID of the layer below (None for the bottom one).
    pub fn add_layer(
        &self,
        source: &LayerBlob,
        diff_id: &Digest,
        parent: Option<&ChainId>,
        blob: impl Read,
    ) -> Result<LayerDisk, ImageError> {
        if let Some(disk) = self.get(&ChainId::extend(parent, diff_id)) {
            return Ok(disk);
        }
        self.prepare_layer(source, diff_id, parent, blob)?.commit()
    }

    /// Like [`LayerCache::add_layer`] but stops before the commit, so a
    /// caller can commit several layers only once all of them converted.
    /// Dropping the result removes everything it wrote.
    pub fn prepare_layer(
        &self,
        source: &LayerBlob,
        diff_id: &Digest,
        parent: Option<&ChainId>,
        blob: impl Read,
    ) -> Result<PreparedLayer, ImageError> {
        let chain_id = ChainId::extend(parent, diff_id);
        let staging = Staging {
            dir: &self.staging_dir(),
            prefix: &self.temp_prefix(&chain_id.hex()[..12]),
            uncompressed_limit: self.uncompressed_limit,
        };
        let converted = convert::convert(&staging, source, diff_id, blob)?;
        let layers = self.layers_dir();
        let tmp = tempfile::Builder::new()
            .prefix(&self.temp_prefix(".tmp-"))
            .tempdir_in(&layers)
            .map_err(|e| {
                ImageError::io(format!("create temporary entry in {}", layers.display()), e)
            })?;
        let disk_path = tmp.path().join(DISK_FILE);
        crate::erofs::mkfs(&converted.rootfs(), &disk_path, &chain_id)?;
        let uncompressed_size = converted.uncompressed_size;
        drop(converted);
        let size = sync_file(&disk_path)?;
        let meta = LayerMeta {
            format: LAYER_FORMAT,
            chain_id,
            diff_id: diff_id.clone(),
            parent: parent.cloned(),
            size,
            uncompressed_size,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            source: source.clone(),
        };
        let meta_path = tmp.path().join(META_FILE);
        let json = serde_json::to_vec_pretty(&meta).expect("layer metadata serializes");
        write_synced(&meta_path, &json)?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
            .map_err(|e| ImageError::io(format!("chmod {}", tmp.path().display()), e))?;
        sync_dir(tmp.path())?;
        Ok(PreparedLayer {
            cache: self.clone(),
            tmp,
            meta,
        })
    }

    /// Removes the entry directory `dir`: renamed out of sight first (to a
    /// `.trash-` name of this owner), so nobody sees it half removed.
    fn remove_entry_dir(&self, dir: &Path) -> Result<(), ImageError> {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let trash = self
            .layers_dir()
            .join(format!("{}{name}", self.temp_prefix(".trash-")));
        match fs::rename(dir, &trash) {
            Ok(()) => {}
            // Someone else removed it first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(ImageError::io(
                    format!("rename {} to {}", dir.display(), trash.display()),
                    e,
                ));
            }
        }
        fs::remove_dir_all(&trash)
            .map_err(|e| ImageError::io(format!("remove {}", trash.display()), e))?;
        sync_dir(&self.layers_dir())
    }

    fn read_entry(&self, dir: &Path) -> Result<LayerDisk, ImageError> {
        let damaged = |reason: String| ImageError::DamagedCacheEntry {
            path: dir.to_path_buf(),
            reason,
        };
        let json =
            fs::read(dir.join(META_FILE)).map_err(|e| damaged(format!("read {META_FILE}: {e}")))?;
        let meta: LayerMeta = serde_json::from_slice(&json)
            .map_err(|e| damaged(format!("parse {META_FILE}: {e}")))?;
        if meta.format != LAYER_FORMAT {
            return Err(damaged(format!(
                "{META_FILE} says format {}, this podvisor makes and uses {LAYER_FORMAT}",
                meta.format
            )));
        }
        let path = dir.join(DISK_FILE);
        let size = fs::metadata(&path)
            .map_err(|e| damaged(format!("stat {DISK_FILE}: {e}")))?
            .len();
        if size != meta.size {
            return Err(damaged(format!(
                "{DISK_FILE} has {size} bytes, {META_FILE} says {}",
                meta.size
            )));
        }
        Ok(LayerDisk {
            chain_id: meta.chain_id,
            diff_id: meta.diff_id,
            parent: meta.parent,
            path,
            size,
        })
    }
}

/// A converted, synced layer disk not yet visible in the cache. Dropping it
/// deletes it.
#[derive(Debug)]
pub struct PreparedLayer {
    cache: LayerCache,
    tmp: TempDir,
    meta: LayerMeta,
}

impl PreparedLayer {
    /// The ChainID the disk will be stored under.
    pub fn chain_id(&self) -> &ChainId {
        &self.meta.chain_id
    }

    /// Renames the disk into place. If another writer committed the same
    /// ChainID first, this copy is discarded and the existing disk returned;
    /// an existing entry that is damaged (its disk deleted or cut short) is
    /// replaced by this one.
    pub fn commit(self) -> Result<LayerDisk, ImageError> {
        let layers = self.cache.layers_dir();
        let target = layers.join(self.meta.chain_id.hex());
        let mut replaced = false;
        loop {
            match rename_noreplace(self.tmp.path(), &target) {
                Ok(()) => {
                    let _ = self.tmp.keep();
                    sync_dir(&layers)?;
                    break;
                }
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) =>
                {
                    if replaced || self.cache.read_entry(&target).is_ok() {
                        // Lost the race: `self.tmp` is dropped (deleted) below.
                        break;
                    }
                    tracing::warn!(entry = %target.display(), "replacing a damaged layer cache entry");
                    self.cache.remove_entry_dir(&target)?;
                    replaced = true;
                }
                Err(e) => {
                    return Err(ImageError::io(
                        format!(
                            "rename {} to {}",
                            self.tmp.path().display(),
                            target.display()
                        ),
                        e,
                    ));
                }
            }
        }
        self.cache.read_entry(&target)
    }
}

/// `renameat2(RENAME_NOREPLACE)`, falling back to `rename` (which refuses a
/// non-empty target directory anyway) where the filesystem lacks it.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: valid NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => fs::rename(from, to),
        _ => Err(e),
    }
}

/// fsyncs a file and returns its size.
fn sync_file(path: &Path) -> Result<u64, ImageError> {
    let f = File::open(path).map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    f.sync_all()
        .map_err(|e| ImageError::io(format!("fsync {}", path.display()), e))?;
    Ok(f.metadata()
        .map_err(|e| ImageError::io(format!("stat {}", path.display()), e))?
        .len())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let err = |e| ImageError::io(format!("write {}", path.display()), e);
    let mut f = File::create(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

pub(crate) fn sync_dir(path: &Path) -> Result<(), ImageError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| ImageError::io(format!("fsync directory {}", path.display()), e))
}
