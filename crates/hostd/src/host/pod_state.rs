//! A pod task's state: what it publishes (to the runtime's watchers and
//! the daemon's change feed) and persists in the pod's record.

use super::pod_task::{PodTask, Stage};
use super::status::{PodPhase, PodState, running_phase};

impl PodTask {
    /// The pod's state now, for `stage`.
    fn state(&self, phase: PodPhase) -> PodState {
        let (reason, message) = match &self.vm_problem {
            Some((r, m)) => (Some(*r), Some(m.clone())),
            None => (None, None),
        };
        PodState {
            phase,
            reason,
            message,
            started_at: self.record.state.started_at,
            containers: self.slots.iter().map(|s| s.track.status.clone()).collect(),
            pod_ips: self.shared.launcher.pod_ips(&self.record.plan.uid),
            hibernation: self.hibernation.clone(),
        }
    }

    fn running_phase(&self) -> PodPhase {
        running_phase(self.slots.iter().map(|s| &s.track))
    }

    pub(super) fn publish(&mut self, stage: &Stage) {
        let phase = match stage {
            Stage::NeedVm(_) => PodPhase::Pending,
            Stage::Up(_) | Stage::Hibernated => self.running_phase(),
            Stage::Finished => match self.running_phase() {
                PodPhase::Running => PodPhase::Failed,
                p => p,
            },
        };
        self.set_state(self.state(phase));
    }

    pub(super) fn publish_up(&mut self) {
        self.set_state(self.state(self.running_phase()));
    }

    fn set_state(&mut self, state: PodState) {
        if *self.state_tx.borrow() == state && self.record.state == state {
            return;
        }
        self.record.state = state.clone();
        self.state_tx.send_replace(state.clone());
        self.shared
            .changes
            .send(self.record.plan.uid.clone(), state);
        self.save();
    }

    pub(super) fn save(&self) {
        if let Err(e) = self.shared.state.save(&self.record) {
            tracing::error!(pod = %self.key(), "cannot save the pod record: {e}", e = podvisor_errors::ErrorChain(&e));
        }
    }

    /// The pod is deleted: removes its network, releases its layers in the
    /// catalog and removes its record and logs.
    pub(super) async fn remove_files(&self) {
        self.shared.launcher.finished(&self.record.plan).await;
        self.shared.launcher.release(&self.record.holds).await;
        if let Err(e) = self.shared.state.remove(&self.record.plan.uid) {
            tracing::warn!(pod = %self.key(), "{e}", e = podvisor_errors::ErrorChain(&e));
        }
    }
}
