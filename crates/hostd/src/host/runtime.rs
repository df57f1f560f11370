//! [`PodRuntime`]: the daemon's handle on every pod of this host: start,
//! delete, state, logs and exec, and the adoption of VMs at start-up.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podvisor_proto::{Stream, TerminalSize};
use tokio::sync::{mpsc, oneshot, watch};

use super::logs::{LogReader, LogSignal};
use super::pod_task::{PodCommand, PodTask, Shared};
use super::records::{PodRecord, RecordError, StateDir};
use super::{HostConfig, PodPlan, PodState};
use podvisor_podvm::PodVmError;

/// Errors of the host runtime; the HTTP layer maps them to status codes.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No such pod or container here.
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit the pod's state (e.g. exec into a
    /// container that is not running).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Node(#[from] PodVmError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A process to start in a running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// The container; `None`: the pod's first container.
    pub container: Option<String>,
    pub command: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    /// Initial terminal size (with `tty`).
    pub size: Option<TerminalSize>,
}

/// What an exec session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Output (with a terminal all of it comes as stdout).
    Output(Stream, Vec<u8>),
    /// The process ended with this exit code (128 + signal if killed).
    Exited(i32),
    /// It could not be started (the exit code a shell would report, 127
    /// for a command not found), or its VM went away.
    Failed { exit_code: i32, message: String },
}

/// Input to an exec session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecInput {
    Stdin(Vec<u8>),
    CloseStdin,
    Resize(TerminalSize),
    /// The client went away: the process is killed.
    Hangup,
}

/// A running exec: events until `Exited`/`Failed`; dropping `input` kills
/// the process.
pub struct ExecSession {
    pub events: mpsc::Receiver<ExecEvent>,
    pub input: mpsc::Sender<ExecInput>,
}

struct PodHandle {
    plan: PodPlan,
    commands: mpsc::Sender<PodCommand>,
    state: watch::Receiver<PodState>,
    logs: HashMap<String, watch::Receiver<LogSignal>>,
}

/// Every pod of this host.
pub struct PodRuntime {
    shared: Arc<Shared>,
    pods: Mutex<HashMap<String, PodHandle>>,
}

impl PodRuntime {
    /// Opens the state directory, stops VMs no record knows (left by a
    /// daemon that died while booting one), and resumes every recorded pod:
    /// its VM is adopted if it still runs, else restarted as its policy
    /// says. Also returns the feed of state changes (pod uid, state).
    pub fn open(
        mut cfg: HostConfig,
    ) -> Result<(PodRuntime, mpsc::UnboundedReceiver<(String, PodState)>), RuntimeError> {
        let state = StateDir::open(&cfg.state_dir)?;
        cfg.node.run_dir = state.run_dir();
        check_socket_paths(&state.run_dir())?;
        let records = state.load_all()?;
        stop_unrecorded_vms(&state.run_dir(), &records);
        let (changes, feed) = mpsc::unbounded_channel();
        let runtime = PodRuntime {
            shared: Arc::new(Shared {
                cfg,
                state,
                changes,
            }),
            pods: Mutex::new(HashMap::new()),
        };
        for record in records {
            let uid = record.plan.uid.clone();
            if let Err(e) = runtime.spawn(record) {
                tracing::error!(pod = %uid, "cannot resume the pod: {e}");
            }
        }
        Ok((runtime, feed))
    }

    fn spawn(&self, record: PodRecord) -> Result<(), RuntimeError> {
        let (tx, rx) = mpsc::channel(16);
        let plan = record.plan.clone();
        let (task, state, logs) = PodTask::new(self.shared.clone(), record, rx)?;
        tokio::spawn(task.run());
        self.pods.lock().unwrap().insert(
            plan.uid.clone(),
            PodHandle {
                plan,
                commands: tx,
                state,
                logs,
            },
        );
        Ok(())
    }

    /// Runs `plan` if it is not running here yet (a pod's spec never
    /// changes; a known uid is left alone). Returns whether it was new.
    pub fn run(&self, plan: PodPlan) -> Result<bool, RuntimeError> {
        if self.pods.lock().unwrap().contains_key(&plan.uid) {
            return Ok(false);
        }
        let state = PodState {
            containers: plan
                .containers
                .iter()
                .map(|c| super::ContainerStatus::new(&c.name, &c.image))
                .collect(),
            ..Default::default()
        };
        let record = PodRecord {
            plan,
            state,
            vm: None,
            holds: vec![],
        };
        self.shared.state.save(&record)?;
        self.spawn(record)?;
        Ok(true)
    }

    /// Stops pod `uid` (containers get `grace` between SIGTERM and
    /// SIGKILL), powers its VM off and removes its files. Returns once
    /// done; `false` if the pod was not known here.
    pub async fn delete(&self, uid: &str, grace: Option<Duration>) -> bool {
        let Some(handle) = self.pods.lock().unwrap().remove(uid) else {
            return false;
        };
        let (done, wait) = oneshot::channel();
        let grace = grace.unwrap_or(self.shared.cfg.delete_grace);
        if handle
            .commands
            .send(PodCommand::Delete { grace, done })
            .await
            .is_ok()
        {
            let _ = wait.await;
        }
        true
    }

    /// Every pod here with its current state.
    pub fn pods(&self) -> Vec<(PodPlan, PodState)> {
        let pods = self.pods.lock().unwrap();
        let mut out: Vec<_> = pods
            .values()
            .map(|h| (h.plan.clone(), h.state.borrow().clone()))
            .collect();
        out.sort_by(|a, b| a.0.uid.cmp(&b.0.uid));
        out
    }

    /// The uid of pod `namespace/name`, if it runs here.
    pub fn find(&self, namespace: &str, name: &str) -> Option<String> {
        let pods = self.pods.lock().unwrap();
        pods.values()
            .find(|h| h.plan.namespace == namespace && h.plan.name == name)
            .map(|h| h.plan.uid.clone())
    }

    fn lookup(&self, namespace: &str, name: &str) -> Result<String, RuntimeError> {
        self.find(namespace, name).ok_or_else(|| {
            RuntimeError::NotFound(format!("pod {namespace}/{name} does not run on this host"))
        })
    }

    /// A reader of a container's log (the pod's only container when
    /// `container` is `None`): its last `tail` lines, then with `follow`
    /// what it writes until it stops.
    pub fn logs(
        &self,
        namespace: &str,
        name: &str,
        container: Option<&str>,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<LogReader, RuntimeError> {
        let uid = self.lookup(namespace, name)?;
        let pods = self.pods.lock().unwrap();
        let handle = &pods[&uid];
        let names: Vec<&str> = handle
            .plan
            .containers
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        let container = match (container, names.as_slice()) {
            (Some(c), _) => c,
            (None, [only]) => only,
            (None, _) => {
                return Err(RuntimeError::BadRequest(format!(
                    "pod {namespace}/{name} has several containers: choose one of {}",
                    names.join(", ")
                )));
            }
        };
        let signal = handle.logs.get(container).ok_or_else(|| {
            RuntimeError::NotFound(format!(
                "container {container} is not in pod {namespace}/{name} (it has {})",
                names.join(", ")
            ))
        })?;
        let dir = self.shared.state.log_dir(&uid)?;
        LogReader::open(&dir, container, tail, follow.then(|| signal.clone())).map_err(|source| {
            RuntimeError::Io {
                what: format!("read the log of {container}"),
                source,
            }
        })
    }

    /// Starts an exec session in a running container of pod `namespace/name`.
    pub async fn exec(
        &self,
        namespace: &str,
        name: &str,
        request: ExecRequest,
    ) -> Result<ExecSession, RuntimeError> {
        let uid = self.lookup(namespace, name)?;
        let commands = self.pods.lock().unwrap()[&uid].commands.clone();
        let (reply, answer) = oneshot::channel();
        let gone = || RuntimeError::NotFound(format!("pod {namespace}/{name} is being deleted"));
        commands
            .send(PodCommand::Exec { request, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Lets go of every VM, leaving them running for the next daemon.
    pub async fn detach_all(&self) {
        let handles: Vec<_> = self
            .pods
            .lock()
            .unwrap()
            .drain()
            .map(|(_, h)| h.commands)
            .collect();
        for commands in handles {
            let (done, wait) = oneshot::channel();
            if commands.send(PodCommand::Detach { done }).await.is_ok() {
                let _ = wait.await;
            }
        }
    }
}

/// Unix socket paths hold at most 107 bytes; the VM sockets live at
/// `<run>/pods/<16 chars>/control.sock`.
fn check_socket_paths(run_dir: &Path) -> Result<(), RuntimeError> {
    let longest = run_dir.join("pods/0123456789abcdef/control.sock");
    let len = longest.as_os_str().len();
    if len > 107 {
        return Err(RuntimeError::BadRequest(format!(
            "the state directory's path is too long for the VM sockets under it \
             ({} is {len} bytes, unix sockets allow 107): choose a shorter --state-dir",
            longest.display()
        )));
    }
    Ok(())
}

/// Kills the VMM process of every run directory under `<run>/pods` that no
/// record names, and removes those directories.
fn stop_unrecorded_vms(run_dir: &Path, records: &[PodRecord]) {
    let known: HashSet<&str> = records
        .iter()
        .filter_map(|r| r.vm.as_ref().map(|v| v.vm_id.as_str()))
        .collect();
    let Ok(entries) = std::fs::read_dir(run_dir.join("pods")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if known.contains(name.as_str()) {
            continue;
        }
        let socket = entry.path().join("control.sock").display().to_string();
        for pid in processes_mentioning(&socket) {
            tracing::warn!(pid, dir = %entry.path().display(), "stopping a VM no record knows");
            // SAFETY: kill(2) on a pid that was just seen serving `socket`.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

/// Pids of processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| podvisor_vmm::process::cmdline(*pid).is_ok_and(|c| c.contains(needle)))
        .collect()
}
