//! The benchmark with real processes: `podvisor server` and H ×
//! `podvisor host --runtime ack-without-vm`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use podvisor_api::client::{PodEvent, PodFeedEvent};
use podvisor_api::{Client, PodFilter, PodPhase};

use super::{Options, Report};

/// Child processes, killed when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn podvisor(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().expect("run podvisor");
    assert!(
        out.status.success(),
        "podvisor {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub async fn run(bin: &str, store: &str, store_url: Option<String>, o: &Options) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("server").display().to_string();
    let mut store_args = vec![];
    if let Some(url) = &store_url {
        store_args = vec!["--store".to_string(), url.clone()];
    }
    let with_store = |mut args: Vec<String>| {
        args.extend(store_args.iter().cloned());
        args
    };
    let admin = podvisor(
        bin,
        &with_store(vec![
            "server".into(),
            "init".into(),
            "--state-dir".into(),
            state.clone(),
        ])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    let mut children = Children(Vec::new());
    let mut server = Command::new(bin)
        .args(with_store(vec![
            "server".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--state-dir".into(),
            state.clone(),
        ]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn podvisor server");
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let url = loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the server did not start"
        );
        if let Some(rest) = line.split("server listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || {
        let mut sink = String::new();
        while stderr.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    children.0.push(server);
    for h in 0..o.hosts {
        let name = format!("host-{h:02}");
        let token = podvisor(
            bin,
            &with_store(vec![
                "server".into(),
                "token".into(),
                "create".into(),
                "--host".into(),
                name.clone(),
                "--state-dir".into(),
                state.clone(),
            ])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        );
        let host_state = dir.path().join(&name).display().to_string();
        let child = Command::new(bin)
            .args([
                "host",
                "--server",
                &url,
                "--token",
                &token,
                "--name",
                &name,
                "--state-dir",
                &host_state,
            ])
            .args([
                "--runtime",
                "ack-without-vm",
                "--cpu",
                "16",
                "--memory",
                "16Gi",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn podvisor host");
        children.0.push(child);
    }
    let user = Client::new(&url, Some(&admin)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = user
            .list_hosts()
            .await
            .map(|l| l.items.iter().filter(|h| h.status.ready).count())
            .unwrap_or(0);
        if ready == o.hosts {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {ready} of {} hosts registered",
            o.hosts
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Count Running pods and keep the time each host acknowledged its pod.
    let mut all = user.pod_feed(PodFilter::all(), None);
    let total = o.pods;
    let done = tokio::spawn(async move {
        let mut started: HashMap<String, SystemTime> = HashMap::new();
        while let Some(event) = all.recv().await {
            if let PodFeedEvent::Changed(PodEvent::Modified(p)) = event
                && p.status.phase == PodPhase::Running
                && let Some(t) = p.status.start_time
            {
                started.insert(p.metadata.name.clone(), t.into());
                if started.len() == total {
                    return (Instant::now(), started);
                }
            }
        }
        panic!("feed ended");
    });

    let applied_at: Arc<Mutex<HashMap<String, SystemTime>>> = Arc::default();
    let start = Instant::now();
    super::apply_pods(&user, total, o.concurrency, &applied_at, SystemTime::now).await;
    let applied = start.elapsed();
    let (finished, started) = tokio::time::timeout(Duration::from_secs(600), done)
        .await
        .expect("all pods Running within 10 minutes")
        .unwrap();
    let applied_at = applied_at.lock().unwrap();
    let latencies = applied_at
        .iter()
        .map(|(name, t)| started[name].duration_since(*t).unwrap_or_default())
        .collect();
    drop(children);
    Report {
        store: store.to_string(),
        store_creates: Duration::ZERO,
        all_running: finished.duration_since(start),
        applied,
        latencies,
    }
}
