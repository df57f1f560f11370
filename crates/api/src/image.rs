//! The image catalog as the API shows it.

use serde::{Deserialize, Serialize};

/// An image known to the global cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Image {
    /// The reference it was pulled as (`registry/repo:tag`).
    pub name: String,
    /// The manifest digest (`sha256:...`).
    pub digest: String,
    /// Number of layers.
    pub layers: usize,
    /// Bytes of the layer disks.
    pub size: u64,
}

/// The image catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ImageList {
    pub items: Vec<Image>,
}
