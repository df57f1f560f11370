//! Image references as docker spells them, normalised: `busybox` is
//! `docker.io/library/busybox:latest`, `localhost:5000/app` is
//! `localhost:5000/app:latest`, and `name@sha256:<hex>` pins a manifest.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use oci_client::Reference;

use crate::{Digest, ImageError};

/// A parsed, normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    /// Parses and normalises `value` as docker does. A reference with
    /// neither tag nor digest gets `:latest`.
    pub fn parse(value: &str) -> Result<ImageRef, ImageError> {
        let invalid = |reason: String| ImageError::InvalidReference {
            value: value.to_string(),
            reason,
        };
        if value.is_empty() {
            return Err(invalid("empty reference".into()));
        }
        let inner = Reference::try_from(value).map_err(|e| invalid(e.to_string()))?;
        if inner.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("repository name must be lowercase".into()));
        }
        if let Some(d) = inner.digest() {
            Digest::parse(d)?;
        }
        Ok(ImageRef { inner })
    }

    /// The registry host (and port), e.g. `docker.io` or `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The host the registry API is reached at (`index.docker.io` for docker.io).
    pub fn registry_host(&self) -> &str {
        self.inner.resolve_registry()
    }

    /// The repository path, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The tag, if the reference has one.
    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    /// The manifest digest the reference pins, if any.
    pub fn digest(&self) -> Option<Digest> {
        self.inner.digest().and_then(|d| Digest::parse(d).ok())
    }

    /// The same repository pinned to `digest` (tag dropped).
    pub fn with_digest(&self, digest: &Digest) -> ImageRef {
        ImageRef {
            inner: Reference::with_digest(
                self.registry().to_string(),
                self.repository().to_string(),
                digest.to_string(),
            ),
        }
    }

    /// Whether this registry is on the loopback network (`localhost`,
    /// 127.0.0.0/8, `::1`), where docker allows plain HTTP.
    pub fn is_loopback_registry(&self) -> bool {
        is_loopback_host(self.registry())
    }

    pub(crate) fn oci(&self) -> &Reference {
        &self.inner
    }
}

/// Whether `registry` (`host`, `host:port` or `[v6]:port`) names this machine.
pub fn is_loopback_host(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl FromStr for ImageRef {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<ImageRef, ImageError> {
        ImageRef::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_docker() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            (
                "index.docker.io/library/busybox",
                "docker.io/library/busybox:latest",
            ),
            ("user/app:v1", "docker.io/user/app:v1"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t"),
            ("quay.io/org/app:3", "quay.io/org/app:3"),
        ];
        for (input, want) in cases {
            assert_eq!(ImageRef::parse(input).unwrap().to_string(), want, "{input}");
        }
        let hex = "a".repeat(64);
        let r = ImageRef::parse(&format!("busybox@sha256:{hex}")).unwrap();
        assert_eq!(
            r.to_string(),
            format!("docker.io/library/busybox@sha256:{hex}")
        );
        assert_eq!(r.digest().unwrap().hex(), hex);
        assert_eq!(r.tag(), None);
    }

    #[test]
    fn rejects_bad_references_with_the_value() {
        for bad in ["", "UPPER/case", "a b", "busybox@sha256:abc", "x:y:z"] {
            let err = ImageRef::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")) || bad.is_empty(), "{err}");
        }
    }

    #[test]
    fn loopback_registries() {
        for yes in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.8.9.1",
            "[::1]:5000",
        ] {
            assert!(is_loopback_host(yes), "{yes}");
        }
        for no in [
            "docker.io",
            "10.0.0.1:5000",
            "localhost.example.com",
            "[fe80::1]:1",
        ] {
            assert!(!is_loopback_host(no), "{no}");
        }
        assert!(
            ImageRef::parse("127.0.0.1:5000/app")
                .unwrap()
                .is_loopback_registry()
        );
        assert!(!ImageRef::parse("busybox").unwrap().is_loopback_registry());
    }
}
