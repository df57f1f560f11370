//! What the control-plane tests share: the `podvisor` binary, a busybox
//! image, daemons started from it, waiting, and reading pods back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use podvisor_api::{Pod, PodList, PodPhase};
use podvisor_testbed::cli::{CmdOutput, PodvisorCommand, TestDir};
use podvisor_testbed::daemon::{Daemon, kill_mentioning};
use podvisor_testbed::oci::ImageBuilder;

pub const BIN: &str = env!("CARGO_BIN_EXE_podvisor");

/// How long pods may take to run: boots of several VMs at once under
/// emulation on two cores are slow.
pub const POD_TIMEOUT: Duration = Duration::from_secs(300);

/// A test's directory; on drop, every process mentioning it (VMs whose
/// daemon a test killed included) is killed.
pub struct Scratch {
    pub dir: TestDir,
}

impl Scratch {
    /// A new directory with an empty CLI config file, which every command
    /// of the test uses (never the machine's /etc/podvisor/config.toml).
    pub fn new() -> Scratch {
        let s = Scratch {
            dir: TestDir::new(),
        };
        std::fs::write(s.config(), "").unwrap();
        s
    }

    /// The CLI config file of this test.
    pub fn config(&self) -> PathBuf {
        self.path().join("config.toml")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A `podvisor` command with this test's cache and config file.
    pub fn podvisor(&self) -> PodvisorCommand {
        self.dir
            .podvisor(BIN)
            .env("PODVISOR_CONFIG", self.config())
            .timeout(Duration::from_secs(120))
    }

    /// A `podvisor` command as a `std::process::Command`, for daemons.
    pub fn daemon_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env("PODVISOR_CACHE_DIR", self.dir.cache_dir())
            // Host daemons here run pods without a network: the machine's
            // own namespace is not a test's to change.
            .env("PODVISOR_POD_NETWORK", "none")
            .arg("--log")
            .arg("info")
            .args(args)
            .current_dir(self.path())
            .env("PODVISOR_CONFIG", self.config())
            .env_remove("PODVISOR_LOG");
        cmd
    }

    /// Starts `podvisor ARGS` in the background, logging to `NAME.log`.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Daemon {
        let log = self.path().join(format!("{name}.log"));
        Daemon::spawn(name, self.daemon_command(args), &log)
    }

    /// An OCI archive of a busybox image named `busybox:latest`.
    pub fn busybox(&self) -> PathBuf {
        let path = self.path().join("busybox.tar");
        if !path.exists() {
            busybox_image().write_oci_archive(&path).unwrap();
        }
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        kill_mentioning(&self.path().display().to_string());
    }
}

/// A busybox image named `busybox:latest`.
pub fn busybox_image() -> ImageBuilder {
    ImageBuilder::new()
        .busybox_layer()
        .cmd(&["sh"])
        .tag("busybox:latest")
}

/// Fails unless the command exited with `code`, showing its output.
pub fn assert_code(out: &CmdOutput, code: i32) {
    assert_eq!(
        out.code,
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
}

/// Polls `check` every half second until it returns `Some`, or fails
/// after `timeout` with `what` and the last value seen.
pub fn wait_for<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if start.elapsed() > timeout => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Every pod, as `podvisor get pods -A -o json` shows it through `cmd`.
pub fn pods(cmd: PodvisorCommand) -> Result<Vec<Pod>, String> {
    let out = cmd.args(["get", "pods", "-A", "-o", "json"]).output();
    if out.code != Some(0) {
        return Err(out.stderr);
    }
    let list: PodList =
        serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {}", out.stdout))?;
    Ok(list.items)
}

/// The pod named `name` among `pods`.
pub fn find<'a>(pods: &'a [Pod], name: &str) -> Option<&'a Pod> {
    pods.iter().find(|p| p.metadata.name == name)
}

/// A short description of pods for failure messages.
pub fn summary(pods: &[Pod]) -> String {
    pods.iter()
        .map(|p| {
            format!(
                "{} on {:?}: {:?} {}",
                p.metadata.name,
                p.spec.node_name,
                p.status.phase,
                p.display_status()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether every pod named in `names` runs with all its containers ready.
pub fn all_running(pods: &[Pod], names: &[String]) -> bool {
    names.iter().all(|n| {
        find(pods, n).is_some_and(|p| {
            p.status.phase == PodPhase::Running && p.ready_count().0 == p.ready_count().1
        })
    })
}

/// A pod running `sleep`, as YAML.
pub fn sleeper_yaml(name: &str, image: &str, cpu: &str, memory: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels:
    app: sleeper
spec:
  containers:
  - name: main
    image: {image}
    command: [sh, -c, 'echo \"$GREETING from $(hostname)\"; exec sleep 3600']
    env:
    - name: GREETING
      value: hello
    resources:
      limits:
        cpu: {cpu}
        memory: {memory}
",
    )
}

/// The files under `dir` (recursively) that `keep` keeps.
pub fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            found.extend(files_under(&path, keep));
        } else if keep(&path) {
            found.push(path);
        }
    }
    found
}
