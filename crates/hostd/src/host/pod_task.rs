//! One pod's supervisor: a task that gets the pod a VM (booting one, or
//! adopting the one its record names), starts and restarts its containers,
//! writes their output to the logs, serves exec sessions, publishes the
//! pod's state, and on delete stops everything and removes the pod's files.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use podvisor_proto::{ContainerSpec, HostMessage, StartError, StartErrorKind, TerminalSize};
use tokio::sync::{mpsc, oneshot, watch};

use super::logs::ContainerLog;
use super::records::{PodRecord, StateDir, VmRecord};
use super::runtime::{ExecEvent, ExecInput, ExecRequest, ExecSession, RuntimeError};
use super::status::{ContainerState, ContainerStatus, ContainerTrack, Ended, PodState};
use super::{HostConfig, images};
use podvisor_podvm::PodVmError;
use podvisor_podvm::container::{ContainerOverrides, process_spec};
use podvisor_podvm::pod_vm::{PodVm, PodVmSpec};

/// Terminal size of a container or exec with `tty` before any resize.
pub(super) const DEFAULT_TERMINAL: TerminalSize = TerminalSize { rows: 24, cols: 80 };

/// What the runtime asks of a pod's task.
pub(crate) enum PodCommand {
    /// Stop the containers (SIGTERM, SIGKILL after `grace`), power the VM
    /// off, remove the pod's files; then answer.
    Delete {
        grace: Duration,
        done: oneshot::Sender<()>,
    },
    /// Start an exec session in a running container.
    Exec {
        request: ExecRequest,
        reply: oneshot::Sender<Result<ExecSession, RuntimeError>>,
    },
    /// Let go of the VM, leaving it running (the daemon is exiting).
    Detach { done: oneshot::Sender<()> },
}

/// What every pod task shares.
pub(crate) struct Shared {
    pub cfg: HostConfig,
    pub state: StateDir,
    /// Every change of a pod's state, for the daemon to report.
    pub changes: mpsc::UnboundedSender<(String, PodState)>,
}

pub(super) enum Stage {
    /// No VM; get one at this time.
    NeedVm(Instant),
    Up(Box<PodVm>),
    /// Nothing runs or will run again.
    Finished,
}

/// A command handled without a VM: go on, or the task is over.
enum Flow {
    Continue,
    Exit,
}

/// A new task and the receivers the runtime hands out: the pod's state and
/// each container's log signal.
pub(crate) type NewTask = (
    PodTask,
    watch::Receiver<PodState>,
    HashMap<String, watch::Receiver<super::logs::LogSignal>>,
);

pub(crate) struct PodTask {
    pub(super) shared: Arc<Shared>,
    pub(super) record: PodRecord,
    pub(super) tracks: Vec<ContainerTrack>,
    /// Whether each container has been started before (its next start is a
    /// restart).
    pub(super) started_once: Vec<bool>,
    pub(super) logs: Vec<ContainerLog>,
    /// What each container runs, once its image is resolved.
    pub(super) specs: Vec<Option<ContainerSpec>>,
    pub(super) state_tx: watch::Sender<PodState>,
    pub(super) commands: mpsc::Receiver<PodCommand>,
    pub(super) exec_tx: mpsc::Sender<(String, ExecInput)>,
    pub(super) exec_rx: mpsc::Receiver<(String, ExecInput)>,
    pub(super) sessions: HashMap<String, mpsc::Sender<ExecEvent>>,
    /// The next delay of a retried pull or boot.
    pub(super) retry_delay: Option<Duration>,
    /// Why the pod has no VM, if something failed.
    pub(super) vm_problem: Option<(String, String)>,
}

impl PodTask {
    /// A task for `record`, with its logs opened. Returns the task and the
    /// receivers the runtime hands out.
    pub(crate) fn new(
        shared: Arc<Shared>,
        record: PodRecord,
        commands: mpsc::Receiver<PodCommand>,
    ) -> Result<NewTask, RuntimeError> {
        let log_dir = shared.state.log_dir(&record.plan.uid)?;
        let mut logs = Vec::new();
        let mut signals = HashMap::new();
        let mut tracks = Vec::new();
        let mut started_once = Vec::new();
        let now = Instant::now();
        for c in &record.plan.containers {
            let log = ContainerLog::open(&log_dir, &c.name, shared.cfg.log_max_bytes).map_err(
                |source| RuntimeError::Io {
                    what: format!("open the log of container {}", c.name),
                    source,
                },
            )?;
            signals.insert(c.name.clone(), log.subscribe());
            logs.push(log);
            let known = record.state.containers.iter().find(|s| s.name == c.name);
            let mut track = ContainerTrack::new(
                known
                    .cloned()
                    .unwrap_or_else(|| ContainerStatus::new(&c.name, &c.image)),
            );
            let ran = known.is_some_and(|s| {
                s.restart_count > 0 || !matches!(&s.state, ContainerState::Waiting { reason, .. } if reason == "ContainerCreating")
            });
            // A restart that was waiting when the daemon stopped is due now.
            if matches!(&track.status.state, ContainerState::Waiting { reason, .. } if reason == "CrashLoopBackOff")
            {
                track.restart_at = Some(now);
            }
            tracks.push(track);
            started_once.push(ran);
        }
        let specs = match &record.vm {
            Some(vm) => vm.containers.clone(),
            None => vec![None; record.plan.containers.len()],
        };
        let (state_tx, state_rx) = watch::channel(record.state.clone());
        let (exec_tx, exec_rx) = mpsc::channel(64);
        Ok((
            PodTask {
                shared,
                record,
                tracks,
                started_once,
                logs,
                specs,
                state_tx,
                commands,
                exec_tx,
                exec_rx,
                sessions: HashMap::new(),
                retry_delay: None,
                vm_problem: None,
            },
            state_rx,
            signals,
        ))
    }

    pub(super) fn key(&self) -> String {
        self.record.plan.key()
    }

    /// Runs until the pod is deleted or detached.
    pub(crate) async fn run(mut self) {
        let mut stage = self.initial_stage().await;
        loop {
            self.publish(&stage);
            stage = match stage {
                Stage::NeedVm(at) => match self.idle_until(Some(at)).await {
                    Flow::Exit => return,
                    Flow::Continue => self.bring_up().await,
                },
                Stage::Up(vm) => match self.supervise(vm).await {
                    Some(next) => next,
                    None => return,
                },
                Stage::Finished => match self.idle_until(None).await {
                    Flow::Exit => return,
                    Flow::Continue => Stage::Finished,
                },
            };
        }
    }

    /// Adopts the recorded VM, if any; otherwise decides when to boot one.
    async fn initial_stage(&mut self) -> Stage {
        let Some(rec) = self.record.vm.clone() else {
            return if self.record.state.phase.is_terminal() {
                Stage::Finished
            } else {
                Stage::NeedVm(Instant::now())
            };
        };
        match PodVm::adopt(&self.shared.cfg.node, &rec.vm_id, &rec.process).await {
            Ok(vm) => {
                tracing::info!(pod = %self.key(), pid = rec.process.pid, "adopted the pod VM");
                return Stage::Up(Box::new(vm));
            }
            Err(e) => {
                tracing::warn!(pod = %self.key(), "cannot adopt the pod VM: {e}");
                self.vm_lost(
                    format!("the pod VM was lost while no host daemon ran: {e}"),
                    Some(&rec),
                );
            }
        }
        self.after_vm()
    }

    /// What comes after the VM is gone: a new one when a container is to be
    /// restarted, else the end.
    fn after_vm(&self) -> Stage {
        if self.tracks.iter().all(ContainerTrack::is_done) {
            return Stage::Finished;
        }
        let at = self
            .tracks
            .iter()
            .filter_map(|t| t.restart_at)
            .min()
            .unwrap_or_else(Instant::now);
        Stage::NeedVm(at)
    }

    /// The VM is gone: every container that was running or starting ended
    /// with `why`; a leftover VMM process of `rec` is killed.
    fn vm_lost(&mut self, why: String, rec: Option<&VmRecord>) {
        if let Some(rec) = rec {
            kill_recorded(rec);
            let _ = std::fs::remove_dir_all(&rec.process.run_dir);
        }
        self.record.vm = None;
        let now = Instant::now();
        for (i, t) in self.tracks.iter_mut().enumerate() {
            let live = matches!(t.status.state, ContainerState::Running { .. })
                || matches!(&t.status.state, ContainerState::Waiting { reason, .. } if reason == "ContainerCreating");
            if live && self.started_once[i] {
                t.ended(
                    Ended::Lost(why.clone()),
                    self.record.plan.restart_policy,
                    &self.shared.cfg.backoff,
                    now,
                );
                self.logs[i].set_running(false);
            }
        }
        for (_, tx) in self.sessions.drain() {
            let _ = tx.try_send(ExecEvent::Failed {
                exit_code: 255,
                message: why.clone(),
            });
        }
    }

    /// Handles commands until `until` (forever for `None`) while no VM runs.
    async fn idle_until(&mut self, until: Option<Instant>) -> Flow {
        loop {
            let sleep = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => return Flow::Continue,
                cmd = self.commands.recv() => match cmd {
                    None => return Flow::Exit,
                    Some(PodCommand::Detach { done }) => {
                        let _ = done.send(());
                        return Flow::Exit;
                    }
                    Some(PodCommand::Delete { done, .. }) => {
                        self.remove_files().await;
                        let _ = done.send(());
                        return Flow::Exit;
                    }
                    Some(PodCommand::Exec { request, reply }) => {
                        let name = request.container.unwrap_or_default();
                        let _ = reply.send(Err(RuntimeError::Conflict(format!(
                            "pod {} has no running container {name}: its VM is not running",
                            self.key()
                        ))));
                    }
                },
            }
        }
    }

    /// The next retry time of a failed pull or boot (back-off doubling).
    fn retry_at(&mut self) -> Instant {
        let b = self.shared.cfg.backoff;
        let delay = self.retry_delay.unwrap_or(b.base);
        self.retry_delay = Some((delay * 2).min(b.max));
        Instant::now() + delay
    }

    /// Resolves the images, boots the VM and starts the containers.
    async fn bring_up(&mut self) -> Stage {
        let cfg = &self.shared.cfg;
        let plan = self.record.plan.clone();
        let images = match images::resolve(&cfg.node, &plan).await {
            Ok(i) => {
                // The layers are now held for the pod; let go of what an
                // earlier VM of it held.
                let old = std::mem::replace(&mut self.record.holds, i.holds.clone());
                self.save();
                images::release(&cfg.node, &old).await;
                i
            }
            Err(problem) => {
                tracing::warn!(pod = %self.key(), "{problem}");
                for t in &mut self.tracks {
                    let message = if t.status.name == problem.container {
                        problem.to_string()
                    } else {
                        format!("waiting for the image of container {}", problem.container)
                    };
                    t.status.state = ContainerState::waiting("ErrImagePull", Some(message));
                }
                return Stage::NeedVm(self.retry_at());
            }
        };
        for (i, c) in plan.containers.iter().enumerate() {
            let overrides = ContainerOverrides {
                entrypoint: c.command.clone(),
                cmd: c.args.clone(),
                env: c.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                workdir: c.working_dir.clone(),
                user: None,
                terminal: c.tty.then_some(DEFAULT_TERMINAL),
                stdin: c.stdin,
            };
            let img = &images.containers[i];
            self.specs[i] = match process_spec(&img.config, &overrides) {
                Ok(process) => Some(ContainerSpec {
                    id: c.name.clone(),
                    hostname: hostname(&plan.name),
                    layers: img.layers.clone(),
                    process,
                }),
                Err(e) => {
                    let how = Ended::StartFailed(StartError {
                        kind: StartErrorKind::InvalidSpec,
                        message: e.to_string(),
                    });
                    self.tracks[i].ended(how, plan.restart_policy, &cfg.backoff, Instant::now());
                    None
                }
            };
        }
        let guest = {
            let opts = podvisor_guest::GuestOptions {
                kernel: cfg.node.kernel.clone(),
                agent: cfg.node.agent.clone(),
                extra_modules: vec![],
                cache_dir: cfg.node.cache_dir.clone(),
            };
            tokio::task::spawn_blocking(move || podvisor_guest::prepare(&opts)).await
        };
        let booted = match guest {
            Ok(Ok(guest)) => {
                let spec = PodVmSpec {
                    id: plan.vm_id(),
                    cpus: plan.cpus,
                    memory_mib: plan.memory_mib,
                    guest,
                    disks: images.disks,
                    memory: podvisor_vmm::MemoryBacking::Anonymous,
                    die_with_parent: false,
                };
                PodVm::boot(&cfg.node, spec).await
            }
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(PodVmError::Io {
                what: "prepare the guest".into(),
                source: std::io::Error::other(e),
            }),
        };
        let (mut vm, process) = match booted.and_then(|vm| vm.vmm_process().map(|p| (vm, p))) {
            Ok(ok) => ok,
            Err(e) => return self.boot_failed(e),
        };
        tracing::info!(pod = %self.key(), pid = process.pid, "pod VM up");
        self.retry_delay = None;
        self.vm_problem = None;
        self.record.vm = Some(VmRecord {
            vm_id: plan.vm_id(),
            process,
            booted_at: SystemTime::now(),
            containers: self.specs.clone(),
        });
        self.record
            .state
            .started_at
            .get_or_insert_with(SystemTime::now);
        self.save();
        for i in 0..self.tracks.len() {
            if self.tracks[i].is_done() {
                continue;
            }
            if let Err(e) = self.start_container(&mut vm, i).await {
                let rec = self.record.vm.clone();
                drop(vm);
                self.vm_lost(format!("the pod VM stopped: {e}"), rec.as_ref());
                return self.after_vm();
            }
        }
        Stage::Up(Box::new(vm))
    }

    fn boot_failed(&mut self, e: PodVmError) -> Stage {
        let message = format!("the pod VM did not start: {e}");
        tracing::warn!(pod = %self.key(), "{message}");
        if self.record.plan.restart_policy == super::RestartPolicy::Never {
            let now = Instant::now();
            for (i, t) in self.tracks.iter_mut().enumerate() {
                if !t.is_done() {
                    t.ended(
                        Ended::Lost(message.clone()),
                        super::RestartPolicy::Never,
                        &self.shared.cfg.backoff,
                        now,
                    );
                    self.logs[i].set_running(false);
                }
            }
            self.vm_problem = Some(("VMFailed".into(), message));
            return Stage::Finished;
        }
        self.vm_problem = Some(("VMFailed".into(), message));
        Stage::NeedVm(self.retry_at())
    }

    /// Starts (or restarts) container `i` in `vm`.
    pub(super) async fn start_container(
        &mut self,
        vm: &mut PodVm,
        i: usize,
    ) -> Result<(), PodVmError> {
        let restart = self.started_once[i];
        self.started_once[i] = true;
        self.tracks[i].starting(restart);
        match self.specs[i].clone() {
            Some(spec) => vm.send(&HostMessage::StartContainer(spec)).await,
            None => {
                let how = Ended::StartFailed(StartError {
                    kind: StartErrorKind::InvalidSpec,
                    message: "the container's spec could not be made from its image".into(),
                });
                let p = self.record.plan.restart_policy;
                self.tracks[i].ended(how, p, &self.shared.cfg.backoff, Instant::now());
                Ok(())
            }
        }
    }

    /// Serves a running VM until it is gone (next stage) or the task ends
    /// (`None`).
    async fn supervise(&mut self, vm: Box<PodVm>) -> Option<Stage> {
        let mut vm = vm;
        loop {
            self.publish_up();
            if self.tracks.iter().all(ContainerTrack::is_done) {
                tracing::info!(pod = %self.key(), "all containers ended; powering the VM off");
                vm.shutdown(Duration::ZERO).await;
                self.record.vm = None;
                return Some(Stage::Finished);
            }
            let next_restart = self.tracks.iter().filter_map(|t| t.restart_at).min();
            let restart_due = async {
                match next_restart {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let result: Result<(), PodVmError> = tokio::select! {
                event = vm.next_event() => match event {
                    Ok(msg) => self.on_message(&mut vm, msg).await,
                    Err(e) => Err(e),
                },
                cmd = self.commands.recv() => match cmd {
                    None | Some(PodCommand::Detach { .. }) => {
                        vm.detach();
                        if let Some(PodCommand::Detach { done }) = cmd {
                            let _ = done.send(());
                        }
                        return None;
                    }
                    Some(PodCommand::Delete { grace, done }) => {
                        tracing::info!(pod = %self.key(), "deleting: stopping containers and the VM");
                        vm.shutdown(grace).await;
                        self.remove_files().await;
                        let _ = done.send(());
                        return None;
                    }
                    Some(PodCommand::Exec { request, reply }) => {
                        // A send that failed means the VM is going: the
                        // next event says how.
                        let _ = reply.send(self.start_exec(&mut vm, request).await);
                        Ok(())
                    }
                },
                Some((id, input)) = self.exec_rx.recv() => self.on_exec_input(&mut vm, id, input).await,
                _ = restart_due => {
                    let now = Instant::now();
                    let mut result = Ok(());
                    for i in 0..self.tracks.len() {
                        if self.tracks[i].restart_at.is_some_and(|t| t <= now) {
                            result = self.start_container(&mut vm, i).await;
                            if result.is_err() { break; }
                        }
                    }
                    result
                }
            };
            if let Err(e) = result {
                tracing::warn!(pod = %self.key(), "pod VM stopped: {e}");
                let rec = self.record.vm.clone();
                drop(vm);
                self.vm_lost(format!("the pod VM stopped: {e}"), rec.as_ref());
                return Some(self.after_vm());
            }
        }
    }
}

/// The hostname of a pod's containers: the pod's name, cut to the 64 bytes
/// Linux allows.
fn hostname(pod: &str) -> String {
    let mut h = pod.to_string();
    while h.len() > 64 {
        h.pop();
    }
    h
}

/// Kills the VMM process of `rec` if it is still that process.
fn kill_recorded(rec: &VmRecord) {
    if rec.process.check_alive().is_err() {
        return;
    }
    if let Ok(h) = podvisor_vmm::process::ProcessHandle::open(rec.process.pid)
        && rec.process.check_alive().is_ok()
    {
        let _ = h.signal(libc::SIGKILL);
    }
}
