//! The backends the store tests run against: a SQLite file in a temp dir,
//! and a real etcd server started on loopback by `testbed::etcd`.

#![allow(dead_code)] // each test binary uses part of this

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podvisor_store::{
    EtcdStore, SqliteOptions, SqliteStore, Store, StoreError, StoreUrl, WatchEvent, WatchStream,
};
use podvisor_testbed::etcd::EtcdServer;

/// Events the SQLite test stores keep, so that compaction is quick to reach.
pub const SQLITE_TEST_HISTORY: u32 = 50;

/// A store under test and what it runs on.
pub struct Backend {
    pub store: Arc<dyn Store>,
    pub target: Target,
}

pub enum Target {
    Sqlite {
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
    Etcd(EtcdServer),
}

impl Backend {
    pub async fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let options = SqliteOptions {
            history: SQLITE_TEST_HISTORY,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open(&path, options).await.unwrap();
        Backend {
            store: Arc::new(store),
            target: Target::Sqlite { path, _dir: dir },
        }
    }

    pub async fn etcd() -> Backend {
        let server = EtcdServer::start();
        let store = open_etcd(&server.url()).await;
        Backend {
            store: Arc::new(store),
            target: Target::Etcd(server),
        }
    }

    /// Drops all history up to the current revision (etcd compacts, then
    /// writes one more key; for SQLite, enough writes under `filler/` push
    /// it out of the log). Returns the oldest revision still kept.
    pub async fn compact(&self) -> i64 {
        match &self.target {
            Target::Etcd(server) => {
                let mut client = etcd_client::Client::connect([server.endpoint()], None)
                    .await
                    .unwrap();
                let rev = self.store.current_revision().await.unwrap();
                client
                    .compact(
                        rev,
                        Some(etcd_client::CompactionOptions::new().with_physical()),
                    )
                    .await
                    .unwrap();
                self.store.put("filler/after", b"x", None).await.unwrap();
                rev
            }
            Target::Sqlite { .. } => {
                for i in 0..=SQLITE_TEST_HISTORY {
                    self.store
                        .put(&format!("filler/{i}"), b"x", None)
                        .await
                        .unwrap();
                }
                self.store.current_revision().await.unwrap() - i64::from(SQLITE_TEST_HISTORY) + 1
            }
        }
    }
}

pub async fn open_etcd(url: &str) -> EtcdStore {
    let StoreUrl::Etcd {
        endpoints,
        namespace,
    } = StoreUrl::parse(url).unwrap()
    else {
        panic!("{url} is not an etcd URL");
    };
    EtcdStore::connect(&endpoints, &namespace).await.unwrap()
}

/// The next item of a watch, failing the test after `within`.
pub async fn next_event(
    watch: &mut WatchStream,
    within: Duration,
) -> Result<WatchEvent, StoreError> {
    match tokio::time::timeout(within, watch.recv()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("the watch ended without an error"),
        Err(_) => panic!("no watch event within {within:?}"),
    }
}

/// Asserts that the watch delivers nothing for `quiet`.
pub async fn assert_quiet(watch: &mut WatchStream, quiet: Duration) {
    if let Ok(item) = tokio::time::timeout(quiet, watch.recv()).await {
        panic!("unexpected watch item: {item:?}");
    }
}

/// Polls `get(key)` until the key is gone; returns when, or panics after
/// `within`.
pub async fn wait_gone(store: &dyn Store, key: &str, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if store.get(key).await.unwrap().is_none() {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{key} still present after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
