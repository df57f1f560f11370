//! What differs between the backends: opening by URL, bad files and bad
//! servers, etcd namespaces, and watches whose etcd connection drops.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{next_event, open_etcd};
use podvisor_store::{
    LeaseKeeper, SqliteOptions, SqliteStore, Store, StoreError, WatchEvent, open,
};
use podvisor_testbed::etcd::EtcdServer;

const TTL: Duration = Duration::from_secs(2);

#[tokio::test]
async fn open_picks_the_backend_from_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("by-url.db");
    let store = open(&format!("sqlite:{}", path.display())).await.unwrap();
    let rev = store.put("k", b"v", None).await.unwrap();
    // A bare path is the same SQLite file.
    let again = open(path.to_str().unwrap()).await.unwrap();
    assert_eq!(again.get("k").await.unwrap().unwrap().mod_revision, rev);

    let server = EtcdServer::start();
    let etcd = open(&server.url()).await.unwrap();
    etcd.put("k", b"etcd", None).await.unwrap();
    assert_eq!(etcd.get("k").await.unwrap().unwrap().value, b"etcd");

    let err = open("redis://127.0.0.1:6379").await.err().unwrap();
    assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
}

#[tokio::test]
async fn sqlite_refuses_files_that_are_not_its_store_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("no/such/dir/state.db");
    let err = SqliteStore::open(&missing, SqliteOptions::default())
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("no/such/dir does not exist"),
        "{err}"
    );

    let garbage = dir.path().join("garbage.db");
    let bytes: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&garbage, &bytes).unwrap();
    let err = SqliteStore::open(&garbage, SqliteOptions::default())
        .await
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("garbage.db") && msg.contains("not a database"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&garbage).unwrap(),
        bytes,
        "the file was changed"
    );

    let foreign = dir.path().join("other-program.db");
    let conn = rusqlite::Connection::open(&foreign).unwrap();
    conn.execute_batch("CREATE TABLE notes (t TEXT); INSERT INTO notes VALUES ('mine');")
        .unwrap();
    drop(conn);
    let err = SqliteStore::open(&foreign, SqliteOptions::default())
        .await
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("other-program.db") && msg.contains("another program"),
        "{msg}"
    );
    let conn = rusqlite::Connection::open(&foreign).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        tables,
        ["notes"],
        "the other program's database was changed"
    );
}

#[tokio::test]
async fn sqlite_store_reopens_with_its_data_and_revision() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    store.put("a", b"1", None).await.unwrap();
    let rev = store.put("b", b"2", None).await.unwrap();
    drop(store);
    let store = SqliteStore::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    assert_eq!(store.current_revision().await.unwrap(), rev);
    assert_eq!(store.list("").await.unwrap().0.len(), 2);
    assert!(store.put("c", b"3", None).await.unwrap() > rev);
}

#[tokio::test]
async fn etcd_that_does_not_answer_is_unavailable() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("etcd://127.0.0.1:{port}");
    let started = Instant::now();
    let err = open(&url).await.err().unwrap();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn etcd_namespaces_keep_stores_apart() {
    let server = EtcdServer::start();
    let a = open_etcd(&format!("{}?prefix=/team-a/", server.url())).await;
    let b = open_etcd(&format!("{}?prefix=/team-b/", server.url())).await;
    let rev = a.current_revision().await.unwrap();
    let mut watch_b = b.watch("", rev).await.unwrap();
    a.put("pods/x", b"a", None).await.unwrap();
    b.put("pods/x", b"b", None).await.unwrap();
    let (listed, _) = a.list("").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].key.as_str(), listed[0].value.as_slice()),
        ("pods/x", &b"a"[..])
    );
    match next_event(&mut watch_b, Duration::from_secs(5))
        .await
        .unwrap()
    {
        WatchEvent::Put(kv) => assert_eq!(
            (kv.key.as_str(), kv.value.as_slice()),
            ("pods/x", &b"b"[..])
        ),
        other => panic!("unexpected {other:?}"),
    }
    // Without a namespace the full keys show.
    let root = open_etcd(&server.url()).await;
    let all: Vec<String> = root
        .list("")
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(all, ["/team-a/pods/x", "/team-b/pods/x"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_reports_a_lost_connection_and_resumes_after_restart() {
    let mut server = EtcdServer::start();
    let store = open_etcd(&server.url()).await;
    let start = store.current_revision().await.unwrap();
    let mut watch = store.watch("p/", start).await.unwrap();
    store.put("p/1", b"1", None).await.unwrap();
    let seen = next_event(&mut watch, Duration::from_secs(5))
        .await
        .unwrap()
        .revision();
    let shared: Arc<dyn Store> = Arc::new(open_etcd(&server.url()).await);
    let keeper = LeaseKeeper::start(shared, TTL).await.unwrap();

    server.kill();
    let killed = Instant::now();
    let err = next_event(&mut watch, Duration::from_secs(15))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains(&server.url()), "{err}");
    assert!(
        tokio::time::timeout(Duration::from_secs(1), watch.recv())
            .await
            .unwrap()
            .is_none(),
        "nothing follows the error"
    );
    let err = store.get("p/1").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    // No keep-alive can succeed: the keeper gives the lease up after a TTL.
    tokio::time::timeout(TTL + Duration::from_secs(2), keeper.lost())
        .await
        .expect("the keeper reports the loss");
    let after = killed.elapsed();
    assert!(after >= TTL - TTL / 3, "lost after only {after:?}");

    // Same data, same port: the same store handle reconnects, and a watch
    // from the last revision seen gets what happened in between.
    server.restart();
    let mut writer = None;
    for _ in 0..50 {
        match store.put("p/2", b"2", None).await {
            Ok(rev) => {
                writer = Some(rev);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let r2 = writer.expect("the store handle reconnected to the restarted etcd");
    let mut resumed = store.watch("p/", seen).await.unwrap();
    let event = next_event(&mut resumed, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((event.key(), event.revision()), ("p/2", r2));
}
