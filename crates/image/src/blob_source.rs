//! Where layer blobs come from: a registry (streamed) or a local layout or
//! archive.

use std::collections::HashMap;
use std::io::Read;

use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::convert::LayerBlob;
use crate::reference::ImageRef;
use crate::registry::Registry;
use crate::source::Source;
use crate::{Digest, ImageError};

/// Opens layer blobs for reading. `open` is called from the async runtime;
/// the reader it returns is read on a blocking thread.
#[async_trait::async_trait]
pub(crate) trait BlobSource: Send + Sync {
    async fn open(&self, blob: &LayerBlob) -> Result<Box<dyn Read + Send>, ImageError>;
}

/// Blobs streamed from a registry.
pub(crate) struct RegistryBlobs {
    pub registry: Registry,
    pub reference: ImageRef,
}

#[async_trait::async_trait]
impl BlobSource for RegistryBlobs {
    async fn open(&self, blob: &LayerBlob) -> Result<Box<dyn Read + Send>, ImageError> {
        let stream = self.registry.blob_stream(&self.reference, blob).await?;
        Ok(Box::new(SyncIoBridge::new(StreamReader::new(stream))))
    }
}

/// Blobs in a local OCI layout or image archive.
pub(crate) struct LocalBlobs {
    pub source: Source,
    /// Blob digest → its path in the source.
    pub paths: HashMap<Digest, String>,
}

#[async_trait::async_trait]
impl BlobSource for LocalBlobs {
    async fn open(&self, blob: &LayerBlob) -> Result<Box<dyn Read + Send>, ImageError> {
        let path = self
            .paths
            .get(&blob.digest)
            .ok_or_else(|| ImageError::BadSource {
                path: self.source.path().to_path_buf(),
                reason: format!("no blob {}", blob.digest),
            })?;
        let (reader, _) = self.source.open_file(path)?;
        Ok(reader)
    }
}
