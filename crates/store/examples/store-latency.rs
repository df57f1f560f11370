//! Measures the latency of the store's backends on this machine: sequential
//! put and compare-and-swap round trips, put → watch delivery (writer in
//! this process, and writer in another process), and the throughput of
//! concurrent creates. SQLite (durable and not) on a temp file, and a real
//! etcd started by `testbed::etcd` in the same run.
//!
//!     cargo run --release -p podvisor-store --example store-latency [-- N]
//!
//! (`store-latency --writer URL N` is the other process's part.)

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use podvisor_store::{EtcdStore, SqliteOptions, SqliteStore, Store, StoreUrl, WatchEvent};
use podvisor_testbed::etcd::EtcdServer;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--writer") {
        return writer(&args[2], args[3].parse().unwrap()).await;
    }
    let n: usize = args
        .get(1)
        .map(|a| a.parse().expect("N: a number of operations"))
        .unwrap_or(500);
    let dir = tempfile::tempdir().unwrap();
    println!("{n} operations each; latencies p50 / p99 in ms");
    println!(
        "{:<22} {:>14} {:>14} {:>14} {:>16} {:>10}",
        "backend", "put", "update (CAS)", "put→watch", "put→watch xproc", "creates/s"
    );
    for (name, durable) in [
        ("sqlite (FULL sync)", true),
        ("sqlite (NORMAL sync)", false),
    ] {
        let options = SqliteOptions {
            durable,
            ..SqliteOptions::default()
        };
        let path = dir.path().join(format!("bench-{durable}.db"));
        let store = Arc::new(SqliteStore::open(&path, options).await.unwrap());
        report(name, store, &format!("sqlite:{}", path.display()), n).await;
    }
    let server = EtcdServer::start();
    let StoreUrl::Etcd {
        endpoints,
        namespace,
    } = StoreUrl::parse(&server.url()).unwrap()
    else {
        unreachable!()
    };
    let etcd = Arc::new(EtcdStore::connect(&endpoints, &namespace).await.unwrap());
    report("etcd 3.4 (loopback)", etcd, &server.url(), n).await;
}

/// Pseudo-random pauses of 0–30 ms, so that writes do not fall into step
/// with a SQLite watch's 25 ms poll.
struct Jitter(u64);

impl Jitter {
    fn pause(&mut self) -> Duration {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Duration::from_micros((self.0 >> 33) % 30_000)
    }
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The other process: `n` puts under `xproc/` at jittered times, printing
/// each one's revision and the wall-clock time just before it.
async fn writer(url: &str, n: usize) {
    let store = podvisor_store::open(url).await.unwrap();
    let mut jitter = Jitter(7);
    for i in 0..n {
        tokio::time::sleep(jitter.pause()).await;
        let t = unix_ns();
        let rev = store.put(&format!("xproc/{i}"), b"v", None).await.unwrap();
        println!("{rev} {t}");
    }
}

/// put → watch latency with the writer in another process.
async fn cross_process_delivery(store: &dyn Store, url: &str, n: usize) -> Vec<Duration> {
    let start = store.current_revision().await.unwrap();
    let mut watch = store.watch("xproc/", start).await.unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--writer", url, &n.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut received = HashMap::new();
    for _ in 0..n {
        match watch.recv().await.unwrap().unwrap() {
            WatchEvent::Put(kv) => received.insert(kv.mod_revision, unix_ns()),
            other => panic!("unexpected {other:?}"),
        };
    }
    let mut out = Vec::with_capacity(n);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let (rev, sent) = line.split_once(' ').unwrap();
        let (rev, sent): (i64, u128) = (rev.parse().unwrap(), sent.parse().unwrap());
        out.push(Duration::from_nanos((received[&rev] - sent) as u64));
    }
    assert!(child.wait().unwrap().success());
    out
}

async fn report(name: &str, store: Arc<dyn Store>, url: &str, n: usize) {
    let put = timed(n, |i| {
        let s = store.clone();
        async move {
            s.put(
                &format!("put/{i}"),
                b"value of some 40 bytes, like a small obj",
                None,
            )
            .await
            .unwrap();
        }
    })
    .await;

    let mut rev = store.put("cas", b"0", None).await.unwrap();
    let mut cas = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        rev = store
            .update("cas", i.to_string().as_bytes(), rev)
            .await
            .unwrap()
            .unwrap();
        cas.push(t.elapsed());
    }

    // put → watch: a watcher on the prefix; puts spaced out so that this
    // measures delivery latency, not a backlog.
    let start = store.current_revision().await.unwrap();
    let mut watch = store.watch("watched/", start).await.unwrap();
    let mut delivery = Vec::with_capacity(n);
    let mut jitter = Jitter(3);
    for i in 0..n.min(200) {
        let t = Instant::now();
        let r = store
            .put(&format!("watched/{i}"), b"v", None)
            .await
            .unwrap();
        loop {
            match watch.recv().await.unwrap().unwrap() {
                WatchEvent::Put(kv) if kv.mod_revision == r => break,
                _ => continue,
            }
        }
        delivery.push(t.elapsed());
        tokio::time::sleep(jitter.pause()).await;
    }
    let xproc = cross_process_delivery(store.as_ref(), url, n.min(200)).await;

    let t = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let s = store.clone();
            tokio::spawn(async move {
                for i in 0..n / 8 {
                    s.create(&format!("create/{task}/{i}"), b"v", None)
                        .await
                        .unwrap()
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let creates_per_s = (n / 8 * 8) as f64 / t.elapsed().as_secs_f64();

    println!(
        "{:<22} {:>14} {:>14} {:>14} {:>16} {:>10.0}",
        name,
        percentiles(put),
        percentiles(cas),
        percentiles(delivery),
        percentiles(xproc),
        creates_per_s
    );
}

async fn timed<F, Fut>(n: usize, op: F) -> Vec<Duration>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        op(i).await;
        out.push(t.elapsed());
    }
    out
}

fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    format!("{:.2} / {:.2}", at(0.5), at(0.99))
}
