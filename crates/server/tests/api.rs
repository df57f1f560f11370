//! The server's API end to end over HTTP, on SQLite and on a real etcd:
//! pods, hosts, tokens, scheduling, watches, deletion, host liveness.

mod common;

use std::time::Duration;

use common::{TestServer, pod, pod_where};
use podvisor_api::client::{PodEvent, PodFeedEvent};
use podvisor_api::{
    ContainerState, ContainerStateWaiting, ContainerStatus, HostKsm, HostReport, PodFilter,
    PodPhase, PodStatus,
};
use podvisor_server::Role;
use podvisor_testbed::etcd::EtcdServer;

const GI: u64 = 1 << 30;

/// The life of pods on hosts, as users and host daemons see it.
async fn pods_on_hosts(ts: &TestServer) {
    let user = ts.client(Role::User, "alice").await;

    // No host yet: the pod stays Pending and says why.
    user.create_pod(&pod("first", "1", "256Mi")).await.unwrap();
    let first = pod_where(&user, "first", "first to be unschedulable", |p| {
        p.status.reason.as_deref() == Some("Unschedulable")
    })
    .await;
    assert_eq!(first.status.phase, PodPhase::Pending);
    assert_eq!(
        first.status.message.as_deref(),
        Some("0/0 hosts have room: no host is registered")
    );

    // A host registers (and heartbeats): the pod is assigned to it.
    let h1 = ts.host("h1", 2000, GI).await;
    let h1_beats = heartbeat(&h1, "h1");
    let first = pod_where(&user, "first", "first to be scheduled", |p| {
        p.spec.node_name.is_some()
    })
    .await;
    assert_eq!(first.spec.node_name.as_deref(), Some("h1"));
    assert_eq!(
        first.status.reason, None,
        "the Unschedulable reason is cleared"
    );

    // A pod bigger than what is left stays Pending with the reason per host.
    user.create_pod(&pod("big", "2", "128Mi")).await.unwrap();
    let big = pod_where(&user, "big", "big to be unschedulable", |p| {
        p.status.reason.as_deref() == Some("Unschedulable")
    })
    .await;
    assert_eq!(
        big.status.message.as_deref(),
        Some("0/1 hosts have room: h1: not enough cpu (needs 2, 1 free of 2)")
    );
    assert_eq!(big.display_status(), "Unschedulable");

    // Host tokens may only do host things; other hosts may not report
    // for h1's pods.
    let err = h1
        .create_pod(&pod("sneaky", "1", "64Mi"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(403), "{err}");
    assert!(
        err.to_string()
            .contains("the token of host \"h1\" may only"),
        "{err}"
    );
    let h2 = ts.host("h2", 2000, GI).await;
    let _h2_beats = heartbeat(&h2, "h2");
    let running = PodStatus {
        phase: PodPhase::Running,
        container_statuses: vec![ContainerStatus {
            name: "main".into(),
            image: "registry.local/busybox:1".into(),
            ready: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = h2
        .update_pod_status("default", "first", &running)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(403), "{err}");
    assert!(
        err.to_string().contains("only host \"h1\" may do this"),
        "{err}"
    );

    // h2 has room for big.
    let big = pod_where(&user, "big", "big to be scheduled on h2", |p| {
        p.spec.node_name.is_some()
    })
    .await;
    assert_eq!(big.spec.node_name.as_deref(), Some("h2"));

    // h1 reports its pod running.
    h1.update_pod_status("default", "first", &running)
        .await
        .unwrap();
    let first = user.get_pod("default", "first").await.unwrap();
    assert_eq!(first.status.phase, PodPhase::Running);
    assert_eq!(first.ready_count(), (1, 1));

    // A host watches its pods: a new pod assigned to it arrives as ADDED.
    let mut watch = h1
        .watch_pods(&PodFilter::on_host("h1"), Some(first.metadata.revision()))
        .await
        .unwrap();
    user.create_pod(&pod("second", "500m", "64Mi"))
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an event for the new pod")
        .unwrap()
        .unwrap();
    match &event {
        PodEvent::Added(p) => assert_eq!(p.metadata.name, "second"),
        other => panic!("expected ADDED second, got {other:?}"),
    }

    // An image that does not exist: the host reports the pull error, and
    // users see it.
    let pull_error = PodStatus {
        phase: PodPhase::Pending,
        container_statuses: vec![ContainerStatus {
            name: "main".into(),
            image: "registry.local/busybox:1".into(),
            state: ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: "ErrImagePull".into(),
                    message: Some("manifest unknown: registry.local/nope:1".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        }],
        ..Default::default()
    };
    h1.update_pod_status("default", "second", &pull_error)
        .await
        .unwrap();
    let second = user.get_pod("default", "second").await.unwrap();
    assert_eq!(second.display_status(), "ErrImagePull");
    let waiting = second.status.container_statuses[0]
        .state
        .waiting
        .as_ref()
        .unwrap();
    assert_eq!(
        waiting.message.as_deref(),
        Some("manifest unknown: registry.local/nope:1")
    );

    // Deleting a pod on a live host: marked, the host stops it and
    // finalizes, then it is gone.
    let marked = user
        .delete_pod("default", "first")
        .await
        .unwrap()
        .expect("still there");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(marked.display_status(), "Terminating");
    let err = user.finalize_pod("default", "first").await.unwrap_err();
    assert_eq!(err.code(), Some(403), "only the host finalizes: {err}");
    let mut saw_marked = false;
    while let Ok(Some(Ok(event))) =
        tokio::time::timeout(Duration::from_secs(10), watch.next()).await
    {
        if let PodEvent::Modified(p) = &event
            && p.metadata.name == "first"
            && p.metadata.deletion_timestamp.is_some()
        {
            saw_marked = true;
            break;
        }
    }
    assert!(saw_marked, "h1's watch sees the deletion mark");
    h1.finalize_pod("default", "first").await.unwrap();
    assert!(
        user.get_pod("default", "first")
            .await
            .unwrap_err()
            .is_not_found()
    );
    let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match &event {
        PodEvent::Deleted(p) => {
            assert_eq!(p.metadata.name, "first");
            assert!(p.metadata.revision() > marked.metadata.revision());
        }
        other => panic!("expected DELETED first, got {other:?}"),
    }

    // h1 stops heartbeating (h2 goes on): h1 becomes NotReady and its pods
    // Unknown/NodeLost.
    h1_beats.abort();
    let lost = pod_where(&user, "second", "second to be NodeLost", |p| {
        p.status.phase == PodPhase::Unknown
    })
    .await;
    assert_eq!(lost.status.reason.as_deref(), Some("NodeLost"));
    let host = user.get_host("h1").await.unwrap();
    assert!(!host.status.ready);
    assert_eq!(host.status.reason.as_deref(), Some("HeartbeatLeaseExpired"));
    let big = user.get_pod("default", "big").await.unwrap();
    assert_ne!(
        big.status.phase,
        PodPhase::Unknown,
        "h2's pods are not affected"
    );
    assert!(user.get_host("h2").await.unwrap().status.ready);

    // A pod on a NotReady host is removed at once.
    assert_eq!(user.delete_pod("default", "second").await.unwrap(), None);
    assert!(
        user.get_pod("default", "second")
            .await
            .unwrap_err()
            .is_not_found()
    );

    // h1 comes back.
    let back = h1.heartbeat("h1").await.unwrap();
    assert!(back.status.ready);
    assert_eq!(back.status.lease_duration_seconds, Some(2));
}

/// Heartbeats as a host daemon does (every third of the 2 s TTL), until
/// aborted.
fn heartbeat(client: &podvisor_api::Client, name: &'static str) -> AbortOnDrop {
    let client = client.clone();
    AbortOnDrop(tokio::spawn(async move {
        loop {
            let _ = client.heartbeat(name).await;
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    fn abort(&self) {
        self.0.abort();
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_hosts_sqlite() {
    let ts = TestServer::sqlite().await;
    pods_on_hosts(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_hosts_etcd() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap();
    let ts = TestServer::start(Some(etcd.url()), |_| {}).await;
    pods_on_hosts(&ts).await;
}

/// What a host reports with its heartbeat (KSM) is kept in its status
/// for users to read, until a report says otherwise; a heartbeat without
/// one keeps it, and a report the server cannot read is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_report_is_kept_in_its_status() {
    let ts = TestServer::sqlite().await;
    let user = ts.client(Role::User, "alice").await;
    let h1 = ts.host("h1", 2000, GI).await;
    assert_eq!(user.get_host("h1").await.unwrap().status.ksm, None);
    let ksm = HostKsm {
        enabled: true,
        pages_shared: 10,
        pages_sharing: 250,
        pages_unshared: 3,
        full_scans: 2,
        zero_pages: None,
        saved_bytes: 250 * 4096,
        profit_bytes: Some(1000),
        ksmd_cpu_seconds: Some(0.5),
        pages_to_scan: 1000,
        sleep_millisecs: 20,
    };
    let report = HostReport {
        ksm: Some(ksm.clone()),
    };
    let back = h1.heartbeat_with_report("h1", &report).await.unwrap();
    assert_eq!(back.status.ksm.as_ref(), Some(&ksm));
    assert!(back.status.ready);
    assert_eq!(
        user.get_host("h1").await.unwrap().status.ksm.as_ref(),
        Some(&ksm)
    );
    // The JSON users get names the fields in camelCase.
    let json = serde_json::to_value(user.get_host("h1").await.unwrap()).unwrap();
    assert_eq!(json["status"]["ksm"]["pagesSharing"], 250);
    assert_eq!(json["status"]["ksm"]["ksmdCpuSeconds"], 0.5);
    assert_eq!(json["status"]["ksm"]["savedBytes"], 250 * 4096);

    h1.heartbeat("h1").await.unwrap();
    assert_eq!(
        user.get_host("h1").await.unwrap().status.ksm.as_ref(),
        Some(&ksm),
        "a heartbeat without a report keeps the last one"
    );
    h1.heartbeat_with_report("h1", &HostReport::default())
        .await
        .unwrap();
    assert_eq!(user.get_host("h1").await.unwrap().status.ksm, None);

    let resp = reqwest::Client::new()
        .put(format!("{}/api/v1/hosts/h1/heartbeat", ts.url()))
        .bearer_auth(ts.token_of(Role::Host, "h1").await)
        .body(r#"{"ksm": {"enabled": "yes"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: podvisor_api::Status = resp.json().await.unwrap();
    assert!(body.message.contains("ksm.enabled"), "{}", body.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let ts = TestServer::sqlite().await;
    let http = reqwest::Client::new();
    let pods_url = format!("{}/api/v1/namespaces/default/pods", ts.url());
    let send = |body: &'static str, content_type: &'static str, token: Option<String>| {
        let mut req = http
            .post(&pods_url)
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let status = |resp: reqwest::Response| async move {
        let code = resp.status().as_u16();
        let body: podvisor_api::Status = resp.json().await.unwrap();
        assert_eq!(body.kind, "Status");
        assert_eq!(body.code, code);
        (code, body.message)
    };
    let admin = Some(ts.admin_token.clone());

    // No token, a bad token.
    let (code, msg) = status(send("{}", "application/json", None).await.unwrap()).await;
    assert_eq!(code, 401);
    assert!(msg.contains("no Authorization header"), "{msg}");
    let (code, msg) = status(
        send("{}", "application/json", Some("pv_nope".into()))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 401);
    assert!(
        msg.contains("the bearer token is not valid on this server"),
        "{msg}"
    );

    // Invalid YAML: the line is named.
    let (code, msg) = status(
        send(
            "metadata:\n  name: x\nspec: [\n",
            "application/yaml",
            admin.clone(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(code, 400);
    assert!(msg.contains("line"), "{msg}");

    // A field podvisor does not support: its path is named.
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: web\n    image: busybox\n    livenessProbe:\n      exec: {command: [\"true\"]}\n";
    let (code, msg) = status(send(yaml, "application/yaml", admin.clone()).await.unwrap()).await;
    assert_eq!(code, 400);
    assert!(
        msg.starts_with("spec.containers[0].livenessProbe: not supported by podvisor"),
        "{msg}"
    );

    // Invalid values: every problem, each with its field.
    let yaml = "metadata:\n  name: Web\nspec:\n  containers:\n  - name: web\n    image: ''\n    resources:\n      limits: {memory: 12Zi}\n";
    let (code, msg) = status(send(yaml, "application/yaml", admin.clone()).await.unwrap()).await;
    assert_eq!(code, 422);
    assert!(
        msg.contains("metadata.name: \"Web\" is not a valid name"),
        "{msg}"
    );
    assert!(
        msg.contains("spec.containers[0].image: must not be empty"),
        "{msg}"
    );
    assert!(
        msg.contains("spec.containers[0].resources.limits.memory: memory quantity \"12Zi\""),
        "{msg}"
    );

    // A valid YAML pod is accepted; the same name again is a conflict.
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: {app: web}\nspec:\n  containers:\n  - name: web\n    image: busybox\n";
    let (code, _) = (
        send(yaml, "application/yaml", admin.clone())
            .await
            .unwrap()
            .status()
            .as_u16(),
        (),
    );
    assert_eq!(code, 201);
    let (code, msg) = status(send(yaml, "application/yaml", admin.clone()).await.unwrap()).await;
    assert_eq!(code, 409);
    assert!(
        msg.contains("pod \"web\" already exists in namespace \"default\""),
        "{msg}"
    );

    // Unknown paths and selectors.
    let resp = http
        .get(format!("{}/api/v2/pods", ts.url()))
        .send()
        .await
        .unwrap();
    let (code, msg) = status(resp).await;
    assert_eq!(code, 404);
    assert!(msg.contains("no API path /api/v2/pods"), "{msg}");
    // Lists say what they are, as Kubernetes' do.
    let pods = ts.admin.list_pods(&PodFilter::all()).await.unwrap();
    assert_eq!(
        (pods.api_version.as_str(), pods.kind.as_str()),
        ("v1", "PodList")
    );
    let hosts = ts.admin.list_hosts().await.unwrap();
    assert_eq!(
        (hosts.api_version.as_str(), hosts.kind.as_str()),
        ("v1", "HostList")
    );
    let resp = http
        .get(format!(
            "{}/api/v1/pods?fieldSelector=status.phase=Running",
            ts.url()
        ))
        .bearer_auth(&ts.admin_token)
        .send()
        .await
        .unwrap();
    let (code, msg) = status(resp).await;
    assert_eq!(code, 400);
    assert!(
        msg.contains("fieldSelector \"status.phase=Running\" is not supported"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_updates_labels_and_refuses_spec_changes() {
    let ts = TestServer::sqlite().await;
    let user = ts.client(Role::User, "bob").await;
    let outcome = |resp: &reqwest::Response| {
        resp.headers()
            .get("x-podvisor-apply")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let http = reqwest::Client::new();
    let put = |pod: &podvisor_api::Pod| {
        http.put(format!(
            "{}/api/v1/namespaces/default/pods/{}",
            ts.url(),
            pod.metadata.name
        ))
        .bearer_auth(&ts.admin_token)
        .json(pod)
        .send()
    };
    let mut p = pod("web", "1", "128Mi");
    let resp = put(&p).await.unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(outcome(&resp).as_deref(), Some("created"));
    let resp = put(&p).await.unwrap();
    assert_eq!(
        (resp.status().as_u16(), outcome(&resp).as_deref()),
        (200, Some("unchanged"))
    );

    // Unscheduled: the spec may still change.
    p.spec.containers[0].image = "registry.local/busybox:2".into();
    let resp = put(&p).await.unwrap();
    assert_eq!(outcome(&resp).as_deref(), Some("configured"));

    let _h = ts.host("h1", 4000, 4 * GI).await;
    let _beats = heartbeat(&_h, "h1");
    pod_where(&user, "web", "web to be scheduled", |p| {
        p.spec.node_name.is_some()
    })
    .await;
    p.metadata.labels.insert("tier".into(), "front".into());
    let resp = put(&p).await.unwrap();
    assert_eq!(outcome(&resp).as_deref(), Some("configured"));
    let got = user.get_pod("default", "web").await.unwrap();
    assert_eq!(
        got.metadata.labels.get("tier").map(String::as_str),
        Some("front")
    );
    assert_eq!(
        got.spec.node_name.as_deref(),
        Some("h1"),
        "apply keeps the assignment"
    );

    p.spec.containers[0].image = "registry.local/busybox:3".into();
    let resp = put(&p).await.unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let status: podvisor_api::Status = resp.json().await.unwrap();
    assert!(
        status.message.contains("pod spec is immutable")
            && status.message.contains("spec.containers[0].image"),
        "{}",
        status.message
    );

    // A stale resourceVersion is a conflict.
    let mut stale = got.clone();
    stale.metadata.resource_version = Some("1".into());
    stale.metadata.labels.insert("x".into(), "y".into());
    let resp = put(&stale).await.unwrap();
    assert_eq!(resp.status().as_u16(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_resume_and_too_old_revisions_relist() {
    // Keep only 5 changes so that an old revision is really gone.
    let ts = TestServer::start(None, |c| c.watch_history = 5).await;
    let user = ts.client(Role::User, "carol").await;
    let start = user
        .list_pods(&PodFilter::all())
        .await
        .unwrap()
        .metadata
        .revision();
    for i in 0..3 {
        user.create_pod(&pod(&format!("p{i}"), "1", "64Mi"))
            .await
            .unwrap();
    }
    // Resuming from a kept revision yields exactly what came after.
    let mut watch = user
        .watch_pods(&PodFilter::all(), Some(start))
        .await
        .unwrap();
    let mut names = Vec::new();
    while names.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let PodEvent::Added(p) = event {
            names.push(p.metadata.name.clone());
        }
    }
    assert_eq!(names, ["p0", "p1", "p2"]);

    // More changes than kept: a watch from the start is Gone (410), and the
    // feed lists again.
    for i in 3..12 {
        user.create_pod(&pod(&format!("p{i}"), "1", "64Mi"))
            .await
            .unwrap();
    }
    let err = match user.watch_pods(&PodFilter::all(), Some(start)).await {
        Ok(mut w) => tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.code(), Some(410), "{err}");
    assert!(err.to_string().contains("too old"), "{err}");
    let mut feed = user.pod_feed(PodFilter::all(), Some(start));
    let synced = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let PodFeedEvent::Synced { pods, .. } = feed.recv().await.unwrap() {
                return pods;
            }
        }
    })
    .await
    .expect("the feed re-lists");
    assert_eq!(synced.len(), 12);
}

/// A pod with `hostPort` 8080 on `ip` (every address when `None`).
fn publishing(name: &str, ip: Option<&str>) -> podvisor_api::Pod {
    let mut p = pod(name, "100m", "64Mi");
    p.spec.containers[0].ports = vec![podvisor_api::ContainerPort {
        container_port: 80,
        host_port: Some(8080),
        host_ip: ip.map(str::to_string),
        ..Default::default()
    }];
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_ports_are_a_resource_of_their_host() {
    let ts = TestServer::sqlite().await;
    let user = ts.client(Role::User, "alice").await;
    let h1 = ts.host("h1", 8000, 8 * GI).await;
    let _beats = heartbeat(&h1, "h1");

    user.create_pod(&publishing("web1", None)).await.unwrap();
    let web1 = pod_where(&user, "web1", "web1 to be scheduled", |p| {
        p.spec.node_name.is_some()
    })
    .await;
    assert_eq!(web1.spec.node_name.as_deref(), Some("h1"));

    // The same port (on one address, or all) does not fit next to it,
    // though CPU and memory would.
    user.create_pod(&publishing("web2", Some("127.0.0.1")))
        .await
        .unwrap();
    let web2 = pod_where(&user, "web2", "web2 to be unschedulable", |p| {
        p.status.reason.as_deref() == Some("Unschedulable")
    })
    .await;
    assert_eq!(
        web2.status.message.as_deref(),
        Some("0/1 hosts have room: h1: host port 127.0.0.1:8080/TCP is taken by pod default/web1")
    );

    // A second host has the port free.
    let h2 = ts.host("h2", 8000, 8 * GI).await;
    let _beats2 = heartbeat(&h2, "h2");
    let web2 = pod_where(&user, "web2", "web2 to be scheduled", |p| {
        p.spec.node_name.is_some()
    })
    .await;
    assert_eq!(web2.spec.node_name.as_deref(), Some("h2"));
}

/// Every file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_keys_go_only_to_the_pods_host_and_are_never_stored_in_the_clear() {
    use podvisor_api::client::SnapshotKey;
    let ts = TestServer::sqlite().await;
    let user = ts.client(Role::User, "alice").await;
    let h1 = ts.host("h1", 2000, GI).await;
    let h2 = ts.host("h2", 2000, GI).await;
    let mut sleepy = pod("sleepy", "1", "128Mi");
    sleepy.spec.node_name = Some("h1".into());
    user.create_pod(&sleepy).await.unwrap();
    let secret: Vec<u8> = (0u8..32)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let key = SnapshotKey {
        snapshot: "s1".into(),
        key: hex_of(&secret),
    };

    h1.put_snapshot_key("default", "sleepy", &key)
        .await
        .unwrap();
    assert_eq!(
        h1.get_snapshot_key("default", "sleepy", "s1")
            .await
            .unwrap(),
        key
    );
    // Only for the snapshot it was kept for.
    let err = h1
        .get_snapshot_key("default", "sleepy", "s2")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(404), "{err}");
    // Nobody else: another host, the user, not even the admin.
    for (who, client) in [("h2", &h2), ("alice", &user), ("admin", &ts.admin)] {
        let err = client
            .get_snapshot_key("default", "sleepy", "s1")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(403), "{who}: {err}");
        assert!(
            err.to_string().contains("only the token of host \"h1\""),
            "{err}"
        );
        let err = client
            .put_snapshot_key("default", "sleepy", &key)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(403), "{who}: {err}");
    }
    let bad = SnapshotKey {
        snapshot: "s1".into(),
        key: "not hex".into(),
    };
    let err = h1
        .put_snapshot_key("default", "sleepy", &bad)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(400), "{err}");
    assert_eq!(
        h1.get_snapshot_key("default", "sleepy", "s1")
            .await
            .unwrap(),
        key,
        "a refused key changes nothing"
    );

    // On disk (the store, its journal, the server's files): wrapped only.
    let hex = key.key.as_bytes();
    for (path, bytes) in files_under(&ts.dir.path().join("state")) {
        assert!(
            !bytes.windows(32).any(|w| w == secret.as_slice())
                && !bytes.windows(hex.len()).any(|w| w == hex),
            "{} holds the key in the clear",
            path.display()
        );
    }

    // The pod's end takes its key along.
    let store = podvisor_store::open(&format!(
        "sqlite:{}",
        ts.dir.path().join("state/state.db").display()
    ))
    .await
    .unwrap();
    let stored = "/registry/snapshot-keys/default/sleepy";
    assert!(store.get(stored).await.unwrap().is_some());
    h1.delete_snapshot_key("default", "sleepy").await.unwrap();
    assert!(store.get(stored).await.unwrap().is_none());
    h1.put_snapshot_key("default", "sleepy", &key)
        .await
        .unwrap();
    h1.finalize_pod("default", "sleepy").await.unwrap();
    assert!(store.get(stored).await.unwrap().is_none());
    let err = h1
        .get_snapshot_key("default", "sleepy", "s1")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(404), "{err}");
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_future_revision_is_an_error_not_silence() {
    let ts = TestServer::sqlite().await;
    let user = ts.client(Role::User, "alice").await;
    user.create_pod(&pod("web", "1", "256Mi")).await.unwrap();
    let listed = user
        .list_pods(&podvisor_api::PodFilter::default())
        .await
        .unwrap();
    let now: i64 = listed.metadata.resource_version.unwrap().parse().unwrap();
    // From the listed revision: a watch that works.
    user.watch_pods(&podvisor_api::PodFilter::default(), Some(now))
        .await
        .unwrap();
    // From far ahead: refused after the short wait for the cache.
    let started = std::time::Instant::now();
    let err = match user
        .watch_pods(&podvisor_api::PodFilter::default(), Some(now + 1000))
        .await
    {
        Err(e) => e,
        Ok(_) => panic!("a watch from revision {} was accepted", now + 1000),
    };
    assert_eq!(err.code(), Some(504), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("Too large resource version: {}", now + 1000)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
