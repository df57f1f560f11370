//! The SQLite schema, opening a store file, and the reads (keys, the
//! revision, the event log for watches). Writes are in `write.rs`, which
//! builds on this; a read that must not see keys of expired leases purges
//! them first with `write::purge_if_due`.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension};

use crate::{KeyValue, LeaseId, Revision, WatchEvent};

/// `PRAGMA application_id` of a podvisor store file ("podv").
const APPLICATION_ID: i32 = 0x706f_6476;
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE store_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO store_meta (name, value) VALUES ('schema', 1), ('revision', 0), ('compacted', 0);
CREATE TABLE kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    lease INTEGER
) WITHOUT ROWID;
CREATE INDEX kv_by_lease ON kv (lease) WHERE lease IS NOT NULL;
-- kind: 0 put, 1 delete (value, create_revision and lease are NULL)
CREATE TABLE events (
    revision INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    key BLOB NOT NULL,
    value BLOB,
    create_revision INTEGER,
    lease INTEGER
);
CREATE TABLE leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX leases_by_expiry ON leases (expires_ms);
";

/// Failures of the operations below; `super` turns them into `StoreError`s
/// naming the store.
#[derive(Debug)]
pub(super) enum DbError {
    Sqlite(rusqlite::Error),
    LeaseNotFound(LeaseId),
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    /// The file is not a podvisor store, or holds data it cannot read.
    Foreign(String),
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError::Sqlite(e)
    }
}

impl DbError {
    /// The database was locked by other connections for the whole busy timeout.
    pub(super) fn is_busy(&self) -> bool {
        matches!(self, DbError::Sqlite(e) if is_busy(e))
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

type Result<T> = std::result::Result<T, DbError>;

/// Wall-clock time in unix milliseconds: lease expiry is compared across
/// processes, so a monotonic clock of one process would not do.
pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Opens `path` (creating it and the schema if new) in WAL mode.
pub(super) fn connect(path: &Path, busy_timeout: Duration, durable: bool) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    // Switching to WAL takes an exclusive lock and does not always wait for
    // the busy handler, so several processes creating the file at once retry.
    let deadline = Instant::now() + busy_timeout;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => break,
            Ok(mode) => {
                return Err(DbError::Foreign(format!(
                    "SQLite refused WAL mode (journal mode stays {mode:?}); is the file on a filesystem without shared memory, like NFS?"
                )));
            }
            Err(e) if is_busy(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
    conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
    init_schema(&conn)?;
    Ok(conn)
}

fn init_schema(conn: &Connection) -> Result<()> {
    let app_id: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    if app_id == APPLICATION_ID {
        return check_schema_version(conn);
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let app_id: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        if app_id == APPLICATION_ID {
            return Ok(()); // another process created it meanwhile
        }
        let tables: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'",
            [],
            |r| r.get(0),
        )?;
        if app_id != 0 || tables > 0 {
            return Err(DbError::Foreign(
                "the file is an SQLite database of another program, not a podvisor store".into(),
            ));
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        Ok(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    check_schema_version(conn)
}

fn check_schema_version(conn: &Connection) -> Result<()> {
    let version = meta(conn, "schema")?;
    if version != SCHEMA_VERSION {
        return Err(DbError::Foreign(format!(
            "the store has schema version {version}; this podvisor reads version {SCHEMA_VERSION}"
        )));
    }
    Ok(())
}

pub(super) fn meta(conn: &Connection, name: &str) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT value FROM store_meta WHERE name = ?1",
        [name],
        |r| r.get(0),
    )?)
}

fn key_string(key: Vec<u8>) -> Result<String> {
    String::from_utf8(key).map_err(|e| {
        DbError::Foreign(format!(
            "a key is not UTF-8: {:?}",
            String::from_utf8_lossy(e.as_bytes())
        ))
    })
}

/// The smallest key greater than every key starting with `prefix`, or
/// `None` if there is none (empty prefix).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let i = prefix.iter().rposition(|&b| b < 0xff)?;
    let mut end = prefix[..=i].to_vec();
    end[i] += 1;
    Some(end)
}

/// `key >= ?1 [AND key < ?2]` for keys under `prefix`, and the parameters.
fn prefix_clause(prefix: &str) -> (&'static str, Vec<Vec<u8>>) {
    match prefix_end(prefix.as_bytes()) {
        Some(end) => (
            "key >= ?1 AND key < ?2",
            vec![prefix.as_bytes().to_vec(), end],
        ),
        None => ("key >= ?1", vec![prefix.as_bytes().to_vec()]),
    }
}

const KV_COLUMNS: &str = "key, value, create_revision, mod_revision, lease";

fn kv_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Vec<u8>, KeyValue)> {
    Ok((
        row.get(0)?,
        KeyValue {
            key: String::new(),
            value: row.get(1)?,
            create_revision: row.get(2)?,
            mod_revision: row.get(3)?,
            lease: row.get(4)?,
        },
    ))
}

fn with_key((key, mut kv): (Vec<u8>, KeyValue)) -> Result<KeyValue> {
    kv.key = key_string(key)?;
    Ok(kv)
}

pub(super) fn get_kv(conn: &Connection, key: &str) -> Result<Option<KeyValue>> {
    conn.query_row(
        &format!("SELECT {KV_COLUMNS} FROM kv WHERE key = ?1"),
        [key.as_bytes()],
        kv_from_row,
    )
    .optional()?
    .map(with_key)
    .transpose()
}

/// The keys under `prefix` and the store's revision, from one snapshot.
pub(super) fn list(conn: &mut Connection, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
    let tx = conn.transaction()?; // one snapshot for the keys and the revision
    let (clause, args) = prefix_clause(prefix);
    let mut stmt = tx.prepare(&format!(
        "SELECT {KV_COLUMNS} FROM kv WHERE {clause} ORDER BY key"
    ))?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), kv_from_row)?;
    let mut kvs = Vec::new();
    for row in rows {
        kvs.push(with_key(row?)?);
    }
    drop(stmt);
    let revision = meta(&tx, "revision")?;
    tx.commit()?;
    Ok((kvs, revision))
}

/// Leases whose time has come (their keys are deleted by the next write).
pub(super) fn any_lease_expired(conn: &Connection) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM leases WHERE expires_ms <= ?1)",
        [now_ms()],
        |r| r.get(0),
    )?)
}

/// The events under `prefix` after revision `after`, at most `limit`, and
/// the revision the watcher has now seen everything up to (the store's
/// revision if fewer than `limit` matched, so a watcher of a quiet prefix
/// keeps up with the log and is not compacted away).
pub(super) fn poll_events(
    conn: &mut Connection,
    prefix: &str,
    after: Revision,
    limit: usize,
) -> Result<(Vec<WatchEvent>, Revision)> {
    let tx = conn.transaction()?;
    let compacted = meta(&tx, "compacted")?;
    if after < compacted {
        return Err(DbError::Compacted {
            requested: after,
            oldest: compacted + 1,
        });
    }
    let current = meta(&tx, "revision")?;
    let (clause, mut args) = prefix_clause(prefix);
    let n = args.len();
    let sql = format!(
        "SELECT revision, kind, key, value, create_revision, lease FROM events
         WHERE {clause} AND revision > ?{} AND revision <= ?{} ORDER BY revision LIMIT ?{}",
        n + 1,
        n + 2,
        n + 3
    );
    let mut params: Vec<Box<dyn rusqlite::ToSql>> = args
        .drain(..)
        .map(|a| Box::new(a) as Box<dyn rusqlite::ToSql>)
        .collect();
    params.push(Box::new(after));
    params.push(Box::new(current));
    params.push(Box::new(limit as i64));
    let mut stmt = tx.prepare_cached(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
        Ok((
            r.get::<_, Revision>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, Vec<u8>>(2)?,
            r.get::<_, Option<Vec<u8>>>(3)?,
            r.get::<_, Option<Revision>>(4)?,
            r.get::<_, Option<LeaseId>>(5)?,
        ))
    })?;
    let mut events = Vec::new();
    for row in rows {
        let (revision, kind, key, value, create_revision, lease) = row?;
        let key = key_string(key)?;
        events.push(match kind {
            0 => WatchEvent::Put(KeyValue {
                key,
                value: value.unwrap_or_default(),
                create_revision: create_revision.unwrap_or(revision),
                mod_revision: revision,
                lease,
            }),
            _ => WatchEvent::Delete { key, revision },
        });
    }
    drop(stmt);
    tx.commit()?;
    let seen = if events.len() == limit {
        events.last().map_or(current, WatchEvent::revision)
    } else {
        current
    };
    Ok((events, seen))
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_range() {
        assert_eq!(prefix_end(b"a/"), Some(b"a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b""), None);
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }
}
