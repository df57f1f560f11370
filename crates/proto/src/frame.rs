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
/// After an error the stream has lost its framing; the decoder keeps
/// returning that error, and the caller should drop the connection. A
/// reader that joins a stream that may be mid-frame calls
/// [`FrameDecoder::resynchronize`] first.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    failed: Option<ProtoError>,
    /// Skip what does not decode until the first frame that does.
    resyncing: bool,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Number of buffered bytes not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Until the next frame that decodes, skips bytes that do not (the
    /// tail of a frame whose start went to an earlier reader, as when a
    /// host adopts a VM whose previous host died mid-frame): each is
    /// dropped up to the next place a frame header of this protocol could
    /// start. Errors after that frame are errors again.
    pub fn resynchronize(&mut self) {
        self.failed = None;
        self.resyncing = true;
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
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        let start = (1..self.buf.len())
            .find(|&i| {
                let rest = &self.buf[i..];
                let n = rest.len().min(header.len());
                rest[..n] == header[..n]
            })
            .unwrap_or(self.buf.len());
        self.buf.drain(..start);
    }

    fn try_next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtoError> {
        // Check what is known as early as possible, so garbage is rejected
        // before a whole header arrives.
        if self.buf.len() >= 2 && self.buf[..2] != MAGIC {
            return Err(ProtoError::BadMagic([self.buf[0], self.buf[1]]));
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = u16::from_be_bytes([self.buf[2], self.buf[3]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::Version {
                got: version,
                want: PROTOCOL_VERSION,
            });
        }
        let len = u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(ProtoError::Oversized {
                len,
                limit: MAX_PAYLOAD,
            });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = &self.buf[HEADER_LEN..HEADER_LEN + len];
        let msg = postcard::from_bytes(payload).map_err(|e| ProtoError::Malformed {
            len,
            reason: e.to_string(),
        })?;
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(msg))
    }
}
