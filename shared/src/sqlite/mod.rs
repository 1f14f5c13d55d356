//! The embedded store: one SQLite file in WAL mode, with the same semantics as the DynamoDB store.
//!
//! Entities are stored as the JSON of their domain type; the columns beside the body are only the
//! keys and indexes queries need.
//!
//!
//! The engine (`engine.rs`: the writer thread, group commit, pooled readers, the checkpointer)
//! runs closures on connections; this module holds the schema, its migrations and the queries.

mod engine;

use std::path::Path;

use rusqlite::{Connection, ErrorCode, OptionalExtension as _, ffi, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::domain::{
    ApiKeyRecord, Delivery, DeliveryId, Event, EventId, Subscription, SubscriptionId, TenantId,
    Timestamp,
};
use crate::ports::{
    DueDelivery, DueFanOut, InsertOutcome, NewEvent, Page, PageRequest, Store, StoreError,
    StoreResult,
};

use engine::Engine;

/// Bumped with every schema change; `open` migrates older files forward.
const SCHEMA_VERSION: i64 = 3;

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

/// Version 2: a subscription's deliveries are listed by creation time (delivery ids are derived
/// from the event and subscription, so they no longer sort by time).
const SCHEMA_V2: &str = "
ALTER TABLE deliveries ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
UPDATE deliveries SET created_at =
    CAST(round(unixepoch(json_extract(body, '$.createdAt'), 'subsec') * 1000) AS INTEGER);
DROP INDEX IF EXISTS deliveries_by_subscription;
CREATE INDEX deliveries_by_subscription
    ON deliveries (tenant_id, subscription_id, created_at, id);
";

/// Version 3: an event owes its fan-out until it is marked done; `fan_out_due_at` is when the
/// sweep should do it should its job be lost (NULL: done). Events stored before owe none.
const SCHEMA_V3: &str = "
ALTER TABLE events ADD COLUMN fan_out_due_at INTEGER;
CREATE INDEX events_fan_out_due ON events (fan_out_due_at) WHERE fan_out_due_at IS NOT NULL;
";

/// A [`Store`] over one SQLite database. Clones share the connections and their threads, which
/// stop (after finishing the calls already queued) when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    engine: Engine,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    ///
    /// Another process (the `tidings keys create` CLI) may open the same file while a server
    /// runs: WAL lets readers and one writer share it, and the busy timeout makes writers queue.
    /// Blocking (up to that timeout): call it at start-up, not on a busy runtime thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            engine: Engine::open(path, migrate)?,
        })
    }

    /// A private, empty in-memory database (tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Ok(Self {
            engine: Engine::open_in_memory(migrate)?,
        })
    }

    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.engine.read(f).await
    }

    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.engine.write(f).await
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
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
    if version < 2 {
        tx.execute_batch(SCHEMA_V2)
            .map_err(StoreError::unavailable)?;
    }
    if version < 3 {
        tx.execute_batch(SCHEMA_V3)
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

fn decode_all<T: DeserializeOwned>(bodies: &[String]) -> StoreResult<Vec<T>> {
    bodies.iter().map(|b| decode(b)).collect()
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

/// The bodies a query returns, still JSON: the caller decodes them off the store's thread.
fn query_bodies(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> StoreResult<Vec<String>> {
    let mut stmt = conn.prepare_cached(sql).map_err(StoreError::unavailable)?;
    let rows = stmt
        .query_map(params, |row| row.get::<_, String>(0))
        .map_err(StoreError::unavailable)?;
    rows.collect::<Result<_, _>>()
        .map_err(StoreError::unavailable)
}

fn query_body(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> StoreResult<Option<String>> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row(params, |row| row.get(0)).optional())
        .map_err(StoreError::unavailable)
}

/// A version-checked delivery write, encoded before it reaches the writer thread.
struct DeliveryWrite {
    tenant: TenantId,
    id: DeliveryId,
    version: u64,
    due_at: Option<i64>,
    body: String,
    expected_version: u64,
}

impl DeliveryWrite {
    fn new(delivery: &Delivery, expected_version: u64) -> StoreResult<Self> {
        Ok(Self {
            tenant: delivery.tenant_id().clone(),
            id: delivery.id().clone(),
            version: delivery.version(),
            due_at: millis(delivery.due_at()),
            body: encode(delivery)?,
            expected_version,
        })
    }
}

/// The version-checked write shared by `update_delivery` and `recover_after_restart`.
fn write_delivery(conn: &Connection, w: &DeliveryWrite) -> StoreResult<()> {
    let changed = conn
        .prepare_cached(
            "UPDATE deliveries SET body = ?1, version = ?2, due_at = ?3
             WHERE tenant_id = ?4 AND id = ?5 AND version = ?6",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                w.body,
                w.version,
                w.due_at,
                w.tenant.as_str(),
                w.id.as_str(),
                w.expected_version,
            ])
        })
        .map_err(StoreError::unavailable)?;
    if changed == 1 {
        return Ok(());
    }
    let stored: Option<String> = conn
        .prepare_cached("SELECT body FROM deliveries WHERE tenant_id = ?1 AND id = ?2")
        .and_then(|mut stmt| {
            stmt.query_row(params![w.tenant.as_str(), w.id.as_str()], |row| row.get(0))
                .optional()
        })
        .map_err(StoreError::unavailable)?;
    match stored {
        None => Err(StoreError::NotFound),
        // This very write, repeated: it committed before.
        Some(body) if body == w.body => Ok(()),
        Some(_) => Err(StoreError::Conflict),
    }
}

/// Events owing their fan-out with `fan_out_due_at <= ?1`, earliest first, at most ?2.
const DUE_FAN_OUTS_QUERY: &str = "SELECT tenant_id, id, fan_out_due_at FROM events
     WHERE fan_out_due_at IS NOT NULL AND fan_out_due_at <= ?1
     ORDER BY fan_out_due_at LIMIT ?2";

/// The (tenant, id, due time) rows of a due query (`DUE_QUERY`, `DUE_FAN_OUTS_QUERY`).
fn due_rows(
    conn: &Connection,
    sql: &str,
    now: Timestamp,
    limit: u32,
) -> StoreResult<Vec<(String, String, i64)>> {
    let mut stmt = conn.prepare_cached(sql).map_err(StoreError::unavailable)?;
    let rows = stmt
        .query_map(params![now.unix_millis(), i64::from(limit)], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .map_err(StoreError::unavailable)?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::unavailable)
}

/// The tenant and due time of a due row.
fn due_row(tenant: &str, due_at: i64) -> StoreResult<(TenantId, Timestamp)> {
    Ok((
        TenantId::parse(tenant).map_err(StoreError::unavailable)?,
        Timestamp::from_unix_millis(due_at),
    ))
}

/// The event (and its idempotency key), only if new.
fn insert_event(
    conn: &Connection,
    tenant: &TenantId,
    event_id: EventId,
    key: Option<&str>,
    event_body: &str,
    fan_out_due_at: Option<i64>,
) -> StoreResult<InsertOutcome> {
    if let Some(key) = key {
        let seen: Option<String> = conn
            .prepare_cached(
                "SELECT event_id FROM idempotency_keys WHERE tenant_id = ?1 AND key = ?2",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![tenant.as_str(), key], |row| row.get(0))
                    .optional()
            })
            .map_err(StoreError::unavailable)?;
        if let Some(seen) = seen {
            let id = EventId::parse(&seen).map_err(StoreError::unavailable)?;
            let fingerprint = event_fingerprint(conn, tenant, &id)?.unwrap_or_default();
            return Ok(InsertOutcome::Existing {
                event_id: id,
                fingerprint,
            });
        }
    }
    if let Some(fingerprint) = event_fingerprint(conn, tenant, &event_id)? {
        return Ok(InsertOutcome::Existing {
            event_id,
            fingerprint,
        });
    }
    conn.prepare_cached(
        "INSERT INTO events (tenant_id, id, body, fan_out_due_at) VALUES (?1, ?2, ?3, ?4)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            tenant.as_str(),
            event_id.as_str(),
            event_body,
            fan_out_due_at
        ])
    })
    .map_err(StoreError::unavailable)?;
    if let Some(key) = key {
        conn.prepare_cached(
            "INSERT INTO idempotency_keys (tenant_id, key, event_id) VALUES (?1, ?2, ?3)",
        )
        .and_then(|mut stmt| stmt.execute(params![tenant.as_str(), key, event_id.as_str()]))
        .map_err(StoreError::unavailable)?;
    }
    Ok(InsertOutcome::Created)
}

/// The stored event's fingerprint (empty for events stored before fingerprints); `None` if the
/// event does not exist.
fn event_fingerprint(
    conn: &Connection,
    tenant: &TenantId,
    id: &EventId,
) -> StoreResult<Option<String>> {
    conn.prepare_cached(
        "SELECT coalesce(json_extract(body, '$.fingerprint'), '') FROM events
         WHERE tenant_id = ?1 AND id = ?2",
    )
    .and_then(|mut stmt| {
        stmt.query_row(params![tenant.as_str(), id.as_str()], |row| row.get(0))
            .optional()
    })
    .map_err(StoreError::unavailable)
}

impl Store for SqliteStore {
    async fn put_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        let key = key.clone();
        self.write(move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO api_keys (key_hash, tenant_id, created_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key_hash) DO NOTHING",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        key.key_hash,
                        key.tenant_id.as_str(),
                        key.created_at.unix_millis()
                    ])
                })
                .map_err(StoreError::unavailable)?;
            if inserted == 1 {
                return Ok(());
            }
            let owner: String = conn
                .prepare_cached("SELECT tenant_id FROM api_keys WHERE key_hash = ?1")
                .and_then(|mut stmt| stmt.query_row([&key.key_hash], |row| row.get(0)))
                .map_err(StoreError::unavailable)?;
            if owner == key.tenant_id.as_str() {
                Ok(())
            } else {
                Err(StoreError::Conflict)
            }
        })
        .await
    }

    async fn tenant_for_api_key(&self, key_hash: &str) -> StoreResult<Option<TenantId>> {
        let key_hash = key_hash.to_owned();
        let tenant: Option<String> = self
            .read(move |conn| {
                conn.prepare_cached("SELECT tenant_id FROM api_keys WHERE key_hash = ?1")
                    .and_then(|mut stmt| stmt.query_row([&key_hash], |row| row.get(0)).optional())
                    .map_err(StoreError::unavailable)
            })
            .await?;
        tenant
            .map(|t| TenantId::parse(&t).map_err(StoreError::unavailable))
            .transpose()
    }

    async fn insert_subscription(&self, subscription: &Subscription) -> StoreResult<()> {
        let body = encode(subscription)?;
        let tenant = subscription.tenant_id.clone();
        let id = subscription.id.clone();
        self.write(move |conn| {
            match conn
                .prepare_cached(
                    "INSERT INTO subscriptions (tenant_id, id, body) VALUES (?1, ?2, ?3)",
                )
                .and_then(|mut stmt| stmt.execute(params![tenant.as_str(), id.as_str(), body]))
            {
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
        let body = self
            .read(move |conn| {
                query_body(
                    conn,
                    "SELECT body FROM subscriptions WHERE tenant_id = ?1 AND id = ?2",
                    params![tenant.as_str(), id.as_str()],
                )
            })
            .await?;
        body.as_deref().map(decode).transpose()
    }

    async fn list_subscriptions(
        &self,
        tenant: &TenantId,
        page: &PageRequest,
    ) -> StoreResult<Page<Subscription>> {
        let tenant = tenant.clone();
        let limit = page_limit(page);
        // Ids are never empty, so "after nothing" is "after ''". A cursor is a subscription id
        // (as this store hands them out), else it is refused as the DynamoDB store refuses it.
        let after = page.after.clone().unwrap_or_default();
        if !after.is_empty() && SubscriptionId::parse(&after).is_err() {
            return Err(StoreError::BadCursor);
        }
        let bodies = self
            .read(move |conn| {
                query_bodies(
                    conn,
                    "SELECT body FROM subscriptions WHERE tenant_id = ?1 AND id > ?2
                     ORDER BY id LIMIT ?3",
                    params![tenant.as_str(), after, i64::from(limit) + 1],
                )
            })
            .await?;
        let items: Vec<Subscription> = decode_all(&bodies)?;
        Ok(into_page(items, limit, |s| s.id.as_str().to_owned()))
    }

    async fn update_subscription(
        &self,
        subscription: &Subscription,
        expected_version: u64,
    ) -> StoreResult<()> {
        let body = encode(subscription)?;
        let tenant = subscription.tenant_id.clone();
        let id = subscription.id.clone();
        self.write(move |conn| {
            // Bodies written before versions existed have none: version 0.
            let changed = conn
                .prepare_cached(
                    "UPDATE subscriptions SET body = ?3 WHERE tenant_id = ?1 AND id = ?2
                     AND coalesce(json_extract(body, '$.version'), 0) = ?4",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        tenant.as_str(),
                        id.as_str(),
                        body,
                        expected_version
                    ])
                })
                .map_err(StoreError::unavailable)?;
            if changed == 1 {
                return Ok(());
            }
            let exists = conn
                .prepare_cached("SELECT 1 FROM subscriptions WHERE tenant_id = ?1 AND id = ?2")
                .and_then(|mut stmt| stmt.exists(params![tenant.as_str(), id.as_str()]))
                .map_err(StoreError::unavailable)?;
            Err(if exists {
                StoreError::Conflict
            } else {
                StoreError::NotFound
            })
        })
        .await
    }

    async fn delete_subscription(&self, tenant: &TenantId, id: &SubscriptionId) -> StoreResult<()> {
        let (tenant, id) = (tenant.clone(), id.clone());
        // Its deliveries stay: they are the log of what was sent.
        self.write(move |conn| {
            let changed = conn
                .prepare_cached("DELETE FROM subscriptions WHERE tenant_id = ?1 AND id = ?2")
                .and_then(|mut stmt| stmt.execute(params![tenant.as_str(), id.as_str()]))
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
        let bodies = self
            .read(move |conn| {
                query_bodies(
                    conn,
                    "SELECT body FROM subscriptions WHERE tenant_id = ?1 ORDER BY id",
                    [tenant.as_str()],
                )
            })
            .await?;
        decode_all(&bodies)
    }

    async fn insert_event(&self, new: &NewEvent) -> StoreResult<InsertOutcome> {
        let tenant = new.event.tenant_id.clone();
        let event_id = new.event.id.clone();
        let key = new.idempotency_key.clone();
        let event_body = encode(&new.event)?;
        let due = millis(new.fan_out.due_at());
        self.write(move |conn| {
            insert_event(conn, &tenant, event_id, key.as_deref(), &event_body, due)
        })
        .await
    }

    async fn fanned_out(&self, tenant: &TenantId, id: &EventId) -> StoreResult<()> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE events SET fan_out_due_at = NULL WHERE tenant_id = ?1 AND id = ?2",
                )
                .and_then(|mut stmt| stmt.execute(params![tenant.as_str(), id.as_str()]))
                .map_err(StoreError::unavailable)?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn due_fan_outs(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<DueFanOut>> {
        let rows = self
            .read(move |conn| due_rows(conn, DUE_FAN_OUTS_QUERY, now, limit))
            .await?;
        rows.into_iter()
            .map(|(tenant, id, due_at)| {
                let (tenant_id, due_at) = due_row(&tenant, due_at)?;
                Ok(DueFanOut {
                    tenant_id,
                    event_id: EventId::parse(&id).map_err(StoreError::unavailable)?,
                    due_at,
                })
            })
            .collect()
    }

    async fn claim_fan_out(&self, due: &DueFanOut, next: Timestamp) -> StoreResult<()> {
        let due = due.clone();
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE events SET fan_out_due_at = ?1
                     WHERE tenant_id = ?2 AND id = ?3 AND fan_out_due_at = ?4",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        next.unix_millis(),
                        due.tenant_id.as_str(),
                        due.event_id.as_str(),
                        due.due_at.unix_millis()
                    ])
                })
                .map_err(StoreError::unavailable)?;
            if changed == 1 {
                return Ok(());
            }
            let now_due: Option<Option<i64>> = conn
                .prepare_cached(
                    "SELECT fan_out_due_at FROM events WHERE tenant_id = ?1 AND id = ?2",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(
                        params![due.tenant_id.as_str(), due.event_id.as_str()],
                        |row| row.get(0),
                    )
                    .optional()
                })
                .map_err(StoreError::unavailable)?;
            match now_due {
                None | Some(None) => Err(StoreError::NotFound),
                Some(Some(_)) => Err(StoreError::Conflict),
            }
        })
        .await
    }

    async fn insert_delivery(&self, delivery: &Delivery) -> StoreResult<()> {
        let d = delivery.clone();
        let body = encode(delivery)?;
        self.write(move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO deliveries
                         (tenant_id, id, subscription_id, version, due_at, created_at, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (tenant_id, id) DO NOTHING",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        d.tenant_id().as_str(),
                        d.id().as_str(),
                        d.subscription_id().as_str(),
                        d.version(),
                        millis(d.due_at()),
                        d.created_at().unix_millis(),
                        body,
                    ])
                })
                .map_err(StoreError::unavailable)?;
            if inserted == 1 {
                return Ok(());
            }
            // This very write, repeated (it committed before), is no conflict.
            let stored = query_body(
                conn,
                "SELECT body FROM deliveries WHERE tenant_id = ?1 AND id = ?2",
                params![d.tenant_id().as_str(), d.id().as_str()],
            )?;
            match stored {
                Some(stored) if stored == body => Ok(()),
                _ => Err(StoreError::Conflict),
            }
        })
        .await
    }

    async fn get_event(&self, tenant: &TenantId, id: &EventId) -> StoreResult<Option<Event>> {
        let (tenant, id) = (tenant.clone(), id.clone());
        let body = self
            .read(move |conn| {
                query_body(
                    conn,
                    "SELECT body FROM events WHERE tenant_id = ?1 AND id = ?2",
                    params![tenant.as_str(), id.as_str()],
                )
            })
            .await?;
        body.as_deref().map(decode).transpose()
    }

    async fn get_event_for_fan_out(
        &self,
        tenant: &TenantId,
        id: &EventId,
    ) -> StoreResult<Option<(Event, Option<Timestamp>)>> {
        let (tenant, id) = (tenant.clone(), id.clone());
        let row: Option<(String, Option<i64>)> = self
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT body, fan_out_due_at FROM events WHERE tenant_id = ?1 AND id = ?2",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![tenant.as_str(), id.as_str()], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                    .optional()
                })
                .map_err(StoreError::unavailable)
            })
            .await?;
        row.map(|(body, due)| Ok((decode(&body)?, due.map(Timestamp::from_unix_millis))))
            .transpose()
    }

    async fn get_delivery(
        &self,
        tenant: &TenantId,
        id: &DeliveryId,
    ) -> StoreResult<Option<Delivery>> {
        let (tenant, id) = (tenant.clone(), id.clone());
        let body = self
            .read(move |conn| {
                query_body(
                    conn,
                    "SELECT body FROM deliveries WHERE tenant_id = ?1 AND id = ?2",
                    params![tenant.as_str(), id.as_str()],
                )
            })
            .await?;
        body.as_deref().map(decode).transpose()
    }

    async fn update_delivery(&self, delivery: &Delivery, expected_version: u64) -> StoreResult<()> {
        let write = DeliveryWrite::new(delivery, expected_version)?;
        self.write(move |conn| write_delivery(conn, &write)).await
    }

    async fn list_deliveries(
        &self,
        tenant: &TenantId,
        subscription: &SubscriptionId,
        page: &PageRequest,
    ) -> StoreResult<Page<Delivery>> {
        let (tenant, subscription) = (tenant.clone(), subscription.clone());
        let limit = page_limit(page);
        // `millis.id` as `into_page` below writes it, else `BadCursor`; empty is no cursor,
        // as in the DynamoDB store.
        let after = page
            .after
            .as_deref()
            .filter(|cursor| !cursor.is_empty())
            .map(|cursor| {
                let (millis, id) = cursor.split_once('.').ok_or(StoreError::BadCursor)?;
                let millis: i64 = millis.parse().map_err(|_| StoreError::BadCursor)?;
                let id = DeliveryId::parse(id).map_err(|_| StoreError::BadCursor)?;
                Ok((millis, id.as_str().to_owned()))
            })
            .transpose()?;
        let bodies = self
            .read(move |conn| {
                let fetch = i64::from(limit) + 1;
                match &after {
                    None => query_bodies(
                        conn,
                        "SELECT body FROM deliveries WHERE tenant_id = ?1 AND subscription_id = ?2
                         ORDER BY created_at DESC, id DESC LIMIT ?3",
                        params![tenant.as_str(), subscription.as_str(), fetch],
                    ),
                    Some((millis, id)) => query_bodies(
                        conn,
                        "SELECT body FROM deliveries
                         WHERE tenant_id = ?1 AND subscription_id = ?2 AND (created_at, id) < (?3, ?4)
                         ORDER BY created_at DESC, id DESC LIMIT ?5",
                        params![tenant.as_str(), subscription.as_str(), millis, id, fetch],
                    ),
                }
            })
            .await?;
        let items: Vec<Delivery> = decode_all(&bodies)?;
        Ok(into_page(items, limit, |d| {
            format!("{}.{}", d.created_at().unix_millis(), d.id())
        }))
    }

    async fn due_deliveries(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<DueDelivery>> {
        let rows = self
            .read(move |conn| due_rows(conn, DUE_QUERY, now, limit))
            .await?;
        rows.into_iter()
            .map(|(tenant, id, due_at)| {
                let (tenant_id, due_at) = due_row(&tenant, due_at)?;
                Ok(DueDelivery {
                    tenant_id,
                    delivery_id: DeliveryId::parse(&id).map_err(StoreError::unavailable)?,
                    due_at,
                })
            })
            .collect()
    }

    /// One write transaction: the owed fan-outs due later are made due now, and the deliveries
    /// in the due index (every unfinished one that is not held) are recovered.
    async fn recover_after_restart(&self, now: Timestamp) -> StoreResult<usize> {
        self.write(move |conn| {
            let fan_outs = conn
                .prepare_cached(
                    "UPDATE events SET fan_out_due_at = ?1
                     WHERE fan_out_due_at IS NOT NULL AND fan_out_due_at > ?1",
                )
                .and_then(|mut stmt| stmt.execute([now.unix_millis()]))
                .map_err(StoreError::unavailable)?;
            // Unfinished deliveries that are not held are all in the due index.
            let recovered: Vec<(Delivery, u64)> = {
                let mut stmt = conn
                    .prepare("SELECT body FROM deliveries WHERE due_at IS NOT NULL")
                    .map_err(StoreError::unavailable)?;
                let rows = stmt
                    .query_map([], |row| row.get::<_, String>(0))
                    .map_err(StoreError::unavailable)?;
                let mut recovered = Vec::new();
                for body in rows {
                    let d: Delivery = decode(&body.map_err(StoreError::unavailable)?)?;
                    if let Some(next) = d.recovered(now) {
                        recovered.push((next, d.version()));
                    }
                }
                recovered
            };
            for (next, expected) in &recovered {
                write_delivery(conn, &DeliveryWrite::new(next, *expected)?)?;
            }
            Ok(recovered.len() + fan_outs)
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
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::engine::{MAX_BATCH, ReadJob, WRITER_AUTOCHECKPOINT_PAGES};
    use super::*;
    use crate::conformance::{new_event, subscription, tenant, ts};

    crate::store_conformance_tests!(fresh_store);

    async fn fresh_store() -> SqliteStore {
        SqliteStore::open_in_memory().expect("in-memory store")
    }

    impl SqliteStore {
        /// Runs `f` on the writer's connection between batches (outside any transaction).
        async fn on_writer<T, F>(&self, f: F) -> T
        where
            T: Send + 'static,
            F: FnOnce(&Connection) -> T + Send + 'static,
        {
            let (tx, rx) = oneshot::channel();
            self.send_to_writer(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }));
            rx.await.expect("the writer answers")
        }

        /// Holds the writer thread until the returned gate is opened (sent to or dropped), so
        /// writes queue up behind it.
        fn hold_writer(&self) -> std::sync::mpsc::Sender<()> {
            let (gate, wait) = std::sync::mpsc::channel::<()>();
            self.send_to_writer(Box::new(move |_| {
                let _ = wait.recv();
            }));
            gate
        }

        fn send_to_writer(&self, job: ReadJob) {
            self.engine.send_to_writer(job);
        }

        fn submitted(&self) -> u64 {
            self.engine.stats().submitted.load(Ordering::Relaxed)
        }

        fn commits(&self) -> u64 {
            self.engine.stats().commits.load(Ordering::Relaxed)
        }

        /// Waits until `n` writes in all were handed to the writer.
        async fn until_submitted(&self, n: u64) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while self.submitted() < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "only {} of {n} writes were submitted",
                    self.submitted()
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
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
            crate::conformance::created(&store, &new).await;
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
            store.get_delivery(&a, d.id()).await.unwrap().as_ref(),
            Some(d)
        );
        let version: i64 = store
            .on_writer(|conn| conn.pragma_query_value(None, "user_version", |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn file_backed_store_uses_wal_and_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let (mode, sync) = store
            .on_writer(|conn| -> rusqlite::Result<(String, i64)> {
                let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
                let sync: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0))?;
                Ok((mode, sync))
            })
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        // 2 = FULL
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
        let plan: Vec<String> = store
            .on_writer(|conn| {
                let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {DUE_QUERY}"))?;
                stmt.query_map(params![0, 10], |r| r.get::<_, String>(3))?
                    .collect::<rusqlite::Result<_>>()
            })
            .await
            .unwrap();
        assert!(
            plan.iter().any(|p| p.contains("deliveries_due")),
            "due query must use the sparse index, plan: {plan:?}"
        );
    }

    /// What one of the concurrent writes below was and what it got back.
    enum Answer {
        Fresh(EventId, StoreResult<InsertOutcome>),
        SameKey(EventId, StoreResult<InsertOutcome>),
        Subscription(StoreResult<()>),
        Delivery(StoreResult<()>),
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_get_their_own_answers_and_share_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let a = tenant("a");
        let sub = subscription(&a, ts(1_000));
        store.insert_subscription(&sub).await.unwrap();
        let first = new_event(&a, &[&sub], ts(2_000), "{}");
        crate::conformance::created(&store, &first).await;
        let contested = first.deliveries[0].clone();
        let twin = subscription(&a, ts(4_000));

        let gate = store.hold_writer();
        let before = (store.submitted(), store.commits());
        let mut tasks = Vec::new();
        for i in 0..200_i64 {
            let store = store.clone();
            let (a, sub, twin) = (a.clone(), sub.clone(), twin.clone());
            let contested_version = contested.version();
            // Each worker's lease has its own token.
            let leased = contested
                .leased(ts(3_000), format!("w{i}"), Duration::from_secs(60))
                .unwrap();
            tasks.push(tokio::spawn(async move {
                match i % 5 {
                    // 80 events with no key: each is new.
                    0 | 1 => {
                        let new = new_event(&a, &[&sub], ts(10_000 + i), "{}");
                        Answer::Fresh(
                            new.event.id.clone(),
                            store.insert_event(&new.new_event()).await,
                        )
                    }
                    // 40 events sharing one idempotency key: one wins, the rest see it.
                    2 => {
                        let mut new = new_event(&a, &[&sub], ts(10_000 + i), "{}");
                        new.idempotency_key = Some("same".into());
                        Answer::SameKey(
                            new.event.id.clone(),
                            store.insert_event(&new.new_event()).await,
                        )
                    }
                    // 40 inserts of one subscription id: one wins, the rest conflict.
                    3 => Answer::Subscription(store.insert_subscription(&twin).await),
                    // 40 leases of one delivery at the same version: one wins, the rest conflict.
                    _ => Answer::Delivery(store.update_delivery(&leased, contested_version).await),
                }
            }));
        }
        store.until_submitted(before.0 + 200).await;
        drop(gate);
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        assert_eq!(
            store.commits() - before.1,
            1,
            "the 200 queued writes share one commit"
        );

        let (mut fresh, mut key_winners, mut key_losers) = (0, Vec::new(), Vec::new());
        let (mut sub_ok, mut sub_conflict, mut lease_ok, mut lease_conflict) = (0, 0, 0, 0);
        for answer in &answers {
            match answer {
                Answer::Fresh(id, outcome) => {
                    assert_eq!(outcome.as_ref().unwrap(), &InsertOutcome::Created);
                    assert!(store.get_event(&a, id).await.unwrap().is_some());
                    fresh += 1;
                }
                Answer::SameKey(id, Ok(InsertOutcome::Created)) => key_winners.push(id.clone()),
                Answer::SameKey(id, Ok(InsertOutcome::Existing { event_id: seen, .. })) => {
                    key_losers.push((id.clone(), seen.clone()));
                }
                Answer::Subscription(Ok(())) | Answer::Delivery(Ok(())) => {
                    if matches!(answer, Answer::Subscription(_)) {
                        sub_ok += 1;
                    } else {
                        lease_ok += 1;
                    }
                }
                Answer::Subscription(Err(StoreError::Conflict)) => sub_conflict += 1,
                Answer::Delivery(Err(StoreError::Conflict)) => lease_conflict += 1,
                Answer::SameKey(_, Err(e))
                | Answer::Subscription(Err(e))
                | Answer::Delivery(Err(e)) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(fresh, 80);
        assert_eq!((sub_ok, sub_conflict), (1, 39));
        assert_eq!((lease_ok, lease_conflict), (1, 39));
        let [winner] = key_winners.as_slice() else {
            panic!("exactly one event wins the key: {key_winners:?}");
        };
        assert_eq!(key_losers.len(), 39);
        for (id, seen) in &key_losers {
            assert_eq!(seen, winner);
            // Nothing of a repeated publish is written.
            assert_eq!(store.get_event(&a, id).await.unwrap(), None);
        }
        assert!(store.get_event(&a, winner).await.unwrap().is_some());
        assert_eq!(
            store.get_subscription(&a, &twin.id).await.unwrap(),
            Some(twin)
        );
        let won = store
            .get_delivery(&a, contested.id())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            won.version(),
            contested.version() + 1,
            "one lease was written"
        );
        assert!(won.current_lease().is_some());
        // 1 + 80 + 1 events (their deliveries come from fan-out); all visible to a new
        // connection.
        drop(store);
        let again = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let count: i64 = again
            .on_writer(|conn| conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(count, 82);
    }

    #[tokio::test]
    async fn a_failing_write_rolls_back_only_its_own_changes() {
        let store = fresh_store().await;
        let a = tenant("a");
        let sub = subscription(&a, ts(1_000));
        store.insert_subscription(&sub).await.unwrap();
        let before_ok = new_event(&a, &[&sub], ts(2_000), "{}");
        let after_ok = new_event(&a, &[&sub], ts(2_001), "{}");
        // A write that fails after writing its event and key rows.
        let mut broken = new_event(&a, &[&sub], ts(2_002), "{}");
        broken.idempotency_key = Some("k".into());

        let gate = store.hold_writer();
        let commits = store.commits();
        let (s1, s2, s3) = (store.clone(), store.clone(), store.clone());
        let (e1, e2, e3) = (before_ok.new_event(), broken.clone(), after_ok.new_event());
        let first = tokio::spawn(async move { s1.insert_event(&e1).await });
        store.until_submitted(store.submitted() + 1).await;
        let middle = tokio::spawn(async move {
            let event_body = encode(&e2.event)?;
            s2.write(move |conn| {
                insert_event(
                    conn,
                    &e2.event.tenant_id,
                    e2.event.id.clone(),
                    e2.idempotency_key.as_deref(),
                    &event_body,
                    Some(0),
                )?;
                Err::<InsertOutcome, _>(StoreError::unavailable("failed after its writes"))
            })
            .await
        });
        store.until_submitted(store.submitted() + 1).await;
        let last = tokio::spawn(async move { s3.insert_event(&e3).await });
        store.until_submitted(store.submitted() + 1).await;
        drop(gate);

        assert_eq!(first.await.unwrap().unwrap(), InsertOutcome::Created);
        assert!(matches!(
            middle.await.unwrap(),
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(last.await.unwrap().unwrap(), InsertOutcome::Created);
        assert_eq!(store.commits() - commits, 1);

        assert!(
            store
                .get_event(&a, &before_ok.event.id)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .get_event(&a, &after_ok.event.id)
                .await
                .unwrap()
                .is_some()
        );
        // Neither the event row nor its key nor its first delivery survived.
        assert_eq!(store.get_event(&a, &broken.event.id).await.unwrap(), None);
        assert_eq!(
            store
                .get_delivery(&a, broken.deliveries[0].id())
                .await
                .unwrap(),
            None
        );
        let mut retry = new_event(&a, &[&sub], ts(2_003), "{}");
        retry.idempotency_key = Some("k".into());
        assert_eq!(
            store.insert_event(&retry.new_event()).await.unwrap(),
            InsertOutcome::Created
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_commit_takes_at_most_max_batch_writes() {
        let store = fresh_store().await;
        let gate = store.hold_writer();
        let (submitted, commits) = (store.submitted(), store.commits());
        let writes = MAX_BATCH as u64 + 10;
        let tasks: Vec<_> = (0..writes)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let key = ApiKeyRecord {
                        key_hash: format!("h{i}"),
                        tenant_id: tenant("a"),
                        created_at: ts(1),
                    };
                    store.put_api_key(&key).await
                })
            })
            .collect();
        store.until_submitted(submitted + writes).await;
        drop(gate);
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(store.commits() - commits, 2);
        assert_eq!(
            store.tenant_for_api_key("h0").await.unwrap(),
            Some(tenant("a"))
        );
    }

    #[tokio::test]
    async fn the_checkpointer_copies_the_wal_into_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).unwrap();
        let a = tenant("a");
        let sub = subscription(&a, ts(1_000));
        store.insert_subscription(&sub).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.engine.stats().checkpoints.load(Ordering::Relaxed) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no checkpoint ran");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let pages: u32 = store
            .on_writer(|conn| conn.pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(pages, WRITER_AUTOCHECKPOINT_PAGES);

        // The checkpointer's connection closes last and, being read-write, removes the WAL.
        drop(store);
        assert!(!dir.path().join("t.db-wal").exists());
        let again = SqliteStore::open(&path).unwrap();
        assert_eq!(
            again.get_subscription(&a, &sub.id).await.unwrap(),
            Some(sub)
        );
    }

    #[tokio::test]
    async fn the_reader_connection_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let attempt = store
            .read(|conn| {
                conn.execute("DELETE FROM api_keys", [])
                    .map_err(StoreError::unavailable)
            })
            .await;
        assert!(matches!(attempt, Err(StoreError::Unavailable(_))));
    }
}
