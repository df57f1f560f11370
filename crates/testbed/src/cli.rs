//! ripgrep-style helpers for CLI tests: a temp dir with its own cache and
//! runtime directories, and a builder for `podvisor` invocations that fails
//! the test (instead of hanging CI) when a command outlives its time limit.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory for one test, removed when dropped, with a second
/// one on tmpfs for VM template RAM files.
pub struct TestDir {
    dir: tempfile::TempDir,
    ram: tempfile::TempDir,
}

impl TestDir {
    /// A new directory with `cache/` and `run/` inside.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("podvisor-test-")
            .tempdir()
            .expect("create temp dir");
        std::fs::create_dir_all(dir.path().join("cache")).unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        // Template RAM belongs on tmpfs, as in production; fall back to the
        // test directory where /dev/shm is missing.
        let ram = tempfile::Builder::new()
            .prefix("podvisor-test-ram-")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir_in(dir.path()))
            .expect("create template RAM dir");
        Self { dir, ram }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The image cache of this test.
    pub fn cache_dir(&self) -> PathBuf {
        self.path().join("cache")
    }

    /// The pod runtime directory of this test.
    pub fn run_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    /// The VM template RAM directory of this test.
    pub fn template_ram_dir(&self) -> &Path {
        self.ram.path()
    }

    /// Names of the complete layer disks in the cache (ChainID hex).
    pub fn layer_disks(&self) -> Vec<String> {
        let mut names = self.layers_dir_entries();
        names.retain(|n| !n.starts_with('.'));
        names
    }

    /// Everything in the cache's layer directory (`layers-v2/`, the
    /// layer-disk format podvisor makes), hidden staging entries included.
    pub fn layers_dir_entries(&self) -> Vec<String> {
        list_dir(&self.cache_dir().join("layers-v2"))
    }

    /// A `podvisor` command using this directory's cache and runtime dirs.
    pub fn podvisor(&self, binary: impl AsRef<OsStr>) -> PodvisorCommand {
        let mut cmd = Command::new(binary);
        cmd.env("PODVISOR_CACHE_DIR", self.cache_dir())
            .env("PODVISOR_RUN_DIR", self.run_dir())
            .current_dir(self.path())
            .env("PODVISOR_TEMPLATE_RAM_DIR", self.template_ram_dir())
            // Tests of pod networking ask for it, on a host of their own.
            .env("PODVISOR_NETWORK", "none")
            .env_remove("PODVISOR_LOG");
        PodvisorCommand {
            cmd,
            stdin: None,
            timeout: Duration::from_secs(300),
        }
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A `podvisor` invocation being built.
pub struct PodvisorCommand {
    cmd: Command,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

/// What a finished command printed and how it exited.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub stdout: String,
    pub stderr: String,
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
}

impl PodvisorCommand {
    /// `binary` with no options added (no cache or run directory), for
    /// tests of how those are found.
    pub fn bare(binary: impl AsRef<OsStr>) -> PodvisorCommand {
        let mut cmd = Command::new(binary);
        cmd.env_remove("PODVISOR_LOG");
        PodvisorCommand {
            cmd,
            stdin: None,
            timeout: Duration::from_secs(300),
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.cmd.arg(a);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn env(mut self, k: &str, v: impl AsRef<OsStr>) -> Self {
        self.cmd.env(k, v);
        self
    }

    /// Removes `k` from the command's environment.
    pub fn env_remove(mut self, k: &str) -> Self {
        self.cmd.env_remove(k);
        self
    }

    /// Bytes to write to the command's stdin (then closed).
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// Kill the command and fail if it runs longer than this.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Runs the command to completion.
    pub fn output(mut self) -> CmdOutput {
        let shown = format!("{:?}", self.cmd);
        self.cmd
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self
            .cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
        if let Some(data) = self.stdin.take() {
            let mut stdin = child.stdin.take().unwrap();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let out_t = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = out.read_to_end(&mut s);
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            s
        });
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
                panic!(
                    "{shown} ran longer than {:?}; stderr:\n{stderr}",
                    self.timeout
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        CmdOutput {
            stdout: String::from_utf8_lossy(&out_t.join().unwrap()).into_owned(),
            stderr: String::from_utf8_lossy(&err_t.join().unwrap()).into_owned(),
            code: status.code(),
        }
    }

    /// Runs the command and fails the test unless it exits 0.
    pub fn success(self) -> CmdOutput {
        let out = self.output();
        assert_eq!(
            out.code,
            Some(0),
            "command failed\nstdout:\n{}\nstderr:\n{}",
            out.stdout,
            out.stderr
        );
        out
    }
}
