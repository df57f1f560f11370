//! Access to the files of an import source: a directory (an OCI image
//! layout) or a tar archive of one (`oci-archive`, `docker save`), plain,
//! gzip- or zstd-compressed.
//!
//! A plain archive is indexed once (name → offset and length) and blobs are
//! read straight out of it; a compressed one is first decompressed into a
//! scratch file that is deleted when the source is dropped. Symlinks inside
//! the archive (newer `docker save` links `<id>/layer.tar` to
//! `blobs/sha256/<hex>`) are followed, but never out of the archive.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::ImageError;

/// Largest JSON document (index, manifest, config) read from a source.
pub(crate) const MAX_JSON_BYTES: u64 = 8 << 20;

/// An opened import source.
pub(crate) struct Source {
    /// What the user named, for messages.
    path: PathBuf,
    kind: Kind,
}

enum Kind {
    Dir,
    Archive {
        /// The uncompressed tar (the source itself or `_scratch`).
        file: PathBuf,
        entries: HashMap<String, Node>,
        _scratch: Option<NamedTempFile>,
    },
}

enum Node {
    Data { offset: u64, len: u64 },
    Symlink(String),
    Hardlink(String),
}

impl Source {
    /// Opens `path`; a compressed archive is decompressed into `scratch_dir`.
    pub(crate) fn open(
        path: &Path,
        scratch_dir: &Path,
        scratch_prefix: &str,
    ) -> Result<Source, ImageError> {
        let bad = |reason: String| ImageError::BadSource {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        if meta.is_dir() {
            return Ok(Source {
                path: path.to_path_buf(),
                kind: Kind::Dir,
            });
        }
        let mut file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut file, &mut magic).map_err(|e| bad(format!("cannot read: {e}")))?;
        file.rewind()
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        let decoder: Option<Box<dyn Read>> = match &magic[..n] {
            [0x1f, 0x8b, ..] => Some(Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(
                file,
            )))),
            [0x28, 0xb5, 0x2f, 0xfd] => Some(Box::new(
                zstd::stream::read::Decoder::new(file).map_err(|e| bad(format!("zstd: {e}")))?,
            )),
            _ => None,
        };
        let (tar_path, scratch) = match decoder {
            None => (path.to_path_buf(), None),
            Some(mut decoder) => {
                let mut scratch = tempfile::Builder::new()
                    .prefix(scratch_prefix)
                    .tempfile_in(scratch_dir)
                    .map_err(|e| {
                        ImageError::io(
                            format!("create scratch file in {}", scratch_dir.display()),
                            e,
                        )
                    })?;
                io::copy(&mut decoder, scratch.as_file_mut()).map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => ImageError::TruncatedArchive {
                        path: path.to_path_buf(),
                        detail: format!("compressed stream ends early: {e}"),
                    },
                    _ => bad(format!("decompressing: {e}")),
                })?;
                (scratch.path().to_path_buf(), Some(scratch))
            }
        };
        let entries = index(path, &tar_path)?;
        Ok(Source {
            path: path.to_path_buf(),
            kind: Kind::Archive {
                file: tar_path,
                entries,
                _scratch: scratch,
            },
        })
    }

    /// The path the user gave.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the source has a file at `rel` (a `/`-separated path).
    pub(crate) fn exists(&self, rel: &str) -> bool {
        match &self.kind {
            Kind::Dir => clean(rel).is_some_and(|p| self.path.join(p).is_file()),
            Kind::Archive { entries, .. } => resolve(entries, rel).is_ok(),
        }
    }

    /// Opens the file at `rel`; returns the reader and the file's length.
    pub(crate) fn open_file(&self, rel: &str) -> Result<(Box<dyn Read + Send>, u64), ImageError> {
        let missing = |reason: String| ImageError::BadSource {
            path: self.path.clone(),
            reason: format!("`{rel}`: {reason}"),
        };
        match &self.kind {
            Kind::Dir => {
                let p = clean(rel).ok_or_else(|| missing("path leaves the source".into()))?;
                let full = self.path.join(p);
                let f = File::open(&full).map_err(|e| missing(format!("cannot open: {e}")))?;
                let len = f
                    .metadata()
                    .map_err(|e| missing(format!("cannot stat: {e}")))?
                    .len();
                Ok((Box::new(f), len))
            }
            Kind::Archive { file, entries, .. } => {
                let (offset, len) = resolve(entries, rel).map_err(missing)?;
                let mut f = File::open(file)
                    .map_err(|e| ImageError::io(format!("open {}", file.display()), e))?;
                f.seek(SeekFrom::Start(offset))
                    .map_err(|e| ImageError::io(format!("seek in {}", file.display()), e))?;
                Ok((Box::new(BufReader::new(f).take(len)), len))
            }
        }
    }

    /// Reads a small file (JSON) completely, refusing one over `MAX_JSON_BYTES`.
    pub(crate) fn read_json_file(&self, rel: &str) -> Result<Vec<u8>, ImageError> {
        let (reader, len) = self.open_file(rel)?;
        if len > MAX_JSON_BYTES {
            return Err(ImageError::BadSource {
                path: self.path.clone(),
                reason: format!(
                    "`{rel}` is {len} bytes, more than the {MAX_JSON_BYTES} allowed for a JSON document"
                ),
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        reader
            .take(MAX_JSON_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| ImageError::io(format!("read `{rel}` in {}", self.path.display()), e))?;
        Ok(bytes)
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Normalises a `/`-separated path inside a source: drops `.`, empty and
/// leading `/` components and resolves `..`; `None` if it climbs out.
pub(crate) fn clean(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Indexes every entry of the tar at `tar_path`; `shown` names it in errors.
fn index(shown: &Path, tar_path: &Path) -> Result<HashMap<String, Node>, ImageError> {
    let truncated = |detail: String| ImageError::TruncatedArchive {
        path: shown.to_path_buf(),
        detail,
    };
    let bad = |reason: String| ImageError::BadSource {
        path: shown.to_path_buf(),
        reason,
    };
    let file = File::open(tar_path)
        .map_err(|e| ImageError::io(format!("open {}", tar_path.display()), e))?;
    let file_len = file
        .metadata()
        .map_err(|e| ImageError::io(format!("stat {}", tar_path.display()), e))?
        .len();
    let mut archive = tar::Archive::new(file);
    let mut entries = HashMap::new();
    let mut end = 0u64;
    let read_err = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            truncated(e.to_string())
        } else {
            bad(format!("not a tar archive or OCI layout directory: {e}"))
        }
    };
    for entry in archive.entries_with_seek().map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(name) = clean(&raw) else { continue };
        let offset = entry.raw_file_position();
        let len = entry.size();
        end = offset + len.div_ceil(512) * 512;
        if offset.saturating_add(len) > file_len {
            return Err(truncated(format!(
                "entry `{raw}` needs {len} bytes at offset {offset}, the archive has {file_len}"
            )));
        }
        let link = || {
            entry
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned())
        };
        let node = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => Node::Data { offset, len },
            tar::EntryType::Symlink => match link() {
                Some(target) => Node::Symlink(target),
                None => continue,
            },
            tar::EntryType::Link => match link().and_then(|t| clean(&t)) {
                Some(target) => Node::Hardlink(target),
                None => continue,
            },
            _ => continue,
        };
        entries.insert(name, node);
    }
    if entries.is_empty() {
        return Err(bad(
            "not a tar archive or OCI layout directory (no files)".into()
        ));
    }
    // Two zero blocks close every tar; without them the archive was cut
    // exactly between two entries.
    if file_len < end + 1024 {
        return Err(truncated("the end-of-archive marker is missing".into()));
    }
    Ok(entries)
}

/// Follows symlinks and hardlinks inside the archive to a file's data.
fn resolve(entries: &HashMap<String, Node>, rel: &str) -> Result<(u64, u64), String> {
    let mut path = clean(rel).ok_or("path leaves the archive")?;
    for _ in 0..32 {
        match entries.get(&path) {
            None => return Err("not found".into()),
            Some(Node::Data { offset, len }) => return Ok((*offset, *len)),
            Some(Node::Hardlink(target)) => path = target.clone(),
            Some(Node::Symlink(target)) => {
                if target.starts_with('/') {
                    return Err(format!("symlink to absolute path `{target}`"));
                }
                let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                path = clean(&format!("{dir}/{target}")).ok_or("symlink leaves the archive")?;
            }
        }
    }
    Err("too many levels of links".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_resolves_dots_but_not_out_of_the_root() {
        assert_eq!(
            clean("./blobs//sha256/x").as_deref(),
            Some("blobs/sha256/x")
        );
        assert_eq!(clean("abc/../blobs/x").as_deref(), Some("blobs/x"));
        assert_eq!(clean("/index.json").as_deref(), Some("index.json"));
        assert_eq!(clean("../x"), None);
        assert_eq!(clean("a/../../x"), None);
    }
}
