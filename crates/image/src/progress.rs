//! What a pull reports while it works, for the CLI's progress bars.

use std::io::{self, Read};
use std::sync::Arc;

use crate::catalog::Holder;
use crate::convert::LayerBlob;

/// The state of one layer of an image being pulled or imported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerEvent {
    /// Already in the cache.
    Cached,
    /// Another process is fetching it; this one waits for its disk.
    Waiting(Holder),
    /// This process fetches it.
    Fetching,
    /// Bytes of the blob read so far.
    Bytes(u64),
    /// The blob is read and verified; its disk is being built.
    Building,
    /// This process built its disk, of this many bytes.
    Done { size: u64 },
    /// Another process built its disk.
    DoneElsewhere,
}

/// Receives progress of a pull or import.
pub trait PullProgress: Send + Sync {
    /// The image's layers, bottom first, before any work on them.
    fn layers(&self, _layers: &[LayerBlob]) {}
    /// Layer `index` (bottom = 0) changed state.
    fn layer(&self, index: usize, event: LayerEvent);
}

/// Reports nothing.
pub struct NoProgress;

impl PullProgress for NoProgress {
    fn layer(&self, _index: usize, _event: LayerEvent) {}
}

/// A reader that reports how many bytes went through it.
pub(crate) struct CountingReader<R> {
    inner: R,
    count: u64,
    index: usize,
    progress: Arc<dyn PullProgress>,
}

impl<R: Read> CountingReader<R> {
    pub(crate) fn new(inner: R, index: usize, progress: Arc<dyn PullProgress>) -> Self {
        CountingReader {
            inner,
            count: 0,
            index,
            progress,
        }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.count += n as u64;
            self.progress
                .layer(self.index, LayerEvent::Bytes(self.count));
        }
        Ok(n)
    }
}
