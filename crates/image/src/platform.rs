//! Platforms (`os/architecture[/variant]`) and choosing a manifest from an
//! image index by platform.

use std::fmt;
use std::str::FromStr;

use oci_spec::image::Descriptor;

use crate::ImageError;

/// A platform an image can be built for, e.g. `linux/amd64` or `linux/arm64/v8`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    /// `linux/amd64`, what podvisor's pod VMs run.
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl Platform {
    /// Parses `os/arch` or `os/arch/variant`.
    pub fn parse(value: &str) -> Result<Platform, ImageError> {
        let parts: Vec<&str> = value.split('/').collect();
        let ok = |s: &&str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        };
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(ImageError::InvalidPlatform {
                value: value.to_string(),
            }),
        }
    }

    /// Whether an index entry's platform is this one. A variant in the
    /// request must match; an entry's variant is ignored when none is asked
    /// for (`linux/arm64` takes `linux/arm64/v8`).
    pub fn matches(&self, descriptor: &Descriptor) -> bool {
        let Some(p) = descriptor.platform() else {
            return false;
        };
        p.os().to_string() == self.os
            && p.architecture().to_string() == self.architecture
            && match &self.variant {
                None => true,
                Some(v) => p.variant().as_deref() == Some(v.as_str()),
            }
    }

    /// The first manifest of an index for this platform.
    pub fn choose<'a>(&self, manifests: &'a [Descriptor]) -> Option<&'a Descriptor> {
        manifests.iter().find(|d| self.matches(d))
    }
}

/// `os/arch[/variant]` of an index entry, for messages.
pub(crate) fn describe(descriptor: &Descriptor) -> String {
    match descriptor.platform() {
        None => "unknown".to_string(),
        Some(p) => {
            let mut s = format!("{}/{}", p.os(), p.architecture());
            if let Some(v) = p.variant() {
                s.push('/');
                s.push_str(v);
            }
            s
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Platform, ImageError> {
        Platform::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(platform: &str) -> Descriptor {
        let p: Vec<&str> = platform.split('/').collect();
        let mut json = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", "0".repeat(64)),
            "size": 1,
            "platform": {"os": p[0], "architecture": p[1]},
        });
        if let Some(v) = p.get(2) {
            json["platform"]["variant"] = (*v).into();
        }
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(Platform::parse("linux/amd64").unwrap(), Platform::default());
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().to_string(),
            "linux/arm64/v8"
        );
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(Platform::parse(bad).unwrap_err().to_string().contains(bad));
        }
    }

    #[test]
    fn choose_picks_the_matching_entry() {
        let entries = vec![
            entry("linux/arm64/v8"),
            entry("windows/amd64"),
            entry("linux/amd64"),
        ];
        let pick = |s: &str| Platform::parse(s).unwrap().choose(&entries).map(describe);
        assert_eq!(pick("linux/amd64").as_deref(), Some("linux/amd64"));
        assert_eq!(pick("linux/arm64").as_deref(), Some("linux/arm64/v8"));
        assert_eq!(pick("linux/arm64/v8").as_deref(), Some("linux/arm64/v8"));
        assert_eq!(pick("linux/arm64/v7"), None);
        assert_eq!(pick("linux/s390x"), None);
    }
}
