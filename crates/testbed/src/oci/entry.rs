//! Layer entries and layer tars: what goes into one layer of a test image,
//! including hostile entries the tar crate would refuse to write.

use std::fs;
use std::io;
use std::path::PathBuf;

/// mtime of every entry unless set otherwise (2023-11-14T22:13:20Z).
pub const FIXED_MTIME: u64 = 1_700_000_000;
/// Where the busybox layer takes busybox from.
pub const HOST_BUSYBOX: &str = "/bin/busybox";
/// Applets the busybox layer links in `/bin`.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "ls", "id", "pwd", "env", "sleep", "true", "false", "touch", "rm",
    "mkdir", "hostname", "head", "dd", "wc", "test", "kill", "printf", "grep", "date", "uname",
    "stat", "readlink", "seq",
];

#[derive(Clone, Debug)]
enum Kind {
    File(Vec<u8>),
    HostFile(PathBuf),
    Dir,
    Symlink(String),
    Hardlink(String),
    Char(u32, u32),
    Fifo,
    /// A header written as is (name included), for hostile entries.
    Raw(Box<tar::Header>, Vec<u8>),
}

/// One entry of a layer tar.
#[derive(Clone, Debug)]
pub struct Entry {
    path: String,
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Entry {
    fn new(path: &str, kind: Kind, mode: u32) -> Entry {
        Entry {
            path: path.to_string(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: FIXED_MTIME,
            xattrs: Vec::new(),
        }
    }

    /// A regular file.
    pub fn file(path: &str, bytes: impl Into<Vec<u8>>, mode: u32) -> Entry {
        Entry::new(path, Kind::File(bytes.into()), mode)
    }

    /// A regular file whose content is read from the host at build time.
    pub fn host_file(path: &str, host_path: impl Into<PathBuf>, mode: u32) -> Entry {
        Entry::new(path, Kind::HostFile(host_path.into()), mode)
    }

    /// A directory, mode 0755 (see [`Entry::mode`]).
    pub fn dir(path: &str) -> Entry {
        Entry::new(path, Kind::Dir, 0o755)
    }

    /// A symlink `path -> target` (the target is stored as given).
    pub fn symlink(path: &str, target: &str) -> Entry {
        Entry::new(path, Kind::Symlink(target.to_string()), 0o777)
    }

    /// A hardlink `path` to the earlier entry `target`.
    pub fn hardlink(path: &str, target: &str) -> Entry {
        Entry::new(path, Kind::Hardlink(target.to_string()), 0o644)
    }

    /// A character device.
    pub fn char_device(path: &str, major: u32, minor: u32) -> Entry {
        Entry::new(path, Kind::Char(major, minor), 0o666)
    }

    /// A named pipe.
    pub fn fifo(path: &str) -> Entry {
        Entry::new(path, Kind::Fifo, 0o644)
    }

    /// The OCI whiteout deleting `path` from the layers below: an empty
    /// file `.wh.<name>` beside it.
    pub fn whiteout(path: &str) -> Entry {
        let (dir, name) = path
            .trim_end_matches('/')
            .rsplit_once('/')
            .unwrap_or(("", path));
        let marker = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        Entry::file(&marker, Vec::new(), 0o644)
    }

    /// The OCI marker making directory `dir` opaque: `dir/.wh..wh..opq`.
    pub fn opaque(dir: &str) -> Entry {
        let dir = dir.trim_end_matches('/');
        Entry::file(&format!("{dir}/.wh..wh..opq"), Vec::new(), 0o644)
    }

    /// A header written exactly as given, followed by `data`; the caller
    /// sets name, type, size and checksum. For inputs the tar crate refuses
    /// to build (`../evil`, absolute names).
    pub fn raw(header: tar::Header, data: Vec<u8>) -> Entry {
        Entry::new("", Kind::Raw(Box::new(header), data), 0)
    }

    /// A regular file whose name is stored verbatim (e.g. `../evil`).
    pub fn raw_file(name: &str, data: &[u8]) -> Entry {
        let mut h = raw_header(name, tar::EntryType::Regular, 0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        Entry::raw(h, data.to_vec())
    }

    /// A symlink whose name is stored verbatim.
    pub fn raw_symlink(name: &str, target: &str) -> Entry {
        let mut h = raw_header(name, tar::EntryType::Symlink, 0o777);
        h.set_link_name_literal(target).expect("short link name");
        h.set_cksum();
        Entry::raw(h, Vec::new())
    }

    /// A hardlink whose name and target are stored verbatim (e.g. target `../../etc/shadow`).
    pub fn raw_hardlink(name: &str, target: &str) -> Entry {
        let mut h = raw_header(name, tar::EntryType::Link, 0o644);
        h.set_link_name_literal(target).expect("short link name");
        h.set_cksum();
        Entry::raw(h, Vec::new())
    }

    /// Sets the permission bits (set-id and sticky bits included).
    pub fn mode(mut self, mode: u32) -> Entry {
        self.mode = mode;
        self
    }

    /// Sets the owner.
    pub fn owner(mut self, uid: u64, gid: u64) -> Entry {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Sets the modification time.
    pub fn mtime(mut self, mtime: u64) -> Entry {
        self.mtime = mtime;
        self
    }

    /// Adds an extended attribute (a PAX `SCHILY.xattr.` record).
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Entry {
        self.xattrs.push((name.to_string(), value.to_vec()));
        self
    }

    pub(super) fn append(&self, b: &mut tar::Builder<Vec<u8>>) -> io::Result<()> {
        if let Kind::Raw(header, data) = &self.kind {
            return b.append(header, &data[..]);
        }
        if !self.xattrs.is_empty() {
            let mut records = Vec::new();
            for (name, value) in &self.xattrs {
                records.extend(pax_record(&format!("SCHILY.xattr.{name}"), value));
            }
            let mut h = raw_header("PaxHeaders/entry", tar::EntryType::XHeader, 0o644);
            h.set_size(records.len() as u64);
            h.set_cksum();
            b.append(&h, &records[..])?;
        }
        let (entry_type, data) = match &self.kind {
            Kind::File(d) => (tar::EntryType::Regular, d.clone()),
            Kind::HostFile(p) => (
                tar::EntryType::Regular,
                fs::read(p)
                    .map_err(|e| io::Error::new(e.kind(), format!("read {}: {e}", p.display())))?,
            ),
            Kind::Dir => (tar::EntryType::Directory, Vec::new()),
            Kind::Symlink(_) => (tar::EntryType::Symlink, Vec::new()),
            Kind::Hardlink(_) => (tar::EntryType::Link, Vec::new()),
            Kind::Char(..) => (tar::EntryType::Char, Vec::new()),
            Kind::Fifo => (tar::EntryType::Fifo, Vec::new()),
            Kind::Raw(..) => unreachable!(),
        };
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(entry_type);
        h.set_mode(self.mode);
        h.set_uid(self.uid);
        h.set_gid(self.gid);
        h.set_mtime(self.mtime);
        h.set_size(data.len() as u64);
        if let Kind::Char(major, minor) = self.kind {
            h.set_device_major(major)?;
            h.set_device_minor(minor)?;
        }
        match &self.kind {
            Kind::Symlink(target) | Kind::Hardlink(target) => {
                b.append_link(&mut h, &self.path, target)
            }
            _ => b.append_data(&mut h, &self.path, &data[..]),
        }
    }
}

fn raw_header(name: &str, entry_type: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(entry_type);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(FIXED_MTIME);
    h.set_size(0);
    let slot = &mut h.as_old_mut().name;
    assert!(name.len() < slot.len(), "raw entry name too long: {name}");
    slot[..name.len()].copy_from_slice(name.as_bytes());
    h
}

/// One PAX record: `"<len> <key>=<value>\n"`, len counting itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// The uncompressed tar of `entries`. Names are stored as given, a leading
/// `/` included.
pub fn layer_tar(entries: &[Entry]) -> io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    b.preserve_absolute(true);
    for e in entries {
        e.append(&mut b)?;
    }
    b.into_inner()
}

/// The entries of the busybox layer (see [`super::ImageBuilder::busybox_layer`]).
pub fn busybox_entries() -> Vec<Entry> {
    let mut entries = vec![
        Entry::dir("bin"),
        Entry::host_file("bin/busybox", HOST_BUSYBOX, 0o755),
    ];
    for applet in BUSYBOX_APPLETS {
        entries.push(Entry::symlink(&format!("bin/{applet}"), "/bin/busybox"));
    }
    entries.extend([
        Entry::dir("etc"),
        Entry::file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        ),
        Entry::file("etc/group", "root:x:0:\nstaff:x:50:app\napp:x:1000:\nnogroup:x:65534:\n", 0o644),
        Entry::dir("tmp").mode(0o1777),
        Entry::dir("root").mode(0o700),
        Entry::dir("home"),
        Entry::dir("home/app").owner(1000, 1000),
    ]);
    entries
}

/// A dynamically linked host program and the shared libraries `ldd` finds
/// for it, each at its host path (parent directories included, symlinks
/// resolved to their files), for an image that runs the host's tool (e.g.
/// iperf3). A static program comes alone.
pub fn host_program_entries(program: &std::path::Path) -> io::Result<Vec<Entry>> {
    let out = std::process::Command::new("ldd").arg(program).output()?;
    let mut paths = vec![program.to_path_buf()];
    if out.status.success() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x...)`; vdso has no path.
            let target = line.split_once("=>").map_or(line, |(_, t)| t).trim();
            let Some(path) = target.split_whitespace().next() else {
                continue;
            };
            if path.starts_with('/') {
                paths.push(PathBuf::from(path));
            } else if line.contains("=> not found") {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: {line}", program.display()),
                ));
            }
        }
    }
    let mut dirs = std::collections::BTreeSet::new();
    let mut entries = Vec::new();
    for path in &paths {
        let name = path.to_str().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{path:?}: not UTF-8"))
        })?;
        let name = name.trim_start_matches('/');
        let mut dir = String::new();
        for component in name
            .split('/')
            .rev()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(component);
            if dirs.insert(dir.clone()) {
                entries.push(Entry::dir(&dir));
            }
        }
        entries.push(Entry::host_file(name, fs::canonicalize(path)?, 0o755));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let r = pax_record("SCHILY.xattr.user.a", b"b");
        let text = String::from_utf8(r.clone()).unwrap();
        let (len, _) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), r.len());
    }

    #[test]
    fn a_host_program_runs_from_its_entries_alone() {
        // /usr/bin/env is dynamically linked on Debian; chroot needs root,
        // as the rest of the test suite does.
        let entries = host_program_entries(std::path::Path::new("/usr/bin/env")).unwrap();
        let root = tempfile::tempdir().unwrap();
        tar::Archive::new(&layer_tar(&entries).unwrap()[..])
            .unpack(root.path())
            .unwrap();
        let status = std::process::Command::new("chroot")
            .arg(root.path())
            .args(["/usr/bin/env", "--version"])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "env in a root holding only its entries: {status}"
        );
        assert!(
            root.path().join("usr/bin/env").exists(),
            "the program at its host path"
        );
    }
}
