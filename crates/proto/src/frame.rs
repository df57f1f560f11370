//! Framing: `magic (2) | version (2, BE) | payload length (4, BE) | payload`.

use serde::{Serialize, de::DeserializeOwned};

/// Version of this protocol; carried in every frame header. A peer speaking
/// another version is rejected, never half-understood. Version 2: a
/// container spec lists mounts, `MountShared` replaces `MountLayers`.
/// Version 3: volumes (ext4, encrypted and sub-path mounts; the volume-key
/// messages). Version 4: runtime sizing (`ContainerSpec::runtime`,
/// `ProfileApplied`) and layers on virtio-pmem (`MountSource::Pmem`).
pub const PROTOCOL_VERSION: u16 = 4;

/// Largest payload one frame may carry (1 MiB). Output chunks are far smaller.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"PV";
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 8;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// The first bytes of a frame were not the protocol magic: the peer is not
    /// an agent, or the stream lost its framing.
    #[error(
        "bad frame magic {0:02x?} (expected \"PV\"): peer is not a podvisor agent or the stream is corrupt"
    )]
    BadMagic([u8; 2]),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {got}, this side speaks {want}")]
    Version { got: u16, want: u16 },
    /// A frame announced a payload larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds the limit of {limit} bytes")]
    Oversized { len: usize, limit: usize },
    /// The payload did not decode as the expected message type.
    #[error("malformed message payload ({len} bytes): {reason}")]
    Malformed { len: usize, reason: String },
    /// The message could not be encoded (should not happen for valid types).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Encodes one message as a complete frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let payload = postcard::to_stdvec(msg).map_err(|e| ProtoError::Encode(e.to_string()))?;
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtoError::Oversized {
            len: payload.len(),
            limit: MAX_PAYLOAD,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Incremental decoder: feed it bytes as they arrive, take messages out.
///
/// Its work is linear in its input, however the bytes are split: a frame
/// that arrives one byte at a time is looked at once when it is complete
/// (only its 8-byte header before that), a decoded frame is consumed by
/// moving a read offset, and the buffer is compacted only when the
/// consumed prefix is at least as long as what is left (each byte moved
/// at most once more than it was received). A resynchronizing decoder
/// (see [`FrameDecoder::resynchronize`]) tries at most
/// [`RESYNC_BUDGET`] bytes of candidate payloads before it treats the next
/// failure as an error, so a guest that plants many overlapping false
/// headers cannot make it decode the same bytes over and over.
///
/// After an error the stream has lost its framing; the decoder keeps
/// returning that error, and the caller should drop the connection. A
/// reader that joins a stream that may be mid-frame calls
/// [`FrameDecoder::resynchronize`] first.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` before this offset are consumed.
    start: usize,
    failed: Option<ProtoError>,
    /// Skip what does not decode until the first frame that does.
    resyncing: bool,
    /// Payload bytes left to try while resynchronizing.
    resync_budget: usize,
    /// The payload length of the frame at `start`, once its header was
    /// checked: a partial frame's header is read once, not at every push.
    header_len: Option<usize>,
    /// Bytes copied, moved, scanned or decoded so far: what the decoder's
    /// cost is linear in (checked by the tests).
    work: u64,
}

/// How many payload bytes a resynchronizing decoder tries to decode before
/// a failure is an error again: the tail of a frame the previous reader
/// took the start of is at most one frame long, so the first frame that
/// decodes starts within it; four frames' worth leaves room for false
/// headers in a legitimate tail (a container's binary output).
pub const RESYNC_BUDGET: usize = 4 * (HEADER_LEN + MAX_PAYLOAD);

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 && self.start >= self.buf.len() - self.start {
            // Moves at most as many bytes as were consumed since the last
            // compaction: linear overall.
            self.work += (self.buf.len() - self.start) as u64;
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.work += bytes.len() as u64;
        self.buf.extend_from_slice(bytes);
    }

    /// Number of buffered bytes not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Until the next frame that decodes, skips bytes that do not (the
    /// tail of a frame whose start went to an earlier reader, as when a
    /// host adopts a VM whose previous host died mid-frame): each is
    /// dropped up to the next place a frame header of this protocol could
    /// start. Errors after that frame are errors again.
    pub fn resynchronize(&mut self) {
        self.failed = None;
        self.header_len = None;
        self.resyncing = true;
        self.resync_budget = RESYNC_BUDGET;
    }

    /// Decodes the next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtoError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        loop {
            match self.try_next() {
                Err(_) if self.resyncing => self.skip_to_next_header(),
                Err(err) => {
                    self.buf = Vec::new();
                    self.start = 0;
                    self.header_len = None;
                    self.failed = Some(err.clone());
                    return Err(err);
                }
                Ok(Some(msg)) => {
                    self.resyncing = false;
                    return Ok(Some(msg));
                }
                Ok(None) => return Ok(None),
            }
        }
    }

    /// Drops the first byte and everything up to the next possible header
    /// (magic and version; a partial one at the end is kept).
    fn skip_to_next_header(&mut self) {
        let mut header = [0u8; 4];
        header[..2].copy_from_slice(&MAGIC);
        header[2..].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        let rest = &self.buf[self.start..];
        let skip = (1..rest.len())
            .find(|&i| {
                let candidate = &rest[i..];
                let n = candidate.len().min(header.len());
                candidate[..n] == header[..n]
            })
            .unwrap_or(rest.len());
        self.work += skip as u64;
        self.start += skip;
        self.header_len = None;
    }

    fn try_next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtoError> {
        let len = match self.header_len {
            Some(len) => len,
            None => match self.check_header()? {
                Some(len) => {
                    self.header_len = Some(len);
                    len
                }
                None => return Ok(None),
            },
        };
        let buf = &self.buf[self.start..];
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        // Whatever happens next, the frame at `start` is done with.
        self.header_len = None;
        if self.resyncing {
            if self.resync_budget < len {
                // Out of tries: this candidate's failure is an error.
                self.resyncing = false;
            } else {
                self.resync_budget -= len;
            }
        }
        self.work += len as u64;
        let payload = &buf[HEADER_LEN..HEADER_LEN + len];
        let msg = postcard::from_bytes(payload).map_err(|e| ProtoError::Malformed {
            len,
            reason: e.to_string(),
        })?;
        self.start += HEADER_LEN + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(msg))
    }

    /// The payload length the header at `start` announces, once it is
    /// whole and valid.
    fn check_header(&mut self) -> Result<Option<usize>, ProtoError> {
        let buf = &self.buf[self.start..];
        // Check what is known as early as possible, so garbage is rejected
        // before a whole header arrives.
        self.work += buf.len().min(HEADER_LEN) as u64;
        if buf.len() >= 2 && buf[..2] != MAGIC {
            return Err(ProtoError::BadMagic([buf[0], buf[1]]));
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = u16::from_be_bytes([buf[2], buf[3]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::Version {
                got: version,
                want: PROTOCOL_VERSION,
            });
        }
        let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(ProtoError::Oversized {
                len,
                limit: MAX_PAYLOAD,
            });
        }
        Ok(Some(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestMessage, Stream};

    /// An `Output` frame whose payload is exactly [`MAX_PAYLOAD`] bytes.
    fn max_size_frame() -> (GuestMessage, Vec<u8>) {
        let mut n = MAX_PAYLOAD - 16;
        loop {
            let msg = GuestMessage::Output {
                id: "c".into(),
                stream: Stream::Stdout,
                data: vec![0xab; n],
            };
            let frame = encode(&msg).unwrap();
            match frame.len().cmp(&(HEADER_LEN + MAX_PAYLOAD)) {
                std::cmp::Ordering::Equal => return (msg, frame),
                std::cmp::Ordering::Less => n += 1,
                std::cmp::Ordering::Greater => panic!("no frame of exactly the maximum size"),
            }
        }
    }

    #[test]
    fn a_max_size_frame_fed_one_byte_at_a_time_costs_linear_work() {
        let (msg, frame) = max_size_frame();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &frame {
            dec.push(std::slice::from_ref(b));
            if let Some(m) = dec.next_message::<GuestMessage>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![msg]);
        assert_eq!(dec.buffered(), 0);
        // Per byte: one copy in and the payload decoded once; the header
        // is read once it is whole. Re-scanning the buffer on every byte
        // would be about n^2/2 = 5 * 10^11.
        let n = frame.len() as u64;
        eprintln!(
            "one max-size frame byte by byte: work {} for {n} bytes",
            dec.work
        );
        assert!(dec.work <= 3 * n, "work {} for {n} bytes", dec.work);
    }

    #[test]
    fn many_small_frames_in_one_read_cost_linear_work() {
        let msg = GuestMessage::Output {
            id: "c".into(),
            stream: Stream::Stdout,
            data: vec![1],
        };
        let frame = encode(&msg).unwrap();
        let count = 100_000;
        let wire: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * count)
            .collect();
        let mut dec = FrameDecoder::new();
        // Pushed in reads of odd sizes, as a socket hands them over.
        let mut decoded = 0;
        for chunk in wire.chunks(64 * 1024 + 7) {
            dec.push(chunk);
            while dec.next_message::<GuestMessage>().unwrap().is_some() {
                decoded += 1;
            }
        }
        assert_eq!(decoded, count);
        // Draining each frame off the front of the buffer would move the
        // rest of the read every time: about 64 KiB / 13 * 32 KiB per read.
        let n = wire.len() as u64;
        eprintln!("{count} small frames: work {} for {n} bytes", dec.work);
        assert!(dec.work <= 4 * n, "work {} for {n} bytes", dec.work);
    }

    #[test]
    fn resynchronizing_over_planted_headers_is_bounded() {
        // A hostile stream: candidate headers every 12 bytes, each naming a
        // 1 MiB payload that fails to decode (an unknown message tag), so a
        // resynchronizing decoder would decode about 1 MiB per candidate.
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        header.extend_from_slice(&(MAX_PAYLOAD as u32).to_be_bytes());
        let mut wire = Vec::new();
        while wire.len() < 3 * MAX_PAYLOAD {
            wire.extend_from_slice(&header);
            wire.extend_from_slice(&[0xff; 4]);
        }
        let mut dec = FrameDecoder::new();
        dec.resynchronize();
        dec.push(&wire);
        let err = dec.next_message::<GuestMessage>().unwrap_err();
        assert!(matches!(err, ProtoError::Malformed { .. }), "{err}");
        // The budget's decoding, plus copying and scanning the input.
        let bound = (RESYNC_BUDGET + 3 * wire.len()) as u64;
        assert!(dec.work <= bound, "work {} over {bound}", dec.work);
    }

    #[test]
    fn resynchronizing_finds_the_frame_after_a_tail() {
        let msg = GuestMessage::Error {
            message: "after the tail".into(),
        };
        let mut wire = b"tail of an earlier frame PV".to_vec();
        wire.extend(encode(&msg).unwrap());
        let mut dec = FrameDecoder::new();
        dec.resynchronize();
        for b in &wire {
            dec.push(std::slice::from_ref(b));
        }
        assert_eq!(dec.next_message::<GuestMessage>().unwrap(), Some(msg));
    }
}
