//! The `mkfs.erofs` wrapper that turns an unpacked layer into a disk image.
//!
//! erofs-utils 1.5 builds only from a directory. Its defaults already keep
//! what a layer needs: ownership, modes (set-id bits included), per-file
//! mtimes, device nodes, fifos, hardlinks and xattrs of every namespace
//! (`trusted.overlay.opaque` included: the xattr tolerance `-x` defaults to
//! keeping them).
//!
//! A disk is built so a guest can map it with DAX (a virtio-pmem device
//! mounted with `dax=always`, sharing the host's page cache of the file):
//! uncompressed, with no file's tail inlined in its inode block
//! (`-Enoinline_data`: the kernel maps only plain, block-aligned file data
//! with DAX), and the file padded with a hole to a multiple of
//! [`DISK_ALIGN`] (virtio-pmem maps whole 2 MiB units; EROFS ignores what
//! follows its last block). The same disk serves virtio-blk.
//!
//! A guest's pmem driver looks for a BTT, PFN or device-DAX info block at
//! 4 KiB into the device before it maps it as plain pmem; there EROFS has
//! its first block after the superblock's, often a file's data, which the
//! image chose. A disk whose block there starts with such a signature is
//! refused ([`ImageError::NvdimmInfoBlock`]), so no image makes its pods'
//! guests take its layer for another kind of device.

use std::path::Path;
use std::process::Command;

use crate::{ChainId, ImageError};

/// The program run to build disks.
pub const MKFS_EROFS: &str = "mkfs.erofs";

/// A layer disk's size is a multiple of this (2 MiB), the unit a
/// virtio-pmem device maps.
pub const DISK_ALIGN: u64 = 2 << 20;

/// The EROFS UUID of the layer disk of `chain_id` (lower case,
/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`): the first 16 bytes of the
/// ChainID, so every build of the layer, on any host, has the same one. A
/// guest finds a layer's virtio-pmem device by it.
pub fn layer_uuid(chain_id: &ChainId) -> String {
    let hex = chain_id.hex();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Where a pmem driver looks for an NVDIMM info block.
const NVDIMM_INFO_OFFSET: u64 = 4096;

/// The signatures of the info blocks Linux's nd_pmem probes for (BTT, PFN,
/// device DAX), 16 bytes each.
const NVDIMM_INFO_SIGNATURES: [&str; 3] =
    ["BTT_ARENA_INFO\0", "NVDIMM_PFN_INFO\0", "NVDIMM_DAX_INFO\0"];

/// The NVDIMM info block signature `block` (the bytes at 4 KiB into a
/// device) starts with, if any.
pub(crate) fn nvdimm_info_signature(block: &[u8]) -> Option<&'static str> {
    NVDIMM_INFO_SIGNATURES
        .into_iter()
        .find(|s| block.starts_with(s.as_bytes()))
}

/// `size` rounded up to a multiple of [`DISK_ALIGN`] (at least one unit).
pub fn padded_size(size: u64) -> u64 {
    size.max(1).div_ceil(DISK_ALIGN) * DISK_ALIGN
}

/// Builds the EROFS image `out` from the directory `src` (see the module
/// documentation for its layout) and pads it.
pub(crate) fn mkfs(src: &Path, out: &Path, chain_id: &ChainId) -> Result<(), ImageError> {
    let uuid = layer_uuid(chain_id);
    let output = Command::new(MKFS_EROFS)
        .arg("--quiet")
        .arg("-Enoinline_data")
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
    if let Some(signature) = nvdimm_info_signature(&read_at(out, NVDIMM_INFO_OFFSET, 16)?) {
        return Err(ImageError::NvdimmInfoBlock {
            layer: chain_id.to_string(),
            signature: signature.trim_end_matches('\0'),
        });
    }
    pad(out).map(drop)
}

/// Up to `len` bytes of `path` from `offset` (fewer at its end).
fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, ImageError> {
    use std::io::{Read, Seek, SeekFrom};
    let err = |e| ImageError::io(format!("read {}", path.display()), e);
    let mut file = std::fs::File::open(path).map_err(err)?;
    file.seek(SeekFrom::Start(offset)).map_err(err)?;
    let mut bytes = Vec::with_capacity(len);
    file.take(len as u64).read_to_end(&mut bytes).map_err(err)?;
    Ok(bytes)
}

/// Extends `path` with a hole to [`padded_size`] of its size; returns the
/// new size.
fn pad(path: &Path) -> Result<u64, ImageError> {
    let err = |e| ImageError::io(format!("pad {}", path.display()), e);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(err)?;
    let size = padded_size(file.metadata().map_err(err)?.len());
    file.set_len(size).map_err(err)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_padded_to_whole_2_mib_units() {
        assert_eq!(padded_size(0), DISK_ALIGN);
        assert_eq!(padded_size(1), DISK_ALIGN);
        assert_eq!(padded_size(4096), DISK_ALIGN);
        assert_eq!(padded_size(DISK_ALIGN), DISK_ALIGN);
        assert_eq!(padded_size(DISK_ALIGN + 1), 2 * DISK_ALIGN);
        assert_eq!(padded_size(5 * DISK_ALIGN - 7), 5 * DISK_ALIGN);
    }

    #[test]
    fn padding_extends_the_file_with_zeros_and_keeps_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, b"erofs").unwrap();
        assert_eq!(pad(&path).unwrap(), DISK_ALIGN);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, DISK_ALIGN);
        assert_eq!(&bytes[..5], b"erofs");
        assert!(bytes[5..].iter().all(|&b| b == 0));
        // Already whole: unchanged.
        assert_eq!(pad(&path).unwrap(), DISK_ALIGN);
    }

    #[test]
    fn nvdimm_info_signatures_are_recognised_at_the_blocks_start_only() {
        assert_eq!(
            nvdimm_info_signature(b"NVDIMM_PFN_INFO\0and the rest"),
            Some("NVDIMM_PFN_INFO\0")
        );
        assert_eq!(
            nvdimm_info_signature(b"BTT_ARENA_INFO\0\0"),
            Some("BTT_ARENA_INFO\0")
        );
        assert_eq!(
            nvdimm_info_signature(b"NVDIMM_DAX_INFO\0"),
            Some("NVDIMM_DAX_INFO\0")
        );
        // Without the NUL, elsewhere in the block, short or empty: none.
        assert_eq!(nvdimm_info_signature(b"NVDIMM_PFN_INFOX"), None);
        assert_eq!(nvdimm_info_signature(b"xNVDIMM_PFN_INFO\0"), None);
        assert_eq!(nvdimm_info_signature(b"NVDIMM_PFN"), None);
        assert_eq!(nvdimm_info_signature(b""), None);
    }

    #[test]
    fn the_uuid_is_the_chain_ids_first_16_bytes() {
        let chain = ChainId::parse(
            "sha256:0123456789abcdef0123456789abcdef00112233445566778899aabbccddeeff",
        )
        .unwrap();
        assert_eq!(layer_uuid(&chain), "01234567-89ab-cdef-0123-456789abcdef");
    }
}
