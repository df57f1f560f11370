//! Write transactions: each purges expired leases, makes its change, logs
//! one event per changed key (each with its own revision) and trims the
//! event log to the configured history, all in one `BEGIN IMMEDIATE`
//! transaction, so writes are atomic across processes.

use rusqlite::{Connection, Transaction, TransactionBehavior, params};

use super::db::{DbError, any_lease_expired, get_kv, meta, now_ms};
use crate::{KeyValue, LeaseId, Revision};

type Result<T> = std::result::Result<T, DbError>;

/// One write transaction: its revision counter and the events it logs.
pub(super) struct Writer<'c> {
    tx: Transaction<'c>,
    revision: Revision,
    changed: bool,
    now: i64,
}

/// Runs `f` in an IMMEDIATE transaction after purging expired leases. The
/// purge is committed even if `f` refuses (e.g. `LeaseNotFound`); a SQLite
/// failure rolls everything back.
pub(super) fn write<T>(
    conn: &mut Connection,
    history: i64,
    f: impl FnOnce(&mut Writer<'_>) -> Result<T>,
) -> Result<T> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let revision = meta(&tx, "revision")?;
    let mut w = Writer {
        tx,
        revision,
        changed: false,
        now: now_ms(),
    };
    w.purge_expired()?;
    let result = f(&mut w);
    if let Err(DbError::Sqlite(_)) = result {
        return result; // dropping the transaction rolls it back
    }
    w.finish(history)?;
    result
}

/// Purges expired leases in a write transaction if any is due, so that a
/// read that follows sees none of their keys.
pub(super) fn purge_if_due(conn: &mut Connection, history: i64) -> Result<()> {
    if any_lease_expired(conn)? {
        write(conn, history, |_| Ok(()))?;
    }
    Ok(())
}

impl Writer<'_> {
    fn next_revision(&mut self) -> Revision {
        self.revision += 1;
        self.changed = true;
        self.revision
    }

    fn finish(self, history: i64) -> Result<()> {
        if self.changed {
            self.tx.execute(
                "UPDATE store_meta SET value = ?1 WHERE name = 'revision'",
                [self.revision],
            )?;
            let cutoff = self.revision - history;
            if cutoff > meta(&self.tx, "compacted")? {
                self.tx
                    .execute("DELETE FROM events WHERE revision <= ?1", [cutoff])?;
                self.tx.execute(
                    "UPDATE store_meta SET value = ?1 WHERE name = 'compacted'",
                    [cutoff],
                )?;
            }
        }
        self.tx.commit()?;
        Ok(())
    }

    fn purge_expired(&mut self) -> Result<()> {
        let expired: Vec<LeaseId> = {
            let mut stmt = self
                .tx
                .prepare_cached("SELECT id FROM leases WHERE expires_ms <= ?1 ORDER BY id")?;
            stmt.query_map([self.now], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        for lease in expired {
            self.end_lease(lease)?;
        }
        Ok(())
    }

    /// Deletes the lease and its keys, one Delete event per key.
    fn end_lease(&mut self, lease: LeaseId) -> Result<()> {
        let keys: Vec<Vec<u8>> = {
            let mut stmt = self
                .tx
                .prepare_cached("SELECT key FROM kv WHERE lease = ?1 ORDER BY key")?;
            stmt.query_map([lease], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        for key in keys {
            self.delete_key(&key)?;
        }
        self.tx
            .execute("DELETE FROM leases WHERE id = ?1", [lease])?;
        Ok(())
    }

    fn delete_key(&mut self, key: &[u8]) -> Result<Revision> {
        let rev = self.next_revision();
        self.tx.execute("DELETE FROM kv WHERE key = ?1", [key])?;
        self.tx.execute(
            "INSERT INTO events (revision, kind, key) VALUES (?1, 1, ?2)",
            params![rev, key],
        )?;
        Ok(rev)
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<()> {
        if let Some(lease) = lease {
            let live: bool = self.tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM leases WHERE id = ?1)",
                [lease],
                |r| r.get(0),
            )?;
            if !live {
                return Err(DbError::LeaseNotFound(lease));
            }
        }
        Ok(())
    }

    /// Writes `key` with `create_revision` (or the new revision if `None`).
    fn write_key(
        &mut self,
        key: &str,
        value: &[u8],
        create_revision: Option<Revision>,
        lease: Option<LeaseId>,
    ) -> Result<Revision> {
        let rev = self.next_revision();
        let create_revision = create_revision.unwrap_or(rev);
        self.tx.execute(
            "INSERT INTO kv (key, value, create_revision, mod_revision, lease)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value,
                 mod_revision = excluded.mod_revision, lease = excluded.lease",
            params![key.as_bytes(), value, create_revision, rev, lease],
        )?;
        self.tx.execute(
            "INSERT INTO events (revision, kind, key, value, create_revision, lease)
             VALUES (?1, 0, ?2, ?3, ?4, ?5)",
            params![rev, key.as_bytes(), value, create_revision, lease],
        )?;
        Ok(rev)
    }

    pub(super) fn put(
        &mut self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Revision> {
        self.check_lease(lease)?;
        let existing = get_kv(&self.tx, key)?.map(|kv| kv.create_revision);
        self.write_key(key, value, existing, lease)
    }

    pub(super) fn create(
        &mut self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<std::result::Result<Revision, KeyValue>> {
        if let Some(existing) = get_kv(&self.tx, key)? {
            return Ok(Err(existing));
        }
        self.check_lease(lease)?;
        Ok(Ok(self.write_key(key, value, None, lease)?))
    }

    pub(super) fn update(
        &mut self,
        key: &str,
        value: &[u8],
        expected: Revision,
    ) -> Result<std::result::Result<Revision, Option<KeyValue>>> {
        match get_kv(&self.tx, key)? {
            Some(cur) if cur.mod_revision == expected => Ok(Ok(self.write_key(
                key,
                value,
                Some(cur.create_revision),
                cur.lease,
            )?)),
            cur => Ok(Err(cur)),
        }
    }

    pub(super) fn delete(&mut self, key: &str) -> Result<Option<Revision>> {
        if get_kv(&self.tx, key)?.is_none() {
            return Ok(None);
        }
        Ok(Some(self.delete_key(key.as_bytes())?))
    }

    pub(super) fn delete_if(&mut self, key: &str, expected: Revision) -> Result<bool> {
        match get_kv(&self.tx, key)? {
            Some(cur) if cur.mod_revision == expected => {
                self.delete_key(key.as_bytes())?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    pub(super) fn grant_lease(&mut self, ttl_ms: i64) -> Result<LeaseId> {
        self.tx.execute(
            "INSERT INTO leases (ttl_ms, expires_ms) VALUES (?1, ?2)",
            params![ttl_ms, self.now.saturating_add(ttl_ms)],
        )?;
        Ok(self.tx.last_insert_rowid())
    }

    pub(super) fn keep_alive(&mut self, lease: LeaseId) -> Result<()> {
        let updated = self.tx.execute(
            "UPDATE leases SET expires_ms = ?1 + ttl_ms WHERE id = ?2",
            params![self.now, lease],
        )?;
        if updated == 0 {
            return Err(DbError::LeaseNotFound(lease));
        }
        Ok(())
    }

    pub(super) fn revoke(&mut self, lease: LeaseId) -> Result<()> {
        self.check_lease(Some(lease))?;
        self.end_lease(lease)
    }
}
