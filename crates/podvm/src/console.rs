//! The guest's console log (QEMU's serial console, a file in the VM's run
//! directory), read from its end only: a guest may have written any amount
//! to it, so nothing reads it whole.

use std::io;
use std::path::Path;

/// The last `max_bytes` of the file at `path` (from the first line that
/// starts in them), read without reading the rest.
pub fn read_tail(path: &Path, max_bytes: u64) -> io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(max_bytes).read_to_end(&mut bytes)?;
    let mut tail = &bytes[..];
    if start > 0
        && let Some(nl) = tail.iter().position(|&b| b == b'\n')
    {
        tail = &tail[nl + 1..];
    }
    Ok(String::from_utf8_lossy(tail).trim_end().to_string())
}

/// [`read_tail`], or a line saying why there is none.
pub fn tail(path: &Path, max_bytes: u64) -> String {
    read_tail(path, max_bytes)
        .unwrap_or_else(|e| format!("(no console log at {}: {e})", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_reads_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"first line\nsecond line\nthird").unwrap();
        assert_eq!(
            read_tail(&path, 100).unwrap(),
            "first line\nsecond line\nthird"
        );
        assert_eq!(read_tail(&path, 15).unwrap(), "third");
        assert!(tail(&dir.path().join("none"), 10).starts_with("(no console log at "));
    }
}
