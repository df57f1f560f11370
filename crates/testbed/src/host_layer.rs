//! Layers of files copied from the host, for tests that need a real
//! runtime in an image: Debian's JDK 17 ([`jdk_layer`]), Node.js, CPython
//! or any program with the system libraries it links.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::oci::Entry;

/// Debian's JDK 17, as `apt-get install openjdk-17-jdk-headless` puts it.
pub const JDK: &str = "/usr/lib/jvm/java-17-openjdk-amd64";

/// A layer copied from the host: every file at its host path, parent
/// directories first, each path once.
#[derive(Default)]
pub struct HostLayer {
    entries: BTreeMap<String, Entry>,
}

impl HostLayer {
    fn name(path: &Path) -> String {
        path.to_str()
            .expect("UTF-8 host path")
            .trim_start_matches('/')
            .to_string()
    }

    fn parents(&mut self, path: &Path) {
        for dir in path.ancestors().skip(1) {
            let name = Self::name(dir);
            if !name.is_empty() {
                self.entries
                    .entry(name.clone())
                    .or_insert_with(|| Entry::dir(&name));
            }
        }
    }

    /// The host file `path` (its content if it is a link) at its path.
    pub fn file(&mut self, path: &Path) {
        let real = std::fs::canonicalize(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let mode = std::os::unix::fs::PermissionsExt::mode(&real.metadata().unwrap().permissions());
        self.parents(path);
        let name = Self::name(path);
        self.entries
            .insert(name.clone(), Entry::host_file(&name, real, mode & 0o7777));
    }

    /// The host file `host` at `path` with `mode`.
    pub fn host_file_at(&mut self, path: &str, host: &Path, mode: u32) {
        self.parents(Path::new(path));
        let name = Self::name(Path::new(path));
        self.entries
            .insert(name.clone(), Entry::host_file(&name, host, mode));
    }

    pub fn dir(&mut self, path: &str) {
        self.parents(Path::new(path));
        let name = Self::name(Path::new(path));
        self.entries.insert(name.clone(), Entry::dir(&name));
    }

    pub fn link(&mut self, path: &str, target: &str) {
        self.parents(Path::new(path));
        let name = Self::name(Path::new(path));
        self.entries
            .insert(name.clone(), Entry::symlink(&name, target));
    }

    pub fn bytes(&mut self, path: &str, bytes: &[u8], mode: u32) {
        self.parents(Path::new(path));
        let name = Self::name(Path::new(path));
        self.entries
            .insert(name.clone(), Entry::file(&name, bytes.to_vec(), mode));
    }

    /// The host directory `dir` as it is (links kept as links), less the
    /// entries whose names are in `skip`.
    pub fn tree(&mut self, dir: &Path, skip: &[&str]) {
        self.parents(dir);
        let name = Self::name(dir);
        self.entries.insert(name.clone(), Entry::dir(&name));
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if skip.contains(&entry.file_name().to_str().unwrap()) {
                continue;
            }
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                self.tree(&path, skip);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                self.link(path.to_str().unwrap(), target.to_str().unwrap());
            } else {
                self.file(&path);
            }
        }
    }

    /// The system libraries (`ldd`) `programs` need, outside `except`.
    pub fn libraries_of(&mut self, programs: &[PathBuf], except: &str) {
        let mut libs = BTreeSet::new();
        for program in programs {
            let out = Command::new("ldd").arg(program).output().unwrap();
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let target = line.split_once("=>").map_or(line, |(_, t)| t).trim();
                if let Some(path) = target.split_whitespace().next()
                    && path.starts_with('/')
                    && !path.starts_with(except)
                {
                    libs.insert(PathBuf::from(path));
                }
            }
        }
        for lib in libs {
            self.file(&lib);
        }
    }

    pub fn entries(self) -> Vec<Entry> {
        self.entries.into_values().collect()
    }
}

/// The host's JDK 17 as Debian installs it: the JDK less what a JVM does
/// not read to run (sources, jmods, headers), its configuration in
/// `/etc/java-17-openjdk`, the `java` links, the system libraries.
pub fn jdk_layer() -> HostLayer {
    let mut layer = HostLayer::default();
    layer.tree(
        Path::new(JDK),
        &[
            "jmods", "include", "man", "legal", "docs", "ct.sym", "src.zip", "demo",
        ],
    );
    layer.tree(Path::new("/etc/java-17-openjdk"), &[]);
    layer.link("/etc/alternatives/java", &format!("{JDK}/bin/java"));
    layer.link("/usr/bin/java", "/etc/alternatives/java");
    let jdk_libs = [
        "bin/java",
        "lib/server/libjvm.so",
        "lib/libjava.so",
        "lib/libzip.so",
        "lib/libjimage.so",
        "lib/libnio.so",
        "lib/libnet.so",
    ];
    layer.libraries_of(
        &jdk_libs
            .iter()
            .map(|l| Path::new(JDK).join(l))
            .collect::<Vec<_>>(),
        JDK,
    );
    layer
}

/// Node.js and CPython 3.11 as Debian installs them (the interpreters, the
/// stdlib files CPython reads to start, the system libraries).
pub fn node_python_layer() -> HostLayer {
    let mut layer = HostLayer::default();
    let node = PathBuf::from("/usr/bin/node");
    let python = PathBuf::from("/usr/bin/python3.11");
    layer.file(&node);
    layer.file(&python);
    layer.link("/usr/bin/python3", "python3.11");
    layer.tree(Path::new("/usr/lib/python3.11/encodings"), &["__pycache__"]);
    layer.file(Path::new("/usr/lib/python3.11/os.py"));
    layer.dir("/usr/lib/python3.11/lib-dynload");
    layer.libraries_of(&[node, python], "/nothing");
    layer
}

/// Builds the Go program `source` statically (Debian's golang-go, no
/// network) in `dir`; returns the binary and Go's version (`go1.19.8`).
pub fn build_go(dir: &Path, source: &str) -> (PathBuf, String) {
    let src = dir.join("main.go");
    std::fs::write(&src, source).unwrap();
    let out = dir.join("goprogram");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(&src)
        .env("CGO_ENABLED", "0")
        .env("GO111MODULE", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        .status()
        .expect("go (golang-go, scripts/setup.sh --test)");
    assert!(status.success(), "go build: {status}");
    let version = Command::new("go").arg("version").output().unwrap();
    // `go version go1.19.8 linux/amd64`
    let version = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    (out, version)
}
