//! Makes this host run what the server assigns to it: pods to start, pods
//! to stop (deleted, or no longer assigned here), and their statuses back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use podvisor_api::client::PodEvent;
use podvisor_api::{Client, Pod, PodPhase};
use tokio::sync::mpsc;

use super::convert::{acknowledged_status, plan_from_pod, status_from_state, unrunnable_status};
use super::reporter::Report;
use crate::host::{PodRuntime, PodState};

/// The daemon's view of its pods.
pub(super) struct Reconciler {
    client: Client,
    /// `None` in `ack-without-vm` mode.
    runtime: Option<Arc<PodRuntime>>,
    host_ip: Option<String>,
    reports: mpsc::UnboundedSender<Report>,
    /// uid → (namespace, name) of every pod the server assigned here.
    assigned: HashMap<String, (String, String)>,
    /// Pods being stopped (uids).
    deleting: Arc<Mutex<HashSet<String>>>,
    /// Pods reported as unrunnable or acknowledged, not to report again.
    answered: HashSet<String>,
}

impl Reconciler {
    pub(super) fn new(
        client: Client,
        runtime: Option<Arc<PodRuntime>>,
        host_ip: Option<String>,
        reports: mpsc::UnboundedSender<Report>,
    ) -> Self {
        Self {
            client,
            runtime,
            host_ip,
            reports,
            assigned: HashMap::new(),
            deleting: Arc::new(Mutex::new(HashSet::new())),
            answered: HashSet::new(),
        }
    }

    /// The full set of this host's pods (at start, or after the server
    /// lost the watch history): run what is new, stop what is gone, and
    /// report every pod's current state (the server may have marked them
    /// Unknown while this daemon was away).
    pub(super) fn synced(&mut self, pods: Vec<Pod>) {
        let listed: HashSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        for pod in &pods {
            self.pod(pod);
        }
        if let Some(rt) = self.runtime.clone() {
            for (plan, state) in rt.pods() {
                if !listed.contains(&plan.uid) {
                    self.stop(
                        plan.uid.clone(),
                        plan.namespace.clone(),
                        plan.name.clone(),
                        false,
                    );
                } else {
                    self.state_changed(&plan.uid, &state);
                }
            }
        }
        self.assigned.retain(|uid, _| listed.contains(uid));
        self.answered.retain(|uid| listed.contains(uid));
    }

    /// One change from the watch.
    pub(super) fn changed(&mut self, event: PodEvent) {
        match event {
            PodEvent::Added(pod) | PodEvent::Modified(pod) => self.pod(&pod),
            PodEvent::Deleted(pod) => {
                if let Some(uid) = pod.metadata.uid.clone() {
                    self.assigned.remove(&uid);
                    self.answered.remove(&uid);
                    let ns = pod.metadata.namespace().to_string();
                    self.stop(uid, ns, pod.metadata.name.clone(), false);
                }
            }
        }
    }

    fn pod(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let ns = pod.metadata.namespace().to_string();
        let name = pod.metadata.name.clone();
        if pod.metadata.deletion_timestamp.is_some() {
            self.stop(uid, ns, name, true);
            return;
        }
        self.assigned
            .insert(uid.clone(), (ns.clone(), name.clone()));
        let Some(rt) = self.runtime.clone() else {
            if self.answered.insert(uid.clone()) {
                let status = acknowledged_status(pod, SystemTime::now(), self.host_ip.as_deref());
                self.report(uid, ns, name, status);
            }
            return;
        };
        let known = rt.pods().into_iter().find(|(p, _)| p.uid == uid);
        if let Some((_, state)) = known {
            // The server marked the pod Unknown while this host could not
            // reach it (its lease expired): report what it really is.
            if pod.status.phase == PodPhase::Unknown {
                self.state_changed(&uid, &state);
            }
            return;
        }
        // A pod that has finished and that this host no longer has records
        // of is not run again.
        if pod.status.phase.is_terminal() || self.answered.contains(&uid) {
            return;
        }
        match plan_from_pod(pod) {
            Ok(plan) => {
                if let Err(e) = rt.run(plan) {
                    tracing::error!(pod = %pod.key(), "cannot run the pod: {e}");
                }
            }
            Err(problem) => {
                tracing::warn!(pod = %pod.key(), "{problem}");
                self.answered.insert(uid.clone());
                let status = unrunnable_status(&problem, self.host_ip.as_deref());
                self.report(uid, ns, name, status);
            }
        }
    }

    /// A pod's state changed in the runtime.
    pub(super) fn state_changed(&mut self, uid: &str, state: &PodState) {
        if self.deleting.lock().unwrap().contains(uid) {
            return;
        }
        let Some((ns, name)) = self.assigned.get(uid).cloned() else {
            return;
        };
        let status = status_from_state(state, self.host_ip.as_deref());
        self.report(uid.to_string(), ns, name, status);
    }

    fn report(
        &self,
        uid: String,
        namespace: String,
        name: String,
        status: podvisor_api::PodStatus,
    ) {
        let _ = self.reports.send(Report {
            uid,
            namespace,
            name,
            status,
        });
    }

    /// Stops pod `uid` here (if it runs) and, with `finalize`, then tells
    /// the server it may remove the object.
    fn stop(&mut self, uid: String, namespace: String, name: String, finalize: bool) {
        if !self.deleting.lock().unwrap().insert(uid.clone()) {
            return;
        }
        self.assigned.remove(&uid);
        let (runtime, client, deleting) = (
            self.runtime.clone(),
            self.client.clone(),
            self.deleting.clone(),
        );
        tokio::spawn(async move {
            if let Some(rt) = runtime {
                rt.delete(&uid, None).await;
            }
            if finalize {
                finalize_pod(&client, &namespace, &name).await;
            }
            deleting.lock().unwrap().remove(&uid);
        });
    }
}

/// Tells the server a deleted pod is stopped here, retrying while the
/// server cannot be reached.
async fn finalize_pod(client: &Client, namespace: &str, name: &str) {
    let mut delay = Duration::from_millis(200);
    for _ in 0..30 {
        match client.finalize_pod(namespace, name).await {
            Ok(()) => return,
            Err(e) if e.is_not_found() => return,
            Err(e) => {
                tracing::warn!(pod = %format!("{namespace}/{name}"), "finalizing: {e}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
