//! Sealed snapshots: a VM state compressed with zstd and encrypted with
//! AES-256-GCM under a key used for this one snapshot, in chunks sealed
//! as the STREAM construction does (Hoang, Reyhanitabar, Rogaway and
//! Vizár, "Online Authenticated-Encryption and its Nonce-Reuse
//! Misuse-Resistance", 2015): each chunk's nonce is the file's random
//! prefix, the chunk's number and a flag set on the last chunk only, so
//! a changed, dropped, repeated, reordered or cut-off chunk fails to open,
//! and so does anything appended. The header (format, chunk size, nonce
//! prefix and the caller's context, e.g. the pod it belongs to) is the
//! associated data of every chunk: a changed header, or a snapshot of
//! another pod presented under this one's context, fails too.
//!
//! [`OpenedSnapshot::open`] authenticates every chunk before it gives out
//! any plaintext (a first pass that decrypts and drops), so nothing of a
//! tampered file reaches the VMM; the second pass, which decompresses what
//! it reads, authenticates again and fails on any change made in between.
//!
//! Layout (integers big-endian):
//!
//! ```text
//! magic "PVSNAP" 0x00 0x01 | version u8 = 1 | cipher u8 = 1 (AES-256-GCM)
//! | compression u8 = 1 (zstd) | 0u8 | chunk size u32 | nonce prefix [7]
//! | 0u8 | context length u16 | context
//! then chunks: length u32 (ciphertext and tag) | ciphertext | tag
//! nonce of chunk n = prefix | n as u32 | 1 if last else 0
//! ```

use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

const MAGIC: [u8; 8] = *b"PVSNAP\x00\x01";
const VERSION: u8 = 1;
const CIPHER_AES_256_GCM: u8 = 1;
const COMPRESSION_ZSTD: u8 = 1;
const PREFIX_LEN: usize = 7;
const FIXED_HEADER_LEN: usize = 8 + 4 + 4 + PREFIX_LEN + 1 + 2;
const TAG_LEN: usize = 16;
/// Plaintext bytes per chunk, unless the writer is told otherwise.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// Chunk sizes a file may declare: a hostile file cannot make the reader
/// allocate more than this per chunk.
const CHUNK_SIZES: std::ops::RangeInclusive<usize> = 4096..=(4 << 20);
/// Most bytes of context.
pub const MAX_CONTEXT_LEN: usize = 1024;
/// zstd level: fast; a VM's free memory is mostly zeros.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("not a podvisor snapshot (its header is not one)")]
    NotASnapshot,
    #[error(
        "snapshot format {version} cipher {cipher} compression {compression} is not one this podvisor reads"
    )]
    Unsupported {
        version: u8,
        cipher: u8,
        compression: u8,
    },
    #[error("the snapshot belongs to {found:?}, not {wanted:?}")]
    OtherContext { found: String, wanted: String },
    #[error(
        "the snapshot failed authentication at chunk {chunk}: it was changed, or this is not its key"
    )]
    Tampered { chunk: u32 },
    #[error("the snapshot ends before its last chunk (cut off after {chunks} chunks)")]
    Truncated { chunks: u32 },
    #[error("the snapshot has data after its last chunk")]
    TrailingData,
    #[error("a snapshot key is 32 bytes, not {0}")]
    KeyLength(usize),
    #[error("the snapshot context is {0} bytes, more than {MAX_CONTEXT_LEN}")]
    ContextTooLong(usize),
    #[error("chunk size {0} is outside 4 KiB..4 MiB")]
    ChunkSize(usize),
    #[error("the snapshot has more chunks than its format can number")]
    TooManyChunks,
    #[error("making a snapshot key")]
    Random(#[source] podvisor_store::RandomError),
    #[error("the snapshot was already finished, or its writing failed before")]
    Finished,
}

impl SealError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> SealError {
        move |source| SealError::Io { what, source }
    }
}

impl From<SealError> for io::Error {
    fn from(e: SealError) -> io::Error {
        match e {
            SealError::Io { source, .. } => source,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// The key of one snapshot. Its bytes are zeroed when it is dropped (each
/// clone's too); they leave the process only to the management server,
/// which keeps them.
#[derive(Clone)]
pub struct SnapshotKey(Box<[u8; 32]>);

impl SnapshotKey {
    /// A fresh random key.
    pub fn generate() -> Result<SnapshotKey, SealError> {
        let mut key = Box::new([0u8; 32]);
        podvisor_store::fill_random(&mut key[..]).map_err(SealError::Random)?;
        Ok(SnapshotKey(key))
    }

    /// A key as [`SnapshotKey::as_bytes`] gave it.
    pub fn from_bytes(bytes: &[u8]) -> Result<SnapshotKey, SealError> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SealError::KeyLength(bytes.len()))?;
        Ok(SnapshotKey(Box::new(array)))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as 64 lowercase hex digits (as the API carries it).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A key as [`SnapshotKey::to_hex`] gave it.
    pub fn from_hex(hex: &str) -> Result<SnapshotKey, SealError> {
        let digits = hex.as_bytes();
        if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(SealError::KeyLength(digits.len() / 2));
        }
        let mut key = Box::new([0u8; 32]);
        for (byte, pair) in key.iter_mut().zip(digits.chunks(2)) {
            let pair = std::str::from_utf8(pair).expect("hex digits are ASCII");
            *byte = u8::from_str_radix(pair, 16).expect("two hex digits");
        }
        Ok(SnapshotKey(key))
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0[..]).expect("a 32-byte AES key"))
    }
}

impl Drop for SnapshotKey {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: a volatile write to a byte we own, so that the
            // compiler keeps the zeroing of memory about to be freed.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl std::fmt::Debug for SnapshotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotKey(..)")
    }
}

fn header(chunk_size: usize, prefix: &[u8; PREFIX_LEN], context: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(FIXED_HEADER_LEN + context.len());
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&[VERSION, CIPHER_AES_256_GCM, COMPRESSION_ZSTD, 0]);
    h.extend_from_slice(&(chunk_size as u32).to_be_bytes());
    h.extend_from_slice(prefix);
    h.push(0);
    h.extend_from_slice(&(context.len() as u16).to_be_bytes());
    h.extend_from_slice(context);
    h
}

fn nonce(prefix: &[u8; PREFIX_LEN], chunk: u32, last: bool) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..PREFIX_LEN].copy_from_slice(prefix);
    n[PREFIX_LEN..PREFIX_LEN + 4].copy_from_slice(&chunk.to_be_bytes());
    n[NONCE_LEN - 1] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// Seals compressed bytes into chunks.
struct ChunkSealer<W: Write> {
    inner: W,
    key: LessSafeKey,
    header: Vec<u8>,
    prefix: [u8; PREFIX_LEN],
    chunk_size: usize,
    buf: Vec<u8>,
    next: u32,
    written: u64,
}

impl<W: Write> ChunkSealer<W> {
    fn seal(&mut self, last: bool) -> io::Result<()> {
        let chunk = self.next;
        self.next = chunk.checked_add(1).ok_or(SealError::TooManyChunks)?;
        let mut data = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_size));
        self.key
            .seal_in_place_append_tag(
                nonce(&self.prefix, chunk, last),
                Aad::from(&self.header[..]),
                &mut data,
            )
            .map_err(|_| io::Error::other("AES-GCM sealing failed"))?;
        self.inner.write_all(&(data.len() as u32).to_be_bytes())?;
        self.inner.write_all(&data)?;
        self.written += 4 + data.len() as u64;
        Ok(())
    }

    fn finish(mut self) -> io::Result<(W, u64)> {
        self.seal(true)?;
        self.inner.flush()?;
        Ok((self.inner, self.written))
    }
}

impl<W: Write> Write for ChunkSealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.chunk_size - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk_size {
            self.seal(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // A chunk is sealed when full or at the end, never early: flushing
        // must not change where chunks end.
        self.inner.flush()
    }
}

/// What a finished snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealSummary {
    /// Bytes of state written into it (before compression).
    pub state_bytes: u64,
    /// Bytes of the sealed file.
    pub sealed_bytes: u64,
}

/// Writes a sealed snapshot: what is written to it is compressed and
/// sealed; [`SealedWriter::finish`] seals the last chunk. A writer dropped
/// unfinished leaves a file that fails to open ([`SealError::Truncated`]).
pub struct SealedWriter<W: Write> {
    encoder: zstd::stream::write::Encoder<'static, ChunkSealer<W>>,
    state_bytes: u64,
}

impl<W: Write> SealedWriter<W> {
    /// Starts a snapshot in `inner` under `key`, bound to `context` (who it
    /// belongs to; [`OpenedSnapshot::open`] must be given the same).
    pub fn new(inner: W, key: &SnapshotKey, context: &[u8]) -> Result<Self, SealError> {
        Self::with_chunk_size(inner, key, context, DEFAULT_CHUNK_SIZE)
    }

    pub fn with_chunk_size(
        mut inner: W,
        key: &SnapshotKey,
        context: &[u8],
        chunk_size: usize,
    ) -> Result<Self, SealError> {
        if context.len() > MAX_CONTEXT_LEN {
            return Err(SealError::ContextTooLong(context.len()));
        }
        if !CHUNK_SIZES.contains(&chunk_size) {
            return Err(SealError::ChunkSize(chunk_size));
        }
        let mut prefix = [0u8; PREFIX_LEN];
        podvisor_store::fill_random(&mut prefix).map_err(SealError::Random)?;
        let header = header(chunk_size, &prefix, context);
        inner
            .write_all(&header)
            .map_err(SealError::io("writing the snapshot header"))?;
        let written = header.len() as u64;
        let sealer = ChunkSealer {
            inner,
            key: key.aead(),
            header,
            prefix,
            chunk_size,
            buf: Vec::with_capacity(chunk_size),
            next: 0,
            written,
        };
        let encoder = zstd::stream::write::Encoder::new(sealer, ZSTD_LEVEL)
            .map_err(SealError::io("starting the snapshot's compression"))?;
        Ok(SealedWriter {
            encoder,
            state_bytes: 0,
        })
    }

    /// Ends the compressed stream, seals the last chunk and flushes.
    /// Returns the inner writer (to sync a file, say) and the sizes.
    pub fn finish(self) -> Result<(W, SealSummary), SealError> {
        let sealer = self
            .encoder
            .finish()
            .map_err(SealError::io("writing the snapshot"))?;
        let (inner, sealed_bytes) = sealer
            .finish()
            .map_err(SealError::io("writing the snapshot's last chunk"))?;
        Ok((
            inner,
            SealSummary {
                state_bytes: self.state_bytes,
                sealed_bytes,
            },
        ))
    }

    /// A `Write` to hand to whoever writes the state (it may take a boxed
    /// writer and drop it) and a handle to finish the snapshot after.
    pub fn shared(self) -> SharedSealedWriter<W> {
        SharedSealedWriter(Arc::new(Mutex::new(Some(self))))
    }
}

impl<W: Write> Write for SealedWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.encoder.write(data)?;
        self.state_bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Flushing the encoder would end a zstd block early: harmless but
        // useless, and callers (a copy loop) flush once at the end anyway.
        Ok(())
    }
}

/// A [`SealedWriter`] shared between the one who writes the state and the
/// one who finishes it; clones are handles to the same snapshot.
pub struct SharedSealedWriter<W: Write>(Arc<Mutex<Option<SealedWriter<W>>>>);

impl<W: Write> Clone for SharedSealedWriter<W> {
    fn clone(&self) -> Self {
        SharedSealedWriter(self.0.clone())
    }
}

impl<W: Write> SharedSealedWriter<W> {
    /// Finishes the snapshot (see [`SealedWriter::finish`]).
    pub fn finish(&self) -> Result<(W, SealSummary), SealError> {
        let writer = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(SealError::Finished)?;
        writer.finish()
    }
}

impl<W: Write> Write for SharedSealedWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let writer = guard.as_mut().ok_or(SealError::Finished)?;
        match writer.write(data) {
            Ok(n) => Ok(n),
            Err(e) => {
                // A snapshot whose writing failed is never finished.
                *guard = None;
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The parsed header of a snapshot.
struct Header {
    bytes: Vec<u8>,
    chunk_size: usize,
    prefix: [u8; PREFIX_LEN],
}

fn read_header<R: Read>(source: &mut R, context: &[u8]) -> Result<Header, SealError> {
    let mut fixed = [0u8; FIXED_HEADER_LEN];
    match source.read_exact(&mut fixed) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(SealError::NotASnapshot),
        Err(e) => {
            return Err(SealError::Io {
                what: "reading the snapshot header",
                source: e,
            });
        }
    }
    if fixed[..8] != MAGIC {
        return Err(SealError::NotASnapshot);
    }
    let (version, cipher, compression) = (fixed[8], fixed[9], fixed[10]);
    if (version, cipher, compression) != (VERSION, CIPHER_AES_256_GCM, COMPRESSION_ZSTD)
        || fixed[11] != 0
        || fixed[23] != 0
    {
        return Err(SealError::Unsupported {
            version,
            cipher,
            compression,
        });
    }
    let chunk_size = u32::from_be_bytes(fixed[12..16].try_into().expect("4 bytes")) as usize;
    if !CHUNK_SIZES.contains(&chunk_size) {
        return Err(SealError::ChunkSize(chunk_size));
    }
    let prefix: [u8; PREFIX_LEN] = fixed[16..23].try_into().expect("7 bytes");
    let context_len = u16::from_be_bytes([fixed[24], fixed[25]]) as usize;
    if context_len > MAX_CONTEXT_LEN {
        return Err(SealError::ContextTooLong(context_len));
    }
    let mut found = vec![0u8; context_len];
    source
        .read_exact(&mut found)
        .map_err(|_| SealError::NotASnapshot)?;
    if found != context {
        return Err(SealError::OtherContext {
            found: String::from_utf8_lossy(&found).into_owned(),
            wanted: String::from_utf8_lossy(context).into_owned(),
        });
    }
    let mut bytes = fixed.to_vec();
    bytes.extend_from_slice(&found);
    Ok(Header {
        bytes,
        chunk_size,
        prefix,
    })
}

/// Opens chunks in order; yields the compressed plaintext.
struct ChunkOpener<R: Read> {
    source: R,
    key: LessSafeKey,
    header: Header,
    next: u32,
    done: bool,
    /// The length of the next chunk, read ahead.
    pending: Option<usize>,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

impl<R: Read> ChunkOpener<R> {
    fn new(source: R, key: &SnapshotKey, header: Header) -> Self {
        let cap = header.chunk_size + TAG_LEN;
        ChunkOpener {
            source,
            key: key.aead(),
            header,
            next: 0,
            done: false,
            pending: None,
            buf: Vec::with_capacity(cap),
            pos: 0,
            len: 0,
        }
    }

    /// Opens the next chunk into `buf[..len]`; `Ok(false)` after the last.
    /// Whether a chunk is the last is known by reading ahead: the last is
    /// the one the file ends after, and it must open with the last flag.
    fn open_next(&mut self) -> Result<bool, SealError> {
        if self.done {
            return Ok(false);
        }
        let chunk = self.next;
        let io = SealError::io("reading the snapshot");
        let len = match self.pending.take() {
            Some(len) => len,
            None => {
                let mut len = [0u8; 4];
                match read_up_to(&mut self.source, &mut len).map_err(io)? {
                    4 => u32::from_be_bytes(len) as usize,
                    _ => return Err(SealError::Truncated { chunks: chunk }),
                }
            }
        };
        if !(TAG_LEN..=self.header.chunk_size + TAG_LEN).contains(&len) {
            return Err(SealError::Tampered { chunk });
        }
        self.buf.resize(len, 0);
        if read_up_to(&mut self.source, &mut self.buf)
            .map_err(SealError::io("reading the snapshot"))?
            != len
        {
            return Err(SealError::Truncated { chunks: chunk });
        }
        let mut ahead = [0u8; 4];
        let last = match read_up_to(&mut self.source, &mut ahead)
            .map_err(SealError::io("reading the snapshot"))?
        {
            0 => true,
            4 => {
                self.pending = Some(u32::from_be_bytes(ahead) as usize);
                false
            }
            _ => {
                // A few stray bytes: the end of a cut-off chunk, or junk
                // after the last one.
                let mut probe = self.buf.clone();
                let was_last = self
                    .key
                    .open_in_place(
                        nonce(&self.header.prefix, chunk, true),
                        Aad::from(&self.header.bytes[..]),
                        &mut probe,
                    )
                    .is_ok();
                return Err(if was_last {
                    SealError::TrailingData
                } else {
                    SealError::Truncated { chunks: chunk + 1 }
                });
            }
        };
        let ciphertext = self.buf.clone();
        let aad = Aad::from(&self.header.bytes[..]);
        let opened = self
            .key
            .open_in_place(nonce(&self.header.prefix, chunk, last), aad, &mut self.buf)
            .map(|plain| plain.len());
        let n = match opened {
            Ok(n) => n,
            Err(_) => {
                // Say why if it opens with the other flag: the file was cut
                // after this chunk, or has chunks after its last one.
                let mut other = ciphertext;
                let aad = Aad::from(&self.header.bytes[..]);
                let with_other_flag = self
                    .key
                    .open_in_place(nonce(&self.header.prefix, chunk, !last), aad, &mut other)
                    .is_ok();
                return Err(match (with_other_flag, last) {
                    (true, true) => SealError::Truncated { chunks: chunk + 1 },
                    (true, false) => SealError::TrailingData,
                    (false, _) => SealError::Tampered { chunk },
                });
            }
        };
        self.buf.truncate(n);
        if !last && n != self.header.chunk_size {
            // Only the last chunk may be short.
            return Err(SealError::Tampered { chunk });
        }
        self.len = n;
        self.pos = 0;
        self.next = chunk.checked_add(1).ok_or(SealError::TooManyChunks)?;
        self.done = last;
        Ok(true)
    }
}

impl<R: Read> Read for ChunkOpener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.len {
            if !self.open_next()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads until `buf` is full or the source ends; returns the bytes read.
fn read_up_to<R: Read>(source: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match source.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A snapshot whose every chunk has been authenticated: reading it gives
/// the state back (decrypted and decompressed, authenticated again).
pub struct OpenedSnapshot<R: Read> {
    decoder: zstd::stream::read::Decoder<'static, BufReader<ChunkOpener<R>>>,
    /// Bytes of compressed state, as the first pass counted them.
    pub compressed_bytes: u64,
}

impl<R: Read + Seek> OpenedSnapshot<R> {
    /// Checks the header against `context` and authenticates every chunk
    /// (nothing is kept), then rewinds for reading.
    pub fn open(mut source: R, key: &SnapshotKey, context: &[u8]) -> Result<Self, SealError> {
        let start = source
            .stream_position()
            .map_err(SealError::io("reading the snapshot"))?;
        let header = read_header(&mut source, context)?;
        let body = source
            .stream_position()
            .map_err(SealError::io("reading the snapshot"))?;
        let mut first = ChunkOpener::new(&mut source, key, header);
        let mut compressed_bytes = 0u64;
        while first.open_next()? {
            compressed_bytes += first.len as u64;
        }
        let header = first.header;
        source
            .seek(SeekFrom::Start(body))
            .map_err(SealError::io("reading the snapshot"))?;
        debug_assert!(body >= start);
        let opener = ChunkOpener::new(source, key, header);
        let decoder = zstd::stream::read::Decoder::new(opener)
            .map_err(SealError::io("starting the snapshot's decompression"))?;
        Ok(OpenedSnapshot {
            decoder,
            compressed_bytes,
        })
    }
}

impl<R: Read> Read for OpenedSnapshot<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.decoder.read(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const CONTEXT: &[u8] = b"pod default/web uid-1";

    /// Compressible text with a marker, then pseudo-random bytes, over
    /// several chunks of 4 KiB.
    fn state() -> Vec<u8> {
        let mut s = Vec::new();
        for i in 0..3000 {
            s.extend_from_slice(format!("line {i} of guest memory; ").as_bytes());
        }
        s.extend_from_slice(b"SECRET-MARKER-0123456789");
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push(x as u8);
        }
        s
    }

    fn seal(key: &SnapshotKey, plain: &[u8]) -> Vec<u8> {
        let mut w = SealedWriter::with_chunk_size(Vec::new(), key, CONTEXT, 4096).unwrap();
        w.write_all(plain).unwrap();
        let (out, summary) = w.finish().unwrap();
        assert_eq!(summary.state_bytes, plain.len() as u64);
        assert_eq!(summary.sealed_bytes, out.len() as u64);
        out
    }

    fn open(key: &SnapshotKey, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut opened = OpenedSnapshot::open(Cursor::new(sealed.to_vec()), key, CONTEXT)?;
        let mut out = Vec::new();
        opened
            .read_to_end(&mut out)
            .map_err(SealError::io("reading"))?;
        Ok(out)
    }

    #[test]
    fn a_sealed_state_opens_to_what_was_written_and_hides_it() {
        let key = SnapshotKey::generate().unwrap();
        let plain = state();
        let sealed = seal(&key, &plain);
        assert!(sealed.len() < plain.len(), "compressed");
        assert_eq!(open(&key, &sealed).unwrap(), plain);
        assert!(
            !sealed.windows(13).any(|w| w == b"SECRET-MARKER"),
            "the plaintext is not in the file"
        );
        // Two snapshots of the same state under the same key differ (each
        // file has its own nonce prefix).
        assert_ne!(seal(&key, &plain), sealed);
        // Nothing at all is a valid snapshot too.
        assert_eq!(open(&key, &seal(&key, b"")).unwrap(), b"");
        // Through the shared writer, as the VMM's copy loop uses it.
        let shared = SealedWriter::new(Vec::new(), &key, CONTEXT)
            .unwrap()
            .shared();
        let mut sink: Box<dyn Write + Send> = Box::new(shared.clone());
        sink.write_all(&plain).unwrap();
        drop(sink);
        let (out, _) = shared.finish().unwrap();
        assert_eq!(open(&key, &out).unwrap(), plain);
        assert!(matches!(shared.finish(), Err(SealError::Finished)));
    }

    #[test]
    fn any_changed_byte_fails_before_any_plaintext() {
        let key = SnapshotKey::generate().unwrap();
        let sealed = seal(&key, &state());
        // Every byte of the header and of the first chunk's length and
        // start, then a spread over the rest, the last bytes included.
        let mut positions: Vec<usize> = (0..80).collect();
        positions.extend((80..sealed.len()).step_by(97));
        positions.extend(sealed.len() - 20..sealed.len());
        for i in positions {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            // `open` itself fails: the first pass reads it all.
            let result = OpenedSnapshot::open(Cursor::new(bad), &key, CONTEXT);
            assert!(
                result.is_err(),
                "a flip at byte {i} of {} opened",
                sealed.len()
            );
        }
    }

    #[test]
    fn cut_off_extended_reordered_or_foreign_snapshots_fail() {
        let key = SnapshotKey::generate().unwrap();
        let plain = state();
        let sealed = seal(&key, &plain);
        for len in [
            0,
            10,
            FIXED_HEADER_LEN + CONTEXT.len(),
            200,
            sealed.len() - 1,
        ] {
            assert!(open(&key, &sealed[..len]).is_err(), "cut to {len} bytes");
        }
        // Cut at a chunk boundary: every remaining chunk is authentic, but
        // the last one is missing.
        let header_len = FIXED_HEADER_LEN + CONTEXT.len();
        let first_len = u32::from_be_bytes(sealed[header_len..header_len + 4].try_into().unwrap());
        let boundary = header_len + 4 + first_len as usize;
        assert!(matches!(
            open(&key, &sealed[..boundary]),
            Err(SealError::Truncated { chunks: 1 })
        ));
        assert!(matches!(
            open(&key, &sealed[..boundary + 2]),
            Err(SealError::Truncated { chunks: 1 })
        ));
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(matches!(open(&key, &longer), Err(SealError::TrailingData)));
        // The first two chunks (both full) swapped.
        let second_len =
            u32::from_be_bytes(sealed[boundary..boundary + 4].try_into().unwrap()) as usize;
        let first = sealed[header_len..boundary].to_vec();
        let second = sealed[boundary..boundary + 4 + second_len].to_vec();
        let mut swapped = sealed[..header_len].to_vec();
        swapped.extend_from_slice(&second);
        swapped.extend_from_slice(&first);
        swapped.extend_from_slice(&sealed[boundary + 4 + second_len..]);
        assert!(matches!(
            open(&key, &swapped),
            Err(SealError::Tampered { chunk: 0 })
        ));
        // Another key, another pod's context.
        let other = SnapshotKey::generate().unwrap();
        assert!(matches!(
            open(&other, &sealed),
            Err(SealError::Tampered { chunk: 0 })
        ));
        let err = OpenedSnapshot::open(Cursor::new(sealed.clone()), &key, b"pod default/other")
            .err()
            .unwrap();
        assert!(matches!(err, SealError::OtherContext { .. }), "{err}");
        // A length field claiming a huge chunk is refused, not allocated.
        let mut huge = sealed.clone();
        huge[header_len..header_len + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            open(&key, &huge),
            Err(SealError::Tampered { chunk: 0 })
        ));
        assert!(matches!(
            open(&key, b"not a snapshot at all, just text"),
            Err(SealError::NotASnapshot)
        ));
    }

    #[test]
    fn keys_are_32_bytes_and_round_trip() {
        let key = SnapshotKey::generate().unwrap();
        let again = SnapshotKey::from_bytes(key.as_bytes()).unwrap();
        let sealed = seal(&key, b"state");
        assert_eq!(open(&again, &sealed).unwrap(), b"state");
        assert!(matches!(
            SnapshotKey::from_bytes(&[0u8; 16]),
            Err(SealError::KeyLength(16))
        ));
        assert_eq!(format!("{key:?}"), "SnapshotKey(..)");
        let hex = key.to_hex();
        assert_eq!(hex.len(), 64);
        let from_hex = SnapshotKey::from_hex(&hex).unwrap();
        assert_eq!(from_hex.as_bytes(), key.as_bytes());
        for bad in [
            "",
            "zz",
            &hex[..62],
            &format!("{}g", &hex[..63]),
            &format!("{hex}00"),
        ] {
            assert!(SnapshotKey::from_hex(bad).is_err(), "{bad:?}");
        }
    }
}
