//! The SQLite store shared by real separate processes: this test binary
//! runs copies of itself (the ignored `child_process` test, picked by
//! environment variables) as the other processes.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::next_event;
use podvisor_store::{LeaseKeeper, SqliteOptions, SqliteStore, Store, WatchEvent};

const ROLE: &str = "PODVISOR_STORE_TEST_ROLE";
const DB: &str = "PODVISOR_STORE_TEST_DB";
/// A directory where children announce they are ready (`ready.<pid>`) and
/// wait for `go`: they start together however slowly each was spawned.
const GATE: &str = "PODVISOR_STORE_TEST_GATE";
/// The first key a racing child tries to create.
const FIRST_KEY: &str = "PODVISOR_STORE_TEST_FIRST_KEY";
const GATE_TIMEOUT: Duration = Duration::from_secs(120);
const RACE_KEYS: usize = 30;
const INCREMENTS: usize = 20;
const TTL: Duration = Duration::from_secs(2);

/// A child process, killed if the test fails before it ends.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }

    fn wait_with_output(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs this test binary's `child_process` test as a child with `role`.
fn spawn_child(role: &str, db: &Path, gate: Option<&Path>, first_key: usize) -> ChildGuard {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.env(FIRST_KEY, first_key.to_string());
    if let Some(gate) = gate {
        command.env(GATE, gate);
    }
    let child = command
        .args([
            "--exact",
            "child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(DB, db)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ChildGuard(Some(child))
}

/// What a child printed after the `child: ` marker (libtest prints its
/// own text around it, the first on the same line).
fn marked_lines(output: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(output)
        .lines()
        .filter_map(|l| l.split_once("child: ").map(|(_, m)| m.to_string()))
        .collect()
}

/// Entry point of the child processes; does nothing useful on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by the other tests in this file"]
async fn child_process() {
    let role = std::env::var(ROLE).expect("child_process runs only as a child of these tests");
    let db = std::env::var(DB).unwrap();
    // Children spawned together race to create the file and its schema...
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(Path::new(&db), SqliteOptions::default())
            .await
            .unwrap(),
    );
    // ...and then start their work together, to make the races real.
    if let Some(gate) = std::env::var_os(GATE) {
        let gate = Path::new(&gate);
        std::fs::write(gate.join(format!("ready.{}", std::process::id())), b"").unwrap();
        let deadline = Instant::now() + GATE_TIMEOUT;
        while !gate.join("go").exists() {
            assert!(
                Instant::now() < deadline,
                "the parent never opened the gate"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let me = std::process::id().to_string();
    match role.as_str() {
        "race" => {
            let _ = store.create("counter", b"0", None).await.unwrap();
            // Each child starts at a different key and goes round, so every
            // key is contested by a child that starts there and by those
            // arriving later, whichever child the scheduler favours.
            let first: usize = std::env::var(FIRST_KEY).unwrap().parse().unwrap();
            for i in 0..RACE_KEYS {
                let key = (first + i) % RACE_KEYS;
                if store
                    .create(&format!("race/{key}"), me.as_bytes(), None)
                    .await
                    .unwrap()
                    .is_ok()
                {
                    println!("child: won race/{key}");
                }
                // Interleave CAS increments with the creates.
                if i < INCREMENTS {
                    loop {
                        let kv = store.get("counter").await.unwrap().unwrap();
                        let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                        let next = (n + 1).to_string();
                        let swapped = store
                            .update("counter", next.as_bytes(), kv.mod_revision)
                            .await
                            .unwrap();
                        if swapped.is_ok() {
                            break;
                        }
                    }
                }
                // Give up the CPU between steps so that, even on a loaded
                // machine, no child runs the whole race alone.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        "hold-lease" => {
            let keeper = LeaseKeeper::start(store.clone(), TTL).await.unwrap();
            store
                .put("held/key", me.as_bytes(), Some(keeper.id()))
                .await
                .unwrap();
            println!("child: holding {}", keeper.id());
            tokio::time::sleep(Duration::from_secs(600)).await; // until killed
        }
        other => panic!("unknown child role {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_and_cas_are_atomic_across_processes() {
    const CHILDREN: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let gate = dir.path().join("gate");
    std::fs::create_dir(&gate).unwrap();
    // The children also race to create the file and its schema.
    let mut children: Vec<ChildGuard> = (0..CHILDREN)
        .map(|n| spawn_child("race", &db, Some(&gate), n * RACE_KEYS / CHILDREN))
        .collect();
    // Open the gate once every child is ready, however loaded the machine.
    let deadline = Instant::now() + GATE_TIMEOUT;
    while std::fs::read_dir(&gate).unwrap().count() < CHILDREN {
        for child in &mut children {
            if let Some(status) = child.child().try_wait().unwrap() {
                panic!("a child ended before the race: {status}");
            }
        }
        assert!(Instant::now() < deadline, "children never became ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(gate.join("go"), b"").unwrap();
    let mut wins: Vec<(u32, String)> = Vec::new();
    for mut child in children.drain(..) {
        let pid = child.child().id();
        let out = child.wait_with_output();
        assert!(out.status.success(), "child {pid} failed: {}", out.status);
        for line in marked_lines(&out.stdout) {
            wins.push((pid, line.strip_prefix("won ").unwrap().to_string()));
        }
    }
    let store = SqliteStore::open(&db, SqliteOptions::default())
        .await
        .unwrap();
    // Every key was created exactly once, by the process whose value it holds.
    assert_eq!(wins.len(), RACE_KEYS, "{wins:?}");
    for i in 0..RACE_KEYS {
        let key = format!("race/{i}");
        let winners: Vec<u32> = wins
            .iter()
            .filter(|(_, k)| *k == key)
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(winners.len(), 1, "{key} won by {winners:?}");
        let stored = store.get(&key).await.unwrap().unwrap();
        assert_eq!(stored.value, winners[0].to_string().as_bytes());
    }
    let distinct: std::collections::BTreeSet<u32> = wins.iter().map(|(p, _)| *p).collect();
    assert!(
        distinct.len() > 1,
        "only one process ever won: the race did not happen"
    );
    // No increment was lost.
    let counter = store.get("counter").await.unwrap().unwrap();
    assert_eq!(
        counter.value,
        (CHILDREN * INCREMENTS).to_string().as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_process_loses_its_lease_after_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let mut guard = spawn_child("hold-lease", &db, None, 0);
    let child = guard.child();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("child: holding") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "child ended before taking its lease"
        );
    }
    let store = SqliteStore::open(&db, SqliteOptions::default())
        .await
        .unwrap();
    let held = store
        .get("held/key")
        .await
        .unwrap()
        .expect("the child's key");
    assert_eq!(held.value, child.id().to_string().as_bytes());
    let mut watch = store.watch("held/", held.mod_revision).await.unwrap();
    // The child's keep-alives hold the key past its TTL.
    tokio::time::sleep(TTL + TTL / 2).await;
    assert!(
        store.get("held/key").await.unwrap().is_some(),
        "kept alive by the child"
    );

    child.kill().unwrap(); // SIGKILL: no chance to revoke
    let killed = Instant::now();
    child.wait().unwrap();
    // Nobody writes: this process's watch polling purges the expired lease.
    match next_event(&mut watch, TTL + Duration::from_secs(3))
        .await
        .unwrap()
    {
        WatchEvent::Delete { key, .. } => assert_eq!(key, "held/key"),
        other => panic!("expected the key's deletion, got {other:?}"),
    }
    let after = killed.elapsed();
    // The last keep-alive was at most TTL/3 before the kill.
    assert!(
        after >= TTL / 2,
        "deleted {after:?} after the kill: before the TTL ran out"
    );
    assert!(
        after <= TTL + Duration::from_millis(500),
        "deleted only {after:?} after the kill"
    );
    assert_eq!(store.get("held/key").await.unwrap(), None);
}
