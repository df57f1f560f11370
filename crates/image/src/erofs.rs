//! The `mkfs.erofs` wrapper that turns an unpacked layer into a disk image.
//!
//! erofs-utils 1.5 builds only from a directory. Its defaults already keep
//! what a layer needs: ownership, modes (set-id bits included), per-file
//! mtimes, device nodes, fifos, hardlinks and xattrs of every namespace
//! (`trusted.overlay.opaque` included: the xattr tolerance `-x` defaults to
//! keeping them). The image is left uncompressed so it can later be shared
//! through the host page cache (DAX).

use std::path::Path;
use std::process::Command;

use crate::{ChainId, ImageError};

/// The program run to build disks.
pub const MKFS_EROFS: &str = "mkfs.erofs";

/// Builds the EROFS image `out` from the directory `src`. The filesystem
/// UUID is derived from the ChainID so a rebuild of the same layer keeps it.
pub(crate) fn mkfs(src: &Path, out: &Path, chain_id: &ChainId) -> Result<(), ImageError> {
    let hex = chain_id.hex();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    let output = Command::new(MKFS_EROFS)
        .arg("--quiet")
        .arg(format!("-U{uuid}"))
        .arg(out)
        .arg(src)
        .output()
        .map_err(|e| ImageError::Mkfs {
            layer: chain_id.to_string(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                format!("`{MKFS_EROFS}` not found: install erofs-utils")
            } else {
                format!("cannot run `{MKFS_EROFS}`: {e}")
            },
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        return Err(ImageError::Mkfs {
            layer: chain_id.to_string(),
            reason: format!("{}: {}{}", output.status, stderr.trim(), stdout.trim()),
        });
    }
    Ok(())
}
