//! Volume files, checked with e2fsprogs' own tools.

use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

use super::*;

const SIZE: u64 = 64 << 20;

fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// `e2fsck -fn` on `path`: whether it found the file system clean, and
/// what it said.
fn fsck(path: &Path) -> (bool, String) {
    let out = Command::new(tool("e2fsck").expect("e2fsck (e2fsprogs)"))
        .args(["-f", "-n"])
        .arg(path)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn debugfs(path: &Path, request: &str) -> String {
    let out = Command::new(tool("debugfs").expect("debugfs (e2fsprogs)"))
        .args(["-R", request])
        .arg(path)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn random_file(path: &Path, size: u64) {
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        urandom.read_exact(&mut buf).unwrap();
        f.write_all_at(&buf, at).unwrap();
        at += buf.len() as u64;
    }
}

#[test]
fn copying_only_the_extents_over_random_bytes_gives_a_clean_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let image = FormatImage::make(dir.path(), SIZE).unwrap();
    assert_eq!(image.size, SIZE);
    assert!(!image.extents.is_empty());
    assert!(image.extents.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    let data = image.data_bytes();
    eprintln!(
        "format image of {} MiB: {} extents, {} KiB of data",
        SIZE >> 20,
        image.extents.len(),
        data >> 10
    );
    assert!(data < SIZE / 4, "{data} bytes of data: not sparse");

    // A volume as the guest sees it through a fresh dm-crypt mapping:
    // random bytes everywhere.
    let volume = dir.path().join("volume");
    random_file(&volume, SIZE);
    let (clean, text) = fsck(&volume);
    assert!(!clean, "random bytes passed e2fsck: {text}");

    let src = std::fs::File::open(&image.path).unwrap();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .open(&volume)
        .unwrap();
    for &(offset, len) in &image.extents {
        let mut buf = vec![0u8; len as usize];
        src.read_exact_at(&mut buf, offset).unwrap();
        dst.write_all_at(&buf, offset).unwrap();
    }
    dst.sync_all().unwrap();
    let (clean, text) = fsck(&volume);
    assert!(clean, "e2fsck -fn after copying the extents: {text}");
    let listing = debugfs(&volume, "ls -l /");
    assert!(listing.contains("lost+found"), "{listing}");
    // The root belongs to root whoever made the image.
    let stat = debugfs(&volume, "stat /");
    assert!(stat.contains("User:     0   Group:     0"), "{stat}");
}

#[test]
fn the_format_image_is_made_once_per_size() {
    let dir = tempfile::tempdir().unwrap();
    let a = FormatImage::make(dir.path(), SIZE).unwrap();
    let ino = std::fs::metadata(&a.path).unwrap().ino();
    let b = FormatImage::make(dir.path(), SIZE).unwrap();
    assert_eq!(a, b);
    assert_eq!(std::fs::metadata(&b.path).unwrap().ino(), ino);
    let meta = std::fs::metadata(&a.path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Nothing left behind but the image.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_plain_volume_is_a_clean_sparse_ext4() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.img");
    format_ext4(&path, SIZE).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), SIZE);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(meta.blocks() * 512 < SIZE / 4);
    let (clean, text) = fsck(&path);
    assert!(clean, "{text}");
}

#[test]
fn a_sparse_disk_is_all_hole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    create_sparse(&path, SIZE).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.len(), meta.blocks()), (SIZE, 0));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(data_extents(&path).unwrap(), []);
    // Made again over the old one.
    create_sparse(&path, SIZE * 2).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE * 2);
    for bad in [0, MIN_SIZE - BLOCK_SIZE, SIZE + 512] {
        assert!(matches!(
            create_sparse(&path, bad),
            Err(VolumeError::BadSize { .. })
        ));
    }
}

#[test]
fn extents_are_the_data_between_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&[1; 4096], 8192).unwrap();
    f.write_all_at(&[1; 8192], 65536).unwrap();
    f.sync_all().unwrap();
    assert_eq!(data_extents(&path).unwrap(), [(8192, 4096), (65536, 8192)]);
}

#[test]
fn serials() {
    assert!(check_serial("pvv0"));
    assert!(check_serial(&"a".repeat(20)));
    for bad in ["", "-a", "..", "a/b", "a b", &"a".repeat(21)] {
        assert!(!check_serial(bad), "{bad:?}");
    }
}
