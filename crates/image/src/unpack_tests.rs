//! Unit tests of `unpack`: path normalisation, whiteout conversion, entry replacement.

use super::*;

#[test]
fn normalize_drops_root_and_dots_and_refuses_parent() {
    let n = |s: &str| normalize(s.as_bytes());
    assert_eq!(n("/etc/passwd").unwrap(), PathBuf::from("etc/passwd"));
    assert_eq!(n("./bin//sh").unwrap(), PathBuf::from("bin/sh"));
    assert_eq!(n("usr/./lib/").unwrap(), PathBuf::from("usr/lib"));
    assert_eq!(n("./").unwrap(), PathBuf::new());
    assert_eq!(n("/").unwrap(), PathBuf::new());
    for bad in ["../evil", "a/../../b", "/../etc", "a/.."] {
        assert!(n(bad).is_err(), "{bad} must be refused");
    }
}

#[test]
fn classify_recognises_whiteouts() {
    fn c(s: &str) -> Result<Whiteout<'_>, String> {
        classify(OsStr::new(s))
    }
    assert_eq!(c("passwd").unwrap(), Whiteout::None);
    assert_eq!(c(".whatever").unwrap(), Whiteout::None);
    assert_eq!(
        c(".wh.passwd").unwrap(),
        Whiteout::Delete(OsStr::new("passwd"))
    );
    assert_eq!(
        c(".wh..hidden").unwrap(),
        Whiteout::Delete(OsStr::new(".hidden"))
    );
    assert_eq!(c(".wh..wh..opq").unwrap(), Whiteout::Opaque);
    assert_eq!(c(".wh..wh.plnk").unwrap(), Whiteout::Ignored);
    assert!(c(".wh.").is_err());
    assert!(c(".wh...").is_err());
}

#[test]
fn pax_times_parse() {
    assert_eq!(parse_pax_time("1700000000"), Some((1_700_000_000, 0)));
    assert_eq!(
        parse_pax_time("1700000000.5"),
        Some((1_700_000_000, 500_000_000))
    );
    assert_eq!(parse_pax_time("-1.25"), Some((-2, 750_000_000)));
    assert_eq!(parse_pax_time("x"), None);
}

/// Unpacks a tar made of `entries` into a fresh directory.
fn unpack_entries(
    entries: Vec<podvisor_testbed::oci::Entry>,
) -> (tempfile::TempDir, Result<UnpackStats, ImageError>) {
    let tar = podvisor_testbed::oci::layer_tar(&entries).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let result = unpack(&mut Archive::new(&tar[..]), dir.path(), "test-layer");
    (dir, result)
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid C strings and a buffer of the given length.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| buf[..len as usize].to_vec())
}

#[test]
fn whiteouts_are_converted_to_overlayfs_form() {
    use podvisor_testbed::oci::Entry;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (dir, result) = unpack_entries(vec![
        Entry::whiteout("etc/passwd"),
        Entry::dir("home").mode(0o700),
        Entry::opaque("home"),
        Entry::file("home/kept", "k", 0o644),
        Entry::opaque("var/lib"),
        Entry::file(".wh..wh.plnk", "", 0o644),
    ]);
    result.unwrap();
    let root = dir.path();
    let passwd = fs::symlink_metadata(root.join("etc/passwd")).unwrap();
    assert!(passwd.file_type().is_char_device());
    assert_eq!(passwd.rdev(), 0);
    assert_eq!(
        xattr(&root.join("home"), OPAQUE_XATTR).as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        fs::symlink_metadata(root.join("home")).unwrap().mode() & 0o7777,
        0o700
    );
    assert!(root.join("home/kept").is_file());
    // The marker's directory is created when the layer does not list it.
    assert_eq!(
        xattr(&root.join("var/lib"), OPAQUE_XATTR).as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(xattr(&root.join("etc"), OPAQUE_XATTR), None);
    let mut names = Vec::new();
    for e in fs::read_dir(root)
        .unwrap()
        .chain(fs::read_dir(root.join("etc")).unwrap())
    {
        names.push(e.unwrap().file_name().to_string_lossy().into_owned());
    }
    assert!(names.iter().all(|n| !n.starts_with(".wh.")), "{names:?}");
}

#[test]
fn later_entries_replace_earlier_ones() {
    use podvisor_testbed::oci::Entry;
    let (dir, result) = unpack_entries(vec![
        Entry::file("a", "first", 0o644),
        Entry::file("a", "second", 0o600),
        Entry::dir("d"),
        Entry::file("d/x", "x", 0o644),
        Entry::file("d", "now a file", 0o644),
        Entry::symlink("s", "/nowhere"),
        Entry::dir("s"),
    ]);
    result.unwrap();
    assert_eq!(fs::read_to_string(dir.path().join("a")).unwrap(), "second");
    assert_eq!(
        fs::read_to_string(dir.path().join("d")).unwrap(),
        "now a file"
    );
    assert!(fs::symlink_metadata(dir.path().join("s")).unwrap().is_dir());
}
