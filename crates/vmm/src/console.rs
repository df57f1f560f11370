//! The guest's serial console log, bounded.
//!
//! The VMM appends what the guest writes to its serial port to a file
//! (opened `O_APPEND`); a guest may write without end, so while a VM is
//! watched the file is cut back ([`cap`]) whenever it grows past
//! [`MAX_LOG_BYTES`]: its last [`KEPT_BYTES`] are kept, after a line that
//! says how much was dropped. Readers read only the tail they want
//! ([`tail`]), never the whole file.

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

/// Largest a console log may grow between two checks before it is cut.
pub const MAX_LOG_BYTES: u64 = 1 << 20;
/// What a cut keeps: the last bytes.
pub const KEPT_BYTES: u64 = 256 << 10;
/// How often a watched VM's log is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Cuts the log at `path` to its last [`KEPT_BYTES`] if it is larger than
/// `max_bytes`; returns the bytes dropped. The VMM keeps appending to the
/// same file (`O_APPEND` writes go to its end, wherever that is now); a
/// line written between the read of the tail and the truncation is lost,
/// which a console log can afford.
pub fn cap(path: &Path, max_bytes: u64) -> io::Result<u64> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    if len <= max_bytes {
        return Ok(0);
    }
    let keep = KEPT_BYTES.min(max_bytes / 2);
    file.seek(SeekFrom::Start(len - keep))?;
    let mut tail = Vec::with_capacity(keep as usize);
    (&mut file).take(keep).read_to_end(&mut tail)?;
    // Start the kept part at a line.
    if let Some(nl) = tail.iter().position(|&b| b == b'\n') {
        tail.drain(..=nl);
    }
    let dropped = len - tail.len() as u64;
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(
        format!("[podvisor: {dropped} earlier bytes of console output dropped]\n").as_bytes(),
    )?;
    file.write_all(&tail)?;
    Ok(dropped)
}

/// The last `max_bytes` of the log at `path` (from a line start), as text;
/// reads no more than that.
pub fn tail(path: &Path, max_bytes: usize) -> String {
    let read = || -> io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let start = len.saturating_sub(max_bytes as u64);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::with_capacity(max_bytes.min(len as usize));
        file.take(max_bytes as u64).read_to_end(&mut bytes)?;
        if start > 0
            && let Some(nl) = bytes.iter().position(|&b| b == b'\n')
        {
            bytes.drain(..=nl);
        }
        Ok(bytes)
    };
    match read() {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim_end().to_string(),
        Err(_) => format!("(no console log at {})", path.display()),
    }
}

/// Keeps the log at `path` capped while the returned task runs (abort it
/// when the VM is no longer watched).
pub fn watch(path: std::path::PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let p = path.clone();
            match tokio::task::spawn_blocking(move || cap(&p, MAX_LOG_BYTES)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(dropped)) => {
                    tracing::debug!(log = %path.display(), dropped, "console log cut")
                }
                // Gone with its run directory: nothing left to watch.
                Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => return,
                Ok(Err(e)) => {
                    tracing::debug!(log = %path.display(), error = %e, "console log not cut")
                }
                Err(_) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_that_grows_past_the_cap_keeps_its_last_lines_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        // The VMM's side: one descriptor opened for appending, kept open.
        let mut vmm = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        for i in 0..40_000 {
            writeln!(vmm, "guest line {i:06} ............................").unwrap();
        }
        let before = std::fs::metadata(&path).unwrap().len();
        assert!(before > MAX_LOG_BYTES);
        let dropped = cap(&path, MAX_LOG_BYTES).unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(after.len() as u64 <= KEPT_BYTES + 100, "{}", after.len());
        assert_eq!(
            dropped + after.len() as u64 - after.lines().next().unwrap().len() as u64 - 1,
            before
        );
        assert!(after.starts_with(&format!("[podvisor: {dropped} earlier bytes")));
        assert!(after.lines().nth(1).unwrap().starts_with("guest line "));
        assert!(after.ends_with("guest line 039999 ............................\n"));
        // The VMM's next write lands after what was kept, not at its old
        // offset (which would leave a hole of zeros).
        writeln!(vmm, "after the cut").unwrap();
        let now = std::fs::read_to_string(&path).unwrap();
        assert!(now.ends_with("039999 ............................\nafter the cut\n"));
        assert!(!now.contains('\0'));
        // A small log is left alone; the tail reads only its end.
        assert_eq!(cap(&path, MAX_LOG_BYTES).unwrap(), 0);
        assert_eq!(tail(&path, 30), "after the cut");
        assert!(tail(&dir.path().join("none"), 10).starts_with("(no console log"));
    }
}
