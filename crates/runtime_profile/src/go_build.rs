//! A Go binary's build information, read the way Go's own
//! `debug/buildinfo` reads it: the ELF section `.go.buildinfo` (or, in a
//! binary without a section named so, its first writable data segment)
//! holds a 32-byte header, `\xff Go buildinf:`, the pointer size
//! and a flags byte; since Go 1.18 (flag bit 2) the Go version and module
//! information follow inline as length-prefixed strings. Older binaries
//! (Go 1.13 to 1.17) point to them instead: they are known as Go, without
//! a version.
//!
//! The file is untrusted (a container image's): every read is bounded
//! ([`MAX_SECTIONS`], [`MAX_SEGMENTS`], [`SEARCH_LEN`],
//! [`MAX_VERSION_LEN`]), and whatever does not parse is "not a Go binary",
//! never an error. Only failed reads are errors.

use std::io::{self, Read, Seek, SeekFrom};

/// The magic that starts Go's build information.
pub const MAGIC: &[u8] = b"\xff Go buildinf:";
/// Length of the build information's header.
const HEADER_LEN: usize = 32;
/// The header's alignment in its section.
const ALIGN: usize = 16;
/// Flag: version and module information follow the header inline.
const FLAG_INLINE: u8 = 2;
/// Most section headers read (a Go binary has a few dozen).
pub const MAX_SECTIONS: usize = 4096;
/// Most program headers read.
pub const MAX_SEGMENTS: usize = 256;
/// Most bytes of the section name table read.
const MAX_NAMES: u64 = 64 << 10;
/// Most bytes of the build information's section searched (Go reads the
/// same amount).
pub const SEARCH_LEN: u64 = 64 << 10;
/// Longest version string accepted (`go1.22.5`, `devel go1.23-abc...`).
pub const MAX_VERSION_LEN: usize = 256;

const SHT_NOBITS: u64 = 8;
const PT_LOAD: u64 = 1;
const PF_X: u64 = 1;
const PF_W: u64 = 2;

/// What a Go binary says about how it was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoBuild {
    /// The Go release that built it (`go1.19.8`); `None` for a binary of
    /// the older format, which points to its version instead.
    pub version: Option<String>,
}

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GoBuildError {
    #[error("reading the executable")]
    Read(#[source] io::Error),
}

/// An ELF file's layout: 32 or 64 bits, little or big endian.
#[derive(Clone, Copy)]
struct Elf {
    wide: bool,
    big: bool,
}

impl Elf {
    fn u16(self, b: &[u8], at: usize) -> Option<u64> {
        let a: [u8; 2] = b.get(at..at + 2)?.try_into().ok()?;
        Some(u64::from(if self.big {
            u16::from_be_bytes(a)
        } else {
            u16::from_le_bytes(a)
        }))
    }
    fn u32(self, b: &[u8], at: usize) -> Option<u64> {
        let a: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        Some(u64::from(if self.big {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }))
    }
    fn u64(self, b: &[u8], at: usize) -> Option<u64> {
        let a: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
        Some(if self.big {
            u64::from_be_bytes(a)
        } else {
            u64::from_le_bytes(a)
        })
    }
}

/// Reads up to `len` bytes at `offset`; fewer at the end of the file.
fn read_at<R: Read + Seek>(r: &mut R, offset: u64, len: u64) -> Result<Vec<u8>, GoBuildError> {
    r.seek(SeekFrom::Start(offset))
        .map_err(GoBuildError::Read)?;
    let mut buf = Vec::new();
    r.take(len)
        .read_to_end(&mut buf)
        .map_err(GoBuildError::Read)?;
    Ok(buf)
}

/// A file region: (offset, size) in the file.
type Region = (u64, u64);

/// The file region of the section named `.go.buildinfo`, if the section
/// headers are there and name one.
fn buildinfo_section<R: Read + Seek>(
    r: &mut R,
    elf: Elf,
    header: &[u8],
) -> Result<Option<Region>, GoBuildError> {
    let (shoff, entsize, count, names_index) = if elf.wide {
        (
            elf.u64(header, 0x28),
            elf.u16(header, 0x3A),
            elf.u16(header, 0x3C),
            elf.u16(header, 0x3E),
        )
    } else {
        (
            elf.u32(header, 0x20),
            elf.u16(header, 0x2E),
            elf.u16(header, 0x30),
            elf.u16(header, 0x32),
        )
    };
    let (Some(shoff), Some(entsize), Some(count), Some(names_index)) =
        (shoff, entsize, count, names_index)
    else {
        return Ok(None);
    };
    let wanted = if elf.wide { 64 } else { 40 };
    if shoff == 0 || count == 0 || entsize != wanted || count as usize > MAX_SECTIONS {
        return Ok(None);
    }
    let table = read_at(r, shoff, count * entsize)?;
    let section = |i: u64| -> Option<(u64, u64, Region)> {
        let at = usize::try_from(i * entsize).ok()?;
        let entry = table.get(at..at + entsize as usize)?;
        let name = elf.u32(entry, 0)?;
        let kind = elf.u32(entry, 4)?;
        let (offset, size) = if elf.wide {
            (elf.u64(entry, 24)?, elf.u64(entry, 32)?)
        } else {
            (elf.u32(entry, 16)?, elf.u32(entry, 20)?)
        };
        Some((name, kind, (offset, size)))
    };
    let Some((_, _, (names_at, names_len))) = section(names_index) else {
        return Ok(None);
    };
    let names = read_at(r, names_at, names_len.min(MAX_NAMES))?;
    for i in 0..count {
        let Some((name, kind, region)) = section(i) else {
            break;
        };
        let named = usize::try_from(name)
            .ok()
            .and_then(|n| names.get(n..))
            .is_some_and(|rest| rest.starts_with(b".go.buildinfo\0"));
        if named && kind != SHT_NOBITS {
            return Ok(Some(region));
        }
    }
    Ok(None)
}

/// The file region of the first loaded segment that is writable and not
/// executable (where the linker puts the build information; Go's own
/// reader looks there when no section is named `.go.buildinfo`).
fn first_writable_segment<R: Read + Seek>(
    r: &mut R,
    elf: Elf,
    header: &[u8],
) -> Result<Option<Region>, GoBuildError> {
    let (phoff, entsize, count) = if elf.wide {
        (
            elf.u64(header, 0x20),
            elf.u16(header, 0x36),
            elf.u16(header, 0x38),
        )
    } else {
        (
            elf.u32(header, 0x1C),
            elf.u16(header, 0x2A),
            elf.u16(header, 0x2C),
        )
    };
    let (Some(phoff), Some(entsize), Some(count)) = (phoff, entsize, count) else {
        return Ok(None);
    };
    let wanted = if elf.wide { 56 } else { 32 };
    if phoff == 0 || entsize != wanted || count as usize > MAX_SEGMENTS {
        return Ok(None);
    }
    let table = read_at(r, phoff, count * entsize)?;
    for entry in table.chunks_exact(entsize as usize) {
        let (flags, offset, size) = if elf.wide {
            (elf.u32(entry, 4), elf.u64(entry, 8), elf.u64(entry, 32))
        } else {
            (elf.u32(entry, 24), elf.u32(entry, 4), elf.u32(entry, 16))
        };
        if elf.u32(entry, 0) == Some(PT_LOAD)
            && let (Some(flags), Some(offset), Some(size)) = (flags, offset, size)
            && flags & (PF_X | PF_W) == PF_W
        {
            return Ok(Some((offset, size)));
        }
    }
    Ok(None)
}

/// An unsigned LEB128 varint at the start of `b`: (value, its length).
fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The build information in `data` (a section's first bytes): the header
/// at a 16-byte boundary, and the inline version string if there is one.
pub fn parse_build_info(data: &[u8]) -> Option<GoBuild> {
    let start = (0..data.len())
        .step_by(ALIGN)
        .find(|&i| data[i..].starts_with(MAGIC) && data.len() - i >= HEADER_LEN)?;
    let header = &data[start..];
    if header[15] & FLAG_INLINE == 0 {
        return Some(GoBuild { version: None });
    }
    let rest = &header[HEADER_LEN..];
    let version = uvarint(rest).and_then(|(len, skip)| {
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_VERSION_LEN)?;
        let bytes = rest.get(skip..skip + len)?;
        let text = std::str::from_utf8(bytes).ok()?;
        (!text.is_empty() && text.chars().all(|c| c.is_ascii_graphic() || c == ' '))
            .then(|| text.to_string())
    });
    Some(GoBuild { version })
}

/// Go's build information in an executable (an ELF file), or `None` if
/// it is no Go binary.
pub fn go_build_info<R: Read + Seek>(r: &mut R) -> Result<Option<GoBuild>, GoBuildError> {
    let header = read_at(r, 0, 64)?;
    if !header.starts_with(b"\x7fELF") || header.len() < 52 {
        return Ok(None);
    }
    let elf = match (header[4], header[5]) {
        (1, 1) => Elf {
            wide: false,
            big: false,
        },
        (1, 2) => Elf {
            wide: false,
            big: true,
        },
        (2, 1) => Elf {
            wide: true,
            big: false,
        },
        (2, 2) => Elf {
            wide: true,
            big: true,
        },
        _ => return Ok(None),
    };
    if elf.wide && header.len() < 64 {
        return Ok(None);
    }
    let region = match buildinfo_section(r, elf, &header)? {
        Some(region) => Some(region),
        None => first_writable_segment(r, elf, &header)?,
    };
    let Some((offset, size)) = region else {
        return Ok(None);
    };
    let data = read_at(r, offset, size.min(SEARCH_LEN))?;
    Ok(parse_build_info(&data))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    /// A build information blob: header (inline format, 8-byte
    /// pointers), then the version and an empty module string.
    pub(crate) fn blob(version: &str) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[8, FLAG_INLINE]);
        b.resize(HEADER_LEN, 0);
        b.push(version.len() as u8);
        b.extend_from_slice(version.as_bytes());
        b.push(0);
        b
    }

    /// A minimal little-endian ELF64 file: header, a writable segment over
    /// `data` at 0x100, and with `with_sections` the section headers
    /// (`data` in a section named `section`) and their names after it.
    pub(crate) fn elf64(section: &str, data: &[u8], with_sections: bool) -> Vec<u8> {
        let mut f = vec![0u8; 0x100];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little endian
        f[6] = 1;
        f[0x10] = 2; // ET_EXEC
        f[0x12] = 0x3e; // x86-64
        // One program header at 0x40: a writable PT_LOAD over `data`.
        f[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3A].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x40;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        f[ph + 4..ph + 8].copy_from_slice(&6u32.to_le_bytes()); // R|W
        f[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
        f.extend_from_slice(data);
        if !with_sections {
            return f;
        }
        let names_at = f.len() as u64;
        let names = format!("\0.shstrtab\0{section}\0");
        f.extend_from_slice(names.as_bytes());
        while !f.len().is_multiple_of(8) {
            f.push(0);
        }
        let shoff = f.len() as u64;
        // Section 0: null; 1: names; 2: the data.
        let mut sh = vec![0u8; 64 * 3];
        let entry = |sh: &mut Vec<u8>, i: usize, name: u32, kind: u32, off: u64, size: u64| {
            let e = &mut sh[i * 64..(i + 1) * 64];
            e[0..4].copy_from_slice(&name.to_le_bytes());
            e[4..8].copy_from_slice(&kind.to_le_bytes());
            e[24..32].copy_from_slice(&off.to_le_bytes());
            e[32..40].copy_from_slice(&size.to_le_bytes());
        };
        entry(&mut sh, 1, 1, 3, names_at, names.len() as u64);
        entry(&mut sh, 2, 11, 1, 0x100, data.len() as u64);
        f.extend_from_slice(&sh);
        f[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        f[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        f[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        f[0x3E..0x40].copy_from_slice(&1u16.to_le_bytes());
        f
    }

    fn read(file: &[u8]) -> Option<GoBuild> {
        go_build_info(&mut Cursor::new(file)).unwrap()
    }

    #[test]
    fn the_version_is_read_from_the_go_buildinfo_section() {
        let mut data = vec![0u8; 16];
        data.extend(blob("go1.19.8"));
        let file = elf64(".go.buildinfo", &data, true);
        assert_eq!(
            read(&file),
            Some(GoBuild {
                version: Some("go1.19.8".into())
            })
        );
        // Without section headers, the first writable segment is searched.
        let file = elf64("", &data, false);
        assert_eq!(read(&file).unwrap().version.as_deref(), Some("go1.19.8"));
    }

    #[test]
    fn other_files_are_no_go_binaries() {
        // An ELF whose sections name no build information, and whose
        // writable data does not hold it either.
        let file = elf64(".data", &[0u8; 64], true);
        assert_eq!(read(&file), None);
        // Without a `.go.buildinfo` section, only a writable segment that
        // is not executable is searched (as Go does).
        let mut file = elf64(".rodata", &blob("go1.21.0"), true);
        assert_eq!(read(&file).unwrap().version.as_deref(), Some("go1.21.0"));
        file[0x44..0x48].copy_from_slice(&7u32.to_le_bytes()); // R|W|X
        assert_eq!(read(&file), None);
        assert_eq!(read(b"#!/bin/sh\n\xff Go buildinf:"), None);
        assert_eq!(read(b""), None);
        assert_eq!(read(b"\x7fELF\x02\x01"), None);
    }

    #[test]
    fn the_header_must_be_aligned_and_the_version_sane() {
        let mut data = vec![0u8; 8];
        data.extend(blob("go1.19.8"));
        assert_eq!(
            parse_build_info(&data),
            None,
            "magic off a 16-byte boundary"
        );
        // The older format: known as Go, without a version.
        let mut old = blob("");
        old[15] = 0;
        assert_eq!(parse_build_info(&old), Some(GoBuild { version: None }));
        // A length past the data, or a version with control bytes.
        let mut long = blob("go1.19.8");
        long[HEADER_LEN] = 200;
        assert_eq!(parse_build_info(&long), Some(GoBuild { version: None }));
        assert_eq!(
            parse_build_info(&blob("go\n1")),
            Some(GoBuild { version: None })
        );
        // A truncated header is no build information.
        assert_eq!(parse_build_info(&blob("go1.19.8")[..20]), None);
    }

    #[test]
    fn hostile_tables_are_bounded() {
        // A section table claiming 65535 entries at the end of the file
        // is not read.
        let mut file = elf64(".go.buildinfo", &blob("go1.19.8"), true);
        file[0x3C..0x3E].copy_from_slice(&u16::MAX.to_le_bytes());
        // It falls back to the writable segment, which holds the blob.
        assert_eq!(read(&file).unwrap().version.as_deref(), Some("go1.19.8"));
        // A section whose size is huge is read up to SEARCH_LEN only.
        let mut file = elf64(".go.buildinfo", &blob("go1.19.8"), true);
        let shoff = u64::from_le_bytes(file[0x28..0x30].try_into().unwrap()) as usize;
        let size_at = shoff + 2 * 64 + 32;
        file[size_at..size_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(read(&file).unwrap().version.as_deref(), Some("go1.19.8"));
    }
}
