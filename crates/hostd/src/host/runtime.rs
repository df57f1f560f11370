//! [`PodRuntime`]: the daemon's handle on every pod of this host: start,
//! delete, state, logs and exec, and the adoption of VMs at start-up.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::error::RuntimeError;
use super::exec::{ExecRequest, ExecSession};
use super::hibernation::KeyCustody;
use super::logs::{LogReader, LogSignal};
use super::pod_task::{PodCommand, PodTask, Shared};
use super::records::{PodRecord, StateDir};
use super::sandbox::Launcher;
use super::status::ContainerStatus;
use super::vm_sandbox::VmLauncher;
use super::volumes::VolumeAuthority;
use super::{HostConfig, PodPlan, PodState};

pub use super::vm_sandbox::processes_mentioning;

pub use super::state_changes::ChangeFeed;

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
    pub fn open(cfg: HostConfig) -> Result<(PodRuntime, ChangeFeed), RuntimeError> {
        let launcher = Arc::new(VmLauncher::new(&cfg)?);
        PodRuntime::open_with(cfg, launcher)
    }

    /// [`PodRuntime::open`] with the pods' sandboxes made by `launcher`
    /// (pods are not hibernated).
    pub fn open_with(
        cfg: HostConfig,
        launcher: Arc<dyn Launcher>,
    ) -> Result<(PodRuntime, ChangeFeed), RuntimeError> {
        PodRuntime::open_with_server(cfg, launcher, None, None)
    }

    /// [`PodRuntime::open_with`], pods hibernated with their snapshots'
    /// keys kept by `keys`.
    pub fn open_with_server(
        cfg: HostConfig,
        launcher: Arc<dyn Launcher>,
        keys: Option<Arc<dyn KeyCustody>>,
        volumes: Option<Arc<dyn VolumeAuthority>>,
    ) -> Result<(PodRuntime, ChangeFeed), RuntimeError> {
        let state = StateDir::open(&cfg.state_dir)?;
        let records = state.load_all()?;
        launcher.recover(&state.run_dir(), &records)?;
        let (changes, feed) = super::state_changes::state_changes();
        let runtime = PodRuntime {
            shared: Arc::new(Shared {
                cfg,
                state,
                changes,
                launcher,
                keys,
                volumes,
            }),
            pods: Mutex::new(HashMap::new()),
        };
        for record in records {
            let uid = record.plan.uid.clone();
            if let Err(e) = runtime.spawn(record) {
                tracing::error!(pod = %uid, "cannot resume the pod: {e}", e = podvisor_errors::ErrorChain(&e));
            }
        }
        tokio::spawn(reconcile_periodically(Arc::downgrade(&runtime.shared)));
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
                .map(|c| ContainerStatus::new(&c.name, &c.image))
                .collect(),
            ..Default::default()
        };
        let record = PodRecord {
            plan,
            state,
            vm: None,
            holds: vec![],
            deleting: false,
            hibernated: None,
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
        self.check_logs_and_exec()?;
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
        let asleep = handle
            .state
            .borrow()
            .hibernation
            .as_ref()
            .is_some_and(|h| h.asleep);
        if follow && asleep {
            // A follower wakes the pod (if the task is busy, it is awake
            // or waking anyway).
            let _ = handle.commands.try_send(PodCommand::Wake { reply: None });
        }
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
        self.check_logs_and_exec()?;
        self.ask(namespace, name, |reply| PodCommand::Exec { request, reply })
            .await
    }

    /// Hibernates pod `namespace/name` now; returns what was saved.
    pub async fn hibernate(&self, namespace: &str, name: &str) -> Result<String, RuntimeError> {
        self.ask(namespace, name, |reply| PodCommand::Hibernate { reply })
            .await
    }

    /// Wakes pod `namespace/name` if it is hibernated; returns how.
    pub async fn wake(&self, namespace: &str, name: &str) -> Result<String, RuntimeError> {
        self.ask(namespace, name, |reply| PodCommand::Wake {
            reply: Some(reply),
        })
        .await
    }

    /// Closes the revoked encrypted volume `volume` in pod
    /// `namespace/name` and stops the containers using it.
    pub async fn close_volume(
        &self,
        namespace: &str,
        name: &str,
        volume: &str,
    ) -> Result<String, RuntimeError> {
        let name_of = volume.to_string();
        self.ask(namespace, name, |reply| PodCommand::CloseVolume {
            name: name_of,
            reply,
        })
        .await
    }

    /// Sends the task of pod `namespace/name` the command `command` makes
    /// around its reply channel, and waits for the reply.
    async fn ask<T>(
        &self,
        namespace: &str,
        name: &str,
        command: impl FnOnce(oneshot::Sender<Result<T, RuntimeError>>) -> PodCommand,
    ) -> Result<T, RuntimeError> {
        let uid = self.lookup(namespace, name)?;
        let commands = self.pods.lock().unwrap()[&uid].commands.clone();
        let (reply, answer) = oneshot::channel();
        let gone = || RuntimeError::NotFound(format!("pod {namespace}/{name} is being deleted"));
        commands.send(command(reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    fn check_logs_and_exec(&self) -> Result<(), RuntimeError> {
        match self.shared.launcher.without_logs_and_exec() {
            Some(why) => Err(RuntimeError::NotImplemented(why.into())),
            None => Ok(()),
        }
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

/// Has the launcher free what pods that are gone or finished still keep
/// (their networks): now, with every recorded pod that has not finished
/// (adopted ones included) live, and then every
/// [`super::NETWORK_RECONCILE_PERIOD`], until the runtime and its pods are
/// gone.
async fn reconcile_periodically(shared: Weak<Shared>) {
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match shared.state.load_all() {
            Ok(records) => {
                let live: HashSet<String> = records
                    .into_iter()
                    .filter(|r| !r.state.phase.is_terminal())
                    .map(|r| r.plan.uid)
                    .collect();
                shared.launcher.reconcile(&live).await;
            }
            Err(e) => tracing::warn!(
                "cannot list the pod records to reconcile networks: {e}",
                e = podvisor_errors::ErrorChain(&e)
            ),
        }
        drop(shared);
        tokio::time::sleep(super::NETWORK_RECONCILE_PERIOD).await;
    }
}
