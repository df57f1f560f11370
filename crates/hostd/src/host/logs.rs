//! Container logs on the host: everything a container writes (stdout and
//! stderr interleaved, as `kubectl logs` shows them, across restarts) is
//! appended to `<pod>/logs/<container>.log`. When that file would pass its
//! size limit it is renamed to `<container>.log.1` (replacing the older one)
//! and a new file starts, so a container never holds more than twice the
//! limit. Readers get the last lines and can follow: a follower keeps its
//! file open across a rotation, finishes it, then moves to the new file.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use tokio::sync::watch;

use super::private_files;

/// Default size limit of one log file (10 MiB, as the kubelet's default).
pub const DEFAULT_MAX_BYTES: u64 = 10 << 20;

/// What followers of a log are told after each write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogSignal {
    /// How many times the file has been rotated.
    pub generation: u64,
    /// Bytes in the current file.
    pub size: u64,
    /// Whether the container runs (a follow ends once it does not).
    pub running: bool,
}

/// The current and the rotated file of a container's log.
pub fn log_paths(dir: &Path, container: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{container}.log")),
        dir.join(format!("{container}.log.1")),
    )
}

/// The writing end of one container's log.
pub struct ContainerLog {
    dir: PathBuf,
    container: String,
    file: File,
    size: u64,
    max_bytes: u64,
    signal: watch::Sender<LogSignal>,
}

impl ContainerLog {
    /// Opens (or creates) the log of `container` in `dir` for appending.
    pub fn open(dir: &Path, container: &str, max_bytes: u64) -> io::Result<Self> {
        private_files::create_dir_all(dir)?;
        let (current, _) = log_paths(dir, container);
        let file = private_files::open_append(&current)?;
        let size = file.metadata()?.len();
        let (signal, _) = watch::channel(LogSignal {
            generation: 0,
            size,
            running: false,
        });
        Ok(Self {
            dir: dir.to_path_buf(),
            container: container.to_string(),
            file,
            size,
            max_bytes: max_bytes.max(1),
            signal,
        })
    }

    /// Appends output, rotating first if the file would pass its limit.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + data.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(data)?;
        self.size += data.len() as u64;
        self.signal.send_modify(|s| s.size = self.size);
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let (current, old) = log_paths(&self.dir, &self.container);
        std::fs::rename(&current, &old)?;
        self.file = private_files::open_append(&current)?;
        self.size = 0;
        self.signal.send_modify(|s| {
            s.generation += 1;
            s.size = 0;
        });
        Ok(())
    }

    /// Records whether the container runs, for followers.
    pub fn set_running(&self, running: bool) {
        self.signal.send_modify(|s| s.running = running);
    }

    /// A receiver of this log's signals, for a [`LogReader`] that follows it.
    /// How many follow the log now (the runtime's own receiver aside).
    pub fn followers(&self) -> usize {
        self.signal.receiver_count().saturating_sub(1)
    }

    pub fn subscribe(&self) -> watch::Receiver<LogSignal> {
        self.signal.subscribe()
    }
}

fn read_all(path: &Path) -> io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The last `lines` lines of `data` (all of it for `None`).
pub fn last_lines(data: &[u8], lines: Option<usize>) -> &[u8] {
    let Some(n) = lines else { return data };
    if n == 0 {
        return &data[data.len()..];
    }
    // A final line without a newline counts as a line.
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut seen = 0;
    for (i, &b) in body.iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

/// Reads one container's log: what is there now, then (following) what is
/// appended, until the container stops running.
pub struct LogReader {
    dir: PathBuf,
    container: String,
    /// The file being followed and the generation it belongs to.
    file: Option<(File, u64)>,
    signal: Option<watch::Receiver<LogSignal>>,
    first: Option<Vec<u8>>,
}

impl LogReader {
    /// The log's last `tail` lines (everything for `None`), rotated file
    /// included. With `follow`, [`LogReader::next_chunk`] then waits for
    /// more output while the container runs.
    pub fn open(
        dir: &Path,
        container: &str,
        tail: Option<usize>,
        follow: Option<watch::Receiver<LogSignal>>,
    ) -> io::Result<LogReader> {
        let (current, old) = log_paths(dir, container);
        // Open the current file first, so that a rotation while reading the
        // old one is seen as a newer generation.
        let generation = follow.as_ref().map_or(0, |s| s.borrow().generation);
        let mut file = match File::open(&current) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut data = read_all(&old)?;
        if let Some(f) = file.as_mut() {
            f.read_to_end(&mut data)?;
        }
        let first = last_lines(&data, tail).to_vec();
        Ok(LogReader {
            dir: dir.to_path_buf(),
            container: container.to_string(),
            file: file.map(|f| (f, generation)),
            signal: follow,
            first: Some(first),
        })
    }

    /// The next bytes of the log; `None` at the end (not following, or the
    /// container stopped and everything was read, or the pod is gone).
    pub async fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        if let Some(first) = self.first.take()
            && !first.is_empty()
        {
            return Ok(Some(first));
        }
        loop {
            let Some(signal) = self.signal.as_mut() else {
                return Ok(None);
            };
            let state = *signal.borrow_and_update();
            let mut buf = Vec::new();
            if let Some((f, _)) = self.file.as_mut() {
                f.read_to_end(&mut buf)?;
            }
            let stale = self
                .file
                .as_ref()
                .is_none_or(|(_, g)| *g != state.generation);
            if stale {
                // The file we read was rotated away (now read to its end):
                // go on with the current one from its start.
                let (current, _) = log_paths(&self.dir, &self.container);
                if let Ok(f) = File::open(&current) {
                    self.file = Some((f, state.generation));
                    if buf.is_empty() {
                        continue;
                    }
                }
            }
            if !buf.is_empty() {
                return Ok(Some(buf));
            }
            if !state.running {
                return Ok(None);
            }
            if signal.changed().await.is_err() {
                // The pod is gone: whatever is left, then the end.
                let mut rest = Vec::new();
                if let Some((f, _)) = self.file.as_mut() {
                    f.read_to_end(&mut rest)?;
                }
                self.signal = None;
                return Ok((!rest.is_empty()).then_some(rest));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn drain(r: &mut LogReader) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = r.next_chunk().await.unwrap() {
            out.extend(chunk);
        }
        out
    }

    #[test]
    fn last_lines_counts_from_the_end() {
        assert_eq!(last_lines(b"a\nb\nc\n", Some(2)), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", Some(2)), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", Some(5)), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", Some(0)), b"");
        assert_eq!(last_lines(b"a\nb\n", None), b"a\nb\n");
    }

    #[tokio::test]
    async fn rotation_keeps_two_files_and_tail_reads_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ContainerLog::open(dir.path(), "web", 10).unwrap();
        for line in ["one\n", "two\n", "three\n", "four\n"] {
            log.append(line.as_bytes()).unwrap();
        }
        let (current, old) = log_paths(dir.path(), "web");
        assert_eq!(std::fs::read(&current).unwrap(), b"four\n");
        assert_eq!(std::fs::read(&old).unwrap(), b"three\n");
        let mut r = LogReader::open(dir.path(), "web", Some(2), None).unwrap();
        assert_eq!(drain(&mut r).await, b"three\nfour\n");
        // Reopening appends.
        drop(log);
        let mut log = ContainerLog::open(dir.path(), "web", 100).unwrap();
        log.append(b"five\n").unwrap();
        let mut r = LogReader::open(dir.path(), "web", None, None).unwrap();
        assert_eq!(drain(&mut r).await, b"three\nfour\nfive\n");
    }

    #[tokio::test]
    async fn follow_sees_new_output_through_rotations_and_ends_with_the_container() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ContainerLog::open(dir.path(), "web", 8).unwrap();
        log.set_running(true);
        log.append(b"boot\n").unwrap();
        let mut r = LogReader::open(dir.path(), "web", None, Some(log.subscribe())).unwrap();
        assert_eq!(r.next_chunk().await.unwrap().unwrap(), b"boot\n");
        let writer = tokio::spawn(async move {
            for line in ["aaaa\n", "bbbb\n", "cccc\n"] {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                log.append(line.as_bytes()).unwrap();
            }
            log.set_running(false);
            log
        });
        let rest = tokio::time::timeout(std::time::Duration::from_secs(5), drain(&mut r))
            .await
            .expect("the follow ends when the container stops");
        assert_eq!(rest, b"aaaa\nbbbb\ncccc\n");
        let log = writer.await.unwrap();
        // A follower of a finished container ends at once; one whose pod
        // is gone ends too.
        let mut r = LogReader::open(dir.path(), "web", Some(1), Some(log.subscribe())).unwrap();
        assert_eq!(drain(&mut r).await, b"cccc\n");
        log.set_running(true);
        let mut r = LogReader::open(dir.path(), "web", Some(0), Some(log.subscribe())).unwrap();
        drop(log);
        assert_eq!(drain(&mut r).await, b"");
    }
}
