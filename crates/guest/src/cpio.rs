//! A writer for cpio archives in the "newc" (SVR4, no CRC) format, the format
//! the Linux kernel unpacks as its initramfs.
//!
//! Each entry is a 110-byte ASCII header (the magic `070701` and thirteen
//! 8-digit hex fields), the NUL-terminated name padded so that header + name
//! end on a 4-byte boundary, then the data padded to 4 bytes. The archive ends
//! with an entry named `TRAILER!!!`; this writer then pads it with zeros to a
//! 512-byte block as `cpio` and the kernel's `gen_init_cpio` do.
//!
//! Entries are written with uid/gid 0, mtime 0 and inode numbers counting up
//! from 1, so the same entries always give the same bytes. Names are stored
//! without a leading `/`. The writer does not create parent directories: write
//! a directory before anything inside it, as the kernel's unpacker needs.

use std::io::{self, Write};

/// The magic number that starts every newc header.
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Length of a newc header in bytes.
pub const HEADER_LEN: usize = 110;
/// Name of the entry that ends an archive.
pub const TRAILER_NAME: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Why an entry could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// The underlying writer failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The entry name is empty, contains a NUL byte or is the trailer's name.
    #[error("invalid entry name {0:?}")]
    BadName(String),
    /// Permission bits outside `0o7777` were given.
    #[error("invalid mode {mode:#o} for {name}: only permission bits (0o7777) may be given")]
    BadMode {
        /// The entry name.
        name: String,
        /// The mode given.
        mode: u32,
    },
    /// The entry is larger than the 32-bit size field of the format allows.
    #[error("{name} is {size} bytes; a newc entry holds at most 4 GiB - 1")]
    TooLarge {
        /// The entry name.
        name: String,
        /// Its size in bytes.
        size: usize,
    },
}

/// The fields of one newc header, besides the magic, the name size and the
/// always-zero check field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

/// Streams a newc cpio archive to `W`. Call [`CpioWriter::finish`] to write
/// the trailer; an archive without it is incomplete.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    offset: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive at the beginning of `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    /// Adds a directory with permission bits `mode` (e.g. `0o755`).
    pub fn directory(&mut self, name: &str, mode: u32) -> Result<(), CpioError> {
        let mode = check_mode(name, mode)?;
        self.entry(name, S_IFDIR | mode, 2, (0, 0), b"")
    }

    /// Adds a regular file with permission bits `mode` and contents `data`.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        let mode = check_mode(name, mode)?;
        self.entry(name, S_IFREG | mode, 1, (0, 0), data)
    }

    /// Adds a symbolic link `name` pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        if target.is_empty() || target.contains('\0') {
            return Err(CpioError::BadName(target.to_owned()));
        }
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node with permission bits `mode` and device
    /// number `major:minor`.
    pub fn char_device(
        &mut self,
        name: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let mode = check_mode(name, mode)?;
        self.entry(name, S_IFCHR | mode, 1, (major, minor), b"")
    }

    /// Writes the trailer, pads the archive to a 512-byte block, flushes and
    /// returns the underlying writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        let header = Header {
            nlink: 1,
            ..Header::default()
        };
        self.write_raw(header, TRAILER_NAME, b"")?;
        let block_pad = padding(self.offset, 512);
        self.put(&vec![0; block_pad])?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Validates `name` and writes one entry with the next inode number.
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        (rdevmajor, rdevminor): (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') || name == TRAILER_NAME {
            return Err(CpioError::BadName(name.to_owned()));
        }
        let filesize = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            name: name.to_owned(),
            size: data.len(),
        })?;
        let header = Header {
            ino: self.next_ino,
            mode,
            nlink,
            filesize,
            rdevmajor,
            rdevminor,
        };
        self.write_raw(header, name, data)?;
        self.next_ino += 1;
        Ok(())
    }

    /// Writes header, name and data with their padding.
    fn write_raw(&mut self, header: Header, name: &str, data: &[u8]) -> Result<(), CpioError> {
        let namesize = u32::try_from(name.len() + 1).map_err(|_| CpioError::TooLarge {
            name: name.to_owned(),
            size: name.len() + 1,
        })?;
        let mut buf = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        buf.extend_from_slice(NEWC_MAGIC);
        let fields = [
            header.ino,
            header.mode,
            0, // uid
            0, // gid
            header.nlink,
            0, // mtime
            header.filesize,
            0, // devmajor
            0, // devminor
            header.rdevmajor,
            header.rdevminor,
            namesize,
            0, // check
        ];
        for field in fields {
            buf.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        let name_pad = padding(self.offset + buf.len() as u64, 4);
        buf.resize(buf.len() + name_pad, 0);
        self.put(&buf)?;
        self.put(data)?;
        self.put(&[0; 3][..padding(self.offset, 4)])?;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }
}

/// Rejects anything but permission bits in `mode`.
fn check_mode(name: &str, mode: u32) -> Result<u32, CpioError> {
    if mode & !0o7777 != 0 {
        return Err(CpioError::BadMode {
            name: name.to_owned(),
            mode,
        });
    }
    Ok(mode)
}

/// Number of zero bytes that bring `offset` up to a multiple of `align`.
fn padding(offset: u64, align: u64) -> usize {
    ((align - offset % align) % align) as usize
}

#[cfg(test)]
#[path = "cpio_tests.rs"]
pub(crate) mod tests;
