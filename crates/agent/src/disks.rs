//! Disks: virtio-blk devices found by their serial
//! (`/sys/block/vd*/serial`), which the host sets (`pvl<N>` for layers).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for a disk to appear: virtio devices probe
/// asynchronously, and hot-plugged disks show up a little after the host
/// added them.
pub const DISK_WAIT: Duration = Duration::from_secs(5);

/// A disk that did not show up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("disk with serial \"{serial}\" not found in /sys/block after {waited_ms} ms")]
pub struct DiskNotFound {
    pub serial: String,
    pub waited_ms: u64,
}

/// Looks through `sys_block` (normally `/sys/block`) for a `vd*` device
/// whose serial is `serial`; returns the device name (`vda`).
pub fn find_by_serial(sys_block: &Path, serial: &str) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("vd"))
        .collect();
    names.sort();
    names.into_iter().find(|name| {
        std::fs::read_to_string(sys_block.join(name).join("serial"))
            .is_ok_and(|s| s.trim_end_matches(['\n', '\0', ' ']) == serial)
    })
}

/// Waits up to `timeout` for the disk with `serial` and its `/dev` node;
/// returns the node's path.
pub fn wait_for_disk(serial: &str, timeout: Duration) -> Result<PathBuf, DiskNotFound> {
    let start = Instant::now();
    loop {
        if let Some(name) = find_by_serial(Path::new("/sys/block"), serial) {
            let dev = Path::new("/dev").join(name);
            if dev.exists() {
                return Ok(dev);
            }
        }
        if start.elapsed() >= timeout {
            return Err(DiskNotFound {
                serial: serial.to_string(),
                waited_ms: start.elapsed().as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Finds the `/dev` node of a disk by its serial; [`SysBlock`] in the
/// guest, a fake in tests.
pub trait DiskFinder {
    fn find(&self, serial: &str) -> Result<PathBuf, DiskNotFound>;
    /// The node of the open (not suspended) dm-crypt mapping of encrypted
    /// volume `volume`, if any.
    fn mapping(&self, _volume: &str) -> Option<PathBuf> {
        None
    }
}

/// The guest's disks: `/sys/block`, waiting up to `timeout` for each.
#[derive(Debug, Clone, Copy)]
pub struct SysBlock {
    pub timeout: Duration,
}

impl DiskFinder for SysBlock {
    fn find(&self, serial: &str) -> Result<PathBuf, DiskNotFound> {
        wait_for_disk(serial, self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_virtio_disk_with_the_serial() {
        let dir = tempfile::tempdir().unwrap();
        for (dev, serial) in [("vda", "pvl0\n"), ("vdb", "pvl1\n"), ("sda", "pvl2\n")] {
            std::fs::create_dir(dir.path().join(dev)).unwrap();
            std::fs::write(dir.path().join(dev).join("serial"), serial).unwrap();
        }
        std::fs::create_dir(dir.path().join("vdc")).unwrap(); // no serial
        assert_eq!(find_by_serial(dir.path(), "pvl1").as_deref(), Some("vdb"));
        assert_eq!(find_by_serial(dir.path(), "pvl0").as_deref(), Some("vda"));
        assert_eq!(find_by_serial(dir.path(), "pvl2"), None);
        assert_eq!(find_by_serial(dir.path(), "pvl"), None);
        assert_eq!(find_by_serial(&dir.path().join("missing"), "pvl0"), None);
    }
}
