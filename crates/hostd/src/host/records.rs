//! The host daemon's state directory: what it must find again after a
//! restart to adopt its pod VMs instead of starting duplicates.
//!
//! ```text
//! <state-dir>/
//!   host.json                  the last pod revision seen (watch resume)
//!   pods/<pod-uid>/pod.json    PodRecord: the plan, the last state, the VM
//!   pods/<pod-uid>/logs/       container logs (see `logs`)
//!   pods/<pod-uid>/snapshots/  a hibernated pod's sealed snapshot (0700;
//!                              the file 0600, its key on the server)
//!   run/pods/<vm-id>/          the VM's run directory: QMP and agent
//!                              sockets, console and QEMU logs
//! ```
//!
//! Records are replaced atomically (written to a temporary file, synced,
//! renamed), so a daemon killed at any moment leaves the old or the new
//! record, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use podvisor_proto::ContainerSpec;
use podvisor_vmm::{BlockDevice, VmmProcess};
use serde::{Deserialize, Serialize};

use super::hibernation::Hibernated;
use super::images::HeldLayers;
use super::plan::PodPlan;
use super::private_files;
use super::status::PodState;

/// Errors reading or writing the state directory.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod record {path} is damaged")]
    Damaged {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("pod uid {0:?} cannot name a directory (letters, digits and '-' only)")]
    BadUid(String),
}

/// A pod VM this host launched, as needed to adopt it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Names the VM's run directory under `vms/`.
    pub vm_id: String,
    pub process: VmmProcess,
    pub booted_at: SystemTime,
    /// What each container of the plan runs in this VM (`None`: its spec
    /// could not be made), for restarts and exec after an adoption.
    pub containers: Vec<Option<ContainerSpec>>,
    /// The VM's disks, for a hibernation (records written before they
    /// were kept have none, and such a VM is not hibernated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<BlockDevice>,
    /// The VM's layers on virtio-pmem, for a hibernation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmem: Vec<podvisor_vmm::PmemDevice>,
    /// The VM's encrypted volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encrypted: Vec<podvisor_proto::volumes::EncryptedVolume>,
    /// Those open in the guest (an adopting daemon starts the containers
    /// that wait for them without asking for keys again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_volumes: Vec<String>,
}

/// Everything the host keeps about one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub plan: PodPlan,
    pub state: PodState,
    /// The running VM, if any.
    pub vm: Option<VmRecord>,
    /// Layers held in the image catalog for the pod (released on delete).
    #[serde(default)]
    pub holds: Vec<HeldLayers>,
    /// Its deletion began: a daemon that finds this after a crash never
    /// starts the pod again, it only finishes the deletion.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
    /// The pod is hibernated: its VM is in this snapshot (and `vm` is
    /// `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hibernated: Option<Hibernated>,
}

/// What the daemon itself keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The store revision of the last pod event handled.
    pub revision: i64,
}

/// The paths of a host's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RecordError + 'a {
    move |source| RecordError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `value` as JSON to `path` atomically.
fn write_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), RecordError> {
    let tmp = path.with_extension("json.tmp");
    let data = serde_json::to_vec_pretty(value).expect("records serialize");
    let mut f = private_files::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&data).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))
}

impl StateDir {
    /// Creates the directory layout under `root` if missing, `pods/` and
    /// `run/` mode 0700, and restricts to the daemon whatever an older
    /// daemon left readable by others in them (pod records, logs, disks,
    /// VM run directories).
    pub fn open(root: &Path) -> Result<StateDir, RecordError> {
        for dir in [root.join("pods"), root.join("run").join("pods")] {
            private_files::create_dir_all(&dir).map_err(io("create", &dir))?;
        }
        for dir in [root.join("pods"), root.join("run")] {
            let done = private_files::restrict_tree(&dir).map_err(io("restrict", &dir))?;
            if done != private_files::Restricted::default() {
                tracing::info!(
                    "restricted {} directories and {} files under {} to this daemon",
                    done.dirs,
                    done.files,
                    dir.display()
                );
            }
        }
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of pod `uid`.
    pub fn pod_dir(&self, uid: &str) -> Result<PathBuf, RecordError> {
        let safe = !uid.is_empty()
            && uid.len() <= 128
            && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !safe {
            return Err(RecordError::BadUid(uid.to_string()));
        }
        Ok(self.root.join("pods").join(uid))
    }

    /// Where pod `uid`'s container logs go.
    pub fn log_dir(&self, uid: &str) -> Result<PathBuf, RecordError> {
        Ok(self.pod_dir(uid)?.join("logs"))
    }

    /// Where pod `uid`'s snapshots go.
    pub fn snapshot_dir(&self, uid: &str) -> Result<PathBuf, RecordError> {
        Ok(self.pod_dir(uid)?.join("snapshots"))
    }

    /// The runtime directory of this host's VMs (their run directories
    /// are `pods/<vm-id>` in it, as [`podvisor_podvm::PodVm`] makes them).
    pub fn run_dir(&self) -> PathBuf {
        Self::run_dir_under(&self.root)
    }

    /// The runtime directory of the VMs of the state directory `root`.
    pub fn run_dir_under(root: &Path) -> PathBuf {
        root.join("run")
    }

    /// Saves a pod's record (creating its directory).
    pub fn save(&self, record: &PodRecord) -> Result<(), RecordError> {
        let dir = self.pod_dir(&record.plan.uid)?;
        private_files::create_dir_all(&dir).map_err(io("create", &dir))?;
        write_atomic(&dir.join("pod.json"), record)
    }

    /// Every pod record; a damaged one is reported and skipped.
    pub fn load_all(&self) -> Result<Vec<PodRecord>, RecordError> {
        let pods = self.root.join("pods");
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&pods).map_err(io("read", &pods))?;
        for entry in entries.flatten() {
            let path = entry.path().join("pod.json");
            let data = match std::fs::read(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(RecordError::Io {
                        what: "read",
                        path,
                        source,
                    });
                }
            };
            match serde_json::from_slice::<PodRecord>(&data) {
                Ok(r) => out.push(r),
                Err(source) => {
                    tracing::warn!("{}", RecordError::Damaged { path, source });
                }
            }
        }
        out.sort_by(|a, b| a.plan.uid.cmp(&b.plan.uid));
        Ok(out)
    }

    /// Removes everything of pod `uid` (record and logs).
    pub fn remove(&self, uid: &str) -> Result<(), RecordError> {
        let dir = self.pod_dir(uid)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RecordError::Io {
                what: "remove",
                path: dir,
                source,
            }),
        }
    }

    /// The daemon's own record (default if none yet).
    pub fn host_record(&self) -> HostRecord {
        std::fs::read(self.root.join("host.json"))
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default()
    }

    pub fn save_host_record(&self, record: &HostRecord) -> Result<(), RecordError> {
        write_atomic(&self.root.join("host.json"), record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::plan::RestartPolicy;

    fn record(uid: &str) -> PodRecord {
        PodRecord {
            plan: PodPlan {
                uid: uid.into(),
                namespace: "default".into(),
                name: "web".into(),
                containers: vec![],
                restart_policy: RestartPolicy::Never,
                cpus: 1,
                memory_mib: 128,
                port_mappings: vec![],
                dns: Default::default(),
                hibernate_after: None,
                isolated: false,
                volumes: vec![],
                size_runtimes: true,
            },
            state: PodState::default(),
            vm: Some(VmRecord {
                vm_id: "abc".into(),
                process: VmmProcess {
                    pid: 42,
                    start_time: 7,
                    run_dir: "/x/run/pods/abc".into(),
                },
                booted_at: SystemTime::UNIX_EPOCH,
                containers: vec![],
                disks: vec![],
                pmem: vec![],
                encrypted: vec![],
                open_volumes: vec![],
            }),
            holds: vec![],
            deleting: false,
            hibernated: None,
        }
    }

    #[test]
    fn opening_the_state_dir_restricts_what_an_older_daemon_left_open() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("pods/a-1");
        std::fs::create_dir_all(pod.join("logs")).unwrap();
        std::fs::write(pod.join("pod.json"), b"{}").unwrap();
        std::fs::write(pod.join("logs/app.log"), b"secret output").unwrap();
        let vm = dir.path().join("run/pods/a1");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::write(vm.join("console.log"), b"boot").unwrap();
        let open = |p: &std::path::Path, m| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        for d in [&dir.path().join("pods"), &pod, &pod.join("logs"), &vm] {
            open(d, 0o755);
        }
        for f in [
            pod.join("pod.json"),
            pod.join("logs/app.log"),
            vm.join("console.log"),
        ] {
            open(&f, 0o644);
        }
        StateDir::open(dir.path()).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        for d in [&dir.path().join("pods"), &pod, &pod.join("logs"), &vm] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        for f in [
            pod.join("pod.json"),
            pod.join("logs/app.log"),
            vm.join("console.log"),
        ] {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }

    #[test]
    fn records_round_trip_and_damaged_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        state.save(&record("b-2")).unwrap();
        state.save(&record("a-1")).unwrap();
        std::fs::create_dir_all(dir.path().join("pods/zz")).unwrap();
        std::fs::write(dir.path().join("pods/zz/pod.json"), b"{not json").unwrap();
        let all = state.load_all().unwrap();
        assert_eq!(all, [record("a-1"), record("b-2")]);
        state.remove("a-1").unwrap();
        state.remove("a-1").unwrap();
        assert_eq!(state.load_all().unwrap(), [record("b-2")]);
        assert!(matches!(
            state.pod_dir("../etc"),
            Err(RecordError::BadUid(_))
        ));
        assert_eq!(state.host_record(), HostRecord::default());
        state
            .save_host_record(&HostRecord { revision: 17 })
            .unwrap();
        assert_eq!(state.host_record().revision, 17);
    }
}
