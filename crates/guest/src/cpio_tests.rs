//! Tests of the newc writer: exact bytes, alignment, and round trips through
//! the system `cpio`.

use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

/// One entry as read back by [`parse`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Parsed {
    pub(crate) name: String,
    /// The 13 header fields after the magic, in header order.
    pub(crate) fields: [u32; 13],
    pub(crate) data: Vec<u8>,
}

/// A minimal newc reader, checking magic and every alignment rule.
pub(crate) fn parse(archive: &[u8]) -> Vec<Parsed> {
    let mut entries = Vec::new();
    let mut pos = 0;
    loop {
        assert_eq!(pos % 4, 0, "header at unaligned offset {pos}");
        assert_eq!(&archive[pos..pos + 6], NEWC_MAGIC, "magic at {pos}");
        let mut fields = [0u32; 13];
        for (i, field) in fields.iter_mut().enumerate() {
            let hex = std::str::from_utf8(&archive[pos + 6 + 8 * i..pos + 14 + 8 * i]).unwrap();
            *field = u32::from_str_radix(hex, 16).unwrap();
        }
        let namesize = fields[11] as usize;
        let name_start = pos + HEADER_LEN;
        assert_eq!(
            archive[name_start + namesize - 1],
            0,
            "name is NUL-terminated"
        );
        let name = String::from_utf8(archive[name_start..name_start + namesize - 1].to_vec())
            .expect("name is UTF-8");
        let data_start = (name_start + namesize).next_multiple_of(4);
        assert!(
            archive[name_start + namesize..data_start]
                .iter()
                .all(|&b| b == 0)
        );
        let data_end = data_start + fields[6] as usize;
        let data = archive[data_start..data_end].to_vec();
        pos = data_end.next_multiple_of(4);
        assert!(archive[data_end..pos].iter().all(|&b| b == 0));
        let done = name == TRAILER_NAME;
        entries.push(Parsed { name, fields, data });
        if done {
            assert_eq!(archive.len() % 512, 0, "archive padded to 512 bytes");
            assert!(
                archive[pos..].iter().all(|&b| b == 0),
                "only zeros after trailer"
            );
            return entries;
        }
    }
}

#[test]
fn file_entry_exact_bytes() {
    let mut writer = CpioWriter::new(Vec::new());
    writer.file("/init", 0o755, b"hello").unwrap();
    let archive = writer.finish().unwrap();

    let mut expected = Vec::new();
    expected.extend_from_slice(b"070701");
    expected.extend_from_slice(b"00000001"); // ino
    expected.extend_from_slice(b"000081ED"); // mode: S_IFREG | 0755
    expected.extend_from_slice(b"00000000"); // uid
    expected.extend_from_slice(b"00000000"); // gid
    expected.extend_from_slice(b"00000001"); // nlink
    expected.extend_from_slice(b"00000000"); // mtime
    expected.extend_from_slice(b"00000005"); // filesize
    expected.extend_from_slice(b"00000000"); // devmajor
    expected.extend_from_slice(b"00000000"); // devminor
    expected.extend_from_slice(b"00000000"); // rdevmajor
    expected.extend_from_slice(b"00000000"); // rdevminor
    expected.extend_from_slice(b"00000005"); // namesize: "init" + NUL
    expected.extend_from_slice(b"00000000"); // check
    assert_eq!(expected.len(), HEADER_LEN);
    expected.extend_from_slice(b"init\0");
    expected.push(0); // 110 + 5 = 115, padded to 116
    expected.extend_from_slice(b"hello");
    expected.extend_from_slice(&[0, 0, 0]); // 121 padded to 124
    // trailer: ino 0, mode 0, nlink 1, namesize 11
    expected.extend_from_slice(b"070701");
    for field in [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0] {
        expected.extend_from_slice(format!("{field:08X}").as_bytes());
    }
    expected.extend_from_slice(b"TRAILER!!!\0");
    // 124 + 110 + 11 = 245; pad to the 512-byte block
    expected.resize(512, 0);
    assert_eq!(archive, expected);
}

#[test]
fn directory_symlink_and_device_headers() {
    let mut writer = CpioWriter::new(Vec::new());
    writer.directory("dev", 0o755).unwrap();
    writer.char_device("dev/console", 0o600, 5, 1).unwrap();
    writer.symlink("bin", "usr/bin").unwrap();
    let entries = parse(&writer.finish().unwrap());
    let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["dev", "dev/console", "bin", TRAILER_NAME]);

    let dir = &entries[0].fields;
    assert_eq!((dir[0], dir[1], dir[4], dir[6]), (1, 0o040755, 2, 0));
    let console = &entries[1].fields;
    assert_eq!(console[1], 0o020600);
    assert_eq!((console[9], console[10]), (5, 1), "rdevmajor, rdevminor");
    assert_eq!(console[6], 0, "device has no data");
    let link = &entries[2];
    assert_eq!(link.fields[1], 0o120777);
    assert_eq!(link.data, b"usr/bin");
    assert_eq!(link.fields[0], 3, "inode numbers count up");
}

#[test]
fn every_name_length_stays_aligned() {
    let mut writer = CpioWriter::new(Vec::new());
    for len in 1..=9 {
        let name = "n".repeat(len);
        writer.file(&name, 0o644, &vec![b'x'; len]).unwrap();
    }
    let entries = parse(&writer.finish().unwrap());
    assert_eq!(entries.len(), 10);
    for (len, entry) in (1..=9).zip(&entries) {
        assert_eq!(entry.name.len(), len);
        assert_eq!(entry.data, vec![b'x'; len]);
    }
}

#[test]
fn rejects_bad_names_and_modes() {
    let mut writer = CpioWriter::new(Vec::new());
    assert!(matches!(
        writer.file("", 0o644, b""),
        Err(CpioError::BadName(_))
    ));
    assert!(matches!(
        writer.file("/", 0o644, b""),
        Err(CpioError::BadName(_))
    ));
    assert!(matches!(
        writer.file("a\0b", 0o644, b""),
        Err(CpioError::BadName(_))
    ));
    assert!(matches!(
        writer.file(TRAILER_NAME, 0o644, b""),
        Err(CpioError::BadName(_))
    ));
    assert!(matches!(
        writer.directory("d", 0o40755),
        Err(CpioError::BadMode { .. })
    ));
    assert!(matches!(
        writer.symlink("l", ""),
        Err(CpioError::BadName(_))
    ));
    // Nothing was written by the rejected calls.
    assert_eq!(writer.finish().unwrap().len(), 512);
}

/// Runs the system `cpio` with `args` in `dir`, feeding it `archive`; panics
/// with its stderr if it fails or is not installed.
pub(crate) fn system_cpio(dir: &Path, args: &[&str], archive: &[u8]) -> String {
    let mut child = Command::new("cpio")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the system `cpio` must be installed for this test (apt-get install cpio)");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(archive)
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "cpio {args:?} failed: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    stdout + &stderr
}

#[test]
fn round_trip_through_system_cpio() {
    let mut writer = CpioWriter::new(Vec::new());
    writer.directory("etc", 0o755).unwrap();
    writer.directory("etc/podvisor", 0o750).unwrap();
    writer.file("etc/podvisor/list", 0o644, b"a\nb\n").unwrap();
    writer
        .file("init", 0o755, &[0x7f, b'E', b'L', b'F', 0, 1, 2])
        .unwrap();
    writer.file("empty", 0o600, b"").unwrap();
    writer.symlink("etc/link", "podvisor/list").unwrap();
    let archive = writer.finish().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let log = system_cpio(
        dir.path(),
        &["-idmv", "--no-absolute-filenames", "--quiet"],
        &archive,
    );
    for name in [
        "etc",
        "etc/podvisor",
        "etc/podvisor/list",
        "init",
        "empty",
        "etc/link",
    ] {
        assert!(
            log.lines().any(|l| l == name),
            "cpio -v did not list {name}: {log}"
        );
    }

    let root = dir.path();
    assert_eq!(
        std::fs::read(root.join("etc/podvisor/list")).unwrap(),
        b"a\nb\n"
    );
    assert_eq!(
        std::fs::read(root.join("init")).unwrap(),
        [0x7f, b'E', b'L', b'F', 0, 1, 2]
    );
    assert_eq!(std::fs::read(root.join("empty")).unwrap(), b"");
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("init"), 0o755);
    assert_eq!(mode("empty"), 0o600);
    assert_eq!(mode("etc/podvisor"), 0o750);
    assert!(
        std::fs::metadata(root.join("etc/podvisor"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(
        std::fs::read_link(root.join("etc/link")).unwrap(),
        Path::new("podvisor/list")
    );
    assert_eq!(std::fs::read(root.join("etc/link")).unwrap(), b"a\nb\n");
    assert_eq!(std::fs::metadata(root.join("init")).unwrap().mtime(), 0);
}

#[test]
fn system_cpio_lists_device_node() {
    // Listing (-t) works without the privilege that extracting a device needs.
    let mut writer = CpioWriter::new(Vec::new());
    writer.directory("dev", 0o755).unwrap();
    writer.char_device("dev/console", 0o600, 5, 1).unwrap();
    let archive = writer.finish().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let listing = system_cpio(dir.path(), &["-tv", "--quiet"], &archive);
    let console = listing
        .lines()
        .find(|l| l.ends_with("dev/console"))
        .unwrap_or_else(|| panic!("dev/console not listed: {listing}"));
    assert!(console.starts_with("crw-------"), "{console}");
    // "crw-------   1 root root   5,   1 Jan  1  1970 dev/console"
    let fields: Vec<&str> = console.split_whitespace().collect();
    let major = fields.iter().position(|f| *f == "5,");
    assert!(
        major.is_some_and(|i| fields.get(i + 1) == Some(&"1")),
        "device 5, 1 in {console}"
    );
}
