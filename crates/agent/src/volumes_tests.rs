//! The volume logic against a recording device-mapper and fake disks.

use std::cell::RefCell;
use std::time::Duration;

use podvisor_proto::volumes::{FormatImage, ReleasedKeys, seal};

use super::*;
use crate::disks::DiskNotFound;
use crate::dm_crypt::RecordingDm;

/// One `copy_extents` call: from, to, extents.
type Copy = (PathBuf, PathBuf, Vec<(u64, u64)>);

#[derive(Default)]
struct FakeEnv {
    modules: usize,
    copies: RefCell<Vec<Copy>>,
    nodes: RefCell<Vec<(PathBuf, u64)>>,
}

impl VolumeEnv for FakeEnv {
    fn load_modules(&mut self) -> Vec<String> {
        self.modules += 1;
        vec![]
    }
    fn ikm(&mut self) -> Result<Zeroizing<[u8; 32]>, String> {
        Ok(Zeroizing::new([9; 32]))
    }
    fn block_device(&self, path: &Path) -> Result<(u64, u64), Errno> {
        let minor = if path.ends_with("vdb") { 16 } else { 32 };
        Ok((libc::makedev(253, minor), (1 << 30) + 1000))
    }
    fn make_node(&self, path: &Path, dev: u64) -> Result<(), Errno> {
        self.nodes.borrow_mut().push((path.to_path_buf(), dev));
        Ok(())
    }
    fn copy_extents(&self, from: &Path, to: &Path, extents: &[(u64, u64)]) -> Result<(), String> {
        self.copies
            .borrow_mut()
            .push((from.to_path_buf(), to.to_path_buf(), extents.to_vec()));
        Ok(())
    }
}

struct Disks;

impl DiskFinder for Disks {
    fn find(&self, serial: &str) -> Result<PathBuf, DiskNotFound> {
        match serial {
            "pvv0" => Ok("/dev/vdb".into()),
            "pvf0" => Ok("/dev/vdc".into()),
            _ => Err(DiskNotFound {
                serial: serial.into(),
                waited_ms: Duration::from_secs(5).as_millis() as u64,
            }),
        }
    }
}

fn volume(format: bool) -> EncryptedVolume {
    EncryptedVolume {
        name: "data".into(),
        serial: "pvv0".into(),
        format_image: format.then(|| FormatImage {
            serial: "pvf0".into(),
            size: 1 << 30,
            extents: vec![(0, 4096), (1 << 20, 8192)],
        }),
    }
}

fn key(format: bool, byte: u8) -> ReleasedKey {
    ReleasedKey {
        volume: "data".into(),
        key: vec![byte; DATA_KEY_LEN],
        cipher: CIPHER.into(),
        sector_size: SECTOR_SIZE,
        format,
    }
}

fn sealed(public: &[u8], context: &str, keys: Vec<ReleasedKey>) -> Vec<u8> {
    seal(public, context, &ReleasedKeys { keys }, &[5; 32]).unwrap()
}

#[test]
fn a_released_key_opens_and_formats_the_volume() {
    let (mut v, mut env, dm) = (
        Volumes::default(),
        FakeEnv::default(),
        RecordingDm::default(),
    );
    let public = v.request(&mut env, "ns/p/u/1", &[volume(true)]).unwrap();
    assert_eq!(public.len(), 32);
    assert_eq!(env.modules, 1);
    let results = v.open_sealed(
        Some(&dm),
        &env,
        &Disks,
        &sealed(&public, "ns/p/u/1", vec![key(true, 7)]),
    );
    assert_eq!(
        results,
        [VolumeOpened {
            name: "data".into(),
            error: None
        }]
    );
    assert_eq!(
        dm.calls(),
        [
            "create pv-data",
            // 1 GiB + 1000 bytes: the mapping rounds down to 4 KiB sectors.
            "load pv-data 2097152 crypt aes-xts-plain64 <key 64> 0 253:16 0 1 sector_size:4096",
            "resume pv-data",
        ]
    );
    let copies = env.copies.borrow();
    assert_eq!(copies[0].0, Path::new("/dev/vdc"));
    assert_eq!(copies[0].1, Path::new("/dev/mapper/pv-data"));
    assert_eq!(copies[0].2, [(0, 4096), (1 << 20, 8192)]);
    assert_eq!(v.node("data"), Some(PathBuf::from("/dev/mapper/pv-data")));
    // The pair is gone: the same envelope does not open twice.
    let again = v.open_sealed(Some(&dm), &env, &Disks, &[0; 48]);
    assert!(
        again[0]
            .error
            .as_deref()
            .unwrap()
            .contains("no volume key request")
    );
}

#[test]
fn never_formats_unless_told_and_refuses_formatting_without_an_image() {
    let (mut v, mut env, dm) = (
        Volumes::default(),
        FakeEnv::default(),
        RecordingDm::default(),
    );
    let public = v.request(&mut env, "c", &[volume(true)]).unwrap();
    let r = v.open_sealed(
        Some(&dm),
        &env,
        &Disks,
        &sealed(&public, "c", vec![key(false, 7)]),
    );
    assert_eq!(r[0].error, None);
    assert!(env.copies.borrow().is_empty());

    let (mut v, mut env, dm) = (
        Volumes::default(),
        FakeEnv::default(),
        RecordingDm::default(),
    );
    let public = v.request(&mut env, "c", &[volume(false)]).unwrap();
    let r = v.open_sealed(
        Some(&dm),
        &env,
        &Disks,
        &sealed(&public, "c", vec![key(true, 7)]),
    );
    assert_eq!(
        r[0].error.as_deref(),
        Some("asked to format but no format image")
    );
    assert!(dm.calls().is_empty());
    assert_eq!(v.node("data"), None);
}

#[test]
fn bad_keys_and_other_contexts_are_refused() {
    let (mut v, mut env, dm) = (
        Volumes::default(),
        FakeEnv::default(),
        RecordingDm::default(),
    );
    let public = v.request(&mut env, "c", &[volume(false)]).unwrap();
    let r = v.open_sealed(
        Some(&dm),
        &env,
        &Disks,
        &sealed(&public, "other", vec![key(false, 7)]),
    );
    assert_eq!(r[0].name, "");
    assert!(r[0].error.is_some());

    let public = v.request(&mut env, "c", &[volume(false)]).unwrap();
    let mut k = key(false, 7);
    k.cipher = "cipher_null".into();
    let mut short = key(false, 7);
    short.volume = "other".into();
    let r = v.open_sealed(
        Some(&dm),
        &env,
        &Disks,
        &sealed(&public, "c", vec![k, short]),
    );
    assert!(r[0].error.as_deref().unwrap().contains("cipher"));
    assert_eq!(r[1].error.as_deref(), Some("not in the request"));
    assert!(dm.calls().is_empty());
    // Modules are loaded once.
    assert_eq!(env.modules, 1);
}

#[test]
fn requests_are_checked() {
    let ok = volume(true);
    assert!(check_request("c", std::slice::from_ref(&ok)).is_ok());
    assert!(check_request("", std::slice::from_ref(&ok)).is_err());
    assert!(check_request(&"x".repeat(513), std::slice::from_ref(&ok)).is_err());
    let many: Vec<_> = (0..=MAX_VOLUMES)
        .map(|i| EncryptedVolume {
            name: format!("v{i}"),
            ..volume(false)
        })
        .collect();
    assert!(check_request("c", &many).is_err());
    for bad in [
        EncryptedVolume {
            name: "../x".into(),
            ..volume(false)
        },
        EncryptedVolume {
            serial: "x".repeat(21),
            ..volume(false)
        },
    ] {
        assert!(check_request("c", &[bad]).is_err());
    }
    let mut overlapping = volume(true);
    overlapping.format_image.as_mut().unwrap().extents = vec![(0, 8192), (4096, 10)];
    assert!(check_request("c", &[overlapping]).is_err());
    let mut outside = volume(true);
    outside.format_image.as_mut().unwrap().extents = vec![(1 << 30, 1)];
    assert!(check_request("c", &[outside]).is_err());
    let mut unsorted = volume(true);
    unsorted.format_image.as_mut().unwrap().extents = vec![(8192, 1), (0, 1)];
    assert!(check_request("c", &[unsorted]).is_err());
    assert!(check_request("c", &[volume(false), volume(false)]).is_err());
}

#[test]
fn suspend_wipes_keys_and_new_keys_resume_the_same_mapping() {
    let (mut v, mut env, dm) = (
        Volumes::default(),
        FakeEnv::default(),
        RecordingDm::default(),
    );
    let public = v.request(&mut env, "c", &[volume(false)]).unwrap();
    v.open_sealed(
        Some(&dm),
        &env,
        &Disks,
        &sealed(&public, "c", vec![key(false, 7)]),
    );
    assert_eq!(v.suspend_all(Some(&dm)), None);
    assert_eq!(v.node("data"), None);
    let public = v.request(&mut env, "c2", &[volume(false)]).unwrap();
    let r = v.open_sealed(
        Some(&dm),
        &env,
        &Disks,
        &sealed(&public, "c2", vec![key(false, 7)]),
    );
    assert_eq!(r[0].error, None);
    assert_eq!(
        dm.calls()[3..],
        [
            "suspend pv-data lockfs",
            "message pv-data key wipe",
            "message pv-data key set <key 64>",
            "resume pv-data",
        ]
    );
    assert!(v.node("data").is_some());
}

#[test]
fn close_wipes_the_key_and_removes_the_mapping() {
    let (mut v, mut env, dm) = (
        Volumes::default(),
        FakeEnv::default(),
        RecordingDm::default(),
    );
    let public = v.request(&mut env, "c", &[volume(false)]).unwrap();
    v.open_sealed(
        Some(&dm),
        &env,
        &Disks,
        &sealed(&public, "c", vec![key(false, 7)]),
    );
    assert_eq!(v.close(Some(&dm), "data"), None);
    assert_eq!(
        dm.calls()[3..],
        [
            "suspend pv-data",
            "message pv-data key wipe",
            "remove pv-data"
        ]
    );
    assert_eq!(v.node("data"), None);
    // A busy device is removed when its last user closes it.
    let dm = RecordingDm {
        failures: vec![("remove pv-data".into(), Errno::EBUSY)],
        ..Default::default()
    };
    let public = v.request(&mut env, "c", &[volume(false)]).unwrap();
    v.open_sealed(
        Some(&dm),
        &env,
        &Disks,
        &sealed(&public, "c", vec![key(false, 7)]),
    );
    let e = v.close(Some(&dm), "data").unwrap();
    assert!(e.contains("deferred"), "{e}");
    assert_eq!(dm.calls().last().unwrap(), "remove pv-data deferred");
}

#[test]
fn a_failed_table_load_removes_the_mapping() {
    let (mut v, mut env) = (Volumes::default(), FakeEnv::default());
    let dm = RecordingDm {
        failures: vec![("load".into(), Errno::EINVAL)],
        ..Default::default()
    };
    let public = v.request(&mut env, "c", &[volume(false)]).unwrap();
    let r = v.open_sealed(
        Some(&dm),
        &env,
        &Disks,
        &sealed(&public, "c", vec![key(false, 7)]),
    );
    assert!(r[0].error.as_deref().unwrap().contains("EINVAL"));
    assert_eq!(dm.calls().last().unwrap(), "remove pv-data");
    assert_eq!(v.node("data"), None);
}

#[test]
fn the_cpu_generator_gives_fresh_bytes() {
    let a = mixed_ikm().unwrap();
    let b = mixed_ikm().unwrap();
    assert_ne!(*a, *b);
}
