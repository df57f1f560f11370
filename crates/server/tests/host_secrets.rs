//! Host endpoint secrets: the store never holds one in the clear (one an
//! older server left there is sealed when a server starts), and the proxy
//! still presents the right one to the host's daemon.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{TestServer, pod, pod_where};
use podvisor_api::{Host, HostCapacity};
use podvisor_server::Role;

const SECRET: &str = "endpoint-secret-never-in-the-store-0123456789";

/// A host daemon's endpoint that answers every hibernate and records the
/// `Authorization` it was given.
async fn fake_daemon() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = Router::new().route(
        "/pods/{ns}/{name}/hibernate",
        post(move |headers: HeaderMap| {
            let record = record.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                record.lock().unwrap().push(auth);
                (
                    StatusCode::OK,
                    r#"{"kind":"Status","apiVersion":"v1","code":200,"status":"Success","reason":"Success","message":"hibernated"}"#,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// Every byte of the state directory (the SQLite store and its journal).
fn state_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            all.extend(std::fs::read(&path).unwrap());
        }
    }
    all
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Registers host `h1` at `address` and keeps its lease alive.
async fn register(ts: &TestServer, address: &str) -> podvisor_api::Client {
    let host_client = ts.client(Role::Host, "h1").await;
    let host = Host::new(
        "h1",
        HostCapacity {
            cpu: 4000,
            memory: 8 << 30,
        },
        address,
    );
    host_client.register_host(&host, SECRET).await.unwrap();
    let beat = host_client.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = beat.heartbeat("h1").await;
        }
    });
    host_client
}

#[tokio::test]
async fn the_store_holds_no_host_secret_and_the_proxy_still_presents_it() {
    let (address, seen) = fake_daemon().await;
    let ts = TestServer::sqlite().await;
    register(&ts, &address).await;
    ts.admin
        .create_pod(&pod("web", "100m", "64Mi"))
        .await
        .unwrap();
    pod_where(&ts.admin, "web", "scheduled", |p| {
        p.spec.node_name.is_some()
    })
    .await;

    let status = ts.admin.hibernate_pod("default", "web").await.unwrap();
    assert_eq!(status.message, "hibernated");
    assert_eq!(*seen.lock().unwrap(), [format!("Bearer {SECRET}")]);

    let state = ts.dir.path().join("state");
    assert!(
        !holds(&state_bytes(&state), SECRET),
        "the host's endpoint secret is in the store's files in the clear"
    );
}

#[tokio::test]
async fn a_secret_an_older_server_stored_in_the_clear_is_sealed_at_start() {
    let (address, seen) = fake_daemon().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let url = format!("sqlite:{}", state.join("state.db").display());
    // A server registers the host; then, stopped, its record is put back
    // as an older server wrote it: the secret itself.
    {
        let ts = TestServer::start(Some(url.clone()), |c| c.state_dir = state.clone()).await;
        register(&ts, &address).await;
        ts.admin
            .create_pod(&pod("web", "100m", "64Mi"))
            .await
            .unwrap();
        pod_where(&ts.admin, "web", "scheduled", |p| {
            p.spec.node_name.is_some()
        })
        .await;
        drop(ts);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let store = podvisor_store::open(&url).await.unwrap();
    let key = "/registry/host-endpoint-tokens/h1";
    store.put(key, SECRET.as_bytes(), None).await.unwrap();
    drop(store);

    let ts = TestServer::start(Some(url.clone()), |c| c.state_dir = state.clone()).await;
    let store = podvisor_store::open(&url).await.unwrap();
    let record = store.get(key).await.unwrap().unwrap().value;
    assert!(!holds(&record, SECRET), "still in the clear after a start");
    assert!(
        record.starts_with(b"{\"kek\""),
        "{}",
        String::from_utf8_lossy(&record)
    );

    register(&ts, &address).await;
    ts.admin.hibernate_pod("default", "web").await.unwrap();
    assert_eq!(
        seen.lock().unwrap().last().unwrap(),
        &format!("Bearer {SECRET}")
    );
}
