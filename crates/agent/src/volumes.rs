//! Encrypted volumes on the guest side (see [`podvisor_proto::volumes`]):
//! the ephemeral key pair of a key request, opening the sealed answer,
//! one dm-crypt mapping `pv-<volume>` per released key (formatted from the
//! host's format image when the server says so), suspending them with
//! their keys wiped before a save, and closing one whose key was revoked.
//!
//! Device-mapper goes through [`DeviceMapper`], everything else the logic
//! touches (modules, disk nodes, copying, randomness) through
//! [`VolumeEnv`], so all of it is unit-tested with fakes.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use podvisor_proto::VolumeOpened;
use podvisor_proto::volumes::{
    self, CIPHER, DATA_KEY_LEN, EncryptedVolume, GuestKeyPair, MAX_FORMAT_EXTENTS, MAX_VOLUMES,
    ReleasedKey, SECTOR_SIZE,
};
use zeroize::Zeroizing;

use crate::disks::DiskFinder;
use crate::dm_crypt::{self, DeviceMapper};
use crate::path_lookup::is_safe_name;

/// Name prefix of the agent's mappings: volume `data` is `pv-data`.
pub const MAPPING_PREFIX: &str = "pv-";
/// Longest `context` of a key request.
pub const MAX_CONTEXT_LEN: usize = 512;

/// What the volume logic needs besides device-mapper.
pub trait VolumeEnv {
    /// Loads the modules of encrypted volumes; returns the failures.
    fn load_modules(&mut self) -> Vec<String>;
    /// 32 secret random bytes for the key pair.
    fn ikm(&mut self) -> Result<Zeroizing<[u8; 32]>, String>;
    /// The `dev_t` and size in bytes of the block device at `path`.
    fn block_device(&self, path: &Path) -> Result<(u64, u64), Errno>;
    /// Makes the block device node `path` for `dev` (replacing one there).
    fn make_node(&self, path: &Path, dev: u64) -> Result<(), Errno>;
    /// Copies each `(offset, length)` of `from` to the same offset of
    /// `to`, then syncs `to`.
    fn copy_extents(&self, from: &Path, to: &Path, extents: &[(u64, u64)]) -> Result<(), String>;
}

struct Pending {
    context: String,
    volumes: Vec<EncryptedVolume>,
    pair: GuestKeyPair,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    /// `/dev/mapper/pv-<volume>`.
    node: PathBuf,
    /// Suspended, key wiped (after `SuspendVolumes`).
    suspended: bool,
}

/// The volumes of this VM.
#[derive(Default)]
pub struct Volumes {
    modules_loaded: bool,
    pending: Option<Pending>,
    open: BTreeMap<String, Mapping>,
}

impl std::fmt::Debug for Volumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volumes")
            .field("pending", &self.pending.as_ref().map(|p| &p.context))
            .field("open", &self.open)
            .finish()
    }
}

/// The mapping name of `volume`.
pub fn mapping_name(volume: &str) -> String {
    format!("{MAPPING_PREFIX}{volume}")
}

/// The node a mount of `volume` comes from.
pub fn mapping_node(volume: &str) -> PathBuf {
    Path::new("/dev/mapper").join(mapping_name(volume))
}

/// Checks a `RequestVolumeKeys`.
pub fn check_request(context: &str, list: &[EncryptedVolume]) -> Result<(), String> {
    if context.is_empty() || context.len() > MAX_CONTEXT_LEN {
        return Err(format!(
            "the context must be 1 to {MAX_CONTEXT_LEN} bytes, not {}",
            context.len()
        ));
    }
    if list.len() > MAX_VOLUMES {
        return Err(format!(
            "{} volumes requested; at most {MAX_VOLUMES}",
            list.len()
        ));
    }
    let serial = |s: &str| is_safe_name(s) && s.len() <= podvisor_proto::MAX_SERIAL_LEN;
    let mut names = HashSet::new();
    for v in list {
        // The mapping name must fit device-mapper's 127 bytes.
        if !is_safe_name(&v.name) || v.name.len() > 100 {
            return Err(format!("invalid volume name {:?}", v.name));
        }
        if !names.insert(v.name.as_str()) {
            return Err(format!("volume {:?} is listed twice", v.name));
        }
        if !serial(&v.serial) {
            return Err(format!("volume {:?}: invalid disk serial", v.name));
        }
        if let Some(image) = &v.format_image {
            if !serial(&image.serial) || image.serial == v.serial {
                return Err(format!("volume {:?}: invalid format image serial", v.name));
            }
            if image.extents.len() > MAX_FORMAT_EXTENTS {
                return Err(format!(
                    "volume {:?}: {} format extents; at most {MAX_FORMAT_EXTENTS}",
                    v.name,
                    image.extents.len()
                ));
            }
            let mut end = 0u64;
            for &(offset, len) in &image.extents {
                let stop = offset.checked_add(len);
                if len == 0 || offset < end || stop.is_none_or(|s| s > image.size) {
                    return Err(format!(
                        "volume {:?}: format extents are not sorted, disjoint and within the image",
                        v.name
                    ));
                }
                end = stop.unwrap_or(u64::MAX);
            }
        }
    }
    Ok(())
}

/// Checks one released key against the request.
fn check_key(key: &ReleasedKey) -> Result<(), String> {
    if key.cipher != CIPHER {
        return Err(format!("cipher {:?} is not {CIPHER}", key.cipher));
    }
    if key.sector_size != SECTOR_SIZE {
        return Err(format!(
            "sector size {} is not {SECTOR_SIZE}",
            key.sector_size
        ));
    }
    if key.key.len() != DATA_KEY_LEN {
        return Err(format!(
            "the key is {} bytes, not {DATA_KEY_LEN}",
            key.key.len()
        ));
    }
    Ok(())
}

impl Volumes {
    /// The node of `volume`'s mapping when it is open and not suspended.
    pub fn node(&self, volume: &str) -> Option<PathBuf> {
        self.open
            .get(volume)
            .filter(|m| !m.suspended)
            .map(|m| m.node.clone())
    }

    /// `RequestVolumeKeys`: checks it, loads the modules (once), makes a
    /// fresh key pair; returns its public key.
    pub fn request(
        &mut self,
        env: &mut dyn VolumeEnv,
        context: &str,
        list: &[EncryptedVolume],
    ) -> Result<Vec<u8>, String> {
        self.pending = None;
        check_request(context, list)?;
        if !self.modules_loaded {
            for e in env.load_modules() {
                crate::log!("volume modules: {e}");
            }
            self.modules_loaded = true;
        }
        let ikm = env.ikm()?;
        let pair = GuestKeyPair::derive(&ikm[..]);
        let public = pair.public_key();
        self.pending = Some(Pending {
            context: context.to_string(),
            volumes: list.to_vec(),
            pair,
        });
        Ok(public)
    }

    /// `VolumeKeys`: opens the sealed keys with the pending request's pair
    /// (then drops it) and opens each released volume.
    pub fn open_sealed(
        &mut self,
        dm: Option<&dyn DeviceMapper>,
        env: &dyn VolumeEnv,
        disks: &dyn DiskFinder,
        sealed: &[u8],
    ) -> Vec<VolumeOpened> {
        let whole = |error: String| {
            vec![VolumeOpened {
                name: String::new(),
                error: Some(error),
            }]
        };
        let Some(pending) = self.pending.take() else {
            return whole("no volume key request is pending".into());
        };
        let released = match volumes::open(&pending.pair, &pending.context, sealed) {
            Ok(r) => r,
            Err(e) => return whole(e.to_string()),
        };
        drop(pending.pair);
        let Some(dm) = dm else {
            return whole("device-mapper is not available".into());
        };
        let mut seen = HashSet::new();
        released
            .keys
            .iter()
            .map(|key| {
                let error = if !seen.insert(key.volume.clone()) {
                    Some("released twice".to_string())
                } else {
                    match pending.volumes.iter().find(|v| v.name == key.volume) {
                        None => Some("not in the request".to_string()),
                        Some(volume) => self.open_one(dm, env, disks, volume, key).err(),
                    }
                };
                if let Some(e) = &error {
                    crate::log!("volume {:?}: {e}", key.volume);
                }
                VolumeOpened {
                    name: key.volume.clone(),
                    error,
                }
            })
            .collect()
    }

    fn open_one(
        &mut self,
        dm: &dyn DeviceMapper,
        env: &dyn VolumeEnv,
        disks: &dyn DiskFinder,
        volume: &EncryptedVolume,
        key: &ReleasedKey,
    ) -> Result<(), String> {
        check_key(key)?;
        let name = mapping_name(&volume.name);
        let node = mapping_node(&volume.name);
        let dm_err = |what: &str, e: Errno| format!("{what} {name}: {e}");
        if key.format && volume.format_image.is_none() {
            return Err("asked to format but no format image".into());
        }
        let existing = dm.info(&name).map_err(|e| dm_err("looking up", e))?;
        if let Some(info) = existing {
            if key.format {
                return Err("asked to format a volume that is already open".into());
            }
            if info.suspended {
                // Back from a save: the same mapping gets its key again.
                dm.message(&name, &dm_crypt::key_set_message(&key.key))
                    .map_err(|e| dm_err("setting the key of", e))?;
                dm.resume(&name).map_err(|e| dm_err("resuming", e))?;
            }
            self.open.insert(
                volume.name.clone(),
                Mapping {
                    node,
                    suspended: false,
                },
            );
            return Ok(());
        }
        let disk = disks.find(&volume.serial).map_err(|e| e.to_string())?;
        let (disk_dev, disk_size) = env
            .block_device(&disk)
            .map_err(|e| format!("{}: {e}", disk.display()))?;
        let size = disk_size - disk_size % u64::from(SECTOR_SIZE);
        if size == 0 {
            return Err(format!("disk {} is empty", disk.display()));
        }
        let image = match (&volume.format_image, key.format) {
            (Some(image), true) => {
                if image.size > size {
                    return Err(format!(
                        "the format image ({} bytes) is larger than the disk ({size} bytes)",
                        image.size
                    ));
                }
                Some((disks.find(&image.serial).map_err(|e| e.to_string())?, image))
            }
            _ => None,
        };
        let params = dm_crypt::crypt_params(
            &key.cipher,
            &key.key,
            libc::major(disk_dev) as u64,
            libc::minor(disk_dev) as u64,
            key.sector_size,
        );
        let dev = dm.create(&name).map_err(|e| dm_err("creating", e))?;
        let made = dm
            .load(&name, size / 512, "crypt", &params)
            .map_err(|e| dm_err("loading the table of", e))
            .and_then(|()| dm.resume(&name).map_err(|e| dm_err("activating", e)))
            .and_then(|()| {
                env.make_node(&node, dev)
                    .map_err(|e| format!("making {}: {e}", node.display()))
            })
            .and_then(|()| match &image {
                Some((from, image)) => env
                    .copy_extents(from, &node, &image.extents)
                    .map_err(|e| format!("formatting: {e}")),
                None => Ok(()),
            });
        drop(params);
        if let Err(e) = made {
            let _ = dm.remove(&name, false);
            let _ = std::fs::remove_file(&node);
            return Err(e);
        }
        self.open.insert(
            volume.name.clone(),
            Mapping {
                node,
                suspended: false,
            },
        );
        Ok(())
    }

    /// `SuspendVolumes`: every open mapping suspended with its file system
    /// frozen, and its key wiped from the kernel.
    pub fn suspend_all(&mut self, dm: Option<&dyn DeviceMapper>) -> Option<String> {
        self.pending = None;
        if self.open.is_empty() {
            return None;
        }
        let Some(dm) = dm else {
            return Some("device-mapper is not available".into());
        };
        let mut errors = Vec::new();
        for (volume, m) in self.open.iter_mut().filter(|(_, m)| !m.suspended) {
            let name = mapping_name(volume);
            let r = dm
                .suspend(&name, true)
                .and_then(|()| dm.message(&name, dm_crypt::KEY_WIPE));
            match r {
                Ok(()) => m.suspended = true,
                Err(e) => errors.push(format!("{volume}: {e}")),
            }
        }
        (!errors.is_empty()).then(|| format!("suspending volumes: {}", errors.join("; ")))
    }

    /// Removes `volume`'s mapping (its file systems already unmounted):
    /// suspended, key wiped, removed (when the device is still held
    /// open, removal is deferred to its last close; the key is gone anyway).
    pub fn close(&mut self, dm: Option<&dyn DeviceMapper>, volume: &str) -> Option<String> {
        let Some(dm) = dm else {
            return self
                .open
                .remove(volume)
                .map(|_| "device-mapper is not available".into());
        };
        let name = mapping_name(volume);
        let node = mapping_node(volume);
        self.open.remove(volume);
        match dm.info(&name) {
            Ok(None) => return None,
            Ok(Some(_)) => {}
            Err(e) => return Some(format!("looking up {name}: {e}")),
        }
        let mut errors = Vec::new();
        if let Err(e) = dm
            .suspend(&name, false)
            .and_then(|()| dm.message(&name, dm_crypt::KEY_WIPE))
        {
            errors.push(format!("wiping the key of {name}: {e}"));
        }
        match dm.remove(&name, false) {
            Ok(()) => {}
            Err(Errno::EBUSY) => {
                errors.push(format!("{name} is still in use; removal deferred"));
                let _ = dm.remove(&name, true);
            }
            Err(e) => errors.push(format!("removing {name}: {e}")),
        }
        let _ = std::fs::remove_file(node);
        (!errors.is_empty()).then(|| errors.join("; "))
    }
}

/// 32 bytes from the CPU's RDSEED (RDRAND without it), retried as Intel
/// advises; `None` when the CPU has neither or they keep failing.
pub fn cpu_random() -> Option<Zeroizing<[u8; 32]>> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut out = Zeroizing::new([0u8; 32]);
        let seed = std::arch::is_x86_feature_detected!("rdseed");
        let rand = std::arch::is_x86_feature_detected!("rdrand");
        for chunk in out.chunks_mut(8) {
            // RDSEED may underflow under load: Intel suggests retrying with
            // a pause; RDRAND retries 10 times.
            let word = if seed {
                (0..100).find_map(|_| {
                    // SAFETY: the CPU has RDSEED (checked above).
                    let w = unsafe { rdseed() };
                    if w.is_none() {
                        std::hint::spin_loop();
                    }
                    w
                })
            } else {
                None
            };
            let word = word.or_else(|| {
                if rand {
                    // SAFETY: the CPU has RDRAND (checked above).
                    (0..10).find_map(|_| unsafe { rdrand() })
                } else {
                    None
                }
            })?;
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Some(out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "rdseed")]
unsafe fn rdseed() -> Option<u64> {
    let mut v = 0u64;
    (std::arch::x86_64::_rdseed64_step(&mut v) == 1).then_some(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "rdrand")]
unsafe fn rdrand() -> Option<u64> {
    let mut v = 0u64;
    (std::arch::x86_64::_rdrand64_step(&mut v) == 1).then_some(v)
}

/// The key pair's input: SHA-256 over 32 bytes of `getrandom(2)` and 32
/// bytes of the CPU's generator (bytes the host did not supply, unlike a
/// clone's reseed), or of `getrandom(2)` alone when the CPU has none.
pub fn mixed_ikm() -> Result<Zeroizing<[u8; 32]>, String> {
    use sha2::Digest;
    let mut kernel = Zeroizing::new([0u8; 32]);
    let mut filled = 0;
    while filled < kernel.len() {
        // SAFETY: writes at most the remaining length into the buffer.
        let n = unsafe {
            libc::getrandom(
                kernel[filled..].as_mut_ptr().cast(),
                kernel.len() - filled,
                0,
            )
        };
        match Errno::result(n) {
            Ok(n) => filled += n as usize,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("getrandom: {e}")),
        }
    }
    let mut h = sha2::Sha256::new();
    h.update(&kernel[..]);
    match cpu_random() {
        Some(cpu) => h.update(&cpu[..]),
        None => crate::log!("volume keys: no CPU random generator; the kernel's RNG only"),
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&h.finalize());
    Ok(out)
}

/// The guest's [`VolumeEnv`].
#[derive(Debug, Default)]
pub struct LinuxVolumeEnv {
    /// The running kernel's release (for the module directory).
    pub release: String,
}

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl VolumeEnv for LinuxVolumeEnv {
    fn load_modules(&mut self) -> Vec<String> {
        use podvisor_proto::{MODULES_VOLUMES_AESNI_LIST, MODULES_VOLUMES_LIST};
        let aes = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "aes"))
        });
        let mut lists = vec![MODULES_VOLUMES_LIST];
        if aes {
            lists.push(MODULES_VOLUMES_AESNI_LIST);
        }
        lists
            .into_iter()
            .flat_map(|list| crate::modules::load_lazy(list, &self.release))
            .collect()
    }

    fn ikm(&mut self) -> Result<Zeroizing<[u8; 32]>, String> {
        mixed_ikm()
    }

    fn block_device(&self, path: &Path) -> Result<(u64, u64), Errno> {
        use std::os::fd::AsRawFd;
        let fd = nix::fcntl::open(
            path,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let st = nix::sys::stat::fstat(&fd)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFBLK {
            return Err(Errno::ENOTBLK);
        }
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64.
        Errno::result(unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut size) })?;
        Ok((st.st_rdev, size))
    }

    fn make_node(&self, path: &Path, dev: u64) -> Result<(), Errno> {
        use nix::sys::stat::{Mode, SFlag};
        if let Some(dir) = path.parent() {
            match nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        let _ = std::fs::remove_file(path);
        nix::sys::stat::mknod(path, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), dev)
    }

    fn copy_extents(&self, from: &Path, to: &Path, extents: &[(u64, u64)]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let src = std::fs::File::open(from).map_err(|e| format!("{}: {e}", from.display()))?;
        let dst = std::fs::OpenOptions::new()
            .write(true)
            .open(to)
            .map_err(|e| format!("{}: {e}", to.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        for &(offset, len) in extents {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                src.read_exact_at(&mut buf[..n], offset + done)
                    .map_err(|e| format!("reading {}: {e}", from.display()))?;
                dst.write_all_at(&buf[..n], offset + done)
                    .map_err(|e| format!("writing {}: {e}", to.display()))?;
                done += n as u64;
            }
        }
        dst.sync_all()
            .map_err(|e| format!("syncing {}: {e}", to.display()))
    }
}

#[cfg(test)]
#[path = "volumes_tests.rs"]
mod tests;
