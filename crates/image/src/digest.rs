//! Content digests (`sha256:<hex>`) and ChainIDs, plus the hashing reader
//! that verifies blobs while they stream.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::ImageError;

/// A content digest, always `sha256:` followed by 64 lowercase hex digits.
/// Parsing validates the form; other algorithms are refused with a clear
/// error until podvisor can verify them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// Parses and validates `sha256:<64 hex>`.
    pub fn parse(value: &str) -> Result<Digest, ImageError> {
        let invalid = |reason: &str| ImageError::InvalidDigest {
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let (algorithm, hex) = value
            .split_once(':')
            .ok_or_else(|| invalid("expected `algorithm:hex`"))?;
        if algorithm != "sha256" {
            let well_formed = !algorithm.is_empty()
                && algorithm
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
            if !well_formed {
                return Err(invalid("malformed algorithm"));
            }
            return Err(ImageError::UnsupportedDigestAlgorithm {
                algorithm: algorithm.to_string(),
                value: value.to_string(),
            });
        }
        if hex.len() != 64 {
            return Err(invalid("a sha256 digest has 64 hex digits"));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid("expected lowercase hex digits"));
        }
        Ok(Digest(value.to_string()))
    }

    /// The digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest::from_sha256(Sha256::digest(bytes).into())
    }

    /// The digest whose sha256 value is `hash`.
    pub fn from_sha256(hash: [u8; 32]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(hash)))
    }

    /// The algorithm part (always `sha256` for now).
    pub fn algorithm(&self) -> &str {
        "sha256"
    }

    /// The hex part, which names blobs and cache entries on disk.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The whole `sha256:<hex>` string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Digest, ImageError> {
        Digest::parse(s)
    }
}

impl TryFrom<String> for Digest {
    type Error = ImageError;
    fn try_from(s: String) -> Result<Digest, ImageError> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

/// The ChainID of a stack of layers: it names a layer *together with
/// everything below it*, which is what a layer disk's content depends on.
/// ChainID(L0) = DiffID(L0); ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln)).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChainId(pub Digest);

impl ChainId {
    /// The ChainID of the stack `diff_ids` (bottom first); `None` for an empty stack.
    pub fn of(diff_ids: &[Digest]) -> Option<ChainId> {
        let (first, rest) = diff_ids.split_first()?;
        let mut chain = ChainId(first.clone());
        for diff_id in rest {
            chain = ChainId::extend(Some(&chain), diff_id);
        }
        Some(chain)
    }

    /// The ChainID of layer `diff_id` stacked on `parent` (or at the bottom).
    pub fn extend(parent: Option<&ChainId>, diff_id: &Digest) -> ChainId {
        match parent {
            None => ChainId(diff_id.clone()),
            Some(parent) => ChainId(Digest::sha256_of(
                format!("{} {}", parent.0, diff_id).as_bytes(),
            )),
        }
    }

    /// Parses `sha256:<hex>`.
    pub fn parse(value: &str) -> Result<ChainId, ImageError> {
        Digest::parse(value).map(ChainId)
    }

    /// The underlying digest.
    pub fn digest(&self) -> &Digest {
        &self.0
    }

    /// The hex part: the name of the layer's directory in the cache.
    pub fn hex(&self) -> &str {
        self.0.hex()
    }
}

impl fmt::Display for ChainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A reader that hashes (sha256) and counts the bytes passing through it,
/// optionally failing once more than `limit` bytes went through. Used on both
/// sides of the decompressor: the blob digest and the DiffID are computed
/// while the layer streams, never from a second read.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: Option<u64>,
    limit_exceeded: bool,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R, limit: Option<u64>) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
            limit_exceeded: false,
        }
    }

    /// Bytes read so far.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Whether a read was refused because of the limit.
    pub(crate) fn limit_exceeded(&self) -> bool {
        self.limit_exceeded
    }

    /// Reads the rest of the stream (hashing it) and returns the digest of
    /// everything read, with the total count.
    pub(crate) fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            Digest::from_sha256(self.hasher.finalize().into()),
            self.count,
        ))
    }

    /// Digest of what was read so far.
    pub(crate) fn digest(&self) -> Digest {
        Digest::from_sha256(self.hasher.clone().finalize().into())
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.limit_exceeded {
            return Err(io::Error::other("decompression limit exceeded"));
        }
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.limit.is_some_and(|limit| self.count > limit) {
            self.limit_exceeded = true;
            return Err(io::Error::other("decompression limit exceeded"));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The DiffIDs of three made-up layers: `printf a | sha256sum`, `printf b | sha256sum`, `printf c | sha256sum`.
    const A: &str = "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb";
    const B: &str = "sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d";
    const C: &str = "sha256:2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6";

    #[test]
    fn parse_accepts_sha256_and_rejects_the_rest() {
        assert_eq!(Digest::parse(A).unwrap().hex(), &A[7..]);
        assert!(matches!(
            Digest::parse("sha512:abcd"),
            Err(ImageError::UnsupportedDigestAlgorithm { algorithm, .. }) if algorithm == "sha512"
        ));
        for bad in [
            "",
            "sha256",
            "sha256:abc",
            &A.to_uppercase(),
            &format!("{A}0"),
            "sha256:../../etc/passwd",
        ] {
            assert!(
                matches!(Digest::parse(bad), Err(ImageError::InvalidDigest { .. })),
                "{bad} should be invalid"
            );
        }
    }

    #[test]
    fn digest_serde_round_trip_validates() {
        let d = Digest::parse(A).unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{A}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"md5:00\"").is_err());
    }

    #[test]
    fn chain_id_follows_the_oci_rule() {
        let a = Digest::parse(A).unwrap();
        let b = Digest::parse(B).unwrap();
        assert_eq!(ChainId::of(&[]), None);
        // ChainID of one layer is its DiffID.
        assert_eq!(ChainId::of(std::slice::from_ref(&a)).unwrap().0, a);
        // Computed by hand:
        //   AB=sha256:$(printf '%s' "$A $B" | sha256sum | cut -c1-64)
        //   printf '%s' "$AB $C" | sha256sum
        let ab = "sha256:51c0c8ace48498d6f5fee6b0592cc06f2da0f3cbe09c5a34a97dce85c3889676";
        let abc = "sha256:2fce7f8ce91bcf0a1428b36e1024639fdbd9469eea762dba98aa749631885106";
        let c = Digest::parse(C).unwrap();
        assert_eq!(
            ChainId::of(&[a.clone(), b.clone()]).unwrap().to_string(),
            ab
        );
        let chain = ChainId::of(&[a.clone(), b.clone(), c.clone()]).unwrap();
        assert_eq!(chain.to_string(), abc);
        let stepwise = ChainId::extend(Some(&ChainId::extend(Some(&ChainId(a)), &b)), &c);
        assert_eq!(stepwise, chain);
    }

    #[test]
    fn hashing_reader_hashes_counts_and_limits() {
        let r = HashingReader::new(&b"hello"[..], None);
        let (d, n) = r.finish().unwrap();
        // printf hello | sha256sum
        assert_eq!(
            d.hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(n, 5);
        let mut r = HashingReader::new(&[0u8; 100][..], Some(10));
        assert!(io::copy(&mut r, &mut io::sink()).is_err());
        assert!(r.limit_exceeded());
    }
}
