//! Makes this host run what the server assigns to it: pods to start, pods
//! to stop (deleted, or no longer assigned here), and their statuses back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podvisor_api::client::PodEvent;
use podvisor_api::{Client, Pod, PodPhase};

use super::convert::{plan_from_pod, status_from_state, unrunnable_status};
use super::reporter::{Report, ReportQueue};
use crate::host::{PodRuntime, PodState};

/// The daemon's view of its pods.
pub(super) struct Reconciler {
    client: Client,
    runtime: Arc<PodRuntime>,
    host_ip: Option<String>,
    reports: ReportQueue,
    /// uid → (namespace, name) of every pod the server assigned here.
    assigned: HashMap<String, (String, String)>,
    /// Pods being stopped (uids).
    deleting: Arc<Mutex<HashSet<String>>>,
    /// Pods reported as unrunnable, not to report again.
    answered: HashSet<String>,
}

impl Reconciler {
    pub(super) fn new(
        client: Client,
        runtime: Arc<PodRuntime>,
        host_ip: Option<String>,
        reports: ReportQueue,
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
        for (plan, state) in self.runtime.pods() {
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
        let rt = self.runtime.clone();
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
                    tracing::error!(pod = %pod.key(), "cannot run the pod: {e}", e = podvisor_errors::ErrorChain(&e));
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
        self.reports.send(Report {
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
            runtime.delete(&uid, None).await;
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
                tracing::warn!(pod = %format!("{namespace}/{name}"), "finalizing: {e}; retrying", e = podvisor_errors::ErrorChain(&e));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake_sandbox::next_vm;
    use crate::host::tests::fake_runtime;

    fn pod(name: &str, uid: &str) -> Pod {
        let yaml = format!(
            "metadata: {{name: {name}}}\nspec:\n  containers:\n  - {{name: app, image: busybox, command: [sleep, '1000']}}\n"
        );
        let mut pod = podvisor_api::parse_pod(&yaml, podvisor_api::Format::Yaml).unwrap();
        pod.metadata.uid = Some(uid.into());
        pod
    }

    #[tokio::test]
    async fn reconcile_runs_assigned_pods_reports_them_and_stops_those_no_longer_assigned() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, mut vms, mut changes) = fake_runtime(dir.path());
        // No server: nothing here may call it.
        let client = Client::new("http://127.0.0.1:9", None).unwrap();
        let reported = ReportQueue::default();
        let mut reconciler = Reconciler::new(
            client,
            rt.clone(),
            Some("10.0.0.1".into()),
            reported.clone(),
        );

        reconciler.synced(vec![pod("web", "u-web"), pod("db", "u-db")]);
        // Which VM is whose: the containers' hostname is the pod's name.
        let (mut web, mut db) = (next_vm(&mut vms).await, next_vm(&mut vms).await);
        let hostname = |msg| match msg {
            podvisor_proto::HostMessage::StartContainer(spec) => spec.hostname,
            other => panic!("{other:?}"),
        };
        if hostname(web.next_sent().await) == "db" {
            std::mem::swap(&mut web, &mut db);
            assert_eq!(hostname(web.next_sent().await), "web");
        } else {
            assert_eq!(hostname(db.next_sent().await), "db");
        }
        let mut uids: Vec<String> = rt.pods().into_iter().map(|(p, _)| p.uid).collect();
        uids.sort();
        assert_eq!(uids, ["u-db", "u-web"]);

        // State changes of assigned pods go to the server.
        reported.take_all();
        let (uid, state) = changes.recv().await.unwrap();
        reconciler.state_changed(&uid, &state);
        let report = reported.take_all().remove(&uid).unwrap();
        assert_eq!(report.uid, uid);
        assert_eq!(report.namespace, "default");
        assert_eq!(report.status.host_ip.as_deref(), Some("10.0.0.1"));

        // `db` is no longer assigned here: it is stopped; `web` runs on.
        reconciler.synced(vec![pod("web", "u-web")]);
        assert!(matches!(
            db.ended().await,
            crate::host::fake_sandbox::Ending::Shutdown(_)
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rt.pods().len() != 1 {
            assert!(std::time::Instant::now() < deadline, "{:?}", rt.pods());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(rt.pods()[0].0.uid, "u-web");
        assert!(web.ending.try_recv().is_err(), "web still runs");
        // A stopped pod's state changes are not reported.
        reported.take_all();
        let db_state = crate::host::PodState::default();
        reconciler.state_changed("u-db", &db_state);
        assert!(reported.take_all().is_empty());
    }
}
