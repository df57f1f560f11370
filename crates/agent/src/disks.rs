//! Disks: virtio-blk devices found by their serial
//! (`/sys/block/vd*/serial`), which the host sets (`pvl<N>` for layers),
//! and virtio-pmem devices (`/dev/pmem<N>`) found by the UUID in the EROFS
//! superblock they hold (a layer disk's UUID comes from its ChainID).
//!
//! A pmem device is guest memory the host maps from a file: its content is
//! whatever the image made it, so the superblock reader takes any bytes,
//! reads a bounded number of them and never fails on them.

use std::cell::Cell;
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

/// A pmem device that did not show up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no pmem device holds the EROFS file system with UUID {uuid} after {waited_ms} ms")]
pub struct PmemNotFound {
    pub uuid: String,
    pub waited_ms: u64,
}

/// Where the EROFS superblock starts on its device.
pub const EROFS_SUPERBLOCK_OFFSET: usize = 1024;
/// The EROFS magic, little-endian at the superblock's start.
pub const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// Where the UUID is inside the EROFS superblock.
const EROFS_UUID_OFFSET: usize = 48;
/// How many bytes of a device [`erofs_uuid`] needs: up to the UUID's end.
pub const EROFS_HEAD_LEN: usize = EROFS_SUPERBLOCK_OFFSET + EROFS_UUID_OFFSET + 16;

/// The UUID of the EROFS file system whose first bytes are `head`; `None`
/// when `head` is too short to hold it or the magic is not EROFS's.
pub fn erofs_uuid(head: &[u8]) -> Option<[u8; 16]> {
    let sb = head.get(EROFS_SUPERBLOCK_OFFSET..EROFS_HEAD_LEN)?;
    let magic = u32::from_le_bytes(sb[..4].try_into().ok()?);
    if magic != EROFS_MAGIC {
        return None;
    }
    sb[EROFS_UUID_OFFSET..].try_into().ok()
}

/// A UUID as the host writes it (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`,
/// lower-case hex) as bytes; `None` for anything else.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = text.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lens != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = groups.concat();
    if !hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The first [`EROFS_HEAD_LEN`] bytes of `path` (fewer if it is shorter).
fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(EROFS_HEAD_LEN);
    std::fs::File::open(path)?
        .take(EROFS_HEAD_LEN as u64)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// Looks through `sys_block` (normally `/sys/block`) for a `pmem<N>`
/// device whose node in `dev` (normally `/dev`) holds the EROFS file
/// system with `uuid`; returns the node's path. Devices that cannot be
/// read or hold something else are passed over.
pub fn find_by_uuid(sys_block: &Path, dev: &Path, uuid: &[u8; 16]) -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.strip_prefix("pmem")
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    names.sort();
    names.into_iter().map(|n| dev.join(n)).find(|node| {
        read_head(node)
            .ok()
            .and_then(|head| erofs_uuid(&head))
            .is_some_and(|found| &found == uuid)
    })
}

/// Whether the mount on `target` has DAX on, from `/proc/self/mountinfo`
/// text: its super options name `dax=always` (the kernel drops it when
/// the device cannot do DAX). `None` if nothing is mounted there.
pub fn dax_in_mountinfo(mountinfo: &str, target: &Path) -> Option<bool> {
    let target = target.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        // id parent major:minor root mount-point options [tags] - type source super-options
        if fields.get(4) != Some(&target) {
            return None;
        }
        let dash = fields.iter().position(|f| *f == "-")?;
        let super_options = fields.get(dash + 3)?;
        Some(super_options.split(',').any(|o| o == "dax=always"))
    })
}

/// Finds the `/dev` node of a disk by its serial; [`SysBlock`] in the
/// guest, a fake in tests.
pub trait DiskFinder {
    fn find(&self, serial: &str) -> Result<PathBuf, DiskNotFound>;
    /// The node of the pmem device holding the EROFS file system with
    /// `uuid` (checked by the caller to be a UUID).
    fn find_pmem(&self, uuid: &str) -> Result<PathBuf, PmemNotFound> {
        Err(PmemNotFound {
            uuid: uuid.to_string(),
            waited_ms: 0,
        })
    }
    /// Whether the file system mounted on `target` maps its files with
    /// DAX; `None` if that cannot be told.
    fn dax(&self, _target: &Path) -> Option<bool> {
        None
    }
    /// The node of the open (not suspended) dm-crypt mapping of encrypted
    /// volume `volume`, if any.
    fn mapping(&self, _volume: &str) -> Option<PathBuf> {
        None
    }
}

/// The guest's disks: `/sys/block`, waiting up to `timeout` for each. The
/// pmem drivers are loaded when the first pmem device is looked for.
#[derive(Debug)]
pub struct SysBlock {
    pub timeout: Duration,
    /// The running kernel's release (where the lazily loaded modules are).
    pub release: String,
    pmem_modules_loaded: Cell<bool>,
}

impl SysBlock {
    pub fn new(timeout: Duration, release: String) -> SysBlock {
        SysBlock {
            timeout,
            release,
            pmem_modules_loaded: Cell::new(false),
        }
    }
}

impl DiskFinder for SysBlock {
    fn find(&self, serial: &str) -> Result<PathBuf, DiskNotFound> {
        wait_for_disk(serial, self.timeout)
    }

    fn find_pmem(&self, uuid: &str) -> Result<PathBuf, PmemNotFound> {
        if !self.pmem_modules_loaded.replace(true) {
            for e in crate::modules::load_lazy(podvisor_proto::MODULES_PMEM_LIST, &self.release) {
                crate::log!("pmem modules: {e}");
            }
        }
        let start = Instant::now();
        let not_found = || PmemNotFound {
            uuid: uuid.to_string(),
            waited_ms: start.elapsed().as_millis() as u64,
        };
        let wanted = parse_uuid(uuid).ok_or_else(not_found)?;
        loop {
            if let Some(node) = find_by_uuid(Path::new("/sys/block"), Path::new("/dev"), &wanted) {
                return Ok(node);
            }
            if start.elapsed() >= self.timeout {
                return Err(not_found());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn dax(&self, target: &Path) -> Option<bool> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        dax_in_mountinfo(&mountinfo, target)
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

    /// The first bytes of an EROFS device with `uuid`.
    fn erofs_head(uuid: [u8; 16]) -> Vec<u8> {
        let mut head = vec![0u8; EROFS_HEAD_LEN + 100];
        head[1024..1028].copy_from_slice(&EROFS_MAGIC.to_le_bytes());
        head[1024 + 48..1024 + 64].copy_from_slice(&uuid);
        head
    }

    const UUID: [u8; 16] = [
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd,
        0xef,
    ];

    #[test]
    fn the_superblock_uuid_is_read_only_from_a_whole_erofs_superblock() {
        let head = erofs_head(UUID);
        assert_eq!(erofs_uuid(&head), Some(UUID));
        assert_eq!(erofs_uuid(&head[..EROFS_HEAD_LEN]), Some(UUID));
        // Short devices: nothing, at every length.
        for len in [0, 1, 1023, 1024, 1027, 1028, EROFS_HEAD_LEN - 1] {
            assert_eq!(erofs_uuid(&head[..len]), None, "{len} bytes");
        }
        // Another file system (or garbage) there.
        let mut other = head.clone();
        other[1024] ^= 0xff;
        assert_eq!(erofs_uuid(&other), None);
        let mut ext4 = vec![0u8; 4096];
        ext4[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert_eq!(erofs_uuid(&ext4), None);
        assert_eq!(erofs_uuid(&[0xff; 8192]), None);
    }

    #[test]
    fn uuids_are_taken_only_in_the_form_the_host_writes() {
        assert_eq!(
            parse_uuid("01234567-89ab-cdef-0123-456789abcdef"),
            Some(UUID)
        );
        for bad in [
            "",
            "0123456789abcdef0123456789abcdef",
            "01234567-89AB-cdef-0123-456789abcdef",
            "01234567-89ab-cdef-0123-456789abcde",
            "01234567-89ab-cdef-0123-456789abcdef0",
            "0123456-789ab-cdef-0123-456789abcdef",
            "01234567-89ab-cdef-0123-456789abcdeg",
            "01234567-89ab-cdef-0123-456789abcd+f",
            "../../../../dev/sda1-0000-0000-000000",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_pmem_device_with_the_uuid_is_found_others_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let (sys, dev) = (dir.path().join("sys"), dir.path().join("dev"));
        std::fs::create_dir_all(&dev).unwrap();
        let mut other = UUID;
        other[15] = 0;
        let devices: [(&str, Vec<u8>); 6] = [
            ("pmem0", erofs_head(other)),
            ("pmem1", vec![0u8; 100]),
            ("pmem2", vec![]),
            ("pmem3", erofs_head(UUID)),
            ("pmem4s", erofs_head(UUID)),
            ("vda", erofs_head(UUID)),
        ];
        for (name, bytes) in &devices {
            std::fs::create_dir_all(sys.join(name)).unwrap();
            std::fs::write(dev.join(name), bytes).unwrap();
        }
        // Listed in /sys but without a node: passed over.
        std::fs::create_dir_all(sys.join("pmem10")).unwrap();
        assert_eq!(find_by_uuid(&sys, &dev, &UUID), Some(dev.join("pmem3")));
        assert_eq!(find_by_uuid(&sys, &dev, &other), Some(dev.join("pmem0")));
        assert_eq!(find_by_uuid(&sys, &dev, &[7; 16]), None);
        assert_eq!(find_by_uuid(&dir.path().join("nothing"), &dev, &UUID), None);
    }

    #[test]
    fn dax_is_read_from_the_mounts_super_options() {
        let mountinfo = "\
22 1 0:20 / /run rw,nosuid - tmpfs tmpfs rw,mode=755
31 22 259:0 / /run/podvisor/layers/pvl0 ro,nodev,relatime - erofs /dev/pmem0 ro,user_xattr,acl,cache_strategy=readaround,dax=always
32 22 259:1 / /run/podvisor/layers/pvl1 ro,nodev,relatime shared:5 - erofs /dev/pmem1 ro,user_xattr,acl,cache_strategy=readaround
33 22 254:0 / /run/podvisor/layers/pvl2 ro,nodev,relatime - erofs /dev/vda ro,user_xattr,acl
";
        let at = |d: &str| dax_in_mountinfo(mountinfo, &Path::new("/run/podvisor/layers").join(d));
        assert_eq!(at("pvl0"), Some(true));
        assert_eq!(at("pvl1"), Some(false));
        assert_eq!(at("pvl2"), Some(false));
        assert_eq!(at("pvl3"), None);
        assert_eq!(dax_in_mountinfo("garbage\n\n1 2", Path::new("/x")), None);
    }
}
