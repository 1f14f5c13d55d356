//! The DynamoDB store: one on-demand table holding every entity; a subscription's deliveries
//! share its partitions, every other item is alone under its key.
//!
//! # Table layout
//!
//! [`DynamoStore::create_table`] is the reference; the SAM template mirrors it.
//!
//! - Billing: `PAY_PER_REQUEST`. TTL: attribute `expires_at` (Number, epoch seconds).
//! - Table key: `pk` (String, HASH), `sk` (String, RANGE). A subscription's deliveries are kept
//!   under [`DELIVERY_SHARDS`] partition keys of their own, sorted by `sk` (the delivery id's own
//!   part: the event's receive time, then a hash), so its list is a `Query` of the table, with
//!   no index row to write per delivery; every other item is alone under its `pk` (`sk` is
//!   [`SINGLE_SK`]), with the tenant in the key, so a busy tenant spreads over many partitions.
//! - Index `list`: `list_pk` (String, HASH), `list_sk` (String, RANGE); projection `INCLUDE`
//!   of the attribute `subscription`: a tenant's subscriptions, with their bodies (fan-out reads
//!   them in one `Query`).
//! - Index `due`: `due_shard` (Number, HASH), `due_at` (Number, RANGE, epoch milliseconds);
//!   projection `KEYS_ONLY`. Sparse: both attributes exist only while the delivery's `due_at` is
//!   set, or while an event owes its fan-out, so the sweep reads live work only. The shard (from
//!   a hash of the id: `0..DUE_SHARDS` for deliveries, [`FAN_OUT_SHARD_BASE`]`..+DUE_SHARDS` for
//!   events) spreads the index over partition keys and keeps the two kinds apart.
//!
//! | item | `pk` / `sk` | `list_pk` / `list_sk` | `due_shard` / `due_at` | other attributes |
//! | --- | --- | --- | --- | --- |
//! | API key | `KEY#{key_hash}` / `-` | | | `api_key` (map) |
//! | subscription | `T#{tenant}#SUB#{id}` / `-` | `T#{tenant}#SUBS` / `{id}` | | `subscription` (map) |
//! | event | `T#{tenant}#EVT#{id}` / `-` | | while its fan-out is owed | `event` (map, `data` a string), `expires_at`, `fan_out` = `stream` when the stream starts its fan-out |
//! | idempotency key | `T#{tenant}#IDEM#{key}` / `-` | | | `event_id`, `expires_at` |
//! | delivery | `T#{tenant}#SUB#{subscription}#DLV#{shard}` / `{own part of the id}` | | while due | `delivery` (map), `expires_at` |
//!
//! Tenant ids and generated ids never contain `#`, so keys cannot collide. Subscription ids are
//! ULID based and sort by creation time, which orders the `list` index. A delivery id is
//! `dlv_{subscription ULID}{own ULID}`, derived from (tenant, event, subscription) and the
//! event's receive time ([`DeliveryId::derive`]): its key follows from the id alone (the shard is
//! a hash of the own part), and its own part sorts by time.
//! Retention (TTL, default 30 days) counts from the event's `received_at` for the event and its
//! idempotency key, and from `created_at` for a delivery (its fan-out, normally moments later).
//!
//! # DynamoDB calls per [`Store`] method
//!
//! Every `GetItem` and table `Query` is strongly consistent but the event's (an event never
//! changes, so an eventually consistent read at half the price is right whenever it finds it; a
//! miss is read again strongly); index queries cannot be, so a list of subscriptions may miss a
//! write made a moment before. Fan-out reads the tenant's subscriptions from the `list` index too: so that an event
//! published after a subscription change was answered always sees it, a subscription write
//! returns only once the index shows it (DynamoDB's index lag is usually well under a second).
//!
//! | method | calls |
//! | --- | --- |
//! | `put_api_key` | 1 `PutItem` |
//! | `tenant_for_api_key` | 1 `GetItem`; none for a key found within the cache time ([`DynamoStore::with_api_key_cache`]) |
//! | `insert_subscription` | 1 `PutItem` (`attribute_not_exists`, `ALL_OLD` on failure), then `Query`s on `list` until it shows the subscription (usually one) |
//! | `get_subscription` | 1 `GetItem` |
//! | `list_subscriptions` | 1 `Query` on `list` (`Limit` = limit + 1) |
//! | `update_subscription` | 1 `PutItem` (version condition, `ALL_OLD` on failure), then `Query`s on `list` until it shows the new version |
//! | `delete_subscription` | 1 `DeleteItem` (`attribute_exists`), then `Query`s on `list` until the subscription is gone from it |
//! | `tenant_subscriptions` | 1 `Query` on `list` |
//! | `insert_event`, no idempotency key | 1 conditional `PutItem` (`attribute_not_exists`, `ALL_OLD` on failure: a repeat is told by the old item, with no read before) |
//! | `insert_event`, with an idempotency key | 1 `TransactWriteItems` (event + key); a known key adds 1 `GetItem` (the first event's fingerprint) |
//! | `get_event` | 1 `GetItem` (eventually consistent; a second, strong one on a miss) |
//! | `fanned_out` | 1 `UpdateItem` (`REMOVE` the due attributes, `attribute_exists`) |
//! | `due_fan_outs` | [`DUE_SHARDS`] `Query`s on `due` (the events' shards), run concurrently |
//! | `claim_fan_out` | 1 `UpdateItem` (`SET due_at`, conditional on the `due_at` read) |
//! | `insert_delivery` | 1 `PutItem` (`attribute_not_exists`, `ALL_OLD` on failure) |
//! | `get_delivery` | 1 `GetItem` |
//! | `update_delivery` | 1 `PutItem` (version condition, `ALL_OLD` on failure) |
//! | `list_deliveries` | [`DELIVERY_SHARDS`] `Query`s of the table (the subscription's partitions, newest first, `Limit` = limit + 1 each), run concurrently and merged |
//! | `due_deliveries` | [`DUE_SHARDS`] `Query`s on `due`, run concurrently |
//! | `recover_after_restart` | 2 × [`DUE_SHARDS`] `Query`s on `due` (every shard, whatever the due time), then per delivery in it 1 `GetItem` and, if it changes, 1 `PutItem` (as `update_delivery`); per owed fan-out due later, 1 `UpdateItem` (as `claim_fan_out`); 16 items at a time |
//!
//! Queries page on past 1 MB; that does not happen at this service's item sizes and page limits
//! in normal operation.
//!
//! Index writes per delivery write: `due` only, when `due_at` changes (a changed key is a delete
//! plus a put in the index); a delivery written with its first attempt done and nothing to retry
//! writes no index at all. Per event: `due` when it is written owing its fan-out, and when the
//! fan-out is done (none when the stream or its caller starts the fan-out).
//!
//! # Events first, deliveries with their first attempt
//!
//! An event is written alone (with its idempotency key, if any, in a two-item transaction),
//! carrying the due attributes while it owes its fan-out; its deliveries are written by the
//! fan-out, each once its first attempt is made, only if it does not exist yet. Nothing is ever
//! deleted: a delivery id names one (event, subscription), so what an earlier or concurrent
//! fan-out wrote is the same delivery.
//!
//! # Lost answers
//!
//! The SDK retries a request whose answer was lost (a timeout, a reset, a 500). Every conditional
//! put here asks for the old item on a failed condition (`ALL_OLD`) and compares it with what it
//! wrote: its own earlier, committed try is a success, not a conflict (a created subscription, a
//! version-checked update, the event of a publish, a delivery's first write). Transactions carry
//! the SDK's idempotency token, which DynamoDB honours for ten minutes. Of the two `UpdateItem`s,
//! `fanned_out` is idempotent; a retried `claim_fan_out` fails its condition and the sweep leaves
//! that fan-out alone: its claim moved it a grace on, and a later sweep sends it.
//!
//! An `UpdateItem` is billed by the size of the whole item: marking an event's fan-out done, or
//! claiming it, costs ⌈event size / 1 KB⌉ write units.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::client::Waiters as _;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, CancellationReason, GlobalSecondaryIndex,
    KeySchemaElement, KeyType, Projection, ProjectionType, Put,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, StreamSpecification, StreamViewType,
    TimeToLiveSpecification, TimeToLiveStatus, TransactWriteItem,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_dynamo::aws_sdk_dynamodb_1 as serde_ddb;
use serde_json::value::RawValue;

use crate::concurrency::join_bounded;
use crate::domain::{
    ApiKeyRecord, Delivery, DeliveryId, Event, EventId, EventType, Subscription, SubscriptionId,
    TenantId, Timestamp,
};
use crate::ports::{
    DueDelivery, DueFanOut, FanOutDuty, InsertOutcome, NewEvent, Page, PageRequest, Store,
    StoreError, StoreResult,
};

/// The table's partition key.
pub const PK: &str = "pk";
/// The table's sort key.
pub const SK: &str = "sk";
/// The sort key of an item alone under its partition key (all but deliveries).
pub const SINGLE_SK: &str = "-";
/// How many partitions a subscription's deliveries are spread over (by a hash of the delivery
/// id): each takes 1,000 write units a second, so a subscription takes 8,000 new deliveries a
/// second (docs/scaling.md). Part of the stored keys: changing it hides stored deliveries.
pub const DELIVERY_SHARDS: u16 = 8;
/// The index listing a tenant's subscriptions and a subscription's deliveries.
pub const LIST_INDEX: &str = "list";
pub const LIST_PK: &str = "list_pk";
pub const LIST_SK: &str = "list_sk";
/// The sparse index of deliveries the sweep should look at.
pub const DUE_INDEX: &str = "due";
pub const DUE_SHARD: &str = "due_shard";
pub const DUE_AT: &str = "due_at";
/// The TTL attribute (epoch seconds).
pub const TTL_ATTRIBUTE: &str = "expires_at";
/// Attribute of an event item whose fan-out the table's change stream starts
/// ([`FAN_OUT_BY_STREAM`]); the stream's event source mapping lets only new items with it through.
pub const FAN_OUT_ATTRIBUTE: &str = "fan_out";
/// [`FAN_OUT_ATTRIBUTE`]'s value on an event the stream fans out.
pub const FAN_OUT_BY_STREAM: &str = "stream";
/// How many partition keys the due index is spread over. Every new delivery writes an index row
/// when it enters and another when it leaves, and one index partition takes 1,000 writes a second:
/// 32 shards carry 16,000 deliveries a second (docs/scaling.md). Part of the stored data: raising
/// it is safe (the sweep queries every shard below it, so rows written under a smaller count are
/// still found, and move when their delivery is next written); lowering it hides the higher ones.
pub const DUE_SHARDS: u8 = 32;
/// The first due-index shard of events that owe their fan-out (`FAN_OUT_SHARD_BASE..+DUE_SHARDS`).
pub const FAN_OUT_SHARD_BASE: u16 = 100;
// The deliveries' shards must stay below the events' (the sweep reads each range on its own).
const _: () = assert!((DUE_SHARDS as u16) <= FAN_OUT_SHARD_BASE);
/// How long retained items live by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);

// The attributes holding each entity.
const API_KEY: &str = "api_key";
const SUBSCRIPTION: &str = "subscription";
const EVENT: &str = "event";
const DELIVERY: &str = "delivery";

/// Tries of a call whose items were left unprocessed (throttling), or a transaction that lost to
/// a concurrent one, before giving up as unavailable.
const MAX_TRIES: u32 = 8;
const TABLE_WAIT: Duration = Duration::from_secs(120);

type Item = HashMap<String, AttributeValue>;

/// The shared AWS configuration: the standard chain (`AWS_REGION`, credentials,
/// `AWS_ENDPOINT_URL*`) over an HTTPS client using rustls with the ring provider.
pub async fn load_sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(sdk_http_client())
        .timeout_config(sdk_timeouts())
        .load()
        .await
}

/// How long one try of a DynamoDB or SQS call may take (they answer in milliseconds; a try that
/// stalls on a dead connection is cut off and retried on a new one).
pub const SDK_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a call may take with its retries: one stalled call cannot use up an invocation
/// (`api` has 10 s, `deliver` at least 20 s).
pub const SDK_OPERATION_TIMEOUT: Duration = Duration::from_secs(8);
/// Connecting to the service's endpoint.
pub const SDK_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The SDK's HTTP client: rustls with ring.
fn sdk_http_client() -> aws_sdk_dynamodb::config::SharedHttpClient {
    use aws_smithy_http_client::tls;
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// The timeouts of every SDK call the functions make.
pub fn sdk_timeouts() -> aws_config::timeout::TimeoutConfig {
    aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(SDK_CONNECT_TIMEOUT)
        .operation_attempt_timeout(SDK_ATTEMPT_TIMEOUT)
        .operation_timeout(SDK_OPERATION_TIMEOUT)
        .build()
}

/// A [`Store`] over one DynamoDB table (layout in the module docs).
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    retention: Duration,
    key_cache: Option<Arc<KeyCache>>,
}

/// API keys looked up lately, by hash: a warm function answers most requests without a read.
#[derive(Debug)]
struct KeyCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (TenantId, Instant)>>,
}

/// A bound on the cache's memory: past it the cache starts over.
const MAX_CACHED_KEYS: usize = 10_000;

impl KeyCache {
    fn get(&self, key_hash: &str) -> Option<TenantId> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(key_hash)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(tenant, _)| tenant.clone())
    }

    fn put(&self, key_hash: &str, tenant: &TenantId) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= MAX_CACHED_KEYS {
            entries.clear();
        }
        entries.insert(key_hash.to_owned(), (tenant.clone(), Instant::now()));
    }
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            retention: DEFAULT_RETENTION,
            key_cache: None,
        }
    }

    /// Remembers each API key found for `ttl` (zero: never). Unknown keys are always read, so a
    /// new key works at once; a revoked one keeps working for up to `ttl` in a warm function.
    pub fn with_api_key_cache(mut self, ttl: Duration) -> Self {
        self.key_cache = (!ttl.is_zero()).then(|| {
            Arc::new(KeyCache {
                ttl,
                entries: Mutex::new(HashMap::new()),
            })
        });
        self
    }

    /// How long events, deliveries and idempotency keys are kept (DynamoDB TTL).
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Creates the table with its indexes, change stream (new images) and TTL, and waits until it
    /// is active. Idempotent: an existing table is left as it is (its TTL is switched on if it is
    /// off).
    pub async fn create_table(client: &Client, table: &str) -> Result<(), StoreError> {
        let created = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute(PK, ScalarAttributeType::S)?)
            .attribute_definitions(attribute(SK, ScalarAttributeType::S)?)
            .attribute_definitions(attribute(LIST_PK, ScalarAttributeType::S)?)
            .attribute_definitions(attribute(LIST_SK, ScalarAttributeType::S)?)
            .attribute_definitions(attribute(DUE_SHARD, ScalarAttributeType::N)?)
            .attribute_definitions(attribute(DUE_AT, ScalarAttributeType::N)?)
            .key_schema(key_element(PK, KeyType::Hash)?)
            .key_schema(key_element(SK, KeyType::Range)?)
            .global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(LIST_INDEX)
                    .key_schema(key_element(LIST_PK, KeyType::Hash)?)
                    .key_schema(key_element(LIST_SK, KeyType::Range)?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::Include)
                            .non_key_attributes(SUBSCRIPTION)
                            .build(),
                    )
                    .build()
                    .map_err(StoreError::unavailable)?,
            )
            .global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(DUE_INDEX)
                    .key_schema(key_element(DUE_SHARD, KeyType::Hash)?)
                    .key_schema(key_element(DUE_AT, KeyType::Range)?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::KeysOnly)
                            .build(),
                    )
                    .build()
                    .map_err(StoreError::unavailable)?,
            )
            .stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(StreamViewType::NewImage)
                    .build()
                    .map_err(StoreError::unavailable)?,
            )
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) => {}
            Err(e) => return Err(StoreError::unavailable(e)),
        }
        client
            .wait_until_table_exists()
            .table_name(table)
            .wait(TABLE_WAIT)
            .await
            .map_err(StoreError::unavailable)?;

        let ttl = client
            .describe_time_to_live()
            .table_name(table)
            .send()
            .await
            .map_err(StoreError::unavailable)?;
        let ttl = ttl.time_to_live_description();
        match ttl.and_then(|d| d.time_to_live_status()) {
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling) => {
                let attribute = ttl.and_then(|d| d.attribute_name());
                if attribute != Some(TTL_ATTRIBUTE) {
                    return Err(StoreError::unavailable(format!(
                        "table {table} has TTL on {attribute:?}, not `{TTL_ATTRIBUTE}`"
                    )));
                }
            }
            _ => {
                client
                    .update_time_to_live()
                    .table_name(table)
                    .time_to_live_specification(
                        TimeToLiveSpecification::builder()
                            .enabled(true)
                            .attribute_name(TTL_ATTRIBUTE)
                            .build()
                            .map_err(StoreError::unavailable)?,
                    )
                    .send()
                    .await
                    .map_err(StoreError::unavailable)?;
            }
        }
        Ok(())
    }

    fn expires_at(&self, from: Timestamp) -> i64 {
        let retention = i64::try_from(self.retention.as_secs()).unwrap_or(i64::MAX);
        from.unix_seconds().saturating_add(retention)
    }

    fn event_item(&self, new: &NewEvent) -> StoreResult<Item> {
        let event = &new.event;
        let due_at = new.fan_out.due_at().map(Timestamp::unix_millis);
        to_item(&EventItem {
            pk: event_pk(&event.tenant_id, &event.id).pk,
            sk: SINGLE_SK,
            due_shard: due_at.map(|_| fan_out_shard(&event.id)),
            due_at,
            fan_out: (new.fan_out == FanOutDuty::Stream).then_some(FAN_OUT_BY_STREAM),
            expires_at: self.expires_at(event.received_at),
            event: StoredEvent::from(event),
        })
    }

    /// The item `new` is written as, as the table's stream hands it over (tests of the stream's
    /// use case).
    #[cfg(test)]
    pub(crate) fn stream_image_for_tests(new: &NewEvent) -> serde_dynamo::Item {
        let store = Self::new(
            Client::from_conf(
                aws_sdk_dynamodb::Config::builder()
                    .behavior_version(BehaviorVersion::latest())
                    .build(),
            ),
            "t",
        );
        serde_dynamo::Item::from(store.event_item(new).expect("an event item"))
    }

    fn idempotency_item(&self, event: &Event, key: &str) -> StoreResult<Item> {
        to_item(&IdempotencyItem {
            pk: idempotency_pk(&event.tenant_id, key).pk,
            sk: SINGLE_SK.to_owned(),
            event_id: event.id.clone(),
            expires_at: self.expires_at(event.received_at),
        })
    }

    fn delivery_item(&self, d: &Delivery) -> StoreResult<Item> {
        let due_at = d.due_at().map(Timestamp::unix_millis);
        let key = delivery_key(d.tenant_id(), d.id());
        to_item(&DeliveryItem {
            pk: key.pk,
            sk: key.sk,
            due_shard: due_at.map(|_| due_shard(d.id())),
            due_at,
            expires_at: self.expires_at(d.created_at()),
            delivery: d,
        })
    }

    async fn get_item(&self, key: Key) -> StoreResult<Option<Item>> {
        self.get_item_read(key, true).await
    }

    /// `consistent`: a strong read (1 read unit per 4 KB) or an eventually consistent one (half).
    async fn get_item_read(&self, key: Key, consistent: bool) -> StoreResult<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key.attributes()))
            .consistent_read(consistent)
            .send()
            .await
            .map_err(StoreError::unavailable)?;
        Ok(out.item)
    }

    async fn get_body<T: DeserializeOwned>(&self, key: Key, attr: &str) -> StoreResult<Option<T>> {
        self.get_item(key)
            .await?
            .map(|item| body(item, attr))
            .transpose()
    }

    /// A conditional `PutItem`. `Ok(Ok(()))` when written; `Ok(Err(old))` when the condition
    /// failed, with the item that stopped it (`None`: there was none).
    async fn put_checked(
        &self,
        item: Item,
        condition: &str,
        names: &[(&str, &str)],
        values: &[(&str, AttributeValue)],
    ) -> StoreResult<Result<(), Option<Item>>> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(condition)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        for (name, attribute) in names {
            put = put.expression_attribute_names(*name, *attribute);
        }
        for (name, value) in values {
            put = put.expression_attribute_values(*name, value.clone());
        }
        match put.send().await {
            Ok(_) => Ok(Ok(())),
            Err(e) => match e.as_service_error() {
                Some(PutItemError::ConditionalCheckFailedException(c)) => {
                    Ok(Err(c.item().cloned()))
                }
                _ => Err(StoreError::unavailable(e)),
            },
        }
    }

    /// The event on its own condition (only if new). A failed condition whose old item is this
    /// very event means an earlier try of this write committed and its answer was lost (the SDK
    /// retried it): that is `Created`, not a repeat.
    async fn put_event(&self, new: &NewEvent) -> StoreResult<InsertOutcome> {
        let item = self.event_item(new)?;
        match self
            .put_checked(item, "attribute_not_exists(#pk)", &[("#pk", PK)], &[])
            .await?
        {
            Ok(()) => Ok(InsertOutcome::Created),
            Err(old) => self.existing_event(new, old).await,
        }
    }

    /// `Created` if `old` (the stored event, read when not given) is this very event, else
    /// `Existing` with the stored event's fingerprint.
    async fn existing_event(
        &self,
        new: &NewEvent,
        old: Option<Item>,
    ) -> StoreResult<InsertOutcome> {
        let old = match old {
            Some(item) => Some(item),
            None => {
                self.get_item(event_pk(&new.event.tenant_id, &new.event.id))
                    .await?
            }
        };
        let stored: Option<StoredEvent> = old.map(|item| body(item, EVENT)).transpose()?;
        match stored.map(Event::try_from).transpose()? {
            Some(stored) if stored == new.event => Ok(InsertOutcome::Created),
            Some(stored) => Ok(InsertOutcome::Existing {
                event_id: stored.id,
                fingerprint: stored.fingerprint,
            }),
            None => Err(StoreError::unavailable(
                "the event's condition failed but the event is not there",
            )),
        }
    }

    /// `Existing` for the event `event_id`, with its fingerprint (empty if it cannot be read).
    async fn existing(&self, tenant: &TenantId, event_id: EventId) -> StoreResult<InsertOutcome> {
        let fingerprint = self
            .get_item(event_pk(tenant, &event_id))
            .await?
            .map(|item| body::<StoredEvent>(item, EVENT))
            .transpose()?
            .map(|e| e.fingerprint)
            .unwrap_or_default();
        Ok(InsertOutcome::Existing {
            event_id,
            fingerprint,
        })
    }

    /// A conditional put for a transaction: only if the item is new, returning the old item when
    /// it is not.
    fn put_new(&self, item: Item) -> StoreResult<TransactWriteItem> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(StoreError::unavailable)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// Writes the event, its idempotency key (if any) and `deliveries` all or nothing, each only
    /// if it is new. A known event id or idempotency key gives `Existing`; a delivery that
    /// exists already, `Conflict`.
    async fn write_new_event(&self, new: &NewEvent) -> StoreResult<InsertOutcome> {
        let event = self.event_item(new)?;
        let key = new
            .idempotency_key
            .as_deref()
            .map(|k| self.idempotency_item(&new.event, k))
            .transpose()?;
        if key.is_none() {
            // A transaction of one item costs twice what a conditional put does.
            return self.put_event(new).await;
        }
        let has_key = key.is_some();
        let items = std::iter::once(event)
            .chain(key)
            .map(|item| self.put_new(item))
            .collect::<StoreResult<Vec<_>>>()?;
        // The SDK gives the request an idempotency token, kept across its retries: a retried
        // transaction whose first try committed succeeds again instead of failing its conditions.
        let request = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items));
        let mut tries = 0;
        loop {
            tries += 1;
            let e = match request.clone().send().await {
                Ok(_) => return Ok(InsertOutcome::Created),
                Err(e) => e,
            };
            let reasons = match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
                    c.cancellation_reasons()
                }
                _ => return Err(StoreError::unavailable(e)),
            };
            // Reasons come in item order: the event, then the key.
            if has_key && condition_failed(reasons.get(1)) {
                let old = reasons.get(1).and_then(CancellationReason::item);
                return self.existing_from_key(new, old).await;
            }
            if condition_failed(reasons.first()) {
                let old = reasons.first().and_then(CancellationReason::item).cloned();
                return self.existing_event(new, old).await;
            }
            let lost_a_race = reasons
                .iter()
                .any(|r| r.code() == Some("TransactionConflict"));
            if !lost_a_race || tries >= MAX_TRIES {
                return Err(StoreError::unavailable(e));
            }
            // Another write held one of the items (typically the same publish, retried at
            // once): try again, and its condition will tell.
            tokio::time::sleep(backoff(tries)).await;
        }
    }

    /// The event a known idempotency key points at: from the failed condition's old item, or read
    /// when the backend did not return it.
    async fn existing_from_key(
        &self,
        new: &NewEvent,
        old: Option<&Item>,
    ) -> StoreResult<InsertOutcome> {
        let item = match old {
            Some(item) => item.clone(),
            None => {
                let key = new.idempotency_key.as_deref().unwrap_or_default();
                self.get_item(idempotency_pk(&new.event.tenant_id, key))
                    .await?
                    .ok_or_else(|| {
                        StoreError::unavailable("idempotency key vanished while publishing")
                    })?
            }
        };
        let item: IdempotencyItem = serde_ddb::from_item(item).map_err(StoreError::unavailable)?;
        self.existing(&new.event.tenant_id, item.event_id).await
    }
}

fn attribute(name: &str, ty: ScalarAttributeType) -> StoreResult<AttributeDefinition> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ty)
        .build()
        .map_err(StoreError::unavailable)
}

fn key_element(name: &str, ty: KeyType) -> StoreResult<KeySchemaElement> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(ty)
        .build()
        .map_err(StoreError::unavailable)
}

fn condition_failed(reason: Option<&CancellationReason>) -> bool {
    reason.and_then(CancellationReason::code) == Some("ConditionalCheckFailed")
}

/// 50 ms, 100 ms, … up to 2 s.
fn backoff(tries: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << tries.min(6)).min(2_000))
}

// ---- keys ----

/// An item's primary key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    pk: String,
    sk: String,
}

impl Key {
    /// The key of an item alone under its partition key.
    fn single(pk: String) -> Self {
        Self {
            pk,
            sk: SINGLE_SK.to_owned(),
        }
    }

    fn attributes(&self) -> Item {
        HashMap::from([
            (PK.to_owned(), AttributeValue::S(self.pk.clone())),
            (SK.to_owned(), AttributeValue::S(self.sk.clone())),
        ])
    }
}

fn api_key_pk(key_hash: &str) -> Key {
    Key::single(format!("KEY#{key_hash}"))
}

fn subscription_pk(tenant: &TenantId, id: &SubscriptionId) -> Key {
    Key::single(format!("T#{tenant}#SUB#{id}"))
}

fn subscriptions_list_pk(tenant: &TenantId) -> String {
    format!("T#{tenant}#SUBS")
}

fn event_pk(tenant: &TenantId, id: &EventId) -> Key {
    Key::single(format!("T#{tenant}#EVT#{id}"))
}

fn idempotency_pk(tenant: &TenantId, key: &str) -> Key {
    Key::single(format!("T#{tenant}#IDEM#{key}"))
}

/// A delivery's key: under its subscription, in one of [`DELIVERY_SHARDS`] partitions (a hash
/// of its id), sorted by its own part (the event's receive time, then a hash). The id names the
/// subscription, so the key follows from the id alone.
fn delivery_key(tenant: &TenantId, id: &DeliveryId) -> Key {
    let shard = shard_of(id.own_part(), DELIVERY_SHARDS);
    Key {
        pk: deliveries_pk(tenant, &id.subscription_id(), shard),
        sk: id.own_part().to_owned(),
    }
}

/// The partition of one shard of a subscription's deliveries.
fn deliveries_pk(tenant: &TenantId, subscription: &SubscriptionId, shard: u16) -> String {
    format!("T#{tenant}#SUB#{subscription}#DLV#{shard}")
}

/// A deliveries-list cursor (the sort key of the last delivery listed) as this store hands it
/// out, else `BadCursor`: a cursor goes into a key condition, so text this store did not hand out
/// never reaches DynamoDB.
fn parse_delivery_cursor<'a>(
    subscription: &SubscriptionId,
    cursor: &'a str,
) -> StoreResult<&'a str> {
    match DeliveryId::from_own_part(subscription, cursor) {
        // Handed out in lower case: compared as text in the key condition.
        Ok(id) if id.own_part() == cursor => Ok(cursor),
        _ => Err(StoreError::BadCursor),
    }
}

/// The tenant and delivery id of a delivery's key.
fn parse_delivery_key(pk: &str, sk: &str) -> StoreResult<(TenantId, DeliveryId)> {
    let parsed = pk.strip_prefix("T#").and_then(|rest| {
        let (tenant, rest) = rest.split_once("#SUB#")?;
        let (subscription, _shard) = rest.split_once("#DLV#")?;
        Some((tenant, subscription))
    });
    let (tenant, subscription) =
        parsed.ok_or_else(|| StoreError::unavailable(format!("`{pk}` is not a delivery key")))?;
    let subscription = SubscriptionId::parse(subscription).map_err(StoreError::unavailable)?;
    Ok((
        TenantId::parse(tenant).map_err(StoreError::unavailable)?,
        DeliveryId::from_own_part(&subscription, sk).map_err(StoreError::unavailable)?,
    ))
}

/// The due-index shard of a delivery: FNV-1a of its id, so it is the same in every build.
fn due_shard(id: &DeliveryId) -> u16 {
    shard_of(id.as_str(), u16::from(DUE_SHARDS))
}

/// The due-index shard of an event that owes its fan-out: apart from the deliveries' shards, so
/// the sweep reads each kind on its own.
fn fan_out_shard(id: &EventId) -> u16 {
    FAN_OUT_SHARD_BASE + shard_of(id.as_str(), u16::from(DUE_SHARDS))
}

/// FNV-1a of `text`, modulo `shards`: the same in every build.
fn shard_of(text: &str, shards: u16) -> u16 {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % u64::from(shards)) as u16
}

/// The tenant and event id of an event's `pk`.
fn parse_event_pk(pk: &str) -> StoreResult<(TenantId, EventId)> {
    let (tenant, id) = pk
        .strip_prefix("T#")
        .and_then(|rest| rest.split_once("#EVT#"))
        .ok_or_else(|| StoreError::unavailable(format!("`{pk}` is not an event key")))?;
    Ok((
        TenantId::parse(tenant).map_err(StoreError::unavailable)?,
        EventId::parse(id).map_err(StoreError::unavailable)?,
    ))
}

/// The event of an item on the table's change stream (a record's `NewImage`, in DynamoDB's JSON
/// as Lambda hands it over). `Ok(None)`: the item is not an event.
pub fn event_from_stream_image(image: serde_dynamo::Item) -> StoreResult<Option<Event>> {
    #[derive(Deserialize)]
    struct Image {
        event: Option<StoredEvent>,
    }
    let image: Image = serde_dynamo::from_item(image).map_err(StoreError::unavailable)?;
    image.event.map(Event::try_from).transpose()
}

// ---- items ----

#[derive(Serialize)]
struct ApiKeyItem<'a> {
    pk: String,
    sk: &'static str,
    api_key: &'a ApiKeyRecord,
}

#[derive(Serialize)]
struct SubscriptionItem<'a> {
    pk: String,
    sk: &'static str,
    list_pk: String,
    list_sk: &'a str,
    subscription: &'a Subscription,
}

#[derive(Serialize)]
struct EventItem {
    pk: String,
    sk: &'static str,
    // Present while the event's fan-out is owed: the sweep finds it in the due index.
    #[serde(skip_serializing_if = "Option::is_none")]
    due_shard: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    due_at: Option<i64>,
    // `FAN_OUT_BY_STREAM` when the table's stream starts the fan-out: the stream's event source
    // mapping lets only such items through.
    #[serde(skip_serializing_if = "Option::is_none")]
    fan_out: Option<&'static str>,
    expires_at: i64,
    event: StoredEvent,
}

/// An event as stored: `data` is the producer's JSON text, byte for byte, in a string attribute
/// (a map would re-order and re-format it).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredEvent {
    id: EventId,
    tenant_id: TenantId,
    event_type: EventType,
    occurred_at: Timestamp,
    data: String,
    received_at: Timestamp,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    fingerprint: String,
}

impl From<&Event> for StoredEvent {
    fn from(e: &Event) -> Self {
        Self {
            id: e.id.clone(),
            tenant_id: e.tenant_id.clone(),
            event_type: e.event_type.clone(),
            occurred_at: e.occurred_at,
            data: e.data.get().to_owned(),
            received_at: e.received_at,
            fingerprint: e.fingerprint.clone(),
        }
    }
}

impl TryFrom<StoredEvent> for Event {
    type Error = StoreError;

    fn try_from(e: StoredEvent) -> StoreResult<Self> {
        Ok(Self {
            id: e.id,
            tenant_id: e.tenant_id,
            event_type: e.event_type,
            occurred_at: e.occurred_at,
            data: RawValue::from_string(e.data).map_err(StoreError::unavailable)?,
            received_at: e.received_at,
            fingerprint: e.fingerprint,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct IdempotencyItem {
    pk: String,
    sk: String,
    event_id: EventId,
    expires_at: i64,
}

#[derive(Serialize)]
struct DeliveryItem<'a> {
    pk: String,
    sk: String,
    // Absent, not null, while not due: that keeps the due index sparse.
    #[serde(skip_serializing_if = "Option::is_none")]
    due_shard: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    due_at: Option<i64>,
    expires_at: i64,
    delivery: &'a Delivery,
}

/// What the due index holds of a delivery or an event.
#[derive(Deserialize)]
struct DueEntry {
    pk: String,
    sk: String,
    due_at: i64,
}

fn to_item<T: Serialize>(value: &T) -> StoreResult<Item> {
    serde_ddb::to_item(value).map_err(StoreError::unavailable)
}

/// Whether attribute `attr` of `item` holds exactly `value`: the item is a write of ours.
fn holds<T: DeserializeOwned + PartialEq>(item: &Item, attr: &str, value: &T) -> bool {
    body::<T>(item.clone(), attr).is_ok_and(|stored| stored == *value)
}

/// The entity held in attribute `attr` of `item`.
fn body<T: DeserializeOwned>(mut item: Item, attr: &str) -> StoreResult<T> {
    let value = item
        .remove(attr)
        .ok_or_else(|| StoreError::unavailable(format!("item without `{attr}`")))?;
    serde_ddb::from_attribute_value(value).map_err(StoreError::unavailable)
}

/// A page size the queries can use: at least one item, so a cursor always moves forward.
fn page_limit(page: &PageRequest) -> usize {
    page.limit.max(1) as usize
}

/// The cursor to start after, if any (ids are never empty).
fn page_after(page: &PageRequest) -> Option<&str> {
    page.after.as_deref().filter(|a| !a.is_empty())
}

/// Trims the `limit + 1` items a page query fetched to `limit`, and sets the cursor only when a
/// further item exists (no empty last page).
fn into_page<T>(mut items: Vec<T>, limit: usize, cursor_of: impl Fn(&T) -> String) -> Page<T> {
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor_of)
    } else {
        None
    };
    Page { items, next }
}

/// Runs `query` until it has `want` items or the results end, paging past 1 MB.
async fn query_up_to(query: QueryFluentBuilder, want: usize) -> StoreResult<Vec<Item>> {
    let mut items = Vec::new();
    let mut start = None;
    loop {
        let mut page = query.clone().set_exclusive_start_key(start.take());
        if let Ok(limit) = i32::try_from(want - items.len()) {
            page = page.limit(limit);
        }
        let out = page.send().await.map_err(StoreError::unavailable)?;
        items.extend(out.items.unwrap_or_default());
        match out.last_evaluated_key {
            Some(key) if items.len() < want && !key.is_empty() => start = Some(key),
            _ => return Ok(items),
        }
    }
}

impl DynamoStore {
    /// A query on the list index for `list_pk`, ascending or not, with `list_sk` beyond `after`.
    fn list_query(
        &self,
        list_pk: String,
        forward: bool,
        after: Option<&str>,
    ) -> QueryFluentBuilder {
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(LIST_INDEX)
            .scan_index_forward(forward)
            .expression_attribute_names("#p", LIST_PK)
            .expression_attribute_values(":p", AttributeValue::S(list_pk));
        match after {
            None => query.key_condition_expression("#p = :p"),
            Some(after) => query
                .key_condition_expression(if forward {
                    "#p = :p AND #s > :after"
                } else {
                    "#p = :p AND #s < :after"
                })
                .expression_attribute_names("#s", LIST_SK)
                .expression_attribute_values(":after", AttributeValue::S(after.to_owned())),
        }
    }
}

/// How many items restart recovery reads and writes at once.
const RECOVERY_WRITES_AT_ONCE: usize = 16;

/// How long a subscription change waits for the `list` index to show it.
const INDEX_WAIT: Duration = Duration::from_secs(10);

impl DynamoStore {
    /// Waits until fan-out's read (a `Query` on the eventually consistent `list` index) sees
    /// subscription `id` at `version` (`None`: gone), so an event published after a change is
    /// answered reaches a subscription just created or changed. Gives up after [`INDEX_WAIT`]
    /// with a warning: the change itself is stored either way.
    async fn until_listed(&self, tenant: &TenantId, id: &SubscriptionId, version: Option<u64>) {
        let deadline = Instant::now() + INDEX_WAIT;
        let mut pause = Duration::from_millis(20);
        loop {
            let listed = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(LIST_INDEX)
                .key_condition_expression("#p = :p AND #s = :s")
                .expression_attribute_names("#p", LIST_PK)
                .expression_attribute_names("#s", LIST_SK)
                .expression_attribute_values(":p", AttributeValue::S(subscriptions_list_pk(tenant)))
                .expression_attribute_values(":s", AttributeValue::S(id.as_str().to_owned()))
                .send()
                .await;
            let seen = match listed {
                Ok(out) => Some(
                    out.items
                        .unwrap_or_default()
                        .into_iter()
                        .find_map(|item| body::<Subscription>(item, SUBSCRIPTION).ok())
                        .map(|s| s.version),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the subscription index");
                    None
                }
            };
            if seen == Some(version) {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(subscription = %id, "the subscription index did not show a change within {INDEX_WAIT:?}");
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// The `due` index rows of `shards` with `due_at <= now`: each shard's earliest `limit`,
    /// queried concurrently and merged, so the earliest `limit` overall (keys and due times).
    async fn due_rows(
        &self,
        now: Timestamp,
        limit: u32,
        shards: std::ops::Range<u16>,
    ) -> StoreResult<Vec<(Key, Timestamp)>> {
        let want = limit as usize;
        if want == 0 {
            return Ok(Vec::new());
        }
        let mut queries = tokio::task::JoinSet::new();
        for shard in shards {
            let query = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(DUE_INDEX)
                .key_condition_expression("#s = :s AND #d <= :now")
                .expression_attribute_names("#s", DUE_SHARD)
                .expression_attribute_names("#d", DUE_AT)
                .expression_attribute_values(":s", AttributeValue::N(shard.to_string()))
                .expression_attribute_values(
                    ":now",
                    AttributeValue::N(now.unix_millis().to_string()),
                )
                .scan_index_forward(true);
            queries.spawn(query_up_to(query, want));
        }
        let mut due = Vec::new();
        while let Some(items) = queries.join_next().await {
            for item in items.map_err(StoreError::unavailable)?? {
                let entry: DueEntry =
                    serde_ddb::from_item(item).map_err(StoreError::unavailable)?;
                let key = Key {
                    pk: entry.pk,
                    sk: entry.sk,
                };
                due.push((key, Timestamp::from_unix_millis(entry.due_at)));
            }
        }
        due.sort_by(|a, b| (a.1, &a.0.pk, &a.0.sk).cmp(&(b.1, &b.0.pk, &b.0.sk)));
        due.truncate(want);
        Ok(due)
    }

    /// Every row of the `due` index in `shards`, whatever its due time (restart recovery).
    async fn all_due_rows(
        &self,
        shards: std::ops::Range<u16>,
    ) -> StoreResult<Vec<(Key, Timestamp)>> {
        self.due_rows(Timestamp::from_unix_millis(i64::MAX), u32::MAX, shards)
            .await
    }

    /// Restart recovery of one delivery of the due index: read, [`Delivery::recovered`], and
    /// written back version-checked. `false` if nothing changed: not in need of it, or it moved
    /// on (or went) between the read and the write.
    async fn recover_delivery(&self, key: Key, now: Timestamp) -> StoreResult<bool> {
        let Some(current) = self.get_body::<Delivery>(key, DELIVERY).await? else {
            return Ok(false);
        };
        let Some(next) = current.recovered(now) else {
            return Ok(false);
        };
        match self.update_delivery(&next, current.version()).await {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict | StoreError::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Restart recovery of one owed fan-out of the due index: due now if it was due later.
    /// `false` if nothing changed: due already, or done or moved on since the index was read.
    async fn recover_fan_out(
        &self,
        key: Key,
        due_at: Timestamp,
        now: Timestamp,
    ) -> StoreResult<bool> {
        if due_at <= now {
            return Ok(false);
        }
        let (tenant_id, event_id) = parse_event_pk(&key.pk)?;
        let due = DueFanOut {
            tenant_id,
            event_id,
            due_at,
        };
        match self.claim_fan_out(&due, now).await {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict | StoreError::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// [`until_listed`](Self::until_listed) for `subscription` as just written.
    async fn until_listed_version(&self, subscription: &Subscription) {
        self.until_listed(
            &subscription.tenant_id,
            &subscription.id,
            Some(subscription.version),
        )
        .await;
    }
}

impl Store for DynamoStore {
    async fn put_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        let item = to_item(&ApiKeyItem {
            pk: api_key_pk(&key.key_hash).pk,
            sk: SINGLE_SK,
            api_key: key,
        })?;
        match self
            .put_checked(item, "attribute_not_exists(#pk)", &[("#pk", PK)], &[])
            .await?
        {
            Ok(()) => Ok(()),
            // Registered already: for this tenant (a retried call, or our own earlier try whose
            // answer was lost) that is done; a key never moves to another tenant.
            Err(Some(old))
                if body::<ApiKeyRecord>(old.clone(), API_KEY)
                    .is_ok_and(|r| r.tenant_id == key.tenant_id) =>
            {
                Ok(())
            }
            Err(_) => Err(StoreError::Conflict),
        }
    }

    async fn tenant_for_api_key(&self, key_hash: &str) -> StoreResult<Option<TenantId>> {
        if let Some(tenant) = self.key_cache.as_ref().and_then(|c| c.get(key_hash)) {
            return Ok(Some(tenant));
        }
        let key: Option<ApiKeyRecord> = self.get_body(api_key_pk(key_hash), API_KEY).await?;
        let tenant = key.map(|k| k.tenant_id);
        if let (Some(cache), Some(tenant)) = (&self.key_cache, &tenant) {
            cache.put(key_hash, tenant);
        }
        Ok(tenant)
    }

    async fn insert_subscription(&self, subscription: &Subscription) -> StoreResult<()> {
        let item = subscription_item(subscription)?;
        match self
            .put_checked(item, "attribute_not_exists(#pk)", &[("#pk", PK)], &[])
            .await?
        {
            Ok(()) => {}
            // Our own earlier try, whose answer was lost and which the SDK retried.
            Err(Some(old)) if holds(&old, SUBSCRIPTION, subscription) => {}
            Err(_) => return Err(StoreError::Conflict),
        }
        self.until_listed_version(subscription).await;
        Ok(())
    }

    async fn get_subscription(
        &self,
        tenant: &TenantId,
        id: &SubscriptionId,
    ) -> StoreResult<Option<Subscription>> {
        self.get_body(subscription_pk(tenant, id), SUBSCRIPTION)
            .await
    }

    async fn list_subscriptions(
        &self,
        tenant: &TenantId,
        page: &PageRequest,
    ) -> StoreResult<Page<Subscription>> {
        let limit = page_limit(page);
        let after = page_after(page)
            .map(|a| {
                SubscriptionId::parse(a)
                    .map(|_| a)
                    .map_err(|_| StoreError::BadCursor)
            })
            .transpose()?;
        let query = self.list_query(subscriptions_list_pk(tenant), true, after);
        let items = query_up_to(query, limit + 1)
            .await?
            .into_iter()
            .map(|item| body(item, SUBSCRIPTION))
            .collect::<StoreResult<Vec<Subscription>>>()?;
        Ok(into_page(items, limit, |s| s.id.as_str().to_owned()))
    }

    async fn update_subscription(
        &self,
        subscription: &Subscription,
        expected_version: u64,
    ) -> StoreResult<()> {
        let item = subscription_item(subscription)?;
        // Items written before versions existed have none: version 0.
        let condition = if expected_version == 0 {
            "attribute_exists(#pk) AND (attribute_not_exists(#s.#v) OR #s.#v = :expected)"
        } else {
            "attribute_exists(#pk) AND #s.#v = :expected"
        };
        let written = self
            .put_checked(
                item,
                condition,
                &[("#pk", PK), ("#s", SUBSCRIPTION), ("#v", "version")],
                &[(":expected", AttributeValue::N(expected_version.to_string()))],
            )
            .await?;
        match written {
            Ok(()) => {}
            Err(None) => return Err(StoreError::NotFound),
            // Our own earlier try, whose answer was lost and which the SDK retried.
            Err(Some(old)) if holds(&old, SUBSCRIPTION, subscription) => {}
            Err(Some(_)) => return Err(StoreError::Conflict),
        }
        self.until_listed_version(subscription).await;
        Ok(())
    }

    async fn delete_subscription(&self, tenant: &TenantId, id: &SubscriptionId) -> StoreResult<()> {
        // Its deliveries stay: they are the log of what was sent.
        let deleted = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(subscription_pk(tenant, id).attributes()))
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .send()
            .await;
        match deleted {
            Ok(_) => {
                self.until_listed(tenant, id, None).await;
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Err(StoreError::NotFound)
            }
            Err(e) => Err(StoreError::unavailable(e)),
        }
    }

    async fn tenant_subscriptions(&self, tenant: &TenantId) -> StoreResult<Vec<Subscription>> {
        let query = self.list_query(subscriptions_list_pk(tenant), true, None);
        query_up_to(query, usize::MAX)
            .await?
            .into_iter()
            .map(|item| body(item, SUBSCRIPTION))
            .collect()
    }

    async fn insert_event(&self, new: &NewEvent) -> StoreResult<InsertOutcome> {
        self.write_new_event(new).await
    }

    async fn get_event(&self, tenant: &TenantId, id: &EventId) -> StoreResult<Option<Event>> {
        // An event never changes once written, so an eventually consistent read (half the
        // price) is right whenever it finds the item; only a miss is read again, strongly.
        let pk = event_pk(tenant, id);
        let item = match self.get_item_read(pk.clone(), false).await? {
            Some(item) => Some(item),
            None => self.get_item(pk).await?,
        };
        let stored: Option<StoredEvent> = item.map(|item| body(item, EVENT)).transpose()?;
        stored.map(Event::try_from).transpose()
    }

    async fn get_event_for_fan_out(
        &self,
        tenant: &TenantId,
        id: &EventId,
    ) -> StoreResult<Option<(Event, Option<Timestamp>)>> {
        // Eventually consistent like `get_event`: a lagging read shows the fan-out still owed
        // (the earlier state), never done too early.
        let pk = event_pk(tenant, id);
        let item = match self.get_item_read(pk.clone(), false).await? {
            Some(item) => Some(item),
            None => self.get_item(pk).await?,
        };
        let Some(item) = item else {
            return Ok(None);
        };
        let due = match item.get(DUE_AT) {
            Some(AttributeValue::N(n)) => n.parse().ok().map(Timestamp::from_unix_millis),
            _ => None,
        };
        let stored: StoredEvent = body(item, EVENT)?;
        Ok(Some((Event::try_from(stored)?, due)))
    }

    async fn fanned_out(&self, tenant: &TenantId, id: &EventId) -> StoreResult<()> {
        let done = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(event_pk(tenant, id).attributes()))
            .update_expression("REMOVE #s, #d")
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#s", DUE_SHARD)
            .expression_attribute_names("#d", DUE_AT)
            .send()
            .await;
        match done {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Err(StoreError::NotFound)
            }
            Err(e) => Err(StoreError::unavailable(e)),
        }
    }

    async fn due_fan_outs(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<DueFanOut>> {
        let rows = self
            .due_rows(
                now,
                limit,
                FAN_OUT_SHARD_BASE..FAN_OUT_SHARD_BASE + u16::from(DUE_SHARDS),
            )
            .await?;
        rows.into_iter()
            .map(|(key, due_at)| {
                let (tenant_id, event_id) = parse_event_pk(&key.pk)?;
                Ok(DueFanOut {
                    tenant_id,
                    event_id,
                    due_at,
                })
            })
            .collect()
    }

    async fn claim_fan_out(&self, due: &DueFanOut, next: Timestamp) -> StoreResult<()> {
        let claimed = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(event_pk(&due.tenant_id, &due.event_id).attributes()))
            .update_expression("SET #d = :next")
            .condition_expression("#d = :expected")
            .expression_attribute_names("#d", DUE_AT)
            .expression_attribute_values(":next", AttributeValue::N(next.unix_millis().to_string()))
            .expression_attribute_values(
                ":expected",
                AttributeValue::N(due.due_at.unix_millis().to_string()),
            )
            .send()
            .await;
        match claimed {
            Ok(_) => Ok(()),
            // Claimed by another sweep, done meanwhile, or our own claim whose answer was lost:
            // whichever, this sweep leaves it (a lost claim is due again after the grace).
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Err(StoreError::Conflict)
            }
            Err(e) => Err(StoreError::unavailable(e)),
        }
    }

    async fn insert_delivery(&self, delivery: &Delivery) -> StoreResult<()> {
        let item = self.delivery_item(delivery)?;
        match self
            .put_checked(item, "attribute_not_exists(#pk)", &[("#pk", PK)], &[])
            .await?
        {
            Ok(()) => Ok(()),
            // Our own earlier try, whose answer was lost and which the SDK retried.
            Err(Some(old)) if holds(&old, DELIVERY, delivery) => Ok(()),
            Err(_) => Err(StoreError::Conflict),
        }
    }

    async fn get_delivery(
        &self,
        tenant: &TenantId,
        id: &DeliveryId,
    ) -> StoreResult<Option<Delivery>> {
        self.get_body(delivery_key(tenant, id), DELIVERY).await
    }

    async fn update_delivery(&self, delivery: &Delivery, expected_version: u64) -> StoreResult<()> {
        let item = self.delivery_item(delivery)?;
        // The key holds the tenant: another tenant's delivery is simply not there.
        let written = self
            .put_checked(
                item,
                "#d.#v = :expected",
                &[("#d", DELIVERY), ("#v", "version")],
                &[(":expected", AttributeValue::N(expected_version.to_string()))],
            )
            .await?;
        match written {
            Ok(()) => Ok(()),
            // The old item comes back only if there is one: a stale version, not a missing item.
            Err(None) => Err(StoreError::NotFound),
            // Our own earlier try, whose answer was lost and which the SDK retried.
            Err(Some(old)) if holds(&old, DELIVERY, delivery) => Ok(()),
            Err(Some(_)) => Err(StoreError::Conflict),
        }
    }

    async fn list_deliveries(
        &self,
        tenant: &TenantId,
        subscription: &SubscriptionId,
        page: &PageRequest,
    ) -> StoreResult<Page<Delivery>> {
        let limit = page_limit(page);
        let after = page_after(page)
            .map(|a| parse_delivery_cursor(subscription, a))
            .transpose()?;
        // Newest first: each shard's newest `limit + 1` past the cursor, read concurrently and
        // merged; the newest `limit + 1` of all of them tell the page and whether one follows.
        let mut queries = tokio::task::JoinSet::new();
        for shard in 0..DELIVERY_SHARDS {
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .scan_index_forward(false)
                .expression_attribute_names("#p", PK)
                .expression_attribute_values(
                    ":p",
                    AttributeValue::S(deliveries_pk(tenant, subscription, shard)),
                );
            query = match after {
                None => query.key_condition_expression("#p = :p"),
                Some(after) => query
                    .key_condition_expression("#p = :p AND #s < :after")
                    .expression_attribute_names("#s", SK)
                    .expression_attribute_values(":after", AttributeValue::S(after.to_owned())),
            };
            queries.spawn(query_up_to(query, limit + 1));
        }
        let mut found = Vec::new();
        while let Some(items) = queries.join_next().await {
            for item in items.map_err(StoreError::unavailable)?? {
                let delivery: Delivery = body(item, DELIVERY)?;
                found.push(delivery);
            }
        }
        found.sort_by(|a, b| b.id().own_part().cmp(a.id().own_part()));
        found.truncate(limit + 1);
        Ok(into_page(found, limit, |d| d.id().own_part().to_owned()))
    }

    async fn due_deliveries(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<DueDelivery>> {
        let rows = self.due_rows(now, limit, 0..u16::from(DUE_SHARDS)).await?;
        rows.into_iter()
            .map(|(key, due_at)| {
                let (tenant_id, delivery_id) = parse_delivery_key(&key.pk, &key.sk)?;
                Ok(DueDelivery {
                    tenant_id,
                    delivery_id,
                    due_at,
                })
            })
            .collect()
    }

    /// Reads the whole `due` index (every shard, whatever the due time) and recovers each row:
    /// a delivery is read and written back version-checked, an owed fan-out due later is claimed
    /// for now. Rarely run (the local runner's start-up), so simple rather than cheap.
    async fn recover_after_restart(&self, now: Timestamp) -> StoreResult<usize> {
        let deliveries = self.all_due_rows(0..u16::from(DUE_SHARDS)).await?;
        let fan_outs = self
            .all_due_rows(FAN_OUT_SHARD_BASE..FAN_OUT_SHARD_BASE + u16::from(DUE_SHARDS))
            .await?;
        let mut recovered = 0;
        let delivery_results = join_bounded(
            deliveries
                .into_iter()
                .map(|(key, _)| self.recover_delivery(key, now)),
            RECOVERY_WRITES_AT_ONCE,
        )
        .await;
        for changed in delivery_results {
            recovered += usize::from(changed?);
        }
        let fan_out_results = join_bounded(
            fan_outs
                .into_iter()
                .map(|(key, due_at)| self.recover_fan_out(key, due_at, now)),
            RECOVERY_WRITES_AT_ONCE,
        )
        .await;
        for changed in fan_out_results {
            recovered += usize::from(changed?);
        }
        Ok(recovered)
    }
}

fn subscription_item(s: &Subscription) -> StoreResult<Item> {
    to_item(&SubscriptionItem {
        pk: subscription_pk(&s.tenant_id, &s.id).pk,
        sk: SINGLE_SK,
        list_pk: subscriptions_list_pk(&s.tenant_id),
        list_sk: s.id.as_str(),
        subscription: s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{delivery_for, event, subscription, tenant, ts};

    fn store() -> DynamoStore {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .build();
        DynamoStore::new(Client::from_conf(config), "t")
    }

    /// A call to an endpoint that accepts the connection and never answers (a stalled
    /// connection, the worst an unhealthy network does) fails once the operation timeout is up.
    #[tokio::test]
    async fn a_stalled_call_fails_within_the_operation_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket); // read nothing, answer nothing
            }
        });
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .endpoint_url(endpoint)
            .http_client(sdk_http_client())
            .timeout_config(sdk_timeouts())
            .load()
            .await;
        let config = aws_sdk_dynamodb::Config::from(&sdk);
        let store = DynamoStore::new(Client::from_conf(config), "t");
        let started = Instant::now();
        let read = store.get_event(&tenant("a"), &EventId::generate()).await;
        let took = started.elapsed();
        held.abort();
        assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
        assert!(
            took >= SDK_ATTEMPT_TIMEOUT && took < SDK_OPERATION_TIMEOUT + Duration::from_secs(2),
            "took {took:?}"
        );
    }

    #[test]
    fn delivery_keys_parse_back() {
        let d = delivery_for(
            &tenant("acme-1"),
            &subscription(&tenant("acme-1"), ts(0)),
            ts(0),
        );
        let key = delivery_key(d.tenant_id(), d.id());
        assert!(
            key.pk
                .starts_with(&format!("T#acme-1#SUB#{}#DLV#", d.subscription_id())),
            "under its subscription: {key:?}"
        );
        assert_eq!(
            parse_delivery_key(&key.pk, &key.sk).unwrap(),
            (d.tenant_id().clone(), d.id().clone())
        );
        assert!(parse_delivery_key("T#a#SUB#sub_x", &key.sk).is_err());
        assert!(parse_delivery_key(&key.pk, "x").is_err());
        assert!(parse_delivery_key("KEY#x", SINGLE_SK).is_err());
    }

    #[test]
    fn a_subscriptions_deliveries_spread_over_its_shards() {
        let a = tenant("a");
        let s = subscription(&a, ts(0));
        let partitions: std::collections::HashSet<String> = (0..400)
            .map(|i| {
                let event = EventId::parse(&format!("e-{i}")).unwrap();
                let id = DeliveryId::derive(&a, &event, &s.id, ts(i));
                delivery_key(&a, &id).pk
            })
            .collect();
        assert_eq!(partitions.len(), usize::from(DELIVERY_SHARDS));
    }

    #[test]
    fn due_shard_is_stable_and_spread() {
        // FNV-1a is fixed: a delivery must keep its shard across builds.
        let id =
            DeliveryId::parse("dlv_01hf2gn0h3c0y8mp0fqzjaxyqw01hf2gn0h3c0y8mp0fqzjaxyqw").unwrap();
        assert_eq!(due_shard(&id), due_shard(&id.clone()));
        let used: std::collections::HashSet<u16> = (0..4_000)
            .map(|_| due_shard(&DeliveryId::generate()))
            .collect();
        assert_eq!(used.len(), usize::from(DUE_SHARDS));
        assert!(used.iter().all(|s| *s < u16::from(DUE_SHARDS)));
        let events: std::collections::HashSet<u16> = (0..4_000)
            .map(|_| fan_out_shard(&EventId::generate()))
            .collect();
        assert_eq!(events.len(), usize::from(DUE_SHARDS));
        assert!(
            events.iter().all(
                |s| (FAN_OUT_SHARD_BASE..FAN_OUT_SHARD_BASE + u16::from(DUE_SHARDS)).contains(s)
            ),
            "events owing a fan-out have shards of their own"
        );
    }

    #[test]
    fn delivery_item_is_in_the_due_index_only_while_due() {
        let store = store();
        let a = tenant("a");
        let d = delivery_for(&a, &subscription(&a, ts(0)), ts(0));
        let item = store.delivery_item(&d).unwrap();
        for attr in [PK, SK, DUE_SHARD, DUE_AT, TTL_ATTRIBUTE, DELIVERY] {
            assert!(item.contains_key(attr), "{attr} in {item:?}");
        }
        for attr in [LIST_PK, LIST_SK] {
            assert!(
                !item.contains_key(attr),
                "listed from the table, not an index"
            );
        }
        assert_eq!(
            item[DUE_AT],
            AttributeValue::N(d.due_at().unwrap().unix_millis().to_string())
        );
        let d = d.with_due_at_for_tests(None);
        let item = store.delivery_item(&d).unwrap();
        assert!(!item.contains_key(DUE_SHARD) && !item.contains_key(DUE_AT));
        let back: Delivery = body(item, DELIVERY).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn an_event_the_stream_fans_out_is_marked_for_its_filter_and_read_back_from_its_image() {
        let store = store();
        let e = event(&tenant("a"), ts(0), r#"{"b": 1}"#);
        let new = NewEvent {
            event: e.clone(),
            idempotency_key: None,
            fan_out: FanOutDuty::Stream,
        };
        let item = store.event_item(&new).unwrap();
        assert_eq!(
            item[FAN_OUT_ATTRIBUTE],
            AttributeValue::S(FAN_OUT_BY_STREAM.into())
        );
        assert!(!item.contains_key(DUE_AT), "nothing owed");
        // As Lambda hands the new image over: DynamoDB JSON.
        let json = serde_json::to_value(serde_dynamo::Item::from(item)).unwrap();
        assert_eq!(json["fan_out"], serde_json::json!({"S": "stream"}));
        let image: serde_dynamo::Item = serde_json::from_value(json).unwrap();
        assert_eq!(event_from_stream_image(image).unwrap(), Some(e));

        let caller = NewEvent {
            fan_out: FanOutDuty::Caller,
            ..new
        };
        let item = store.event_item(&caller).unwrap();
        assert!(!item.contains_key(FAN_OUT_ATTRIBUTE) && !item.contains_key(DUE_AT));
        let mut api_key = Item::new();
        api_key.insert(PK.into(), AttributeValue::S("KEY#abc".into()));
        let not_an_event = serde_dynamo::Item::from(api_key);
        assert_eq!(event_from_stream_image(not_an_event).unwrap(), None);
    }

    #[test]
    fn event_data_is_a_string_attribute_kept_byte_for_byte() {
        let store = store().with_retention(Duration::from_secs(10));
        let e = event(&tenant("a"), ts(0), "{ \"b\":1,\n\"a\" : [1.50e+2] }");
        let new = NewEvent {
            event: e.clone(),
            idempotency_key: None,
            fan_out: FanOutDuty::Caller,
        };
        let item = store.event_item(&new).unwrap();
        assert!(!item.contains_key(DUE_AT), "owes no fan-out");
        assert_eq!(
            item[TTL_ATTRIBUTE],
            AttributeValue::N((e.received_at.unix_seconds() + 10).to_string())
        );
        let AttributeValue::M(stored) = &item[EVENT] else {
            panic!("event is a map: {item:?}");
        };
        assert_eq!(stored["data"], AttributeValue::S(e.data.get().to_owned()));
        let back = Event::try_from(body::<StoredEvent>(item, EVENT).unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn delivery_sort_keys_sort_by_receive_time_and_parse_back_as_cursors() {
        let a = tenant("a");
        let s = subscription(&a, ts(0));
        let early = delivery_for(&a, &s, Timestamp::from_unix_millis(999));
        let late = delivery_for(&a, &s, Timestamp::from_unix_millis(1_700_000_000_000));
        let (ek, lk) = (
            delivery_key(&a, early.id()).sk,
            delivery_key(&a, late.id()).sk,
        );
        assert!(ek < lk, "{ek} sorts before {lk}");
        assert_eq!(parse_delivery_cursor(&s.id, &lk).unwrap(), lk);
        for bad in [
            "",
            "x",
            "1700000000000",
            &format!("{lk}x"),
            late.id().as_str(),
        ] {
            assert!(parse_delivery_cursor(&s.id, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pages_have_a_cursor_only_when_more_follow() {
        let page = into_page(vec![1, 2, 3], 2, |i| i.to_string());
        assert_eq!((page.items, page.next), (vec![1, 2], Some("2".into())));
        let page = into_page(vec![1, 2], 2, |i| i.to_string());
        assert_eq!((page.items, page.next), (vec![1, 2], None));
    }

    /// The key and cursor parsers under property tests (shared/tests/properties has the
    /// others): any text is a cursor exactly when it is a list key, and every list key and
    /// delivery key this store writes parses back.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            ProptestConfig {
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        fn delivery(tenant: &str, event: &str, created_ms: i64) -> Delivery {
            let tenant = TenantId::parse(tenant).unwrap();
            Delivery::new(
                tenant.clone(),
                EventId::parse(event).unwrap(),
                Timestamp::from_unix_millis(created_ms),
                subscription(&tenant, ts(0)).id,
                Timestamp::from_unix_millis(created_ms),
                Duration::ZERO,
                Duration::from_secs(60),
            )
        }

        fn cursor_like() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[0-9a-zA-Z]{24,28}",
                "[0-7][0-9a-hjkmnp-tv-z]{25}",
            ]
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn delivery_cursors_are_exactly_sort_keys(s in cursor_like()) {
                // A ULID in lower case, as handed out; written apart from the parser.
                const CROCKFORD: &str = "0123456789abcdefghjkmnpqrstvwxyz";
                let form = s.len() == 26
                    && s.chars().all(|c| CROCKFORD.contains(c))
                    && s.as_bytes()[0] <= b'7';
                let sub = SubscriptionId::generate();
                match parse_delivery_cursor(&sub, &s) {
                    Ok(cursor) => {
                        prop_assert!(form, "{:?}", s);
                        prop_assert_eq!(cursor, s.as_str());
                    }
                    Err(e) => {
                        prop_assert!(!form, "{:?}", s);
                        prop_assert!(matches!(e, StoreError::BadCursor));
                    }
                }
            }

            #[test]
            fn sort_keys_are_cursors_and_sort_by_receive_time(
                tenant in "[a-z0-9_-]{1,64}",
                (a, b) in ("[A-Za-z0-9._:-]{1,128}", "[A-Za-z0-9._:-]{1,128}"),
                (at_a, at_b) in (-1_000i64..=9_999_999_999_999, -1_000i64..=9_999_999_999_999),
            ) {
                let (da, db) = (delivery(&tenant, &a, at_a), delivery(&tenant, &b, at_b));
                let (ka, kb) = (
                    delivery_key(da.tenant_id(), da.id()),
                    delivery_key(db.tenant_id(), db.id()),
                );
                let sub = da.subscription_id();
                prop_assert_eq!(parse_delivery_cursor(sub, &ka.sk).ok(), Some(ka.sk.as_str()));
                if at_a.max(0) != at_b.max(0) {
                    prop_assert_eq!(ka.sk.cmp(&kb.sk), at_a.max(0).cmp(&at_b.max(0)), "{} vs {}", ka.sk, kb.sk);
                }
                let parsed = parse_delivery_key(&ka.pk, &ka.sk).unwrap();
                prop_assert_eq!((&parsed.0, &parsed.1), (da.tenant_id(), da.id()));
            }

            #[test]
            fn any_text_is_a_delivery_key_or_an_error(s in any::<String>()) {
                let _ = parse_delivery_key(&s, &s);
                let _ = parse_delivery_key(&format!("T#{s}#SUB#{s}#DLV#{s}"), &s);
            }
        }
    }
}
