//! One layer's way from blob to unpacked directory: decompress by media
//! type, verify the blob digest and size and the DiffID while streaming,
//! enforce the decompression limit, and unpack safely into a staging
//! directory that is deleted unless every check passed.

use std::fs;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tempfile::TempDir;

use crate::digest::HashingReader;
use crate::{Digest, ImageError, unpack};

/// The blob a layer came from: what its descriptor in the manifest says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerBlob {
    /// e.g. `application/vnd.oci.image.layer.v1.tar+gzip`.
    pub media_type: String,
    /// Digest of the (compressed) blob.
    pub digest: Digest,
    /// Size of the (compressed) blob in bytes.
    pub size: u64,
}

/// Where and how far a layer may be unpacked.
pub(crate) struct Staging<'a> {
    /// The directory the staging directory is made in.
    pub dir: &'a Path,
    /// The staging directory's name prefix.
    pub prefix: &'a str,
    /// The largest uncompressed layer accepted, in bytes.
    pub uncompressed_limit: u64,
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression a layer media type implies; `None` for a media type
    /// that is not a layer podvisor understands.
    pub fn for_media_type(media_type: &str) -> Option<Compression> {
        Some(match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Compression::Zstd,
            _ => return None,
        })
    }
}

/// A decompressor that gives back its input reader when done, so the blob
/// hash can be finished over the whole blob.
enum Decoder<R: Read> {
    Plain(R),
    Gzip(flate2::read::MultiGzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<R>>),
}

impl<R: Read> Decoder<R> {
    fn new(compression: Compression, inner: R) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Decoder::Plain(inner),
            Compression::Gzip => Decoder::Gzip(flate2::read::MultiGzDecoder::new(inner)),
            Compression::Zstd => Decoder::Zstd(zstd::stream::read::Decoder::new(inner)?),
        })
    }

    fn into_inner(self) -> R {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish().into_inner(),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
        }
    }
}

/// A verified, unpacked layer in `<cache>/layers/.staging/`; deleted on drop.
pub(crate) struct Converted {
    staging: TempDir,
    /// Bytes of the uncompressed layer tar.
    pub uncompressed_size: u64,
}

impl Converted {
    /// The unpacked layer root.
    pub(crate) fn rootfs(&self) -> PathBuf {
        self.staging.path().join("rootfs")
    }
}

/// Streams `blob` through the decompressor into a staging directory made
/// as `staging` says, checking it against `source` (digest, size, media type) and `diff_id`.
///
/// When several things are wrong, the blob's own integrity is reported
/// first: a blob that does not match its digest is the cause, whatever the
/// tar parser made of it.
pub(crate) fn convert(
    staging: &Staging<'_>,
    source: &LayerBlob,
    diff_id: &Digest,
    blob: impl Read,
) -> Result<Converted, ImageError> {
    let layer = source.digest.to_string();
    let compression = Compression::for_media_type(&source.media_type).ok_or_else(|| {
        ImageError::UnknownMediaType {
            layer: layer.clone(),
            media_type: source.media_type.clone(),
        }
    })?;
    let limit = staging.uncompressed_limit;
    let staging = tempfile::Builder::new()
        .prefix(staging.prefix)
        .tempdir_in(staging.dir)
        .map_err(|e| {
            ImageError::io(
                format!("create staging directory in {}", staging.dir.display()),
                e,
            )
        })?;
    let rootfs = staging.path().join("rootfs");
    fs::create_dir(&rootfs)
        .and_then(|_| fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755)))
        .map_err(|e| ImageError::io(format!("create {}", rootfs.display()), e))?;

    // Read at most one byte more than declared: enough to tell "too long".
    let blob_reader = HashingReader::new(blob.take(source.size.saturating_add(1)), None);
    let stream_err = |source| ImageError::LayerStream {
        layer: layer.clone(),
        source,
    };
    let (unpacked, diff) = match Decoder::new(compression, blob_reader) {
        Err(e) => return Err(stream_err(e)),
        Ok(decoder) => {
            let mut archive = tar::Archive::new(HashingReader::new(decoder, Some(limit)));
            let mut unpacked = unpack::unpack(&mut archive, &rootfs, &layer).map(|_| ());
            let mut diff_reader = archive.into_inner();
            if unpacked.is_ok() {
                // Whatever follows the end-of-archive marker is part of the DiffID too.
                if let Err(e) = io::copy(&mut diff_reader, &mut io::sink()) {
                    unpacked = Err(stream_err(e));
                }
            }
            let diff = (
                diff_reader.digest(),
                diff_reader.count(),
                diff_reader.limit_exceeded(),
            );
            (unpacked, (diff, diff_reader.into_inner().into_inner()))
        }
    };
    let ((diff_digest, uncompressed_size, limit_exceeded), blob_reader) = diff;

    // 1. the blob itself: size, then digest.
    let (blob_digest, blob_len) = blob_reader
        .finish()
        .map_err(|e| ImageError::io(format!("read layer blob {layer}"), e))?;
    let what = || format!("layer blob {layer}");
    if blob_len < source.size {
        return Err(ImageError::Truncated {
            what: what(),
            expected: source.size,
            actual: blob_len,
        });
    }
    if blob_len > source.size {
        return Err(ImageError::SizeMismatch {
            what: what(),
            expected: source.size,
            actual: blob_len,
        });
    }
    if blob_digest != source.digest {
        return Err(ImageError::DigestMismatch {
            what: what(),
            expected: source.digest.to_string(),
            actual: blob_digest.to_string(),
        });
    }
    // 2. the uncompressed stream: limit, content, DiffID.
    if limit_exceeded {
        return Err(ImageError::DecompressionLimit { layer, limit });
    }
    unpacked?;
    if &diff_digest != diff_id {
        return Err(ImageError::DiffIdMismatch {
            layer,
            expected: diff_id.to_string(),
            actual: diff_digest.to_string(),
        });
    }
    Ok(Converted {
        staging,
        uncompressed_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_map_to_compressions() {
        let c = Compression::for_media_type;
        assert_eq!(
            c("application/vnd.oci.image.layer.v1.tar"),
            Some(Compression::None)
        );
        assert_eq!(
            c("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            c("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            c("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(c("application/vnd.oci.image.layer.v1.tar+bzip2"), None);
        assert_eq!(c("application/vnd.oci.image.config.v1+json"), None);
    }
}
