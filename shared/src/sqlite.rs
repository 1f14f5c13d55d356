//! The embedded store: one SQLite file in WAL mode, with the same semantics as the DynamoDB store.
//!
//! Entities are stored as the JSON of their domain type; the columns beside the body are only the
//! keys and indexes queries need. Blocking calls run on tokio's blocking pool over one connection.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension as _, TransactionBehavior, ffi, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::domain::{
    ApiKeyRecord, Delivery, DeliveryId, Event, EventId, Subscription, SubscriptionId, TenantId,
    Timestamp,
};
use crate::ports::{
    DueDelivery, InsertOutcome, NewEvent, Page, PageRequest, Store, StoreError, StoreResult,
};

/// Bumped with every schema change; `open` migrates older files forward.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash   TEXT PRIMARY KEY NOT NULL,
    tenant_id  TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
-- Tables holding JSON bodies keep their rowid: WITHOUT ROWID suits small rows only, and an
-- event body may be 200 KiB.
CREATE TABLE IF NOT EXISTS subscriptions (
    tenant_id TEXT NOT NULL,
    id        TEXT NOT NULL,
    body      TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE TABLE IF NOT EXISTS events (
    tenant_id TEXT NOT NULL,
    id        TEXT NOT NULL,
    body      TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant_id TEXT NOT NULL,
    key       TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    PRIMARY KEY (tenant_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    tenant_id       TEXT NOT NULL,
    id              TEXT NOT NULL,
    subscription_id TEXT NOT NULL,
    version         INTEGER NOT NULL,
    due_at          INTEGER,
    body            TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX IF NOT EXISTS deliveries_by_subscription
    ON deliveries (tenant_id, subscription_id, id);
-- Sparse: final deliveries (due_at NULL) leave the index, so the sweep reads only live work.
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (due_at) WHERE due_at IS NOT NULL;
";

/// A [`Store`] over one SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    ///
    /// Another process (the `tidings keys create` CLI) may open the same file while a server
    /// runs: WAL lets readers and one writer share it, and the busy timeout makes writers queue.
    /// Blocking (up to that timeout): call it at start-up, not on a busy runtime thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(StoreError::unavailable)?;
        // Before anything else: switching to WAL itself may wait for another process's lock.
        set_busy_timeout(&conn)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(StoreError::unavailable)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::unavailable(format!(
                "{}: SQLite refused WAL mode (got `{mode}`)",
                path.display()
            )));
        }
        Self::init(conn)
    }

    /// A private, empty in-memory database (tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(StoreError::unavailable)?;
        set_busy_timeout(&conn)?;
        Self::init(conn)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        // An accepted event must survive a power cut: FULL syncs the WAL on every commit.
        // (Per connection, not stored in the file, so it is set on every open.)
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(StoreError::unavailable)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(StoreError::unavailable)?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection in the blocking pool.
    async fn call<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // A panic mid-call leaves no half-written state: an open transaction is rolled back
            // when it is dropped during unwinding, so a poisoned lock is still a good connection.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await
        .map_err(StoreError::unavailable)?
    }

    /// After a crash, for the single-process local runner only (it holds an exclusive lock on its
    /// data directory, so no live worker owns any lease and the in-memory queue is gone): every
    /// unfinished delivery is released from its lease and becomes due at its next attempt time
    /// (or now), so the sweep sends it again. Returns how many were touched.
    pub async fn recover_after_restart(&self, now: Timestamp) -> Result<usize, StoreError> {
        self.call(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(StoreError::unavailable)?;
            // Unfinished deliveries are all in the due index.
            let leased: Vec<Delivery> = {
                let mut stmt = tx
                    .prepare("SELECT body FROM deliveries WHERE due_at IS NOT NULL")
                    .map_err(StoreError::unavailable)?;
                let rows = stmt
                    .query_map([], |row| row.get::<_, String>(0))
                    .map_err(StoreError::unavailable)?;
                let mut leased = Vec::new();
                for body in rows {
                    let d: Delivery = decode(&body.map_err(StoreError::unavailable)?)?;
                    let due = d.next_attempt_at.map_or(now, |t| t.max(now));
                    if !d.status.is_final() && (d.lease.is_some() || d.due_at != Some(due)) {
                        leased.push(d);
                    }
                }
                leased
            };
            for d in &leased {
                let expected = d.version;
                let mut next = d.clone();
                next.lease = None;
                next.due_at = Some(d.next_attempt_at.map_or(now, |t| t.max(now)));
                next.updated_at = now;
                next.version = expected.saturating_add(1);
                write_delivery(&tx, &next, expected)?;
            }
            tx.commit().map_err(StoreError::unavailable)?;
            Ok(leased.len())
        })
        .await
    }
}

fn set_busy_timeout(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(StoreError::unavailable)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(StoreError::unavailable)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(StoreError::unavailable)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::unavailable(format!(
            "database schema version {version} is newer than this build supports ({SCHEMA_VERSION})"
        )));
    }
    if version < 1 {
        tx.execute_batch(SCHEMA_V1)
            .map_err(StoreError::unavailable)?;
    }
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(StoreError::unavailable)?;
    }
    tx.commit().map_err(StoreError::unavailable)
}

fn encode<T: Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(StoreError::unavailable)
}

/// `from_str`, not `from_value`: an event's `data` is a `RawValue` and must keep its bytes.
fn decode<T: DeserializeOwned>(body: &str) -> StoreResult<T> {
    serde_json::from_str(body).map_err(StoreError::unavailable)
}

/// A primary-key or unique clash (not any constraint: a NOT NULL failure is a bug, not a conflict).
fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == ErrorCode::ConstraintViolation
                && matches!(
                    f.extended_code,
                    ffi::SQLITE_CONSTRAINT_PRIMARYKEY | ffi::SQLITE_CONSTRAINT_UNIQUE
                )
    )
}

fn millis(t: Option<Timestamp>) -> Option<i64> {
    t.map(Timestamp::unix_millis)
}

/// A page size the queries can use: at least one item, so a cursor always moves forward.
fn page_limit(page: &PageRequest) -> u32 {
    page.limit.max(1)
}

/// Trims the `limit + 1` rows a page query fetched to `limit`, and sets the cursor only when a
/// further item exists (no empty last page).
fn into_page<T>(mut items: Vec<T>, limit: u32, cursor_of: impl Fn(&T) -> String) -> Page<T> {
    let limit = limit as usize;
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor_of)
    } else {
        None
    };
    Page { items, next }
}

fn query_bodies<T: DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(StoreError::unavailable)?;
    let rows = stmt
        .query_map(params, |row| row.get::<_, String>(0))
        .map_err(StoreError::unavailable)?;
    rows.map(|body| decode(&body.map_err(StoreError::unavailable)?))
        .collect()
}

fn query_body<T: DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> StoreResult<Option<T>> {
    let body: Option<String> = conn
        .prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row(params, |row| row.get(0)).optional())
        .map_err(StoreError::unavailable)?;
    body.map(|b| decode(&b)).transpose()
}

/// The version-checked write shared by `update_delivery` and `recover_after_restart`.
fn write_delivery(
    conn: &Connection,
    delivery: &Delivery,
    expected_version: u64,
) -> StoreResult<()> {
    let body = encode(delivery)?;
    let changed = conn
        .prepare_cached(
            "UPDATE deliveries SET body = ?1, version = ?2, due_at = ?3
             WHERE tenant_id = ?4 AND id = ?5 AND version = ?6",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                body,
                delivery.version,
                millis(delivery.due_at),
                delivery.tenant_id.as_str(),
                delivery.id.as_str(),
                expected_version,
            ])
        })
        .map_err(StoreError::unavailable)?;
    if changed == 1 {
        return Ok(());
    }
    let exists = conn
        .prepare_cached("SELECT 1 FROM deliveries WHERE tenant_id = ?1 AND id = ?2")
        .and_then(|mut stmt| {
            stmt.exists(params![delivery.tenant_id.as_str(), delivery.id.as_str()])
        })
        .map_err(StoreError::unavailable)?;
    Err(if exists {
        StoreError::Conflict
    } else {
        StoreError::NotFound
    })
}

impl Store for SqliteStore {
    async fn put_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        let key = key.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO api_keys (key_hash, tenant_id, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key_hash) DO UPDATE
                 SET tenant_id = excluded.tenant_id, created_at = excluded.created_at",
                params![
                    key.key_hash,
                    key.tenant_id.as_str(),
                    key.created_at.unix_millis()
                ],
            )
            .map_err(StoreError::unavailable)?;
            Ok(())
        })
        .await
    }

    async fn tenant_for_api_key(&self, key_hash: &str) -> StoreResult<Option<TenantId>> {
        let key_hash = key_hash.to_owned();
        self.call(move |conn| {
            let tenant: Option<String> = conn
                .query_row(
                    "SELECT tenant_id FROM api_keys WHERE key_hash = ?1",
                    [&key_hash],
                    |row| row.get(0),
                )
                .optional()
                .map_err(StoreError::unavailable)?;
            tenant
                .map(|t| TenantId::parse(&t).map_err(StoreError::unavailable))
                .transpose()
        })
        .await
    }

    async fn insert_subscription(&self, subscription: &Subscription) -> StoreResult<()> {
        let body = encode(subscription)?;
        let tenant = subscription.tenant_id.clone();
        let id = subscription.id.clone();
        self.call(move |conn| {
            match conn.execute(
                "INSERT INTO subscriptions (tenant_id, id, body) VALUES (?1, ?2, ?3)",
                params![tenant.as_str(), id.as_str(), body],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict),
                Err(e) => Err(StoreError::unavailable(e)),
            }
        })
        .await
    }

    async fn get_subscription(
        &self,
        tenant: &TenantId,
        id: &SubscriptionId,
    ) -> StoreResult<Option<Subscription>> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.call(move |conn| {
            query_body(
                conn,
                "SELECT body FROM subscriptions WHERE tenant_id = ?1 AND id = ?2",
                params![tenant.as_str(), id.as_str()],
            )
        })
        .await
    }

    async fn list_subscriptions(
        &self,
        tenant: &TenantId,
        page: &PageRequest,
    ) -> StoreResult<Page<Subscription>> {
        let tenant = tenant.clone();
        let limit = page_limit(page);
        // Ids are never empty, so "after nothing" is "after ''".
        let after = page.after.clone().unwrap_or_default();
        self.call(move |conn| {
            let items: Vec<Subscription> = query_bodies(
                conn,
                "SELECT body FROM subscriptions WHERE tenant_id = ?1 AND id > ?2
                 ORDER BY id LIMIT ?3",
                params![tenant.as_str(), after, i64::from(limit) + 1],
            )?;
            Ok(into_page(items, limit, |s| s.id.as_str().to_owned()))
        })
        .await
    }

    async fn update_subscription(&self, subscription: &Subscription) -> StoreResult<()> {
        let body = encode(subscription)?;
        let tenant = subscription.tenant_id.clone();
        let id = subscription.id.clone();
        self.call(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE subscriptions SET body = ?3 WHERE tenant_id = ?1 AND id = ?2",
                    params![tenant.as_str(), id.as_str(), body],
                )
                .map_err(StoreError::unavailable)?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn delete_subscription(&self, tenant: &TenantId, id: &SubscriptionId) -> StoreResult<()> {
        let (tenant, id) = (tenant.clone(), id.clone());
        // Its deliveries stay: they are the log of what was sent.
        self.call(move |conn| {
            let changed = conn
                .execute(
                    "DELETE FROM subscriptions WHERE tenant_id = ?1 AND id = ?2",
                    params![tenant.as_str(), id.as_str()],
                )
                .map_err(StoreError::unavailable)?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn tenant_subscriptions(&self, tenant: &TenantId) -> StoreResult<Vec<Subscription>> {
        let tenant = tenant.clone();
        self.call(move |conn| {
            query_bodies(
                conn,
                "SELECT body FROM subscriptions WHERE tenant_id = ?1 ORDER BY id",
                [tenant.as_str()],
            )
        })
        .await
    }

    async fn insert_event(&self, new: &NewEvent) -> StoreResult<InsertOutcome> {
        let tenant = new.event.tenant_id.clone();
        let event_id = new.event.id.clone();
        let key = new.idempotency_key.clone();
        let event_body = encode(&new.event)?;
        let deliveries = new
            .deliveries
            .iter()
            .map(|d| Ok((d.clone(), encode(d)?)))
            .collect::<StoreResult<Vec<_>>>()?;
        self.call(move |conn| {
            // IMMEDIATE takes the write lock up front, so the checks below and the inserts are
            // one atomic step even with a second process on the file.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(StoreError::unavailable)?;
            if let Some(key) = &key {
                let seen: Option<String> = tx
                    .query_row(
                        "SELECT event_id FROM idempotency_keys WHERE tenant_id = ?1 AND key = ?2",
                        params![tenant.as_str(), key],
                        |row| row.get(0),
                    )
                    .optional()
                    .map_err(StoreError::unavailable)?;
                if let Some(seen) = seen {
                    let id = EventId::parse(&seen).map_err(StoreError::unavailable)?;
                    return Ok(InsertOutcome::Existing(id));
                }
            }
            let exists = tx
                .prepare_cached("SELECT 1 FROM events WHERE tenant_id = ?1 AND id = ?2")
                .and_then(|mut stmt| stmt.exists(params![tenant.as_str(), event_id.as_str()]))
                .map_err(StoreError::unavailable)?;
            if exists {
                return Ok(InsertOutcome::Existing(event_id));
            }
            tx.execute(
                "INSERT INTO events (tenant_id, id, body) VALUES (?1, ?2, ?3)",
                params![tenant.as_str(), event_id.as_str(), event_body],
            )
            .map_err(StoreError::unavailable)?;
            if let Some(key) = &key {
                tx.execute(
                    "INSERT INTO idempotency_keys (tenant_id, key, event_id) VALUES (?1, ?2, ?3)",
                    params![tenant.as_str(), key, event_id.as_str()],
                )
                .map_err(StoreError::unavailable)?;
            }
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO deliveries
                             (tenant_id, id, subscription_id, version, due_at, body)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .map_err(StoreError::unavailable)?;
                for (d, body) in &deliveries {
                    stmt.execute(params![
                        d.tenant_id.as_str(),
                        d.id.as_str(),
                        d.subscription_id.as_str(),
                        d.version,
                        millis(d.due_at),
                        body,
                    ])
                    .map_err(StoreError::unavailable)?;
                }
            }
            tx.commit().map_err(StoreError::unavailable)?;
            Ok(InsertOutcome::Created)
        })
        .await
    }

    async fn get_event(&self, tenant: &TenantId, id: &EventId) -> StoreResult<Option<Event>> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.call(move |conn| {
            query_body(
                conn,
                "SELECT body FROM events WHERE tenant_id = ?1 AND id = ?2",
                params![tenant.as_str(), id.as_str()],
            )
        })
        .await
    }

    async fn get_delivery(
        &self,
        tenant: &TenantId,
        id: &DeliveryId,
    ) -> StoreResult<Option<Delivery>> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.call(move |conn| {
            query_body(
                conn,
                "SELECT body FROM deliveries WHERE tenant_id = ?1 AND id = ?2",
                params![tenant.as_str(), id.as_str()],
            )
        })
        .await
    }

    async fn update_delivery(&self, delivery: &Delivery, expected_version: u64) -> StoreResult<()> {
        let delivery = delivery.clone();
        self.call(move |conn| write_delivery(conn, &delivery, expected_version))
            .await
    }

    async fn list_deliveries(
        &self,
        tenant: &TenantId,
        subscription: &SubscriptionId,
        page: &PageRequest,
    ) -> StoreResult<Page<Delivery>> {
        let (tenant, subscription) = (tenant.clone(), subscription.clone());
        let limit = page_limit(page);
        let after = page.after.clone();
        self.call(move |conn| {
            let fetch = i64::from(limit) + 1;
            let items: Vec<Delivery> = match &after {
                None => query_bodies(
                    conn,
                    "SELECT body FROM deliveries WHERE tenant_id = ?1 AND subscription_id = ?2
                     ORDER BY id DESC LIMIT ?3",
                    params![tenant.as_str(), subscription.as_str(), fetch],
                )?,
                Some(after) => query_bodies(
                    conn,
                    "SELECT body FROM deliveries
                     WHERE tenant_id = ?1 AND subscription_id = ?2 AND id < ?3
                     ORDER BY id DESC LIMIT ?4",
                    params![tenant.as_str(), subscription.as_str(), after, fetch],
                )?,
            };
            Ok(into_page(items, limit, |d| d.id.as_str().to_owned()))
        })
        .await
    }

    async fn due_deliveries(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<DueDelivery>> {
        self.call(move |conn| {
            let mut stmt = conn
                .prepare_cached(DUE_QUERY)
                .map_err(StoreError::unavailable)?;
            let rows = stmt
                .query_map(params![now.unix_millis(), i64::from(limit)], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, i64>(2)?,
                    ))
                })
                .map_err(StoreError::unavailable)?;
            rows.map(|row| {
                let (tenant, id, due_at) = row.map_err(StoreError::unavailable)?;
                Ok(DueDelivery {
                    tenant_id: TenantId::parse(&tenant).map_err(StoreError::unavailable)?,
                    delivery_id: DeliveryId::parse(&id).map_err(StoreError::unavailable)?,
                    due_at: Timestamp::from_unix_millis(due_at),
                })
            })
            .collect()
        })
        .await
    }
}

/// Reads only the sparse due index (`due_at <= ?` implies `due_at IS NOT NULL`, so SQLite may use
/// the partial index; the condition is spelled out anyway).
const DUE_QUERY: &str = "SELECT tenant_id, id, due_at FROM deliveries
     WHERE due_at IS NOT NULL AND due_at <= ?1 ORDER BY due_at LIMIT ?2";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{attempt, new_event, save, subscription, tenant, ts};
    use crate::domain::{DeliveryStatus, Lease};
    use crate::retry::AttemptClass;

    crate::store_conformance_tests!(fresh_store);

    async fn fresh_store() -> SqliteStore {
        SqliteStore::open_in_memory().expect("in-memory store")
    }

    #[tokio::test]
    async fn file_backed_store_keeps_data_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tidings.db");
        let a = tenant("a");
        let sub = subscription(&a, ts(1_000));
        let new = new_event(&a, &[&sub], ts(2_000), "{\"x\": 1}");
        {
            let store = SqliteStore::open(&path).unwrap();
            store.insert_subscription(&sub).await.unwrap();
            assert_eq!(
                store.insert_event(&new).await.unwrap(),
                InsertOutcome::Created
            );
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            store.get_subscription(&a, &sub.id).await.unwrap(),
            Some(sub.clone())
        );
        assert_eq!(
            store.get_event(&a, &new.event.id).await.unwrap(),
            Some(new.event.clone())
        );
        let d = &new.deliveries[0];
        assert_eq!(
            store.get_delivery(&a, &d.id).await.unwrap().as_ref(),
            Some(d)
        );
        let version: i64 = {
            let conn = store.conn.lock().unwrap();
            conn.pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn file_backed_store_uses_wal_and_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let conn = store.conn.lock().unwrap();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        // 2 = FULL
        let sync: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2);
    }

    #[tokio::test]
    async fn a_second_connection_sees_committed_writes() {
        // The `keys create` CLI writes while the server has the file open.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let server = SqliteStore::open(&path).unwrap();
        let cli = SqliteStore::open(&path).unwrap();
        let key = ApiKeyRecord {
            key_hash: "h".into(),
            tenant_id: tenant("a"),
            created_at: ts(1),
        };
        cli.put_api_key(&key).await.unwrap();
        assert_eq!(
            server.tenant_for_api_key("h").await.unwrap(),
            Some(tenant("a"))
        );
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(SqliteStore::open(&path).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn due_query_reads_the_partial_index() {
        let store = fresh_store().await;
        let conn = store.conn.lock().unwrap();
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {DUE_QUERY}"))
            .unwrap();
        let plan: Vec<String> = stmt
            .query_map(params![0, 10], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().any(|p| p.contains("deliveries_due")),
            "due query must use the sparse index, plan: {plan:?}"
        );
    }

    #[tokio::test]
    async fn recover_after_restart_makes_unfinished_deliveries_due() {
        let store = fresh_store().await;
        let a = tenant("a");
        let sub = subscription(&a, ts(1_000));
        let t0 = ts(10_000);
        let new = new_event(&a, &[&sub, &sub, &sub], t0, "{}");
        assert_eq!(
            store.insert_event(&new).await.unwrap(),
            InsertOutcome::Created
        );
        let [idle, leased, finished] = new.deliveries.as_slice() else {
            panic!("three deliveries");
        };

        // Leased, as a worker that crashed mid-attempt leaves it.
        let lease = Duration::from_secs(60);
        let leased_now = save(
            &store,
            leased,
            leased.leased(t0, "w1".into(), lease).unwrap(),
        )
        .await;
        // Final, yet still carrying a lease (a stale write): not live work, so left alone.
        let mut done = finished.with_attempt(
            attempt(1, t0, AttemptClass::Delivered),
            DeliveryStatus::Succeeded,
            None,
            None,
            t0,
        );
        done.lease = Some(Lease {
            token: "old".into(),
            expires_at: ts(99_000),
        });
        let done = save(&store, finished, done).await;

        let now = ts(20_000);
        // The leased one and the idle one (its queue message died with the process).
        assert_eq!(store.recover_after_restart(now).await.unwrap(), 2);

        let released = store.get_delivery(&a, &leased.id).await.unwrap().unwrap();
        assert_eq!(released.lease, None);
        assert_eq!(released.due_at, Some(now));
        assert_eq!(released.version, leased_now.version + 1);
        assert_eq!(released.status, leased_now.status);
        assert_eq!(released.attempts, leased_now.attempts);
        // Leasable again at once (its lease had 50 s left), and the sweep sees it as due now.
        assert!(released.leased(now, "w2".into(), lease).is_ok());
        let due = store.due_deliveries(now, 10).await.unwrap();
        assert_eq!(due.len(), 2, "{due:?}");
        assert!(due.iter().all(|d| d.due_at == now));

        let idle_now = store.get_delivery(&a, &idle.id).await.unwrap().unwrap();
        assert_eq!(idle_now.due_at, Some(now), "was {:?}", idle.due_at);
        assert_eq!(idle_now.next_attempt_at, idle.next_attempt_at);
        assert_eq!(store.get_delivery(&a, &done.id).await.unwrap(), Some(done));
        // Nothing left to release.
        assert_eq!(store.recover_after_restart(now).await.unwrap(), 0);
    }
}
