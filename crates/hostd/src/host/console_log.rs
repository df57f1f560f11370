//! The guests' console logs, capped. QEMU writes a VM's serial console to
//! `console.log` in its run directory (a `file` chardev: it keeps writing
//! at its own offset and never truncates), so a guest that prints without
//! end would fill the host's disk. Every [`CONSOLE_CHECK_PERIOD`] the
//! runtime frees all but the last [`CONSOLE_LOG_KEEP`] bytes of each
//! console log that holds more than twice that ([`cap`]): the freed part
//! becomes a hole (`fallocate(PUNCH_HOLE)`), so QEMU's offset stays valid,
//! the file's apparent size still grows, and the disk space it takes is
//! bounded by about twice the kept bytes plus what a guest writes in one
//! period. The tail, which is what anyone reads, stays.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// The console bytes kept at the end of each console log.
pub const CONSOLE_LOG_KEEP: u64 = 1 << 20;
/// How often the console logs are capped.
pub const CONSOLE_CHECK_PERIOD: Duration = Duration::from_secs(5);

/// Frees all but the last `keep` bytes (rounded to 4 KiB blocks) of the
/// file at `path` once it takes more than twice `keep` on disk. Returns
/// the bytes freed (0: under the bound, or nothing there).
pub fn cap(path: &Path, keep: u64) -> io::Result<u64> {
    let file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let on_disk = meta.blocks() * 512;
    if !meta.is_file() || on_disk <= 2 * keep {
        return Ok(0);
    }
    let end = meta.len().saturating_sub(keep) / 4096 * 4096;
    if end == 0 {
        return Ok(0);
    }
    // SAFETY: fallocate on a descriptor this function owns, with a range
    // inside the file; it changes no memory of this process.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            end as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let after = file.metadata()?.blocks() * 512;
    Ok(on_disk.saturating_sub(after))
}

/// Caps the console log of every VM under `run_dir` (`pods/*/console.log`).
pub fn cap_all(run_dir: &Path, keep: u64) {
    let Ok(entries) = std::fs::read_dir(run_dir.join("pods")) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path().join("console.log");
        match cap(&path, keep) {
            Ok(0) => {}
            Ok(freed) => tracing::info!(
                "guest console log {} capped: {} KiB freed",
                path.display(),
                freed >> 10
            ),
            Err(e) => tracing::warn!("cannot cap the guest console log {}: {e}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_console_log_is_capped_while_its_writer_keeps_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        // As QEMU's file chardev: opened once, truncated, written at its
        // own offset.
        let mut writer = std::fs::File::create(&path).unwrap();
        let line = [b'x'; 1023];
        for i in 0..8192 {
            writer.write_all(&line).unwrap();
            writer
                .write_all(if i == 8191 { b"!" } else { b"\n" })
                .unwrap();
        }
        let keep = 256 * 1024;
        let before = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(before >= 8 << 20, "{before}");
        let freed = cap(&path, keep).unwrap();
        let after = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert_eq!(freed, before - after);
        assert!(after <= keep + 64 * 1024, "{after} bytes still on disk");
        // The writer goes on where it was; the tail is whole.
        writer.write_all(b"\nafter the cap\n").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), (8 << 20) + 15);
        let t = podvisor_podvm::console::tail(&path, 2048);
        assert!(t.ends_with("x!\nafter the cap"), "{t:?}");
        // Under the bound: nothing to do.
        assert_eq!(cap(&path, keep).unwrap(), 0);
    }
}
