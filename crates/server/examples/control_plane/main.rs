//! Control-plane throughput without VM cost: N pods applied to a server with
//! H hosts that acknowledge pods without booting anything (each host does
//! what a host daemon does over the API: register, heartbeat, follow its
//! pods with a pod feed, report each new pod Running). Prints, per store,
//! the time until all pods are Running and the latency from apply to the
//! host seeing its pod.
//!
//! With `--podvisor PATH` the server and the hosts are real processes:
//! `podvisor server` and H × `podvisor host --runtime ack-without-vm`, and
//! "the host sees its pod" is the `status.startTime` the daemon stamps when
//! its pod feed delivers the pod. Without it, the server runs in this
//! process and the hosts are played here through `podvisor_api::Client`.
//!
//! cargo run --release -p podvisor-server --example control_plane -- \
//!     [--pods 1000] [--hosts 20] [--concurrency 16] [--store sqlite|etcd|both]
//!     [--podvisor target/release/podvisor]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podvisor_api::client::{PodEvent, PodFeedEvent};
use podvisor_api::{
    Client, Container, Host, HostCapacity, Pod, PodFilter, PodPhase, PodStatus, Quantity,
    ResourceList,
};
use podvisor_server::{Role, ServerConfig};
use podvisor_testbed::etcd::EtcdServer;

mod daemons;

struct Options {
    pods: usize,
    hosts: usize,
    concurrency: usize,
    stores: Vec<String>,
    podvisor: Option<String>,
}

fn options() -> Options {
    let mut o = Options {
        pods: 1000,
        hosts: 20,
        concurrency: 16,
        stores: vec!["sqlite".into(), "etcd".into()],
        podvisor: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or("");
        match pair[0].as_str() {
            "--pods" => o.pods = value.parse().expect("--pods N"),
            "--hosts" => o.hosts = value.parse().expect("--hosts N"),
            "--concurrency" => o.concurrency = value.parse().expect("--concurrency N"),
            "--store" if value == "both" => {}
            "--store" => o.stores = vec![value.to_string()],
            "--podvisor" => o.podvisor = Some(value.to_string()),
            other => panic!("unknown option {other}"),
        }
    }
    o
}

/// What one run measured.
struct Report {
    store: String,
    /// Baseline: the same number of creates straight into the store, as
    /// many at once as the appliers.
    store_creates: Duration,
    all_running: Duration,
    applied: Duration,
    latencies: Vec<Duration>,
}

fn main() {
    let o = options();
    let mut reports = Vec::new();
    for store in &o.stores {
        let etcd = (store == "etcd").then(EtcdServer::start);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let url = etcd.as_ref().map(|e| e.url());
        let baseline = rt.block_on(store_creates(url.clone(), &o));
        let mut report = match &o.podvisor {
            Some(bin) => rt.block_on(daemons::run(bin, store, url, &o)),
            None => rt.block_on(run(store, url, &o)),
        };
        report.store_creates = baseline;
        reports.push(report);
    }
    let hosts = match o.podvisor {
        Some(_) => "`podvisor host --runtime ack-without-vm` processes",
        None => "hosts played through the API client",
    };
    println!(
        "\n{} pods, {} {hosts}, {} concurrent appliers\n",
        o.pods, o.hosts, o.concurrency
    );
    println!(
        "| store | baseline: {} creates in the store | all applied | all Running | pods/s | apply→host sees p50 | p99 | max |",
        o.pods
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in reports {
        let mut l = r.latencies.clone();
        l.sort();
        let pct = |p: f64| l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1];
        println!(
            "| {} | {:.2} s | {:.2} s | {:.2} s | {:.0} | {:.0} ms | {:.0} ms | {:.0} ms |",
            r.store,
            r.store_creates.as_secs_f64(),
            r.applied.as_secs_f64(),
            r.all_running.as_secs_f64(),
            o.pods as f64 / r.all_running.as_secs_f64(),
            pct(0.50).as_secs_f64() * 1000.0,
            pct(0.99).as_secs_f64() * 1000.0,
            l.last().unwrap().as_secs_f64() * 1000.0,
        );
    }
}

/// The floor: as many creates of a pod-sized value straight into the store
/// (a fresh SQLite file, or a separate prefix of the same etcd), with the
/// same concurrency as the appliers.
async fn store_creates(etcd_url: Option<String>, o: &Options) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let url = match etcd_url {
        Some(u) => format!("{u}?prefix=/baseline/"),
        None => format!("sqlite:{}", dir.path().join("baseline.db").display()),
    };
    let store = podvisor_store::open(&url).await.unwrap();
    let value = serde_json::to_vec(&pod("pod-0000")).unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..o.concurrency {
        let (store, next, value, total) = (store.clone(), next.clone(), value.clone(), o.pods);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let key = format!("/registry/pods/default/pod-{i:04}");
                store.create(&key, &value, None).await.unwrap().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

/// Creates pods `pod-0000`, `pod-0001`, ... (`total` of them) with
/// `concurrency` clients at once, stamping each in `applied_at` with
/// `now()` just before its create request.
async fn apply_pods<T: Send + 'static>(
    user: &Client,
    total: usize,
    concurrency: usize,
    applied_at: &Arc<Mutex<HashMap<String, T>>>,
    now: fn() -> T,
) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut appliers = Vec::new();
    for _ in 0..concurrency {
        let (user, next, applied_at) = (user.clone(), next.clone(), applied_at.clone());
        appliers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let name = format!("pod-{i:04}");
                applied_at.lock().unwrap().insert(name.clone(), now());
                user.create_pod(&pod(&name)).await.unwrap();
            }
        }));
    }
    for a in appliers {
        a.await.unwrap();
    }
}

fn pod(name: &str) -> Pod {
    let mut c = Container {
        name: "main".into(),
        image: "registry.local/busybox:1".into(),
        ..Default::default()
    };
    c.resources.limits = Some(ResourceList {
        cpu: Some(Quantity::new("100m")),
        memory: Some(Quantity::new("64Mi")),
    });
    Pod::new(name, vec![c])
}

async fn run(store: &str, store_url: Option<String>, o: &Options) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut config = ServerConfig::new("127.0.0.1:0", &state);
    config.store_url = store_url.clone();
    let server = podvisor_server::start(config).await.unwrap();
    let admin = std::fs::read_to_string(server.admin_token_path()).unwrap();
    let user = Client::new(&server.url(), Some(admin.trim())).unwrap();

    // Apply times and host-seen times by pod name.
    let applied_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    for h in 0..o.hosts {
        let name = format!("host-{h:02}");
        let token = podvisor_server::create_token(&state, store_url.as_deref(), Role::Host, &name)
            .await
            .unwrap();
        let client = Client::new(&server.url(), Some(&token)).unwrap();
        let capacity = HostCapacity {
            cpu: 16_000,
            memory: 16 << 30,
        };
        client
            .register_host(
                &Host::new(&name, capacity, "http://127.0.0.1:9"),
                "ack-without-vm-hosts-serve-no-endpoint-0000",
            )
            .await
            .unwrap();
        let beat = (client.clone(), name.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(4)).await;
                let _ = beat.0.heartbeat(&beat.1).await;
            }
        });
        let mut feed = client.pod_feed(PodFilter::on_host(&name), None);
        let seen_at = seen_at.clone();
        tokio::spawn(async move {
            while let Some(event) = feed.recv().await {
                let PodFeedEvent::Changed(PodEvent::Added(p)) = event else {
                    continue;
                };
                seen_at
                    .lock()
                    .unwrap()
                    .entry(p.metadata.name.clone())
                    .or_insert_with(Instant::now);
                let running = PodStatus {
                    phase: PodPhase::Running,
                    ..Default::default()
                };
                let c = client.clone();
                tokio::spawn(async move {
                    c.update_pod_status("default", &p.metadata.name, &running)
                        .await
                        .unwrap();
                });
            }
        });
    }

    // Count Running pods from a feed of all pods.
    let mut all = user.pod_feed(PodFilter::all(), None);
    let total = o.pods;
    let done = tokio::spawn(async move {
        let mut running = std::collections::HashSet::new();
        while let Some(event) = all.recv().await {
            if let PodFeedEvent::Changed(PodEvent::Modified(p)) = event
                && p.status.phase == PodPhase::Running
            {
                running.insert(p.metadata.name.clone());
                if running.len() == total {
                    return Instant::now();
                }
            }
        }
        panic!("feed ended");
    });

    let start = Instant::now();
    apply_pods(&user, total, o.concurrency, &applied_at, Instant::now).await;
    let applied = start.elapsed();
    let finished = tokio::time::timeout(Duration::from_secs(600), done)
        .await
        .expect("all pods Running within 10 minutes")
        .unwrap();
    let applied_at = applied_at.lock().unwrap();
    let seen_at = seen_at.lock().unwrap();
    let latencies = applied_at
        .iter()
        .map(|(name, t)| seen_at[name].duration_since(*t))
        .collect();
    drop(server);
    Report {
        store: store.to_string(),
        store_creates: Duration::ZERO,
        all_running: finished.duration_since(start),
        applied,
        latencies,
    }
}
