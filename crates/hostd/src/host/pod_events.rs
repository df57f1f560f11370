//! What a running pod VM tells its pod's task, and exec sessions: output
//! to the logs, starts and exits to the containers' tracks (restart
//! decisions), the process list after an adoption, exec input and output.

use std::collections::HashSet;
use std::time::Instant;

use podvisor_proto::{ExecSpec, GuestMessage, HostMessage, MAX_CHUNK, ProcessInfo, StartError};
use tokio::sync::mpsc;

use podvisor_podvm::PodVmError;
use podvisor_podvm::agent_link::{sanitize_guest_text, sanitize_profile};

use super::error::RuntimeError;
use super::exec::{ExecEvent, ExecInput, ExecRequest, ExecSession, Undelivered, exec_events};
use super::plan::DEFAULT_TERMINAL;
use super::pod_task::PodTask;
use super::sandbox::Sandbox;
use super::status::{ContainerState, Ended};

impl PodTask {
    pub(super) fn container_index(&self, id: &str) -> Option<usize> {
        self.record
            .plan
            .containers
            .iter()
            .position(|c| c.name == id)
    }

    pub(super) async fn on_message(
        &mut self,
        vm: &mut dyn Sandbox,
        msg: GuestMessage,
    ) -> Result<(), PodVmError> {
        let policy = self.record.plan.restart_policy;
        let backoff = self.shared.cfg.backoff;
        let now = Instant::now();
        match msg {
            GuestMessage::Started { id, .. } => {
                if let Some(i) = self.container_index(&id) {
                    if let Some(ready) = self.vm_ready_at
                        && !self.slots[i].started_once_in_vm
                    {
                        let ms = ready.elapsed().as_secs_f64() * 1000.0;
                        tracing::info!(pod = %self.key(), container = %id, after_vm_ready_ms = ms, "container started");
                    }
                    let slot = &mut self.slots[i];
                    slot.started_once_in_vm = true;
                    slot.track.started(now);
                    slot.log.set_running(true);
                }
            }
            GuestMessage::ProfileApplied { id, profile } => {
                if let Some(i) = self.container_index(&id) {
                    let profile = sanitize_profile(profile);
                    tracing::info!(pod = %self.key(), container = %id, runtime = %profile.runtime, settings = ?profile.env, "runtime profile applied");
                    self.slots[i].track.status.runtime_profile = Some(profile);
                }
            }
            GuestMessage::StartFailed { id, error } => {
                let error = StartError {
                    kind: error.kind,
                    message: sanitize_guest_text(&error.message),
                };
                if let Some(i) = self.container_index(&id) {
                    self.slots[i].ended(Ended::StartFailed(error), policy, &backoff, now);
                } else if let Some(tx) = self.sessions.remove(&id) {
                    let failed = ExecEvent::Failed {
                        exit_code: error.kind.exit_code(),
                        message: error.message,
                    };
                    let _ = tx.offer(failed);
                }
            }
            GuestMessage::Output { id, stream, data } => {
                if let Some(i) = self.container_index(&id) {
                    if self.slots[i].archive_key.is_some()
                        && podvisor_runtime_profile::jvm_archive::archive_rejected(&data)
                        && let Some(key) = self.slots[i].archive_key.take()
                    {
                        tracing::warn!(pod = %self.key(), container = %id, "the JVM rejected its class-data archive");
                        self.shared.launcher.archive_rejected(&key).await;
                    }
                    if let Err(e) = self.slots[i].log.append(&data) {
                        tracing::warn!(pod = %self.key(), container = %id, "log write failed: {e}");
                    }
                } else if let Some(tx) = self.sessions.get(&id)
                    && let Err(why) = tx.offer(ExecEvent::Output(stream, data))
                {
                    // Never waits for the client: a client that is gone or
                    // fell behind its bound loses the session.
                    if why == Undelivered::Behind {
                        tracing::warn!(pod = %self.key(), exec = %id, "exec client did not read its output: session dropped");
                    }
                    self.sessions.remove(&id);
                    vm.send(&HostMessage::Signal {
                        id,
                        signal: libc::SIGKILL,
                    })
                    .await?;
                }
            }
            GuestMessage::Exited { id, status } => {
                if let Some(i) = self.container_index(&id) {
                    self.slots[i].ended(Ended::Exited(status), policy, &backoff, now);
                } else if let Some(tx) = self.sessions.remove(&id) {
                    let _ = tx.offer(ExecEvent::Exited(status.shell_code()));
                }
            }
            GuestMessage::Processes { processes } => self.reconcile_adopted(vm, processes).await?,
            GuestMessage::VolumeKeyRequest { public_key, error } => {
                self.on_volume_key_request(public_key, error)
            }
            GuestMessage::VolumesOpened { results } => self.on_volumes_opened(vm, results).await?,
            GuestMessage::VolumeClosed { name, error } => self.on_volume_closed(name, error),
            GuestMessage::Error { message } => {
                tracing::debug!(pod = %self.key(), "agent: {}", sanitize_guest_text(&message));
            }
            other => {
                return Err(vm.reject(format!("unexpected message {other:?}")).await);
            }
        }
        Ok(())
    }

    /// After an adoption: containers recorded as running that the agent
    /// does not list ended unseen; exec processes nobody listens to any
    /// more are killed.
    async fn reconcile_adopted(
        &mut self,
        vm: &mut dyn Sandbox,
        processes: Vec<ProcessInfo>,
    ) -> Result<(), PodVmError> {
        let listed: HashSet<&str> = processes.iter().map(|p| p.id.as_str()).collect();
        let (policy, backoff, now) = (
            self.record.plan.restart_policy,
            self.shared.cfg.backoff,
            Instant::now(),
        );
        for slot in &mut self.slots {
            let running = matches!(slot.track.status.state, ContainerState::Running { .. });
            if running && !listed.contains(slot.track.status.name.as_str()) {
                let why = "the container ended while no host daemon was connected; its exit status was lost";
                slot.ended(Ended::Lost(why.into()), policy, &backoff, now);
            } else if running {
                slot.log.set_running(true);
            }
        }
        for p in processes {
            if p.exec_in.is_some() && !self.sessions.contains_key(&p.id) {
                vm.send(&HostMessage::Signal {
                    id: p.id,
                    signal: libc::SIGKILL,
                })
                .await?;
            }
        }
        Ok(())
    }

    pub(super) async fn start_exec(
        &mut self,
        vm: &mut dyn Sandbox,
        request: ExecRequest,
    ) -> Result<ExecSession, RuntimeError> {
        let plan = &self.record.plan;
        let name = match request.container.clone() {
            Some(n) => n,
            None => plan
                .containers
                .first()
                .map(|c| c.name.clone())
                .unwrap_or_default(),
        };
        let Some(i) = self.container_index(&name) else {
            return Err(RuntimeError::NotFound(format!(
                "container {name} is not in pod {}",
                plan.key()
            )));
        };
        let slot = &self.slots[i];
        let spec = match (&slot.track.status.state, &slot.spec) {
            (ContainerState::Running { .. }, Some(spec)) => spec,
            _ => {
                return Err(RuntimeError::Conflict(format!(
                    "container {name} of pod {} is not running",
                    plan.key()
                )));
            }
        };
        if request.command.is_empty() {
            return Err(RuntimeError::BadRequest("exec needs a command".into()));
        }
        let mut process = spec.process.clone();
        process.args = request.command.clone();
        process.terminal = request
            .tty
            .then_some(request.size.unwrap_or(DEFAULT_TERMINAL));
        process.stdin = request.stdin;
        let id = format!(
            "exec.{}",
            podvisor_podvm::pod_vm::new_pod_id().map_err(PodVmError::from)?
        );
        vm.send(&HostMessage::Exec(ExecSpec {
            id: id.clone(),
            container: name,
            process,
        }))
        .await
        .map_err(RuntimeError::PodVm)?;
        let (events_tx, events_rx) = exec_events();
        let (input_tx, mut input_rx) = mpsc::channel::<ExecInput>(64);
        self.sessions.insert(id.clone(), events_tx);
        let forward = self.exec_tx.clone();
        tokio::spawn(async move {
            while let Some(input) = input_rx.recv().await {
                if forward.send((id.clone(), input)).await.is_err() {
                    return;
                }
            }
            let _ = forward.send((id, ExecInput::Hangup)).await;
        });
        Ok(ExecSession {
            events: events_rx,
            input: input_tx,
        })
    }

    pub(super) async fn on_exec_input(
        &mut self,
        vm: &mut dyn Sandbox,
        id: String,
        input: ExecInput,
    ) -> Result<(), PodVmError> {
        if !self.sessions.contains_key(&id) {
            return Ok(());
        }
        match input {
            ExecInput::Stdin(data) => {
                for chunk in data.chunks(MAX_CHUNK) {
                    vm.send(&HostMessage::Stdin {
                        id: id.clone(),
                        data: chunk.to_vec(),
                    })
                    .await?;
                }
            }
            ExecInput::CloseStdin => vm.send(&HostMessage::CloseStdin { id }).await?,
            ExecInput::Resize(size) => vm.send(&HostMessage::Resize { id, size }).await?,
            ExecInput::Hangup => {
                self.sessions.remove(&id);
                vm.send(&HostMessage::Signal {
                    id,
                    signal: libc::SIGKILL,
                })
                .await?;
            }
        }
        Ok(())
    }
}
