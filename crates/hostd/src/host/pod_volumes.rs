//! A pod's encrypted volumes, as its task drives them: the containers
//! that mount one wait until it is open; the key conversation (a start's
//! instance id from the server, the guest's public key, the server's
//! sealed answer relayed to the guest, the guest's report) runs beside the
//! pod's other work; a refusal or a conversation past its deadline leaves
//! those containers waiting with `KeyDenied` or `KeyTimeout`. Before a
//! hibernation the guest wipes the keys, and a wake asks again; a revoked
//! volume is closed and its containers stopped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use podvisor_api::{PodInstance, VolumeKeyRequest, VolumeKeyResponse};
use podvisor_podvm::PodVmError;
use podvisor_podvm::agent_link::sanitize_guest_text;
use podvisor_proto::volumes::{EncryptedVolume, PUBLIC_KEY_LEN, context};
use podvisor_proto::{HostMessage, VolumeOpened};
use tokio::sync::{mpsc, oneshot};

use super::error::RuntimeError;
use super::pod_task::PodTask;
use super::sandbox::Sandbox;
use super::status::{ContainerState, WaitingReason};
use super::volumes::{AuthorityError, VolumeAuthority, encrypted_claims_of};

/// How long the agent may take to suspend the volumes before a
/// hibernation.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the task knows of its VM's encrypted volumes.
#[derive(Default)]
pub(super) struct VolumeKeys {
    /// The VM's encrypted volumes.
    pub encrypted: Vec<EncryptedVolume>,
    /// Those open in the guest now.
    pub open: HashSet<String>,
    /// Those that will not open in this VM, with why.
    pub closed: HashMap<String, (WaitingReason, String)>,
    /// The conversation under way.
    flow: Option<KeyFlow>,
    /// Replies waiting for a volume's close.
    closing: HashMap<String, oneshot::Sender<Result<String, RuntimeError>>>,
}

struct KeyFlow {
    deadline: Instant,
    /// The context the guest was told, once the instance is known.
    instance: Option<PodInstance>,
    /// What the server calls answer.
    answers: mpsc::Receiver<ServerAnswer>,
    answers_tx: mpsc::Sender<ServerAnswer>,
}

/// What a call to the server brought back.
pub(super) enum ServerAnswer {
    Instance(Result<PodInstance, AuthorityError>),
    Keys(Result<VolumeKeyResponse, AuthorityError>),
}

/// Calls `f` until it succeeds, fails for good, or `deadline` passes.
async fn until_deadline<T, F, Fut>(deadline: Instant, mut f: F) -> Result<T, AuthorityError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, AuthorityError>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match f().await {
            Err(e) if e.retryable && Instant::now() + delay < deadline => {
                tracing::debug!("volume keys: {e}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

impl VolumeKeys {
    pub(super) fn new(encrypted: Vec<EncryptedVolume>, open: Vec<String>) -> VolumeKeys {
        VolumeKeys {
            encrypted,
            open: open.into_iter().collect(),
            ..Default::default()
        }
    }

    /// A conversation is under way.
    pub(super) fn in_flight(&self) -> bool {
        self.flow.is_some()
    }

    /// The next answer of the server, or the deadline passing (`None`).
    /// Pending forever without a conversation. Cancel-safe.
    pub(super) async fn next_answer(&mut self) -> Option<ServerAnswer> {
        let Some(flow) = &mut self.flow else {
            return std::future::pending().await;
        };
        tokio::select! {
            a = flow.answers.recv() => a,
            _ = tokio::time::sleep_until(flow.deadline.into()) => None,
        }
    }
}

impl PodTask {
    fn authority(&self) -> Option<Arc<dyn VolumeAuthority>> {
        self.shared.volumes.clone()
    }

    /// Why container `i` cannot start now because of its encrypted
    /// volumes: waiting for a key, or refused one.
    pub(super) fn volume_gate(&self, i: usize) -> Option<(WaitingReason, String)> {
        let plan = &self.record.plan;
        let needs = encrypted_claims_of(plan, &plan.containers[i], &self.volume_keys.encrypted);
        for v in &needs {
            if let Some(closed) = self.volume_keys.closed.get(v) {
                return Some(closed.clone());
            }
        }
        needs
            .iter()
            .find(|v| !self.volume_keys.open.contains(*v))
            .map(|v| {
                (
                    WaitingReason::ContainerCreating,
                    format!("waiting for the key of encrypted volume {v}"),
                )
            })
    }

    /// Starts the key conversation for the VM's encrypted volumes that are
    /// not open (at a start, after a wake); nothing if all are.
    pub(super) fn begin_key_flow(&mut self) {
        let wanted: Vec<_> = self
            .volume_keys
            .encrypted
            .iter()
            .filter(|v| !self.volume_keys.open.contains(&v.name))
            .filter(|v| !self.volume_keys.closed.contains_key(&v.name))
            .cloned()
            .collect();
        if wanted.is_empty() || self.volume_keys.flow.is_some() {
            return;
        }
        let Some(authority) = self.authority() else {
            let why = "encrypted volumes need a management server; this host runs without one";
            for v in wanted {
                self.volume_keys
                    .closed
                    .insert(v.name, (WaitingReason::KeyDenied, why.into()));
            }
            self.show_gates();
            return;
        };
        let (answers_tx, answers) = mpsc::channel(4);
        let deadline = Instant::now() + self.shared.cfg.key_timeout;
        let plan = self.record.plan.clone();
        let tx = answers_tx.clone();
        tokio::spawn(async move {
            let r = until_deadline(deadline, || authority.new_instance(&plan)).await;
            let _ = tx.send(ServerAnswer::Instance(r)).await;
        });
        self.volume_keys.flow = Some(KeyFlow {
            deadline,
            instance: None,
            answers,
            answers_tx,
        });
    }

    /// Ends the conversation: the volumes still not open get `reason`.
    fn end_key_flow(&mut self, reason: WaitingReason, message: &str) {
        self.volume_keys.flow = None;
        let pending: Vec<String> = self
            .volume_keys
            .encrypted
            .iter()
            .map(|v| v.name.clone())
            .filter(|n| !self.volume_keys.open.contains(n))
            .collect();
        for v in pending {
            self.volume_keys
                .closed
                .entry(v)
                .or_insert((reason, message.to_string()));
        }
        self.show_gates();
    }

    /// Containers waiting on their volumes show why.
    pub(super) fn show_gates(&mut self) {
        for i in 0..self.slots.len() {
            let waiting = matches!(
                self.slots[i].track.status.state,
                ContainerState::Waiting { .. }
            ) && self.slots[i].track.restart_at.is_none()
                && !self.slots[i].track.is_done();
            if !waiting {
                continue;
            }
            if let Some((reason, message)) = self.volume_gate(i) {
                self.slots[i].track.status.state = ContainerState::waiting(reason, Some(message));
            }
        }
    }

    /// A server answer (or the deadline, `None`) for the conversation.
    pub(super) async fn on_server_answer(
        &mut self,
        vm: &mut dyn Sandbox,
        answer: Option<ServerAnswer>,
    ) -> Result<(), PodVmError> {
        match answer {
            None => {
                let t = self.shared.cfg.key_timeout;
                tracing::warn!(pod = %self.key(), "volume keys: no answer within {t:?}");
                self.end_key_flow(
                    WaitingReason::KeyTimeout,
                    &format!("the key release did not complete within {t:?}"),
                );
            }
            Some(ServerAnswer::Instance(Err(e))) | Some(ServerAnswer::Keys(Err(e))) => {
                let message = podvisor_errors::chain(&e);
                tracing::warn!(pod = %self.key(), "volume keys: {message}");
                let reason = if e.retryable {
                    WaitingReason::KeyTimeout
                } else {
                    WaitingReason::KeyDenied
                };
                self.end_key_flow(reason, &message);
            }
            Some(ServerAnswer::Instance(Ok(instance))) => {
                let plan = &self.record.plan;
                if instance.pod_uid != plan.uid {
                    self.end_key_flow(
                        WaitingReason::KeyDenied,
                        "the server issued an instance for another pod of this name",
                    );
                    return Ok(());
                }
                let ctx = context(&plan.namespace, &plan.name, &plan.uid, &instance.instance);
                let volumes = self
                    .volume_keys
                    .encrypted
                    .iter()
                    .filter(|v| !self.volume_keys.open.contains(&v.name))
                    .filter(|v| !self.volume_keys.closed.contains_key(&v.name))
                    .cloned()
                    .collect();
                if let Some(flow) = &mut self.volume_keys.flow {
                    flow.instance = Some(instance);
                }
                vm.send(&HostMessage::RequestVolumeKeys {
                    context: ctx,
                    volumes,
                })
                .await?;
            }
            Some(ServerAnswer::Keys(Ok(response))) => {
                for r in &response.refused {
                    tracing::warn!(pod = %self.key(), volume = %r.volume, "key refused: {}", r.message);
                    let reason = if r.reason == "KeyTimeout" {
                        WaitingReason::KeyTimeout
                    } else {
                        WaitingReason::KeyDenied
                    };
                    self.volume_keys
                        .closed
                        .insert(r.volume.clone(), (reason, r.message.clone()));
                }
                let sealed = response.sealed.as_deref().map(|s| {
                    base64::engine::general_purpose::STANDARD
                        .decode(s)
                        .map_err(|e| e.to_string())
                });
                match sealed {
                    Some(Ok(sealed)) if !response.released.is_empty() => {
                        vm.send(&HostMessage::VolumeKeys { sealed }).await?;
                    }
                    Some(Err(e)) => {
                        self.end_key_flow(
                            WaitingReason::KeyDenied,
                            &format!("the server's sealed answer is not base64: {e}"),
                        );
                    }
                    _ => self.end_key_flow(WaitingReason::KeyDenied, "no key was released"),
                }
                self.show_gates();
            }
        }
        Ok(())
    }

    /// The guest's public key for the conversation: relayed to the server.
    pub(super) fn on_volume_key_request(&mut self, public_key: Vec<u8>, error: Option<String>) {
        let Some(flow) = &self.volume_keys.flow else {
            tracing::debug!(pod = %self.key(), "agent sent a volume key request nobody asked for");
            return;
        };
        let Some(instance) = flow.instance.clone() else {
            return;
        };
        if let Some(e) = error {
            let e = sanitize_guest_text(&e);
            self.end_key_flow(
                WaitingReason::KeyDenied,
                &format!("the guest cannot ask for keys: {e}"),
            );
            return;
        }
        if public_key.len() != PUBLIC_KEY_LEN {
            self.end_key_flow(
                WaitingReason::KeyDenied,
                "the guest's public key has the wrong length",
            );
            return;
        }
        let request = VolumeKeyRequest {
            instance: instance.instance,
            public_key: base64::engine::general_purpose::STANDARD.encode(&public_key),
            volumes: self
                .volume_keys
                .encrypted
                .iter()
                .map(|v| v.name.clone())
                .filter(|n| !self.volume_keys.open.contains(n))
                .filter(|n| !self.volume_keys.closed.contains_key(n))
                .collect(),
        };
        let (tx, deadline) = (flow.answers_tx.clone(), flow.deadline);
        let authority = self
            .authority()
            .expect("a flow runs only with an authority");
        let plan = self.record.plan.clone();
        tokio::spawn(async move {
            let r = until_deadline(deadline, || authority.request_keys(&plan, &request)).await;
            let _ = tx.send(ServerAnswer::Keys(r)).await;
        });
    }

    /// The guest opened (or failed to open) the released volumes: start
    /// the containers that waited for them.
    pub(super) async fn on_volumes_opened(
        &mut self,
        vm: &mut dyn Sandbox,
        results: Vec<VolumeOpened>,
    ) -> Result<(), PodVmError> {
        for r in results {
            let name = sanitize_guest_text(&r.name);
            match r.error {
                None if self.volume_keys.encrypted.iter().any(|v| v.name == name) => {
                    tracing::info!(pod = %self.key(), volume = %name, "encrypted volume open");
                    // Formatted now: a later start never formats again.
                    for v in &mut self.volume_keys.encrypted {
                        if v.name == name {
                            v.format_image = None;
                        }
                    }
                    self.volume_keys.open.insert(name);
                }
                None => {}
                Some(e) => {
                    let e = sanitize_guest_text(&e);
                    tracing::warn!(pod = %self.key(), volume = %name, "opening the volume failed: {e}");
                    let message = format!("opening the volume in the guest failed: {e}");
                    if name.is_empty() {
                        self.end_key_flow(WaitingReason::KeyDenied, &message);
                    } else {
                        self.volume_keys
                            .closed
                            .insert(name, (WaitingReason::FailedMount, message));
                    }
                }
            }
        }
        self.volume_keys.flow = None;
        self.remember_volumes();
        self.show_gates();
        // Start what waited.
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            let gated = slot
                .track
                .status
                .state
                .is_waiting(WaitingReason::ContainerCreating)
                && slot.track.restart_at.is_none()
                && !slot.track.is_done();
            if gated && self.volume_gate(i).is_none() {
                self.start_container(vm, i).await?;
            }
        }
        Ok(())
    }

    /// The VM record keeps which volumes are open (for an adoption).
    pub(super) fn remember_volumes(&mut self) {
        if let Some(vm) = &mut self.record.vm {
            vm.encrypted = self.volume_keys.encrypted.clone();
            vm.open_volumes = self.volume_keys.open.iter().cloned().collect();
        }
        self.save();
    }

    /// Before a save: the guest suspends its mappings and wipes the keys.
    /// Messages that arrive meanwhile are handled as usual.
    pub(super) async fn suspend_volumes(
        &mut self,
        vm: &mut dyn Sandbox,
    ) -> Result<(), RuntimeError> {
        if self.volume_keys.open.is_empty() {
            return Ok(());
        }
        vm.send(&HostMessage::SuspendVolumes)
            .await
            .map_err(RuntimeError::PodVm)?;
        let deadline = Instant::now() + SUSPEND_TIMEOUT;
        loop {
            let event = tokio::time::timeout_at(deadline.into(), vm.next_event()).await;
            match event {
                Err(_) => {
                    return Err(RuntimeError::Conflict(format!(
                        "the guest did not close its encrypted volumes within {SUSPEND_TIMEOUT:?}"
                    )));
                }
                Ok(Err(e)) => return Err(RuntimeError::PodVm(e)),
                Ok(Ok(podvisor_proto::GuestMessage::VolumesSuspended { error })) => {
                    return match error {
                        None => {
                            // The keys are gone from the guest: a wake (or
                            // a failed save) asks again.
                            self.volume_keys.open.clear();
                            Ok(())
                        }
                        Some(e) => Err(RuntimeError::Conflict(format!(
                            "the guest could not close its encrypted volumes: {}",
                            sanitize_guest_text(&e)
                        ))),
                    };
                }
                Ok(Ok(other)) => self
                    .on_message(vm, other)
                    .await
                    .map_err(RuntimeError::PodVm)?,
            }
        }
    }

    /// The volume was revoked: the guest closes it and stops the
    /// containers using it; they wait with `KeyDenied` from now on.
    pub(super) async fn close_volume(
        &mut self,
        vm: &mut dyn Sandbox,
        name: String,
        reply: oneshot::Sender<Result<String, RuntimeError>>,
    ) -> Result<(), PodVmError> {
        if !self.volume_keys.encrypted.iter().any(|v| v.name == name) {
            let _ = reply.send(Ok(format!(
                "pod {} has no encrypted volume {name} open",
                self.key()
            )));
            return Ok(());
        }
        let revoked = (
            WaitingReason::KeyDenied,
            format!("volume {name} was revoked"),
        );
        if !self.volume_keys.open.contains(&name)
            && self.volume_keys.closed.get(&name) == Some(&revoked)
        {
            // Told again (the periodic pass over the volume list).
            let _ = reply.send(Ok(format!(
                "volume {name} of pod {} was closed before",
                self.key()
            )));
            return Ok(());
        }
        self.volume_keys.closed.insert(name.clone(), revoked);
        let was_open = self.volume_keys.open.remove(&name);
        self.remember_volumes();
        if !was_open {
            self.show_gates();
            let _ = reply.send(Ok(format!(
                "volume {name} was not open in pod {}",
                self.key()
            )));
            return Ok(());
        }
        let grace = self.shared.cfg.delete_grace.as_millis() as u64;
        if let Some(old) = self.volume_keys.closing.insert(name.clone(), reply) {
            let _ = old.send(Ok("closing".into()));
        }
        vm.send(&HostMessage::CloseVolume {
            name,
            grace_ms: grace,
        })
        .await
    }

    pub(super) fn on_volume_closed(&mut self, name: String, error: Option<String>) {
        let name = sanitize_guest_text(&name);
        let answer = match error {
            None => Ok(format!("volume {name} closed in pod {}", self.key())),
            Some(e) => Err(RuntimeError::Conflict(format!(
                "closing volume {name} in pod {} failed: {}",
                self.key(),
                sanitize_guest_text(&e)
            ))),
        };
        tracing::info!(pod = %self.key(), volume = %name, "revoked volume closed: {answer:?}");
        if let Some(reply) = self.volume_keys.closing.remove(&name) {
            let _ = reply.send(answer);
        }
        self.show_gates();
    }
}
