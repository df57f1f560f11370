//! Volumes on the wire: what the host tells the agent about a pod's
//! encrypted volumes, and the sealed envelope in which the management
//! server delivers their keys to the guest through the host.
//!
//! The conversation (all of it after the pod has its identity):
//!
//! 1. host → [`HostMessage::RequestVolumeKeys`](crate::HostMessage::RequestVolumeKeys):
//!    the encrypted volumes the pod's spec names, each with the serial of
//!    its disk (and, for one that may need formatting, the format image),
//!    and the `context` naming this start of the pod (namespace, name, uid
//!    and the server-issued instance id).
//! 2. The agent makes an ephemeral X25519 key pair from the kernel's RNG
//!    mixed with the CPU's (`RDSEED`/`RDRAND` where the CPU has them: bytes
//!    the host did not supply) and answers
//!    [`GuestMessage::VolumeKeyRequest`](crate::GuestMessage::VolumeKeyRequest)
//!    with the public key.
//! 3. The host asks the server with that public key; the server checks the
//!    pod's entitlement and seals the keys it releases with [`seal`].
//! 4. host → [`HostMessage::VolumeKeys`](crate::HostMessage::VolumeKeys)
//!    with the sealed bytes (the host cannot open them). The agent opens
//!    them with [`open`] under the same `context`, drops its private key,
//!    opens a dm-crypt mapping for each released volume (formatting it
//!    first only when the server says so) and answers
//!    [`GuestMessage::VolumesOpened`](crate::GuestMessage::VolumesOpened).
//!    A container's [`MountSource::Encrypted`](crate::MountSource::Encrypted)
//!    mount then finds the mapping.
//!
//! Sealing is HPKE (RFC 9180, base mode) with DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256 and ChaCha20-Poly1305 (the `hpke` crate); the HPKE `info`
//! is [`INFO_PREFIX`] followed by the context, so an answer made for one
//! start of one pod does not open in another.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Most encrypted volumes in one request.
pub const MAX_VOLUMES: usize = 16;
/// Most extents in one format image.
pub const MAX_FORMAT_EXTENTS: usize = 16384;
/// Length of an X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of a volume's data key: AES-256-XTS takes two 256-bit keys.
pub const DATA_KEY_LEN: usize = 64;
/// The only cipher the agent accepts (dm-crypt's name for it).
pub const CIPHER: &str = "aes-xts-plain64";
/// Sector size of the mapping in bytes (dm-crypt `sector_size`).
pub const SECTOR_SIZE: u32 = 4096;
/// Prefix of the HPKE `info` of a sealed answer.
pub const INFO_PREFIX: &[u8] = b"podvisor volume keys v1\0";

/// One encrypted volume a pod's spec names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedVolume {
    /// The volume's name in the pod's namespace (what the server releases
    /// keys for, and what [`MountSource::Encrypted`](crate::MountSource::Encrypted) names).
    pub name: String,
    /// Serial of the virtio-blk disk holding the ciphertext.
    pub serial: String,
    /// The empty file system to write through the mapping if the server
    /// says this volume was never formatted; `None` when the host knows
    /// it was (the agent then refuses a release that asks to format).
    pub format_image: Option<FormatImage>,
}

/// An empty ext4 file system made by the host (nothing secret in it) on a
/// read-only disk: the agent formats a volume by copying `extents` (the
/// image's only non-hole parts) from this disk through the dm-crypt
/// mapping, at the same offsets. The rest of the file system is made
/// lazily by the guest kernel (`lazy_itable_init`), so the holes need not
/// be written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatImage {
    /// Serial of the disk holding the image.
    pub serial: String,
    /// The image's size in bytes: the volume's.
    pub size: u64,
    /// `(offset, length)` in bytes, sorted, not overlapping, within `size`;
    /// at most [`MAX_FORMAT_EXTENTS`].
    pub extents: Vec<(u64, u64)>,
}

/// The keys the server released, as sealed to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct ReleasedKeys {
    pub keys: Vec<ReleasedKey>,
}

/// One volume's key and how to open it. Nothing about the mapping is read
/// from the disk (there is no header on it for the host to tamper with):
/// every parameter comes from here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct ReleasedKey {
    pub volume: String,
    /// [`DATA_KEY_LEN`] bytes.
    pub key: Vec<u8>,
    /// [`CIPHER`].
    pub cipher: String,
    /// [`SECTOR_SIZE`].
    pub sector_size: u32,
    /// Never formatted: the agent formats it (from its [`FormatImage`])
    /// before mounting. The server records the volume as formatted when it
    /// releases a key with this set, so a later start never formats again.
    pub format: bool,
}

/// Why sealing or opening failed. Deliberately vague on opening: a wrong
/// key, a wrong context and a tampered envelope look the same.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the public key is not an X25519 key ({0} bytes)")]
    BadPublicKey(usize),
    #[error("sealing failed")]
    Seal,
    #[error("the sealed keys do not open with this key pair and context")]
    Open,
    #[error("the opened keys do not decode")]
    Decode,
}

/// The guest's ephemeral key pair.
pub struct GuestKeyPair {
    private: <X25519HkdfSha256 as hpke::Kem>::PrivateKey,
    public: <X25519HkdfSha256 as hpke::Kem>::PublicKey,
}

impl GuestKeyPair {
    /// The key pair derived from `ikm` (at least 32 bytes of secret
    /// randomness; the caller mixes its sources into it and wipes it).
    pub fn derive(ikm: &[u8]) -> GuestKeyPair {
        let (private, public) = X25519HkdfSha256::derive_keypair(ikm);
        GuestKeyPair { private, public }
    }

    /// The public key, [`PUBLIC_KEY_LEN`] bytes.
    pub fn public_key(&self) -> Vec<u8> {
        self.public.to_bytes().to_vec()
    }
}

/// The context of one start of a pod, as both the server (sealing) and
/// the host (telling the agent) write it: `namespace/name/uid/instance`.
pub fn context(namespace: &str, pod: &str, pod_uid: &str, instance: &str) -> String {
    format!("{namespace}/{pod}/{pod_uid}/{instance}")
}

fn info(context: &str) -> Vec<u8> {
    let mut info = INFO_PREFIX.to_vec();
    info.extend_from_slice(context.as_bytes());
    info
}

/// Seals `keys` to the guest's `public_key` under `context`: the HPKE
/// encapsulated key (32 bytes) followed by the ciphertext. `ikm` is fresh
/// randomness for the ephemeral sender key (at least 32 bytes).
pub fn seal(
    public_key: &[u8],
    context: &str,
    keys: &ReleasedKeys,
    ikm: &[u8],
) -> Result<Vec<u8>, SealError> {
    let public = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(public_key)
        .map_err(|_| SealError::BadPublicKey(public_key.len()))?;
    let mut plaintext = postcard::to_allocvec(keys).map_err(|_| SealError::Seal)?;
    let mut rng = SeededRng::new(ikm);
    let result = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256, _>(
        &OpModeS::Base,
        &public,
        &info(context),
        &plaintext,
        b"",
        &mut rng,
    );
    plaintext.zeroize();
    let (encapped, ciphertext) = result.map_err(|_| SealError::Seal)?;
    let mut out = encapped.to_bytes().to_vec();
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Opens what [`seal`] made for `pair` under `context`.
pub fn open(pair: &GuestKeyPair, context: &str, sealed: &[u8]) -> Result<ReleasedKeys, SealError> {
    const ENC_LEN: usize = 32;
    if sealed.len() < ENC_LEN {
        return Err(SealError::Open);
    }
    let encapped = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(&sealed[..ENC_LEN])
        .map_err(|_| SealError::Open)?;
    let mut plaintext = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
        &OpModeR::Base,
        &pair.private,
        &encapped,
        &info(context),
        &sealed[ENC_LEN..],
        b"",
    )
    .map_err(|_| SealError::Open)?;
    let keys = postcard::from_bytes(&plaintext).map_err(|_| SealError::Decode);
    plaintext.zeroize();
    keys
}

/// A ChaCha20 stream keyed by the caller's randomness: the RNG HPKE's
/// sender asks for. (`hpke` wants a `rand_core` RNG; this keeps the
/// caller's choice of entropy source.)
struct SeededRng(chacha20::ChaCha20);

impl SeededRng {
    fn new(ikm: &[u8]) -> SeededRng {
        use chacha20::cipher::KeyIvInit;
        use sha2::Digest;
        let mut key: [u8; 32] = sha2::Sha256::digest(ikm).into();
        let rng = SeededRng(chacha20::ChaCha20::new(&key.into(), &[0u8; 12].into()));
        key.zeroize();
        rng
    }
}

impl hpke::rand_core::RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        use chacha20::cipher::StreamCipher;
        dest.fill(0);
        self.0.apply_keystream(dest);
    }
}

impl hpke::rand_core::CryptoRng for SeededRng {}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ReleasedKeys {
        ReleasedKeys {
            keys: vec![ReleasedKey {
                volume: "data".into(),
                key: vec![7; DATA_KEY_LEN],
                cipher: CIPHER.into(),
                sector_size: SECTOR_SIZE,
                format: true,
            }],
        }
    }

    #[test]
    fn sealed_keys_open_only_with_the_pair_and_context_they_were_sealed_to() {
        let pair = GuestKeyPair::derive(&[1; 32]);
        let sealed = seal(&pair.public_key(), "ns/pod/uid/i1", &keys(), &[2; 32]).unwrap();
        assert_eq!(open(&pair, "ns/pod/uid/i1", &sealed).unwrap(), keys());
        // The plaintext key is not in the envelope.
        assert!(!sealed.windows(8).any(|w| w == [7; 8]));
        assert!(matches!(
            open(&pair, "ns/pod/uid/i2", &sealed),
            Err(SealError::Open)
        ));
        let other = GuestKeyPair::derive(&[3; 32]);
        assert!(matches!(
            open(&other, "ns/pod/uid/i1", &sealed),
            Err(SealError::Open)
        ));
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(open(&pair, "ns/pod/uid/i1", &tampered).is_err());
        assert!(open(&pair, "ns/pod/uid/i1", &sealed[..10]).is_err());
    }

    #[test]
    fn a_key_that_is_not_x25519_is_refused() {
        assert!(matches!(
            seal(&[0; 5], "c", &keys(), &[2; 32]),
            Err(SealError::BadPublicKey(5))
        ));
    }

    #[test]
    fn fresh_randomness_gives_a_fresh_envelope() {
        let pair = GuestKeyPair::derive(&[1; 32]);
        let a = seal(&pair.public_key(), "c", &keys(), &[2; 32]).unwrap();
        let b = seal(&pair.public_key(), "c", &keys(), &[4; 32]).unwrap();
        assert_ne!(a, b);
    }
}
