//! `podvisor server` as a real process, and the kubectl-like commands
//! against it: init and tokens, apply/get/describe/delete, clear errors,
//! the config file; two replicas on one real etcd (no pod assigned twice,
//! no host over capacity, kill -9 of the leader loses nothing).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podvisor_api::client::{PodEvent, PodFeedEvent};
use podvisor_api::{
    Client, Container, ContainerState, ContainerStateRunning, ContainerStatus,
    HIBERNATED_CONDITION, Host, HostCapacity, Pod, PodCondition, PodFilter, PodPhase, PodStatus,
    Quantity, ResourceList,
};
use podvisor_testbed::cli::{PodvisorCommand, TestDir};
use podvisor_testbed::etcd::EtcdServer;
use podvisor_testbed::oci::ImageBuilder;

const BIN: &str = env!("CARGO_BIN_EXE_podvisor");
const GI: u64 = 1 << 30;

fn podvisor(t: &TestDir) -> PodvisorCommand {
    t.podvisor(BIN)
        .env_remove_all()
        .timeout(Duration::from_secs(60))
}

trait NoServerEnv {
    fn env_remove_all(self) -> Self;
}

impl NoServerEnv for PodvisorCommand {
    /// Points the config file at nothing, so the user's settings do not leak
    /// into the test.
    fn env_remove_all(self) -> Self {
        self.env("PODVISOR_CONFIG", "/dev/null")
            .env("PODVISOR_SERVER", "")
            .env("PODVISOR_TOKEN", "")
    }
}

/// A `podvisor server` process, killed (-9) when dropped.
struct ServerProcess {
    child: Child,
    url: String,
}

impl ServerProcess {
    fn start(state_dir: &Path, store: Option<&str>) -> ServerProcess {
        ServerProcess::start_with(state_dir, store, &[])
    }

    fn start_with(state_dir: &Path, store: Option<&str>, extra: &[&str]) -> ServerProcess {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--host-ttl",
            "2",
            "--state-dir",
        ])
        .arg(state_dir)
        .args(extra)
        .env("PODVISOR_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        if let Some(store) = store {
            cmd.args(["--store", store]);
        }
        let mut child = cmd.spawn().expect("spawn podvisor server");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > deadline {
                let _ = child.kill();
                panic!("podvisor server did not start:\n{seen}");
            }
            seen.push_str(&line);
            if let Some(rest) = line.split("server listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while stderr.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        ServerProcess { child, url }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn token_create(t: &TestDir, state: &Path, store: Option<&str>, who: &str, name: &str) -> String {
    let mut cmd = podvisor(t)
        .args(["server", "token", "create", who, name, "--state-dir"])
        .arg(state);
    if who == "--user" {
        cmd = cmd.arg("--all-namespaces");
    }
    if let Some(store) = store {
        cmd = cmd.args(["--store", store]);
    }
    cmd.success().stdout.trim().to_string()
}

/// Registers `name` and heartbeats it from a thread with its own runtime
/// until the returned guard is dropped.
fn host_daemon(
    url: &str,
    token: &str,
    name: &str,
    cpu: u64,
    memory: u64,
) -> (Client, HeartbeatGuard) {
    let client = Client::new(url, Some(token)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(client.register_host(
        &Host::new(name, HostCapacity { cpu, memory }, "http://127.0.0.1:9"),
        "no-endpoint-behind-this-test-host-000",
    ))
    .unwrap();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (c, n) = (client.clone(), name.to_string());
    std::thread::spawn(move || {
        while stop_rx.recv_timeout(Duration::from_millis(500)).is_err() {
            let _ = rt.block_on(c.heartbeat(&n));
        }
    });
    (client, HeartbeatGuard(stop_tx))
}

struct HeartbeatGuard(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn running(image: &str) -> PodStatus {
    PodStatus {
        phase: PodPhase::Running,
        container_statuses: vec![ContainerStatus {
            name: "web".into(),
            image: image.into(),
            ready: true,
            restart_count: 2,
            state: ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: chrono::Utc::now(),
                }),
                ..Default::default()
            },
            runtime_profile: None,
        }],
        ..Default::default()
    }
}

const PODS_YAML: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  containers:
  - name: web
    image: registry.local/web:1
    command: [sh, -c, 'echo hello; sleep 1000']
    resources:
      limits: {cpu: 500m, memory: 128Mi}
---
apiVersion: v1
kind: Pod
metadata:
  name: db
spec:
  containers:
  - name: db
    image: registry.local/db:1
";

#[test]
fn kubectl_like_commands_against_a_server_process() {
    let t = TestDir::new();
    let state = t.path().join("server");

    // init makes the admin token once (printed, and in a 0600 file).
    let out = podvisor(&t)
        .args(["server", "init", "--state-dir"])
        .arg(&state)
        .success();
    let admin = out.stdout.trim().to_string();
    assert!(admin.starts_with("pv_"), "{out:?}");
    let file = state.join("admin.token");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), admin);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = podvisor(&t)
        .args(["server", "init", "--state-dir"])
        .arg(&state)
        .success();
    assert!(
        again.stdout.is_empty() && again.stderr.contains("already initialized"),
        "{again:?}"
    );

    let user = token_create(&t, &state, None, "--user", "alice");
    let host_token = token_create(&t, &state, None, "--host", "h1");
    // An image in the cache the server's catalog describes.
    let archive = t.path().join("app.tar");
    let built = ImageBuilder::new()
        .busybox_layer()
        .tag("myapp:1.0")
        .write_oci_archive(&archive)
        .unwrap();
    podvisor(&t)
        .args(["image", "import"])
        .arg(&archive)
        .success();
    let cache = t.cache_dir().display().to_string();
    let server = ServerProcess::start_with(&state, None, &["--cache-dir", &cache]);
    let (h1, _beats) = host_daemon(&server.url, &host_token, "h1", 4000, 4 * GI);
    let kube = |args: &[&str]| {
        podvisor(&t)
            .args(args)
            .args(["--server", &server.url, "--token", &user])
    };

    // apply: created, then unchanged.
    std::fs::write(t.path().join("pods.yaml"), PODS_YAML).unwrap();
    let out = kube(&["apply", "-f", "pods.yaml"]).success();
    assert_eq!(out.stdout, "pod/web created\npod/db created\n");
    let out = kube(&["apply", "-f", "pods.yaml"]).success();
    assert_eq!(out.stdout, "pod/web unchanged\npod/db unchanged\n");

    // The host runs web: get shows it like kubectl.
    let user_client = Client::new(&server.url, Some(&user)).unwrap();
    wait_for(20, "web to be scheduled", || {
        block(user_client.get_pod("default", "web"))
            .ok()?
            .spec
            .node_name
    });
    block(h1.update_pod_status("default", "web", &running("registry.local/web:1"))).unwrap();
    let out = kube(&["get", "pods"]).success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let cols = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(
        cols(lines[0]),
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "NODE"]
    );
    let web = cols(lines.iter().find(|l| l.starts_with("web")).unwrap());
    assert_eq!(
        [&web[..4], &web[5..]].concat(),
        ["web", "1/1", "Running", "2", "h1"]
    );
    let out = kube(&["get", "pods", "-A"]).success();
    assert!(out.stdout.starts_with("NAMESPACE"), "{}", out.stdout);
    let out = kube(&["get", "pods", "-o", "json"]).success();
    let list: podvisor_api::PodList = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list.items.len(), 2);
    let out = kube(&["get", "pod", "web", "-o", "yaml"]).success();
    let pod: Pod = yaml_roundtrip(&out.stdout);
    assert_eq!(pod.status.phase, PodPhase::Running);
    let out = kube(&["get", "hosts"]).success();
    let h = cols(out.stdout.lines().nth(1).unwrap());
    assert_eq!(&h[..4], ["h1", "Ready", "4", "4Gi"]);
    let out = kube(&["get", "images"]).success();
    let image = cols(out.stdout.lines().nth(1).unwrap());
    assert_eq!(image[0], "docker.io/library/myapp:1.0", "{}", out.stdout);
    assert!(
        built.manifest_digest.starts_with(&image[1]),
        "{} vs {}",
        image[1],
        built.manifest_digest
    );
    assert_eq!(image[2], "1", "one layer");
    let out = kube(&["describe", "pod", "web"]).success();
    for expected in [
        "Node:           h1",
        "Status:         Running",
        "Labels:         app=web",
        "Limits:       cpu 500m, memory 128Mi",
        "Restarts:     2",
    ] {
        assert!(
            out.stdout.contains(expected),
            "{expected:?} in:\n{}",
            out.stdout
        );
    }

    // hibernate and wake go to the pod's host (nothing listens at h1's
    // address here): the server's error, exit code 125.
    let out = kube(&["hibernate", "web"]).output();
    assert_eq!(out.code, Some(125), "{out:?}");
    assert!(
        out.stderr.contains("hibernate pod default/web: POST ")
            && out
                .stderr
                .contains("502 BadGateway: cannot reach host \"h1\""),
        "{}",
        out.stderr
    );
    let out = kube(&["wake", "nope", "-n", "other"]).output();
    assert_eq!(out.code, Some(125), "{out:?}");
    assert!(
        out.stderr
            .contains("404 NotFound: pod \"nope\" not found in namespace \"other\""),
        "{}",
        out.stderr
    );
    // A pod its host reports hibernated.
    let since = chrono::Utc::now() - chrono::Duration::minutes(5);
    let mut asleep = running("registry.local/web:1");
    asleep.conditions = vec![PodCondition {
        type_: HIBERNATED_CONDITION.into(),
        status: "True".into(),
        reason: Some("Idle".into()),
        message: Some("snapshot 15.1 MiB of 192 MiB guest memory".into()),
        last_transition_time: Some(since),
    }];
    block(h1.update_pod_status("default", "web", &asleep)).unwrap();
    let out = kube(&["get", "pods"]).success();
    let web = cols(out.stdout.lines().find(|l| l.starts_with("web")).unwrap());
    assert_eq!(web[2], "Hibernated", "{}", out.stdout);
    let out = kube(&["describe", "pod", "web"]).success();
    let since = since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for expected in [
        "Status:         Hibernated".to_string(),
        format!(
            "Hibernated:     since {since} (5m ago); snapshot 15.1 MiB of 192 MiB guest memory"
        ),
        "Conditions:\n  Type         Status   Since".to_string(),
    ] {
        assert!(
            out.stdout.contains(&expected),
            "{expected:?} in:\n{}",
            out.stdout
        );
    }
    block(h1.update_pod_status("default", "web", &running("registry.local/web:1"))).unwrap();

    // Clear errors, and nothing is created by a bad file.
    std::fs::write(
        t.path().join("bad.yaml"),
        "metadata: {name: bad}\nspec:\n  containers:\n  - name: c\n    image: busybox\n    livenessProbe: {exec: {command: [\"true\"]}}\n",
    )
    .unwrap();
    let out = kube(&["apply", "-f", "bad.yaml"]).output();
    assert_eq!(out.code, Some(125));
    assert!(
        out.stderr
            .contains("spec.containers[0].livenessProbe: not supported by podvisor"),
        "{}",
        out.stderr
    );
    let out = kube(&["apply", "-f", "-"]).stdin("spec: [\n").output();
    assert_eq!(out.code, Some(125));
    assert!(
        out.stderr.contains("stdin: not a valid Pod") && out.stderr.contains("line"),
        "{}",
        out.stderr
    );
    assert_eq!(
        block(user_client.list_pods(&PodFilter::all()))
            .unwrap()
            .items
            .len(),
        2
    );
    let out = podvisor(&t)
        .args([
            "get",
            "pods",
            "--server",
            &server.url,
            "--token",
            "pv_wrong",
        ])
        .output();
    assert_eq!(out.code, Some(125));
    assert!(
        out.stderr
            .contains("401 Unauthorized: the bearer token is not valid on this server"),
        "{}",
        out.stderr
    );
    let out = kube(&["logs", "web"]).output();
    assert_eq!(out.code, Some(125));
    assert!(
        out.stderr
            .contains("502 BadGateway: cannot reach host \"h1\""),
        "{}",
        out.stderr
    );

    // The config file's [server] section is enough.
    let config = t.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nurl = \"{}\"\ntoken_file = \"{}\"\n",
            server.url,
            file.display()
        ),
    )
    .unwrap();
    let out = t
        .podvisor(BIN)
        .env("PODVISOR_CONFIG", &config)
        .env_remove_server()
        .args(["get", "pods"])
        .success();
    assert!(out.stdout.contains("web"), "{}", out.stdout);

    // delete --wait returns once the host has stopped and finalized the pod.
    let waiter = std::thread::spawn({
        let (url, user) = (server.url.clone(), user.clone());
        let t_path = t.path().to_path_buf();
        move || {
            Command::new(BIN)
                .args([
                    "delete", "pod", "web", "--wait", "--server", &url, "--token", &user,
                ])
                .current_dir(t_path)
                .env("PODVISOR_CONFIG", "/dev/null")
                .output()
                .unwrap()
        }
    });
    wait_for(20, "web to be marked for deletion", || {
        block(h1.get_pod("default", "web"))
            .ok()?
            .metadata
            .deletion_timestamp
    });
    block(h1.finalize_pod("default", "web")).unwrap();
    let out = waiter.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pod \"web\" deleted\n"
    );
    let out = kube(&["delete", "pod", "web"]).output();
    assert!(
        out.stderr.contains("404 NotFound: pod \"web\" not found"),
        "{}",
        out.stderr
    );
}

trait RemoveServerEnv {
    fn env_remove_server(self) -> Self;
}

impl RemoveServerEnv for PodvisorCommand {
    fn env_remove_server(self) -> Self {
        self.env("PODVISOR_SERVER", "").env("PODVISOR_TOKEN", "")
    }
}

fn yaml_roundtrip(text: &str) -> Pod {
    podvisor_api::parse_object(text, podvisor_api::Format::Yaml).unwrap()
}

fn small_pod(name: &str) -> Pod {
    let mut c = Container {
        name: "main".into(),
        image: "registry.local/busybox:1".into(),
        ..Default::default()
    };
    c.resources.limits = Some(ResourceList {
        cpu: Some(Quantity::new("500m")),
        memory: Some(Quantity::new("128Mi")),
    });
    Pod::new(name, vec![c])
}

#[test]
fn two_replicas_on_one_etcd_never_double_assign_and_survive_kill9() {
    let etcd = EtcdServer::start();
    let t = TestDir::new();
    let store = etcd.url();
    let (state_a, state_b) = (t.path().join("a"), t.path().join("b"));
    let mut a = ServerProcess::start(&state_a, Some(&store));
    // A replica with a key-encryption key of its own is refused: the
    // cluster's secrets are wrapped with A's. Given A's file, it runs.
    let refused = podvisor(&t)
        .args(["server", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state_b)
        .args(["--store", &store])
        .timeout(Duration::from_secs(60))
        .output();
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("give every server replica the same key file"),
        "{}",
        refused.stderr
    );
    let kek_a = state_a.join("key-encryption.key").display().to_string();
    let b = ServerProcess::start_with(&state_b, Some(&store), &["--key-encryption-key", &kek_a]);
    let both = format!("{},{}", a.url, b.url);
    let user = token_create(&t, &state_a, Some(&store), "--user", "alice");

    // Three hosts with room for 4 pods each (2 CPU / 512 MiB; pods are
    // 500m / 128Mi). Their clients fail over between the replicas.
    let mut hosts = Vec::new();
    for name in ["h1", "h2", "h3"] {
        let token = token_create(&t, &state_b, Some(&store), "--host", name);
        let (client, guard) = host_daemon(&both, &token, name, 2000, 512 << 20);
        hosts.push((name.to_string(), client, guard));
    }

    block(async {
        let ua = Client::new(&a.url, Some(&user)).unwrap();
        let ub = Client::new(&b.url, Some(&user)).unwrap();
        let all = Client::new(&both, Some(&user)).unwrap();
        let start = all
            .list_pods(&PodFilter::all())
            .await
            .unwrap()
            .metadata
            .revision();
        // Every change to every pod, through a feed that survives the kill.
        let mut feed = all.pod_feed(PodFilter::all(), Some(start));

        // 14 pods created through both replicas at once: 12 fit.
        let mut creates = Vec::new();
        for i in 0..14 {
            let c = if i % 2 == 0 { ua.clone() } else { ub.clone() };
            creates.push(tokio::spawn(async move {
                c.create_pod(&small_pod(&format!("p{i:02}"))).await
            }));
        }
        for c in creates {
            c.await.unwrap().unwrap();
        }
        let mut assigned: HashMap<String, String> = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut unschedulable = 0;
        while assigned.len() < 12 || unschedulable < 2 {
            let event = tokio::time::timeout_at(deadline, feed.recv())
                .await
                .expect("all pods placed")
                .unwrap();
            if let PodFeedEvent::Changed(e) = event {
                record(&mut assigned, &e);
                unschedulable = count_unschedulable(&all).await;
            }
        }
        check_capacity(&assigned, 4);

        // kill -9 the leader replica (the one that schedules).
        let leader = leader_pid(&store).await;
        assert!(
            leader == a.pid() || leader == b.pid(),
            "leader {leader} is a replica"
        );
        let (survivor_url, killed_a) = if leader == a.pid() {
            (b.url.clone(), true)
        } else {
            (a.url.clone(), false)
        };
        if killed_a {
            a.kill9();
        } else {
            drop(b);
        }
        // The survivor serves every object.
        let survivor = Client::new(&survivor_url, Some(&user)).unwrap();
        let pods = survivor.list_pods(&PodFilter::all()).await.unwrap().items;
        assert_eq!(pods.len(), 14);
        for p in &pods {
            assert_eq!(p.spec.node_name.as_ref(), assigned.get(&p.metadata.name));
        }
        assert_eq!(survivor.list_hosts().await.unwrap().items.len(), 3);

        // Deleting two pods frees room: the survivor (now leader) places the
        // two waiting ones, and the feed (resumed on the survivor) sees it.
        let mut placed: Vec<String> = assigned.keys().cloned().collect();
        placed.sort();
        for name in &placed[..2] {
            let host = assigned[name].clone();
            let (_, hc, _) = hosts.iter().find(|(n, _, _)| *n == host).unwrap();
            survivor.delete_pod("default", name).await.unwrap();
            hc.finalize_pod("default", name).await.unwrap();
            assigned.remove(name);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if assigned.len() == 12 {
                break;
            }
            let event = tokio::time::timeout_at(deadline, feed.recv())
                .await
                .expect("waiting pods placed after the kill")
                .unwrap();
            if let PodFeedEvent::Changed(e) = event {
                record(&mut assigned, &e);
            }
        }
        let live: HashMap<String, String> = survivor
            .list_pods(&PodFilter::all())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|p| (p.metadata.name.clone(), p.spec.node_name.unwrap()))
            .collect();
        assert_eq!(live.len(), 12);
        check_capacity(&live, 4);
        assert!(
            survivor
                .list_hosts()
                .await
                .unwrap()
                .items
                .iter()
                .all(|h| h.status.ready)
        );
    });
}

/// Records an assignment; fails if a pod is ever assigned twice.
fn record(assigned: &mut HashMap<String, String>, event: &PodEvent) {
    let pod = event.pod();
    if let PodEvent::Deleted(_) = event {
        assigned.remove(&pod.metadata.name);
        return;
    }
    if let (PodEvent::Added(_) | PodEvent::Modified(_), Some(host)) = (event, &pod.spec.node_name) {
        let name = pod.metadata.name.clone();
        match assigned.get(&name) {
            Some(before) => assert_eq!(before, host, "pod {name} was assigned twice"),
            None if pod.metadata.deletion_timestamp.is_some() => {}
            None => {
                assigned.insert(name, host.clone());
            }
        }
    }
}

fn check_capacity(assigned: &HashMap<String, String>, per_host: usize) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for host in assigned.values() {
        *counts.entry(host).or_default() += 1;
    }
    for (host, n) in counts {
        assert!(
            n <= per_host,
            "host {host} got {n} pods, room for {per_host}"
        );
    }
}

async fn count_unschedulable(client: &Client) -> usize {
    client
        .list_pods(&PodFilter::all())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|p| p.status.reason.as_deref() == Some("Unschedulable"))
                .count()
        })
        .unwrap_or(0)
}

/// The pid of the replica holding the leader key.
async fn leader_pid(store_url: &str) -> u32 {
    let store = podvisor_store::open(store_url).await.unwrap();
    let kv = store
        .get("/registry/leader/controllers")
        .await
        .unwrap()
        .expect("a leader");
    let identity = String::from_utf8(kv.value).unwrap();
    identity.split('/').nth(1).unwrap().parse().unwrap()
}

#[test]
fn tokens_are_listed_and_revoked() {
    let t = TestDir::new();
    let state = t.path().join("server");
    podvisor(&t)
        .args(["server", "init", "--state-dir"])
        .arg(&state)
        .success();
    let bob = token_create(&t, &state, None, "--user", "bob");
    let carol = token_create(&t, &state, None, "--user", "carol");
    let server = ServerProcess::start(&state, None);
    let get_pods = |token: &str| {
        podvisor(&t)
            .args(["get", "pods", "--server", &server.url, "--token", token])
            .output()
    };
    assert_eq!(get_pods(&bob).code, Some(0), "{:?}", get_pods(&bob));

    let ls = |t: &TestDir| {
        podvisor(t)
            .args(["server", "token", "ls", "--state-dir"])
            .arg(&state)
            .success()
            .stdout
    };
    let listed = ls(&t);
    let rows: Vec<Vec<&str>> = listed
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["ID", "ROLE", "NAME", "NAMESPACES", "AGE"],
        "{listed}"
    );
    let names: Vec<(&str, &str)> = rows[1..].iter().map(|r| (r[1], r[2])).collect();
    assert_eq!(
        names,
        [("admin", "admin"), ("user", "bob"), ("user", "carol")],
        "{listed}"
    );
    // Tokens are stored as hashes: no listing shows one.
    assert!(!listed.contains(&bob[3..15]), "{listed}");

    // Revoked by holder: refused by the running server within its 10 s
    // cache; the others go on working.
    let out = podvisor(&t)
        .args(["server", "token", "revoke", "--user", "bob", "--state-dir"])
        .arg(&state)
        .success();
    assert!(
        out.stdout.starts_with("revoked ") && out.stdout.contains("user bob"),
        "{out:?}"
    );
    wait_for(20, "bob's token to be refused", || {
        let out = get_pods(&bob);
        (out.code != Some(0)).then_some(out)
    });
    let out = get_pods(&bob);
    assert!(out.stderr.contains("401"), "{out:?}");
    assert_eq!(get_pods(&carol).code, Some(0));

    // Revoked by id, from the listing; unknown and short ids are errors.
    let carol_id = ls(&t)
        .lines()
        .find(|l| l.contains(" carol "))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let revoke = |id: &str| {
        podvisor(&t)
            .args(["server", "token", "revoke", id, "--state-dir"])
            .arg(&state)
            .output()
    };
    let out = revoke("abc");
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("at least 8 hex digits"), "{out:?}");
    let out = revoke("00000000ffffffff");
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("no token matches"), "{out:?}");
    let out = revoke(&carol_id);
    assert_eq!(out.code, Some(0), "{out:?}");
    let rest = ls(&t);
    assert!(!rest.contains("carol") && !rest.contains("bob"), "{rest}");
    wait_for(20, "carol's token to be refused", || {
        (get_pods(&carol).code != Some(0)).then_some(())
    });
}

#[test]
fn user_tokens_reach_only_their_namespaces() {
    let t = TestDir::new();
    let state = t.path().join("server");
    podvisor(&t)
        .args(["server", "init", "--state-dir"])
        .arg(&state)
        .success();
    let admin = std::fs::read_to_string(state.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    // A user token says which namespaces it reaches.
    let out = podvisor(&t)
        .args(["server", "token", "create", "--user", "eve", "--state-dir"])
        .arg(&state)
        .output();
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("--namespace NS") && out.stderr.contains("--all-namespaces"),
        "{out:?}"
    );
    let scoped = |name: &str, ns: &str| {
        podvisor(&t)
            .args([
                "server",
                "token",
                "create",
                "--user",
                name,
                "--namespace",
                ns,
            ])
            .arg("--state-dir")
            .arg(&state)
            .success()
            .stdout
            .trim()
            .to_string()
    };
    let alice = scoped("alice", "team-a");
    let bob = scoped("bob", "team-b,shared");
    let listed = podvisor(&t)
        .args(["server", "token", "ls", "--state-dir"])
        .arg(&state)
        .success()
        .stdout;
    assert!(
        listed
            .lines()
            .any(|l| l.contains(" bob ") && l.contains(" team-b,shared ")),
        "{listed}"
    );
    let server = ServerProcess::start(&state, None);
    let client = |token: &str| Client::new(&server.url, Some(token)).unwrap();
    let (alice, bob, admin) = (client(&alice), client(&bob), client(&admin));
    let pod = |ns: &str, name: &str| {
        podvisor_api::parse_pod(
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  containers:\n  - name: c\n    image: busybox\n"
            ),
            podvisor_api::Format::Yaml,
        )
        .unwrap()
    };
    block(alice.create_pod(&pod("team-a", "secret-job"))).unwrap();
    block(bob.create_pod(&pod("team-b", "web"))).unwrap();

    // Bob can neither see nor touch alice's pod, nor put one in her
    // namespace; each refusal is a 403 that says why.
    let forbidden = |what: &str, err: podvisor_api::ClientError| {
        assert_eq!(err.code(), Some(403), "{what}: {err}");
        assert!(
            err.to_string().contains("may not use namespace \"team-a\""),
            "{what}: {err}"
        );
    };
    forbidden(
        "get",
        block(bob.get_pod("team-a", "secret-job")).unwrap_err(),
    );
    forbidden(
        "list",
        block(bob.list_pods(&PodFilter {
            namespace: Some("team-a".into()),
            ..Default::default()
        }))
        .unwrap_err(),
    );
    forbidden(
        "logs",
        block(bob.logs("team-a", "secret-job", &Default::default()))
            .err()
            .unwrap(),
    );
    forbidden(
        "exec",
        block(bob.exec(
            "team-a",
            "secret-job",
            &podvisor_api::client::ExecOptions {
                command: vec!["cat".into(), "/etc/shadow".into()],
                ..Default::default()
            },
        ))
        .err()
        .unwrap(),
    );
    forbidden(
        "hibernate",
        block(bob.hibernate_pod("team-a", "secret-job")).unwrap_err(),
    );
    forbidden(
        "create",
        block(bob.create_pod(&pod("team-a", "intruder"))).unwrap_err(),
    );
    forbidden(
        "delete",
        block(bob.delete_pod("team-a", "secret-job")).unwrap_err(),
    );
    // Listing every namespace, and watching, shows each user only theirs.
    let names = |c: &Client| -> Vec<String> {
        let mut n: Vec<String> = block(c.list_pods(&PodFilter::default()))
            .unwrap()
            .items
            .iter()
            .map(|p| p.key())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&bob), ["team-b/web"]);
    assert_eq!(names(&alice), ["team-a/secret-job"]);
    assert_eq!(names(&admin), ["team-a/secret-job", "team-b/web"]);
    // One runtime for the watch: its connection lives in it.
    block(async {
        let mut watch = bob.watch_pods(&PodFilter::default(), None).await.unwrap();
        let PodEvent::Added(p) = next_event(&mut watch).await else {
            panic!("not an ADDED event")
        };
        assert_eq!(p.key(), "team-b/web");
        alice.create_pod(&pod("team-a", "second")).await.unwrap();
        bob.create_pod(&pod("team-b", "second")).await.unwrap();
        let PodEvent::Added(p) = next_event(&mut watch).await else {
            panic!("not an ADDED event")
        };
        assert_eq!(p.key(), "team-b/second", "bob saw another namespace's pod");
    });
    // The pod bob tried to delete is still there.
    assert!(block(alice.get_pod("team-a", "secret-job")).is_ok());
}

/// The next event of a watch, within 10 s.
async fn next_event(watch: &mut podvisor_api::client::PodWatch) -> PodEvent {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a watch event within 10 s")
        .unwrap()
        .unwrap()
}
