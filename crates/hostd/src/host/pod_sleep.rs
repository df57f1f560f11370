//! A pod's hibernation, as its task drives it: saving the running VM into
//! a sealed snapshot whose key goes to the [`KeyCustody`] (never to this
//! host's disk), sleeping until a request, an exec, a log follower or a
//! wake command comes, and waking: the snapshot's VM back on the pod's own
//! NIC, or, if that fails (no key, a refused snapshot, past the deadline),
//! a cold restart under the pod's restart policy with the reason in its
//! status.
//!
//! Crash safety: the record says `hibernated` only once the snapshot is
//! whole and its key kept, and before the paused VM is killed; a daemon
//! that dies earlier finds the paused VM recorded (it cannot be adopted,
//! so the pod restarts cold) and removes the snapshot files no record
//! names.

use std::time::{Duration, Instant, SystemTime};

use podvisor_hibernate::{HibernateError, Snapshot};
use podvisor_proto::HostMessage;

use super::error::RuntimeError;
use super::hibernation::{self, Hibernated, HibernationStatus, KeyCustody};
use super::pod_task::{PodCommand, PodTask, Stage};
use super::records::VmRecord;
use super::sandbox::Sandbox;

/// A hibernation that did not happen: why, and the VM if it still runs.
type NotHibernated = (Option<Box<dyn Sandbox>>, RuntimeError);

impl PodTask {
    /// How long the running pod has been idle: no traffic to it, no exec
    /// session, no log follower.
    pub(super) async fn idle_for(&mut self) -> Duration {
        let frames = self.shared.launcher.frames_in(&self.record.plan).await;
        let busy = !self.sessions.is_empty() || self.slots.iter().any(|s| s.log.followers() > 0);
        self.activity.look(frames, busy)
    }

    fn custody(&self) -> Result<std::sync::Arc<dyn KeyCustody>, RuntimeError> {
        if let Some(why) = self.shared.launcher.without_hibernation() {
            return Err(RuntimeError::NotImplemented(why.into()));
        }
        self.shared.keys.clone().ok_or_else(|| {
            RuntimeError::NotImplemented(
                "this host runtime has no management server to keep snapshot keys, \
                 so it does not hibernate pods"
                    .into(),
            )
        })
    }

    /// Saves the running VM into a snapshot, hands its key over, records
    /// the pod as hibernated and stops the VM. Returns what was saved.
    pub(super) async fn hibernate(
        &mut self,
        mut vm: Box<dyn Sandbox>,
        by_policy: bool,
    ) -> Result<String, NotHibernated> {
        let keys = match self.custody() {
            Ok(k) => k,
            Err(e) => return Err((Some(vm), e)),
        };
        if !self.sessions.is_empty() {
            let e = RuntimeError::Conflict(format!(
                "pod {} has {} exec session(s) running: it is not idle",
                self.key(),
                self.sessions.len()
            ));
            return Err((Some(vm), e));
        }
        let Some(vm_record) = self.record.vm.clone() else {
            let e = RuntimeError::Conflict(format!("pod {} has no VM record", self.key()));
            return Err((Some(vm), e));
        };
        if vm_record.disks.is_empty() && vm_record.pmem.is_empty() {
            // Adopted from a record of a podvisor that did not keep them:
            // the VM could not be loaded again.
            let e = RuntimeError::Conflict(format!(
                "pod {}'s VM was started by an older podvisor that did not record its disks: \
                 it can be hibernated once it has been restarted",
                self.key()
            ));
            return Err((Some(vm), e));
        }
        let plan = self.record.plan.clone();
        let dir = match self.shared.state.snapshot_dir(&plan.uid) {
            Ok(d) => d,
            Err(e) => return Err((Some(vm), e.into())),
        };
        remove_snapshots_except(&dir, None);
        let started = Instant::now();
        if self.volume_keys.in_flight() {
            let e = RuntimeError::Conflict(format!(
                "pod {} is opening its encrypted volumes",
                self.key()
            ));
            return Err((Some(vm), e));
        }
        // No volume key may be in the snapshot: the guest wipes them.
        if let Err(e) = self.suspend_volumes(vm.as_mut()).await {
            self.begin_key_flow();
            return Err((Some(vm), e));
        }
        let context = hibernation::snapshot_context(&plan);
        let paused = match vm.save(&dir, &context).await {
            Ok(p) => p,
            Err(not) => {
                self.begin_key_flow();
                return Err((not.sandbox, hibernate_error(not.error)));
            }
        };
        let snapshot = paused.snapshot().clone();
        if let Err(e) = keys.put(&plan, &snapshot.id, paused.key()).await {
            let not = paused.resume(HibernateError::KeyNotKept(Box::new(e))).await;
            self.begin_key_flow();
            return Err((not.sandbox, hibernate_error(not.error)));
        }
        let saved_in = started.elapsed();
        let since = SystemTime::now();
        self.record.hibernated = Some(Hibernated {
            snapshot: snapshot.clone(),
            since,
            booted_at: vm_record.booted_at,
            disks: vm_record.disks.clone(),
            pmem: vm_record.pmem.clone(),
            containers: vm_record.containers.clone(),
            encrypted: self.volume_keys.encrypted.clone(),
        });
        self.record.vm = None;
        if let Err(e) = self.shared.state.save(&self.record) {
            // Without the record a restarted daemon would not know the
            // pod sleeps: it runs on.
            self.record.hibernated = None;
            self.record.vm = Some(vm_record);
            let not = paused.resume(HibernateError::Abandoned(Box::new(e))).await;
            self.begin_key_flow();
            return Err((not.sandbox, hibernate_error(not.error)));
        }
        paused.stop().await;
        let mut message = format!(
            "snapshot {} of {} MiB guest memory ({} of VM state), saved in {:.2} s",
            hibernation::mib(snapshot.sealed_bytes),
            plan.memory_mib,
            hibernation::mib(snapshot.state_bytes),
            saved_in.as_secs_f64()
        );
        if let Err(e) = self.shared.launcher.sleep(&plan).await {
            tracing::warn!(pod = %self.key(), "requests will not wake the pod: {e}", e = podvisor_errors::ErrorChain(&e));
            message.push_str(&format!(
                "; requests do not wake it (exec, logs -f and podvisor wake do): {e}",
                e = podvisor_errors::chain(&e)
            ));
        }
        self.hibernation = Some(HibernationStatus {
            asleep: true,
            since,
            reason: if by_policy { "Idle" } else { "Hibernated" }.into(),
            message: message.clone(),
        });
        self.publish(&Stage::Hibernated);
        Ok(format!("pod {} hibernated: {message}", self.key()))
    }

    /// At start-up, the record says the pod sleeps: its network waits for
    /// a request again (or, if it cannot, the pod wakes now).
    pub(super) async fn still_hibernated(&mut self) -> Stage {
        let Some(h) = self.record.hibernated.clone() else {
            return Stage::NeedVm(Instant::now());
        };
        if let Ok(dir) = self.shared.state.snapshot_dir(&self.record.plan.uid) {
            remove_snapshots_except(&dir, Some(&h.snapshot));
        }
        if self.record.deleting {
            return Stage::Finished;
        }
        match self.shared.launcher.sleep(&self.record.plan).await {
            Ok(()) => {
                tracing::info!(pod = %self.key(), "the pod sleeps (hibernated)");
                Stage::Hibernated
            }
            Err(e) => {
                tracing::warn!(pod = %self.key(), "requests cannot wake the pod; waking it now: {e}", e = podvisor_errors::ErrorChain(&e));
                self.wake("a restart of the host daemon").await.0
            }
        }
    }

    /// The pod sleeps: waits for a request, a command or a log follower.
    /// Returns the next stage (`None`: the task ends).
    pub(super) async fn sleep(&mut self) -> Option<Stage> {
        let plan = self.record.plan.clone();
        let launcher = self.shared.launcher.clone();
        loop {
            tokio::select! {
                asked = launcher.requested(&plan) => {
                    if let Err(e) = asked {
                        tracing::warn!(pod = %self.key(), "{e}", e = podvisor_errors::ErrorChain(&e));
                    }
                    return Some(self.wake("a request").await.0);
                }
                cmd = self.commands.recv() => match cmd {
                    None => return None,
                    Some(PodCommand::Detach { done }) => {
                        launcher.forget_sleep(&plan);
                        let _ = done.send(());
                        return None;
                    }
                    Some(PodCommand::Delete { done, .. }) => {
                        tracing::info!(pod = %self.key(), "deleting a hibernated pod");
                        self.record.deleting = true;
                        self.save();
                        launcher.forget_sleep(&plan);
                        // The snapshot is in the pod's directory; the
                        // server forgets the key with the pod.
                        self.remove_files().await;
                        let _ = done.send(());
                        return None;
                    }
                    Some(PodCommand::Exec { request, reply }) => {
                        self.pending_execs.push((request, reply));
                        return Some(self.wake("an exec").await.0);
                    }
                    Some(PodCommand::Wake { reply }) => {
                        let cause = if reply.is_some() { "podvisor wake" } else { "a log follower" };
                        let (stage, result) = self.wake(cause).await;
                        if let Some(reply) = reply {
                            let _ = reply.send(result);
                        }
                        return Some(stage);
                    }
                    Some(PodCommand::Hibernate { reply }) => {
                        let _ = reply.send(Ok(format!("pod {} is already hibernated", self.key())));
                    }
                    Some(PodCommand::CloseVolume { name, reply }) => {
                        // Its key was wiped before the save; the wake asks
                        // the server, which refuses a revoked volume.
                        let _ = reply.send(Ok(format!(
                            "pod {} is hibernated: volume {name} is not open",
                            self.key()
                        )));
                    }
                },
            }
        }
    }

    /// Wakes the pod (`cause` says why): its VM back from the snapshot, or
    /// a cold restart if that fails. The snapshot and its key are gone
    /// either way. Returns the next stage and what to answer.
    pub(super) async fn wake(&mut self, cause: &str) -> (Stage, Result<String, RuntimeError>) {
        let Some(h) = self.record.hibernated.clone() else {
            return (
                self.after_vm(),
                Ok(format!("pod {} is not hibernated", self.key())),
            );
        };
        let plan = self.record.plan.clone();
        let started = Instant::now();
        let timeout = self.shared.cfg.wake_timeout;
        let keys = self.shared.keys.clone();
        let launcher = self.shared.launcher.clone();
        let woken = tokio::time::timeout(timeout, async {
            let keys =
                keys.ok_or_else(|| "no management server keeps the snapshot's key".to_string())?;
            // A server that cannot be reached is asked again until the
            // deadline (its pod's memory is at stake); a no is final.
            let mut delay = Duration::from_millis(100);
            let key = loop {
                match keys.get(&plan, &h.snapshot.id).await {
                    Ok(key) => break key,
                    Err(e) if e.retryable => {
                        tracing::warn!(pod = %plan.key(), "asking again: {e}", e = podvisor_errors::ErrorChain(&e));
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => return Err(podvisor_errors::chain(&e)),
                }
            };
            tracing::debug!(pod = %plan.key(), elapsed = ?started.elapsed(), "wake: key given back");
            launcher
                .wake(&plan, &h, &key, timeout)
                .await
                .map_err(|e| podvisor_errors::chain(&e))
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the wake took longer than its deadline of {} s",
                timeout.as_secs_f64()
            ))
        });
        self.record.hibernated = None;
        let asleep = h
            .since
            .elapsed()
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or_else(|_| "a while".into());
        match woken {
            Ok((mut vm, process)) => {
                let message = format!(
                    "woken by {cause} in {:.2} s after {asleep} asleep",
                    started.elapsed().as_secs_f64()
                );
                tracing::info!(pod = %self.key(), "{message}");
                self.record.vm = Some(VmRecord {
                    vm_id: plan.vm_id(),
                    process,
                    booted_at: h.booted_at,
                    containers: h.containers,
                    disks: h.disks,
                    pmem: h.pmem,
                    encrypted: h.encrypted.clone(),
                    open_volumes: vec![],
                });
                // The guest wiped its volume keys before the save: ask again.
                self.volume_keys = super::pod_volumes::VolumeKeys::new(h.encrypted, vec![]);
                self.begin_key_flow();
                self.hibernation = Some(HibernationStatus {
                    asleep: false,
                    since: SystemTime::now(),
                    reason: "Woken".into(),
                    message: message.clone(),
                });
                self.activity = hibernation::Activity::new();
                // The record names the running VM before the snapshot goes.
                self.save();
                self.forget_snapshot(&h.snapshot);
                // What runs in the VM now, as after an adoption.
                if let Err(e) = vm.send(&HostMessage::ListProcesses).await {
                    return (
                        self.vm_stopped(vm, e),
                        Err(RuntimeError::Conflict(format!(
                            "pod {} stopped right after it woke",
                            self.key()
                        ))),
                    );
                }
                (Stage::Up(vm), Ok(format!("pod {} {message}", self.key())))
            }
            Err(e) => {
                launcher.forget_sleep(&plan);
                let why = format!(
                    "the pod could not be woken from its snapshot, so it starts again from scratch: {e}"
                );
                tracing::warn!(pod = %self.key(), "{why}");
                self.hibernation = Some(HibernationStatus {
                    asleep: false,
                    since: SystemTime::now(),
                    reason: "WakeFailed".into(),
                    message: why.clone(),
                });
                self.vm_lost(why.clone(), None);
                self.save();
                self.forget_snapshot(&h.snapshot);
                for (_, reply) in self.pending_execs.drain(..) {
                    let _ = reply.send(Err(RuntimeError::Conflict(why.clone())));
                }
                (
                    self.after_vm(),
                    Err(RuntimeError::Conflict(format!("pod {}: {why}", self.key()))),
                )
            }
        }
    }
}

impl PodTask {
    /// Removes the snapshot (woken from, or given up) and has the server
    /// forget its key.
    fn forget_snapshot(&self, snapshot: &Snapshot) {
        if let Err(e) = podvisor_hibernate::pod::remove(snapshot) {
            tracing::warn!(pod = %self.key(), "cannot remove the snapshot: {e}");
        }
        if let Some(keys) = self.shared.keys.clone() {
            let (plan, key) = (self.record.plan.clone(), self.key());
            tokio::spawn(async move {
                if let Err(e) = keys.delete(&plan).await {
                    tracing::warn!(pod = %key, "{e}", e = podvisor_errors::ErrorChain(&e));
                }
            });
        }
    }
}

/// A hibernation's error as the runtime reports it.
fn hibernate_error(e: HibernateError) -> RuntimeError {
    match e {
        HibernateError::Unsupported(why) => RuntimeError::NotImplemented(why.into()),
        other => RuntimeError::Hibernate(Box::new(other)),
    }
}

/// Removes the snapshot files in `dir` other than `keep`'s (left by a
/// daemon that died while saving, or a wake that could not remove them).
fn remove_snapshots_except(dir: &std::path::Path, keep: Option<&Snapshot>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if keep.is_some_and(|k| k.path == path) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed a snapshot no record names"),
            Err(e) => tracing::warn!(path = %path.display(), "cannot remove a stray snapshot: {e}"),
        }
    }
}
