//! dm-crypt mappings through the device-mapper ioctls on
//! `/dev/mapper/control`: no `cryptsetup`, no LUKS header on the disk
//! (every parameter comes with the released key; a header on storage the
//! host can write is malleable).
//!
//! [`DeviceMapper`] is the seam: [`DmControl`] issues the ioctls, a
//! recording fake stands in for it in the volume logic's tests. Key bytes
//! only pass through buffers this module wipes ([`Zeroizing`]); the ioctls
//! that carry a key set `DM_SECURE_DATA_FLAG` so the kernel wipes its copy
//! of the ioctl buffer too.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use zeroize::Zeroizing;

/// The control node of device-mapper.
pub const CONTROL: &str = "/dev/mapper/control";

/// Hex of `key` followed by the rest of a crypt table line:
/// `aes-xts-plain64 <hex key> 0 <major:minor> 0 1 sector_size:<n>`.
pub fn crypt_params(
    cipher: &str,
    key: &[u8],
    major: u64,
    minor: u64,
    sector_size: u32,
) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(key.len() * 2 + 96));
    out.extend_from_slice(cipher.as_bytes());
    out.push(b' ');
    push_hex(&mut out, key);
    out.extend_from_slice(format!(" 0 {major}:{minor} 0 1 sector_size:{sector_size}").as_bytes());
    out
}

/// `key set <hex>`: the message giving a suspended mapping its key back.
pub fn key_set_message(key: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(key.len() * 2 + 8));
    out.extend_from_slice(b"key set ");
    push_hex(&mut out, key);
    out
}

/// `key wipe`: the message removing the key from a suspended mapping.
pub const KEY_WIPE: &[u8] = b"key wipe";

fn push_hex(out: &mut Zeroizing<Vec<u8>>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 15) as usize]);
    }
}

/// What a mapping looks like to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmInfo {
    /// Its block device number (`dev_t`).
    pub dev: u64,
    pub suspended: bool,
    pub open_count: i32,
}

/// The device-mapper operations the volume logic needs.
pub trait DeviceMapper {
    /// `DM_DEV_CREATE`: a mapping without a table; returns its `dev_t`.
    fn create(&self, name: &str) -> Result<u64, Errno>;
    /// `DM_TABLE_LOAD` of one target `target_type` over `sectors` 512-byte
    /// sectors with `params` (which may hold a key: wiped by the caller).
    fn load(&self, name: &str, sectors: u64, target_type: &str, params: &[u8])
    -> Result<(), Errno>;
    /// `DM_DEV_SUSPEND` with `DM_SUSPEND_FLAG`; `lockfs` freezes the file
    /// system on it first (and flushes it).
    fn suspend(&self, name: &str, lockfs: bool) -> Result<(), Errno>;
    /// `DM_DEV_SUSPEND` without it: activates a loaded table / resumes.
    fn resume(&self, name: &str) -> Result<(), Errno>;
    /// `DM_TARGET_MSG` to sector 0 (`key set …`, `key wipe`).
    fn message(&self, name: &str, message: &[u8]) -> Result<(), Errno>;
    /// `DM_DEV_REMOVE`; `deferred`: when its last user closes it.
    fn remove(&self, name: &str, deferred: bool) -> Result<(), Errno>;
    /// `DM_DEV_STATUS`: `None` when there is no such mapping.
    fn info(&self, name: &str) -> Result<Option<DmInfo>, Errno>;
}

const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
const DM_MAX_TYPE_NAME: usize = 16;

/// `struct dm_ioctl` (linux/dm-ioctl.h), 312 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}

/// `struct dm_target_spec`, 40 bytes; the parameter string follows it.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; DM_MAX_TYPE_NAME],
}

const HEADER: usize = std::mem::size_of::<DmIoctl>();
const _: () = assert!(HEADER == 312);
const _: () = assert!(std::mem::size_of::<DmTargetSpec>() == 40);

const DM_VERSION_CMD: u8 = 0;
const DM_DEV_CREATE_CMD: u8 = 3;
const DM_DEV_REMOVE_CMD: u8 = 4;
const DM_DEV_SUSPEND_CMD: u8 = 6;
const DM_DEV_STATUS_CMD: u8 = 7;
const DM_TABLE_LOAD_CMD: u8 = 9;
const DM_TARGET_MSG_CMD: u8 = 14;

const DM_SUSPEND_FLAG: u32 = 1 << 1;
const DM_SKIP_LOCKFS_FLAG: u32 = 1 << 10;
const DM_SECURE_DATA_FLAG: u32 = 1 << 15;
const DM_DEFERRED_REMOVE: u32 = 1 << 17;

/// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
const fn request(cmd: u8) -> libc::c_ulong {
    (3 << 30) | ((HEADER as libc::c_ulong) << 16) | (0xfd << 8) | cmd as libc::c_ulong
}

/// The real device-mapper, through `/dev/mapper/control`.
#[derive(Debug)]
pub struct DmControl {
    fd: OwnedFd,
}

impl DmControl {
    /// Opens the control node (making it if devtmpfs has not: 10:236) and
    /// checks the ioctl interface's version.
    pub fn open() -> Result<DmControl, Errno> {
        use nix::fcntl::{OFlag, open};
        use nix::sys::stat::Mode;
        let flags = OFlag::O_RDWR | OFlag::O_CLOEXEC;
        let fd = match open(CONTROL, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                let _ = nix::unistd::mkdir("/dev/mapper", Mode::from_bits_truncate(0o755));
                nix::sys::stat::mknod(
                    CONTROL,
                    nix::sys::stat::SFlag::S_IFCHR,
                    Mode::from_bits_truncate(0o600),
                    libc::makedev(10, 236),
                )?;
                open(CONTROL, flags, Mode::empty())?
            }
            Err(e) => return Err(e),
        };
        let dm = DmControl { fd };
        dm.call(DM_VERSION_CMD, "", 0, &[])?;
        Ok(dm)
    }

    /// One ioctl with `payload` after the header; returns the header the
    /// kernel wrote back. The buffer is wiped afterwards.
    fn call(&self, cmd: u8, name: &str, flags: u32, payload: &[u8]) -> Result<DmIoctl, Errno> {
        if name.len() >= DM_NAME_LEN {
            return Err(Errno::ENAMETOOLONG);
        }
        // Room for what the kernel writes back (status, version strings).
        let size = (HEADER + payload.len() + 8 + 4096).next_multiple_of(8);
        let mut buf = Zeroizing::new(vec![0u8; size]);
        let mut header = DmIoctl {
            version: [4, 0, 0],
            data_size: size as u32,
            data_start: HEADER as u32,
            target_count: 0,
            open_count: 0,
            flags,
            event_nr: 0,
            padding: 0,
            dev: 0,
            name: [0; DM_NAME_LEN],
            uuid: [0; DM_UUID_LEN],
            data: [0; 7],
        };
        header.name[..name.len()].copy_from_slice(name.as_bytes());
        if cmd == DM_TABLE_LOAD_CMD {
            header.target_count = 1;
        }
        // SAFETY: `DmIoctl` is plain old data; `buf` has room for it.
        unsafe { std::ptr::write_unaligned(buf.as_mut_ptr().cast::<DmIoctl>(), header) };
        buf[HEADER..HEADER + payload.len()].copy_from_slice(payload);
        // SAFETY: the buffer is `data_size` bytes long, as the header says;
        // the kernel reads and writes only within it.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), request(cmd), buf.as_mut_ptr()) };
        Errno::result(r)?;
        // SAFETY: as above; the kernel wrote a header back.
        let out = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<DmIoctl>()) };
        Ok(out)
    }
}

impl DeviceMapper for DmControl {
    fn create(&self, name: &str) -> Result<u64, Errno> {
        Ok(self.call(DM_DEV_CREATE_CMD, name, 0, &[])?.dev)
    }

    fn load(
        &self,
        name: &str,
        sectors: u64,
        target_type: &str,
        params: &[u8],
    ) -> Result<(), Errno> {
        if target_type.len() >= DM_MAX_TYPE_NAME {
            return Err(Errno::EINVAL);
        }
        let spec_len = std::mem::size_of::<DmTargetSpec>();
        let total = (spec_len + params.len() + 1).next_multiple_of(8);
        let mut spec = DmTargetSpec {
            sector_start: 0,
            length: sectors,
            status: 0,
            next: total as u32,
            target_type: [0; DM_MAX_TYPE_NAME],
        };
        spec.target_type[..target_type.len()].copy_from_slice(target_type.as_bytes());
        let mut payload = Zeroizing::new(vec![0u8; total]);
        // SAFETY: plain old data into a buffer with room for it.
        unsafe { std::ptr::write_unaligned(payload.as_mut_ptr().cast::<DmTargetSpec>(), spec) };
        payload[spec_len..spec_len + params.len()].copy_from_slice(params);
        self.call(DM_TABLE_LOAD_CMD, name, DM_SECURE_DATA_FLAG, &payload)
            .map(drop)
    }

    fn suspend(&self, name: &str, lockfs: bool) -> Result<(), Errno> {
        let mut flags = DM_SUSPEND_FLAG;
        if !lockfs {
            flags |= DM_SKIP_LOCKFS_FLAG;
        }
        self.call(DM_DEV_SUSPEND_CMD, name, flags, &[]).map(drop)
    }

    fn resume(&self, name: &str) -> Result<(), Errno> {
        self.call(DM_DEV_SUSPEND_CMD, name, 0, &[]).map(drop)
    }

    fn message(&self, name: &str, message: &[u8]) -> Result<(), Errno> {
        // struct dm_target_msg { __u64 sector; char message[]; }
        let mut payload = Zeroizing::new(vec![0u8; (8 + message.len() + 1).next_multiple_of(8)]);
        payload[8..8 + message.len()].copy_from_slice(message);
        self.call(DM_TARGET_MSG_CMD, name, DM_SECURE_DATA_FLAG, &payload)
            .map(drop)
    }

    fn remove(&self, name: &str, deferred: bool) -> Result<(), Errno> {
        let flags = if deferred { DM_DEFERRED_REMOVE } else { 0 };
        self.call(DM_DEV_REMOVE_CMD, name, flags, &[]).map(drop)
    }

    fn info(&self, name: &str) -> Result<Option<DmInfo>, Errno> {
        match self.call(DM_DEV_STATUS_CMD, name, 0, &[]) {
            Ok(h) => Ok(Some(DmInfo {
                dev: h.dev,
                suspended: h.flags & DM_SUSPEND_FLAG != 0,
                open_count: h.open_count,
            })),
            Err(Errno::ENXIO) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Test double: records each call (key bytes replaced by their length) and
/// keeps the mappings' state.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct RecordingDm {
    pub calls: std::cell::RefCell<Vec<String>>,
    pub mappings: std::cell::RefCell<std::collections::BTreeMap<String, DmInfo>>,
    /// Calls whose record starts with one of these fail with the errno.
    pub failures: Vec<(String, Errno)>,
    /// Every params/message buffer seen, to check what was sent (tests only).
    pub seen: std::cell::RefCell<Vec<Vec<u8>>>,
}

#[cfg(test)]
impl RecordingDm {
    fn record(&self, line: String) -> Result<(), Errno> {
        let r = match self.failures.iter().find(|(p, _)| line.starts_with(p)) {
            Some((_, e)) => Err(*e),
            None => Ok(()),
        };
        self.calls.borrow_mut().push(line);
        r
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }
}

#[cfg(test)]
fn redact(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .split(' ')
        .map(|w| {
            if w.len() >= 64 && w.bytes().all(|b| b.is_ascii_hexdigit()) {
                format!("<key {}>", w.len() / 2)
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
impl DeviceMapper for RecordingDm {
    fn create(&self, name: &str) -> Result<u64, Errno> {
        self.record(format!("create {name}"))?;
        let n = self.mappings.borrow().len() as u32;
        let dev = libc::makedev(254, n);
        self.mappings.borrow_mut().insert(
            name.into(),
            DmInfo {
                dev,
                suspended: true,
                open_count: 0,
            },
        );
        Ok(dev)
    }
    fn load(&self, name: &str, sectors: u64, target: &str, params: &[u8]) -> Result<(), Errno> {
        self.seen.borrow_mut().push(params.to_vec());
        self.record(format!("load {name} {sectors} {target} {}", redact(params)))
    }
    fn suspend(&self, name: &str, lockfs: bool) -> Result<(), Errno> {
        self.record(format!(
            "suspend {name}{}",
            if lockfs { " lockfs" } else { "" }
        ))?;
        if let Some(m) = self.mappings.borrow_mut().get_mut(name) {
            m.suspended = true;
        }
        Ok(())
    }
    fn resume(&self, name: &str) -> Result<(), Errno> {
        self.record(format!("resume {name}"))?;
        if let Some(m) = self.mappings.borrow_mut().get_mut(name) {
            m.suspended = false;
        }
        Ok(())
    }
    fn message(&self, name: &str, message: &[u8]) -> Result<(), Errno> {
        self.seen.borrow_mut().push(message.to_vec());
        self.record(format!("message {name} {}", redact(message)))
    }
    fn remove(&self, name: &str, deferred: bool) -> Result<(), Errno> {
        self.record(format!(
            "remove {name}{}",
            if deferred { " deferred" } else { "" }
        ))?;
        self.mappings.borrow_mut().remove(name);
        Ok(())
    }
    fn info(&self, name: &str) -> Result<Option<DmInfo>, Errno> {
        Ok(self.mappings.borrow().get(name).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        assert_eq!(request(DM_VERSION_CMD), 0xc138_fd00);
        assert_eq!(request(DM_TARGET_MSG_CMD), 0xc138_fd0e);
    }

    #[test]
    fn crypt_table_names_cipher_key_device_and_sector_size() {
        let p = crypt_params("aes-xts-plain64", &[0xab, 0x01], 253, 16, 4096);
        assert_eq!(
            std::str::from_utf8(&p).unwrap(),
            "aes-xts-plain64 ab01 0 253:16 0 1 sector_size:4096"
        );
        assert_eq!(&key_set_message(&[0xff])[..], b"key set ff");
    }
}
