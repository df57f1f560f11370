//! The embedded SQLite backend: one database file shared by every process
//! on one host. Writes are `BEGIN IMMEDIATE` transactions, so creates and
//! compare-and-swaps are atomic across processes; watches poll the event
//! log (and are woken at once by writes from their own process). All SQLite
//! calls run on tokio's blocking pool.

mod db;
mod fs;
mod write;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{Notify, mpsc};

use self::db::DbError;
use crate::{
    KeyValue, LeaseId, Revision, Store, StoreError, WatchEvent, WatchStream, check_after,
    check_key, check_ttl,
};

/// Tuning of a [`SqliteStore`]; [`Default`] is what [`crate::open`] uses.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// How many of the latest events the log keeps for watches; a watch
    /// from before them gets [`StoreError::Compacted`].
    pub history: u32,
    /// How often a watch polls the event log (and purges expired leases).
    pub poll_interval: Duration,
    /// How long a write waits for other processes' transactions before it
    /// fails with [`StoreError::Unavailable`].
    pub busy_timeout: Duration,
    /// `synchronous=FULL` (true): a commit survives power loss. `NORMAL`
    /// (false) survives a crash of the process but may lose the last
    /// commits on power loss; it is faster.
    pub durable: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            history: 10_000,
            poll_interval: Duration::from_millis(25),
            busy_timeout: Duration::from_secs(30),
            durable: true,
        }
    }
}

/// Events a watch reads from the log per query.
const WATCH_BATCH: usize = 512;
/// Events buffered in a [`WatchStream`] before the poller waits for the reader.
const WATCH_CHANNEL: usize = 256;

/// The SQLite backend of [`Store`].
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    path: PathBuf,
    options: SqliteOptions,
    conn: Mutex<Connection>,
    /// Woken after every write through any store of this process on the
    /// same file, so watches in this process need not wait for their poll.
    changed: Arc<Notify>,
}

/// The [`Inner::changed`] of each store file open in this process.
fn change_signal(path: &Path) -> Arc<Notify> {
    static SIGNALS: OnceLock<Mutex<HashMap<PathBuf, Weak<Notify>>>> = OnceLock::new();
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut signals = SIGNALS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    signals.retain(|_, s| s.strong_count() > 0);
    if let Some(signal) = signals.get(&key).and_then(Weak::upgrade) {
        return signal;
    }
    let signal = Arc::new(Notify::new());
    signals.insert(key, Arc::downgrade(&signal));
    signal
}

/// Checks where the file is, then opens it (see [`SqliteStore::open`]).
fn open_file(
    path: &Path,
    options: &SqliteOptions,
    url: &str,
) -> Result<(Connection, Arc<Notify>), StoreError> {
    let backend = |reason: String| StoreError::Backend {
        url: url.to_string(),
        reason,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(backend(format!(
            "directory {} does not exist",
            dir.display()
        )));
    }
    if let Some(fs) = fs::network_filesystem(dir) {
        return Err(backend(format!(
            "{} is on {fs}, a network filesystem: SQLite's locks do not work across hosts there; keep the SQLite store on a local disk, or use etcd:// for a cluster",
            dir.display()
        )));
    }
    let conn = db::connect(path, options.busy_timeout, options.durable)
        .map_err(|e| store_error(url, options, e))?;
    Ok((conn, change_signal(path)))
}

impl SqliteStore {
    /// Opens (creating if needed) the store file at `path`. Its directory
    /// must exist and be on a local filesystem (not NFS or the like).
    pub async fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let url = format!("sqlite:{}", path.display());
        if options.history == 0 {
            return Err(StoreError::InvalidRequest {
                url,
                reason: "the event history must keep at least one event".into(),
            });
        }
        let (conn, changed) = {
            let (path, options, task_url) = (path.to_path_buf(), options.clone(), url.clone());
            tokio::task::spawn_blocking(move || open_file(&path, &options, &task_url))
                .await
                .map_err(|e| join_error(&url, e))??
        };
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                url,
                path: path.to_path_buf(),
                options,
                conn: Mutex::new(conn),
                changed,
            }),
        })
    }

    /// `sqlite:<path>`, as named in errors.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Runs `f` on this store's connection on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, i64) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn, i64::from(inner.options.history))
                .map_err(|e| store_error(&inner.url, &inner.options, e))
        })
        .await
        .map_err(|e| join_error(&self.inner.url, e))?
    }

    /// Runs the read `f` after purging expired leases (so it sees none of
    /// their keys).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.run(move |conn, history| {
            write::purge_if_due(conn, history)?;
            f(conn)
        })
        .await
    }

    /// Runs `f` in a write transaction (see [`write::write`]).
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut write::Writer<'_>) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let result = self
            .run(move |conn, history| write::write(conn, history, f))
            .await;
        self.inner.changed.notify_waiters();
        result
    }
}

fn store_error(url: &str, options: &SqliteOptions, e: DbError) -> StoreError {
    if e.is_busy() {
        return StoreError::Unavailable {
            url: url.to_string(),
            reason: format!(
                "the database stayed locked by other connections for the whole busy timeout ({:?})",
                options.busy_timeout
            ),
        };
    }
    match e {
        DbError::LeaseNotFound(lease) => StoreError::LeaseNotFound(lease),
        DbError::Compacted { requested, oldest } => StoreError::Compacted { requested, oldest },
        DbError::Foreign(reason) => StoreError::Backend {
            url: url.to_string(),
            reason,
        },
        DbError::Sqlite(e) => StoreError::Backend {
            url: url.to_string(),
            reason: format!("SQLite: {e}"),
        },
    }
}

fn join_error(url: &str, e: tokio::task::JoinError) -> StoreError {
    StoreError::Backend {
        url: url.to_string(),
        reason: format!("the SQLite worker task failed: {e}"),
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(self.url(), key)?;
        let key = key.to_string();
        self.read(move |conn| db::get_kv(conn, &key)).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let prefix = prefix.to_string();
        self.read(move |conn| db::list(conn, &prefix)).await
    }

    async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        check_key(self.url(), key)?;
        let (key, value) = (key.to_string(), value.to_vec());
        self.write(move |w| w.put(&key, &value, lease)).await
    }

    async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Result<Revision, KeyValue>, StoreError> {
        check_key(self.url(), key)?;
        let (key, value) = (key.to_string(), value.to_vec());
        self.write(move |w| w.create(&key, &value, lease)).await
    }

    async fn update(
        &self,
        key: &str,
        value: &[u8],
        expected: Revision,
    ) -> Result<Result<Revision, Option<KeyValue>>, StoreError> {
        check_key(self.url(), key)?;
        let (key, value) = (key.to_string(), value.to_vec());
        self.write(move |w| w.update(&key, &value, expected)).await
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        check_key(self.url(), key)?;
        let key = key.to_string();
        self.write(move |w| w.delete(&key)).await
    }

    async fn delete_if(&self, key: &str, expected: Revision) -> Result<bool, StoreError> {
        check_key(self.url(), key)?;
        let key = key.to_string();
        self.write(move |w| w.delete_if(&key, expected)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        check_ttl(self.url(), ttl)?;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.write(move |w| w.grant_lease(ttl_ms)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.write(move |w| w.keep_alive(lease)).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.write(move |w| w.revoke(lease)).await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        check_after(self.url(), prefix, after)?;
        let inner = self.inner.clone();
        let owned_prefix = prefix.to_string();
        // Each watch polls on a connection of its own, so it never waits
        // for this store's other calls. The first poll runs here, so a
        // compacted start revision is an error of `watch` itself.
        let (conn, first) = tokio::task::spawn_blocking(move || {
            let history = i64::from(inner.options.history);
            let mut conn = db::connect(
                &inner.path,
                inner.options.busy_timeout,
                inner.options.durable,
            )
            .map_err(|e| store_error(&inner.url, &inner.options, e))?;
            let first = write::purge_if_due(&mut conn, history)
                .and_then(|()| db::poll_events(&mut conn, &owned_prefix, after, WATCH_BATCH))
                .map_err(|e| store_error(&inner.url, &inner.options, e))?;
            Ok::<_, StoreError>((conn, first))
        })
        .await
        .map_err(|e| join_error(self.url(), e))??;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        tokio::spawn(poll_watch(
            self.inner.clone(),
            conn,
            prefix.to_string(),
            first,
            tx,
        ));
        Ok(rx)
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.read(|conn| db::meta(conn, "revision")).await
    }
}

/// Delivers `first`, then polls the event log every `poll_interval`, or
/// at once when this process writes to the file, until the receiver is
/// dropped or an error ends the watch.
async fn poll_watch(
    inner: Arc<Inner>,
    conn: Connection,
    prefix: String,
    first: (Vec<WatchEvent>, Revision),
    tx: mpsc::Sender<Result<WatchEvent, StoreError>>,
) {
    let history = i64::from(inner.options.history);
    let changed = inner.changed.clone();
    let mut conn = Some(conn);
    let (batch, mut seen) = first;
    if !deliver(&tx, batch).await {
        return;
    }
    loop {
        // Registered before the poll, so a write during it still wakes us.
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(mut c) = conn.take() else { return };
        let (p, after) = (prefix.clone(), seen);
        let polled = tokio::task::spawn_blocking(move || {
            let result = write::purge_if_due(&mut c, history)
                .and_then(|()| db::poll_events(&mut c, &p, after, WATCH_BATCH));
            (c, result)
        })
        .await;
        let batch = match polled {
            Ok((c, Ok((events, now_seen)))) => {
                conn = Some(c);
                seen = now_seen;
                events
            }
            Ok((_, Err(e))) => {
                let _ = tx
                    .send(Err(store_error(&inner.url, &inner.options, e)))
                    .await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(join_error(&inner.url, e))).await;
                return;
            }
        };
        let full = batch.len() == WATCH_BATCH;
        if !deliver(&tx, batch).await {
            return;
        }
        if !full {
            tokio::select! {
                _ = tokio::time::sleep(inner.options.poll_interval) => {}
                _ = &mut notified => {}
                _ = tx.closed() => return,
            }
        }
    }
}

/// Sends `events`; false if the receiver is gone.
async fn deliver(
    tx: &mpsc::Sender<Result<WatchEvent, StoreError>>,
    events: Vec<WatchEvent>,
) -> bool {
    for event in events {
        if tx.send(Ok(event)).await.is_err() {
            return false;
        }
    }
    true
}
