//! One pod's supervisor: a task that gets the pod a sandbox from its
//! launcher (starting one, or adopting the one its record names), starts
//! and restarts its containers, writes their output to the logs, serves
//! exec sessions, publishes the pod's state, and on delete stops
//! everything and removes the pod's files.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use podvisor_podvm::PodVmError;
use podvisor_proto::{ContainerSpec, HostMessage, StartError, StartErrorKind};
use tokio::sync::{mpsc, oneshot, watch};

use super::HostConfig;
use super::error::RuntimeError;
use super::exec::{ExecEvent, ExecInput, ExecOutlet, ExecRequest, ExecSession};
use super::hibernation::{self, Activity, HibernationStatus, KeyCustody};
use super::logs::{ContainerLog, LogSignal};
use super::plan::RestartPolicy;
use super::pod_volumes::VolumeKeys;
use super::records::{PodRecord, StateDir, VmRecord};
use super::sandbox::{Launcher, Sandbox};
use super::status::{
    Backoff, ContainerState, ContainerStatus, ContainerTrack, Ended, PodReason, PodState,
    WaitingReason,
};
use super::volumes::VolumeAuthority;

/// Most events of a sandbox taken in at once before its pod's state is
/// published.
const READY_BATCH: usize = 64;

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
    /// Hibernate the pod now; answers what was saved.
    Hibernate {
        reply: oneshot::Sender<Result<String, RuntimeError>>,
    },
    /// Wake the pod if it is hibernated (`reply`: how it went).
    Wake {
        reply: Option<oneshot::Sender<Result<String, RuntimeError>>>,
    },
    /// The encrypted volume `name` was revoked: close it in the guest and
    /// stop the containers using it.
    CloseVolume {
        name: String,
        reply: oneshot::Sender<Result<String, RuntimeError>>,
    },
}

/// What every pod task shares.
pub(crate) struct Shared {
    pub cfg: HostConfig,
    pub state: StateDir,
    /// Every change of a pod's state, for the daemon to report.
    pub changes: super::state_changes::StateChanges,
    /// Makes the pods' sandboxes.
    pub launcher: Arc<dyn Launcher>,
    /// Keeps the keys of hibernated pods' snapshots; `None`: pods are
    /// not hibernated.
    pub keys: Option<Arc<dyn KeyCustody>>,
    /// The server's part in the pods' volumes; `None`: pods get only
    /// `emptyDir` volumes.
    pub volumes: Option<Arc<dyn VolumeAuthority>>,
}

pub(super) enum Stage {
    /// No VM; get one at this time.
    NeedVm(Instant),
    Up(Box<dyn Sandbox>),
    /// The VM is in a snapshot ([`PodRecord::hibernated`]), waiting for
    /// its first request.
    Hibernated,
    /// Nothing runs or will run again.
    Finished,
}

/// What a running pod does next.
enum Step {
    /// Go on serving it (or it stopped with this error).
    Go(Result<(), PodVmError>),
    /// Hibernate it (`None`: by its idle policy).
    Hibernate(Option<oneshot::Sender<Result<String, RuntimeError>>>),
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
    HashMap<String, watch::Receiver<LogSignal>>,
);

/// One container of the pod, as its task keeps it.
pub(super) struct ContainerSlot {
    /// Its status and restart decisions.
    pub track: ContainerTrack,
    /// It has been started before: its next start is a restart.
    pub started_once: bool,
    /// It has run in the current VM (its first start there is logged).
    pub started_once_in_vm: bool,
    pub log: ContainerLog,
    /// What it runs, once its image is resolved.
    pub spec: Option<ContainerSpec>,
    /// The key of the JVM archive it starts with, until its JVM is seen
    /// to reject it.
    pub archive_key: Option<String>,
}

impl ContainerSlot {
    /// Its run ended `how`: decides its restart, tells log followers.
    pub(super) fn ended(
        &mut self,
        how: Ended,
        policy: RestartPolicy,
        backoff: &Backoff,
        now: Instant,
    ) {
        self.track.ended(how, policy, backoff, now);
        self.log.set_running(false);
    }

    /// Running, or being started.
    fn is_live(&self) -> bool {
        let state = &self.track.status.state;
        matches!(state, ContainerState::Running { .. })
            || state.is_waiting(WaitingReason::ContainerCreating)
    }
}

pub(crate) struct PodTask {
    pub(super) shared: Arc<Shared>,
    pub(super) record: PodRecord,
    /// The plan's containers, in its order.
    pub(super) slots: Vec<ContainerSlot>,
    pub(super) state_tx: watch::Sender<PodState>,
    pub(super) commands: mpsc::Receiver<PodCommand>,
    pub(super) exec_tx: mpsc::Sender<(String, ExecInput)>,
    pub(super) exec_rx: mpsc::Receiver<(String, ExecInput)>,
    pub(super) sessions: HashMap<String, ExecOutlet>,
    /// The next delay of a retried pull or boot.
    pub(super) retry_delay: Option<Duration>,
    /// Why the pod has no VM, if something failed.
    pub(super) vm_problem: Option<(PodReason, String)>,
    /// Hibernated now, or how the last wake went.
    pub(super) hibernation: Option<HibernationStatus>,
    /// When the running pod was last used (its `hibernate-after`).
    pub(super) activity: Activity,
    /// Exec requests that woke the pod, served once it runs.
    pub(super) pending_execs: Vec<PendingExec>,
    /// The VM's encrypted volumes and their keys' conversation.
    pub(super) volume_keys: VolumeKeys,
    /// When the running VM booted (its agent ready), for the log line
    /// that says how long each container's first start took after it.
    pub(super) vm_ready_at: Option<Instant>,
}

/// An exec request waiting for its pod to wake.
pub(super) type PendingExec = (
    ExecRequest,
    oneshot::Sender<Result<ExecSession, RuntimeError>>,
);

impl PodTask {
    /// A task for `record`, with its logs opened. Returns the task and the
    /// receivers the runtime hands out.
    pub(crate) fn new(
        shared: Arc<Shared>,
        record: PodRecord,
        commands: mpsc::Receiver<PodCommand>,
    ) -> Result<NewTask, RuntimeError> {
        let log_dir = shared.state.log_dir(&record.plan.uid)?;
        let mut signals = HashMap::new();
        let mut slots = Vec::new();
        let now = Instant::now();
        let specs = match &record.vm {
            Some(vm) => vm.containers.clone(),
            None => vec![],
        };
        for (i, c) in record.plan.containers.iter().enumerate() {
            let log = ContainerLog::open(&log_dir, &c.name, shared.cfg.log_max_bytes).map_err(
                |source| RuntimeError::Io {
                    what: format!("open the log of container {}", c.name),
                    source,
                },
            )?;
            signals.insert(c.name.clone(), log.subscribe());
            let known = record.state.containers.iter().find(|s| s.name == c.name);
            let mut track = ContainerTrack::new(
                known
                    .cloned()
                    .unwrap_or_else(|| ContainerStatus::new(&c.name, &c.image)),
            );
            let ran = known.is_some_and(|s| {
                s.restart_count > 0 || !s.state.is_waiting(WaitingReason::ContainerCreating)
            });
            // A restart that was waiting when the daemon stopped is due now.
            if track
                .status
                .state
                .is_waiting(WaitingReason::CrashLoopBackOff)
            {
                track.restart_at = Some(now);
            }
            slots.push(ContainerSlot {
                track,
                started_once: ran,
                started_once_in_vm: ran,
                log,
                spec: specs.get(i).cloned().flatten(),
                archive_key: None,
            });
        }
        let (state_tx, state_rx) = watch::channel(record.state.clone());
        let hibernation = record.state.hibernation.clone();
        let record_vm = record
            .vm
            .as_ref()
            .map(|v| (v.encrypted.clone(), v.open_volumes.clone()));
        let (exec_tx, exec_rx) = mpsc::channel(64);
        Ok((
            PodTask {
                shared,
                record,
                slots,
                state_tx,
                commands,
                exec_tx,
                exec_rx,
                sessions: HashMap::new(),
                retry_delay: None,
                vm_problem: None,
                hibernation,
                activity: Activity::new(),
                pending_execs: vec![],
                vm_ready_at: None,
                volume_keys: match &record_vm {
                    Some((encrypted, open)) => VolumeKeys::new(encrypted.clone(), open.clone()),
                    None => VolumeKeys::default(),
                },
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
        let mut told_finished = false;
        loop {
            if matches!(stage, Stage::Finished) && !told_finished {
                told_finished = true;
                self.shared.launcher.finished(&self.record.plan).await;
            }
            // A running sandbox's state is published by `supervise`, once
            // it has taken in what the sandbox already said.
            if !matches!(stage, Stage::Up(_)) {
                self.publish(&stage);
            }
            stage = match stage {
                Stage::NeedVm(at) => match self.idle_until(Some(at)).await {
                    Flow::Exit => return,
                    Flow::Continue => self.bring_up().await,
                },
                Stage::Up(vm) => match self.supervise(vm).await {
                    Some(next) => next,
                    None => return,
                },
                Stage::Hibernated => match self.sleep().await {
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
    /// A pod whose deletion began before a crash gets no new VM: the
    /// deletion the server repeats finishes it.
    async fn initial_stage(&mut self) -> Stage {
        if self.record.hibernated.is_some() {
            return self.still_hibernated().await;
        }
        let Some(rec) = self.record.vm.clone() else {
            return if self.record.state.phase.is_terminal() || self.record.deleting {
                Stage::Finished
            } else {
                Stage::NeedVm(Instant::now())
            };
        };
        match self.shared.launcher.adopt(&rec).await {
            Ok(vm) => {
                tracing::info!(pod = %self.key(), pid = rec.process.pid, "adopted the pod VM");
                return Stage::Up(vm);
            }
            Err(e) => {
                tracing::warn!(pod = %self.key(), "cannot adopt the pod VM: {e}", e = podvisor_errors::ErrorChain(&e));
                self.vm_lost(
                    format!(
                        "the pod VM was lost while no host daemon ran: {e}",
                        e = podvisor_errors::ErrorChain(&e)
                    ),
                    Some(&rec),
                );
            }
        }
        if self.record.deleting {
            self.save();
            return Stage::Finished;
        }
        self.after_vm()
    }

    /// What comes after the VM is gone: a new one when a container is to be
    /// restarted, else the end.
    pub(super) fn after_vm(&self) -> Stage {
        if self.all_done() {
            return Stage::Finished;
        }
        let at = self
            .slots
            .iter()
            .filter_map(|s| s.track.restart_at)
            .min()
            .unwrap_or_else(Instant::now);
        Stage::NeedVm(at)
    }

    /// Whether no container runs or will run again.
    pub(super) fn all_done(&self) -> bool {
        self.slots.iter().all(|s| s.track.is_done())
    }

    /// The VM is gone: every container that was running or starting ended
    /// with `why`; what is left of the sandbox `rec` names is discarded.
    pub(super) fn vm_lost(&mut self, why: String, rec: Option<&VmRecord>) {
        if let Some(rec) = rec {
            self.shared.launcher.discard(rec);
        }
        self.record.vm = None;
        let now = Instant::now();
        let (policy, backoff) = (self.record.plan.restart_policy, self.shared.cfg.backoff);
        for slot in &mut self.slots {
            if slot.is_live() && slot.started_once {
                slot.ended(Ended::Lost(why.clone()), policy, &backoff, now);
            }
        }
        for (_, tx) in self.sessions.drain() {
            let _ = tx.offer(ExecEvent::Failed {
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
                        self.record.deleting = true;
                        self.save();
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
                    Some(PodCommand::Hibernate { reply }) => {
                        let _ = reply.send(Err(RuntimeError::Conflict(format!(
                            "pod {} has no running VM to hibernate",
                            self.key()
                        ))));
                    }
                    Some(PodCommand::Wake { reply }) => {
                        if let Some(reply) = reply {
                            let _ = reply.send(Err(RuntimeError::Conflict(format!(
                                "pod {} is not hibernated, and its VM is not running",
                                self.key()
                            ))));
                        }
                    }
                    Some(PodCommand::CloseVolume { name, reply }) => {
                        // No VM holds it; the next start asks the server,
                        // which refuses a revoked volume.
                        let _ = reply.send(Ok(format!(
                            "pod {} has no running VM: volume {name} is not open",
                            self.key()
                        )));
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
        let launcher = self.shared.launcher.clone();
        let backoff = self.shared.cfg.backoff;
        let plan = self.record.plan.clone();
        let prepared = match launcher.prepare(&plan).await {
            Ok(p) => {
                // The layers are now held for the pod; let go of what an
                // earlier VM of it held.
                let old = std::mem::replace(&mut self.record.holds, p.holds.clone());
                self.save();
                launcher.release(&old).await;
                p
            }
            Err(problem) => {
                tracing::warn!(pod = %self.key(), "{problem}");
                for slot in &mut self.slots {
                    let t = &mut slot.track;
                    let message = if t.status.name == problem.container {
                        problem.to_string()
                    } else {
                        format!("waiting for the image of container {}", problem.container)
                    };
                    t.status.state =
                        ContainerState::waiting(WaitingReason::ErrImagePull, Some(message));
                }
                return Stage::NeedVm(self.retry_at());
            }
        };
        let scratch = match self.shared.state.pod_dir(&plan.uid) {
            Ok(d) => d.join("volumes"),
            Err(e) => {
                return self.volumes_failed(podvisor_errors::chain(&e), false);
            }
        };
        let volumes = match super::volumes::prepare(
            &plan,
            &self.shared.cfg.volume_dirs,
            &scratch,
            self.shared.volumes.as_deref(),
        )
        .await
        {
            Ok(v) => v,
            Err(e) => {
                let retry = e.retryable();
                return self.volumes_failed(podvisor_errors::chain(&e), retry);
            }
        };
        for (slot, key) in self.slots.iter_mut().zip(&prepared.archive_keys) {
            slot.archive_key = key.clone();
        }
        for (i, (slot, spec)) in self.slots.iter_mut().zip(prepared.containers).enumerate() {
            slot.spec = match spec {
                Ok(mut spec) => {
                    volumes.add_mounts(&plan.containers[i], &mut spec.mounts);
                    Some(spec)
                }
                Err(e) => {
                    let how = Ended::StartFailed(StartError {
                        kind: StartErrorKind::InvalidSpec,
                        message: podvisor_errors::chain(&e),
                    });
                    slot.track
                        .ended(how, plan.restart_policy, &backoff, Instant::now());
                    None
                }
            };
        }
        let mut disks = prepared.disks;
        disks.extend(volumes.disks.iter().cloned());
        let pmem = prepared.pmem;
        let (mut vm, process) = match launcher.start(&plan, disks.clone(), pmem.clone()).await {
            Ok(ok) => ok,
            Err(e) => return self.boot_failed(e),
        };
        tracing::info!(pod = %self.key(), pid = process.pid, "pod VM up");
        self.vm_ready_at = Some(Instant::now());
        for slot in &mut self.slots {
            slot.started_once_in_vm = false;
        }
        self.retry_delay = None;
        self.vm_problem = None;
        self.record.vm = Some(VmRecord {
            vm_id: plan.vm_id(),
            process,
            booted_at: SystemTime::now(),
            containers: self.slots.iter().map(|s| s.spec.clone()).collect(),
            disks,
            pmem,
            encrypted: volumes.encrypted.clone(),
            open_volumes: vec![],
        });
        self.volume_keys = VolumeKeys::new(volumes.encrypted, vec![]);
        self.activity = Activity::new();
        self.record
            .state
            .started_at
            .get_or_insert_with(SystemTime::now);
        self.save();
        for i in 0..self.slots.len() {
            if self.slots[i].track.is_done() {
                continue;
            }
            if let Some((reason, message)) = self.volume_gate(i) {
                self.slots[i].track.status.state = ContainerState::waiting(reason, Some(message));
                continue;
            }
            if let Err(e) = self.start_container(vm.as_mut(), i).await {
                let rec = self.record.vm.clone();
                drop(vm);
                self.vm_lost(
                    format!(
                        "the pod VM stopped: {e}",
                        e = podvisor_errors::ErrorChain(&e)
                    ),
                    rec.as_ref(),
                );
                return self.after_vm();
            }
        }
        self.begin_key_flow();
        Stage::Up(vm)
    }

    /// The pod's volumes could not be made ready: its containers wait
    /// with the reason; a retry comes after a back-off (`retry`: the
    /// server did not answer) or after the usual retry delay.
    fn volumes_failed(&mut self, message: String, retry: bool) -> Stage {
        tracing::warn!(pod = %self.key(), retry, "volumes: {message}");
        for slot in &mut self.slots {
            if !slot.track.is_done() {
                slot.track.status.state =
                    ContainerState::waiting(WaitingReason::FailedMount, Some(message.clone()));
            }
        }
        Stage::NeedVm(self.retry_at())
    }

    fn boot_failed(&mut self, e: PodVmError) -> Stage {
        let message = format!(
            "the pod VM did not start: {e}",
            e = podvisor_errors::ErrorChain(&e)
        );
        tracing::warn!(pod = %self.key(), "{message}");
        if self.record.plan.restart_policy == RestartPolicy::Never {
            let now = Instant::now();
            let backoff = self.shared.cfg.backoff;
            for slot in &mut self.slots {
                if !slot.track.is_done() {
                    let how = Ended::Lost(message.clone());
                    slot.ended(how, RestartPolicy::Never, &backoff, now);
                }
            }
            self.vm_problem = Some((PodReason::VmFailed, message));
            return Stage::Finished;
        }
        self.vm_problem = Some((PodReason::VmFailed, message));
        Stage::NeedVm(self.retry_at())
    }

    /// Starts (or restarts) container `i` in `vm`.
    pub(super) async fn start_container(
        &mut self,
        vm: &mut dyn Sandbox,
        i: usize,
    ) -> Result<(), PodVmError> {
        if let Some((reason, message)) = self.volume_gate(i) {
            // Its encrypted volume is not open (yet, or any more).
            let slot = &mut self.slots[i];
            slot.track.restart_at = None;
            slot.track.status.state = ContainerState::waiting(reason, Some(message));
            return Ok(());
        }
        let slot = &mut self.slots[i];
        let restart = slot.started_once;
        slot.started_once = true;
        slot.track.starting(restart);
        match slot.spec.clone() {
            Some(spec) => vm.send(&HostMessage::StartContainer(spec)).await,
            None => {
                let how = Ended::StartFailed(StartError {
                    kind: StartErrorKind::InvalidSpec,
                    message: "the container's spec could not be made from its image".into(),
                });
                let p = self.record.plan.restart_policy;
                slot.track
                    .ended(how, p, &self.shared.cfg.backoff, Instant::now());
                Ok(())
            }
        }
    }

    /// Serves a running VM until it is gone or hibernated (next stage) or
    /// the task ends (`None`).
    async fn supervise(&mut self, vm: Box<dyn Sandbox>) -> Option<Stage> {
        let mut vm = vm;
        // Volumes not open yet (an adopted VM whose conversation a
        // previous daemon did not finish): ask now. Nothing if all are
        // open, or a conversation runs.
        self.begin_key_flow();
        for (request, reply) in std::mem::take(&mut self.pending_execs) {
            let _ = reply.send(self.start_exec(vm.as_mut(), request).await);
        }
        let idle_after = self.record.plan.hibernate_after;
        let mut idle_check = tokio::time::interval(hibernation::idle_check_period(
            idle_after.unwrap_or(Duration::from_secs(60)),
        ));
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Err(e) = self.take_ready(vm.as_mut()).await {
                return Some(self.vm_stopped(vm, e));
            }
            self.publish_up();
            if self.all_done() {
                tracing::info!(pod = %self.key(), "all containers ended; powering the VM off");
                vm.shutdown(Duration::ZERO).await;
                self.record.vm = None;
                return Some(Stage::Finished);
            }
            let next_restart = self.slots.iter().filter_map(|s| s.track.restart_at).min();
            let restart_due = async {
                match next_restart {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let idle_tick = async {
                match idle_after {
                    Some(_) => {
                        idle_check.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let step: Step = tokio::select! {
                event = vm.next_event() => Step::Go(match event {
                    Ok(msg) => self.on_message(vm.as_mut(), msg).await,
                    Err(e) => Err(e),
                }),
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
                        self.record.deleting = true;
                        self.save();
                        vm.shutdown(grace).await;
                        self.remove_files().await;
                        let _ = done.send(());
                        return None;
                    }
                    Some(PodCommand::Exec { request, reply }) => {
                        self.activity.touch();
                        // A send that failed means the VM is going: the
                        // next event says how.
                        let _ = reply.send(self.start_exec(vm.as_mut(), request).await);
                        Step::Go(Ok(()))
                    }
                    Some(PodCommand::Hibernate { reply }) => Step::Hibernate(Some(reply)),
                    Some(PodCommand::CloseVolume { name, reply }) => {
                        Step::Go(self.close_volume(vm.as_mut(), name, reply).await)
                    }
                    Some(PodCommand::Wake { reply }) => {
                        self.activity.touch();
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(format!("pod {} is running (it was not hibernated)", self.key())));
                        }
                        Step::Go(Ok(()))
                    }
                },
                Some((id, input)) = self.exec_rx.recv() => {
                    self.activity.touch();
                    Step::Go(self.on_exec_input(vm.as_mut(), id, input).await)
                }
                _ = restart_due => {
                    let now = Instant::now();
                    let mut result = Ok(());
                    for i in 0..self.slots.len() {
                        if self.slots[i].track.restart_at.is_some_and(|t| t <= now) {
                            result = self.start_container(vm.as_mut(), i).await;
                            if result.is_err() { break; }
                        }
                    }
                    Step::Go(result)
                }
                answer = self.volume_keys.next_answer() => {
                    Step::Go(self.on_server_answer(vm.as_mut(), answer).await)
                }
                _ = idle_tick => match self.idle_for().await {
                    idle if idle_after.is_some_and(|after| idle >= after) => Step::Hibernate(None),
                    _ => Step::Go(Ok(())),
                },
            };
            match step {
                Step::Go(Ok(())) => {}
                Step::Go(Err(e)) => return Some(self.vm_stopped(vm, e)),
                Step::Hibernate(reply) => {
                    let by_policy = reply.is_none();
                    match self.hibernate(vm, by_policy).await {
                        Ok(done) => {
                            tracing::info!(pod = %self.key(), "{done}");
                            if let Some(reply) = reply {
                                let _ = reply.send(Ok(done));
                            }
                            return Some(Stage::Hibernated);
                        }
                        Err((still, e)) => {
                            tracing::warn!(pod = %self.key(), "not hibernated: {e}", e = podvisor_errors::ErrorChain(&e));
                            // The policy tries again after another idle
                            // period.
                            self.activity.touch();
                            let lost = format!(
                                "the pod VM was lost while it was being hibernated: {e}",
                                e = podvisor_errors::ErrorChain(&e)
                            );
                            if let Some(reply) = reply {
                                let _ = reply.send(Err(e));
                            }
                            match still {
                                Some(v) => vm = v,
                                None => {
                                    let rec = self.record.vm.clone();
                                    self.vm_lost(lost, rec.as_ref());
                                    return Some(self.after_vm());
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Takes in what the sandbox has already said, so that one publish
    /// covers it all (a container that starts at once is not reported as
    /// still being created first); at most a batch, so that commands are
    /// never starved.
    async fn take_ready(&mut self, vm: &mut dyn Sandbox) -> Result<(), PodVmError> {
        for _ in 0..READY_BATCH {
            let Some(event) = vm.next_event().now_or_never() else {
                return Ok(());
            };
            self.on_message(vm, event?).await?;
        }
        Ok(())
    }

    /// The sandbox stopped with `e`: what comes next.
    pub(super) fn vm_stopped(&mut self, vm: Box<dyn Sandbox>, e: PodVmError) -> Stage {
        tracing::warn!(pod = %self.key(), "pod VM stopped: {e}", e = podvisor_errors::ErrorChain(&e));
        let rec = self.record.vm.clone();
        drop(vm);
        self.vm_lost(
            format!(
                "the pod VM stopped: {e}",
                e = podvisor_errors::ErrorChain(&e)
            ),
            rec.as_ref(),
        );
        self.after_vm()
    }
}
