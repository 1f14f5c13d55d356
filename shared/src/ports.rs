//! The seams. Use cases are generic over these traits; each has an embedded backend and an AWS one.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::domain::{
    ApiKeyRecord, Delivery, DeliveryId, Event, EventId, Subscription, SubscriptionId, TenantId,
    Timestamp,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A conditional write lost: someone else changed the item first.
    #[error("conflicting write")]
    Conflict,
    /// A page cursor this store did not hand out.
    #[error("invalid page cursor")]
    BadCursor,
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
}

impl StoreError {
    pub fn unavailable(e: impl Into<BoxError>) -> Self {
        Self::Unavailable(e.into())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A page request: at most `limit` items after the opaque cursor `after`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: u32,
    pub after: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Cursor for the next page; `None` on the last one.
    pub next: Option<String>,
}

/// An event to store. Its deliveries come later, from its fan-out, and [`fan_out`](Self::fan_out)
/// says what keeps that fan-out from being lost until it is done.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event: Event,
    /// The producer's `Idempotency-Key`; the event id itself is always unique per tenant too.
    pub idempotency_key: Option<String>,
    pub fan_out: FanOutDuty,
}

/// What keeps an accepted event's fan-out from being lost should the process die first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanOutDuty {
    /// The store: the event owes its fan-out until [`Store::fanned_out`] says it is done, and is
    /// due for the sweep's recovery at `due_at` (the stored event is the durable record of the
    /// work). Where there is no change stream (locally, and on AWS with `TIDINGS_FAN_OUT=queue`).
    Owed { due_at: Timestamp },
    /// The store's change stream: a new event is handed to the fan-out by the stream, which
    /// retries until it is handled (DynamoDB Streams and its event source mapping). The store
    /// marks the event for the stream and keeps nothing owed. Only for a store with a stream.
    Stream,
    /// The caller, which fans the event out at once and keeps its own durable record meanwhile
    /// (the SQS message the event came in, which returns should the caller die). The store keeps
    /// nothing owed.
    Caller,
}

impl FanOutDuty {
    /// When the sweep should recover the fan-out, if the store keeps it owed.
    pub fn due_at(self) -> Option<Timestamp> {
        match self {
            Self::Owed { due_at } => Some(due_at),
            Self::Stream | Self::Caller => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    Created,
    /// The idempotency key or event id was seen before: this is the event it created, and the
    /// fingerprint of what was published then (empty where the store has none).
    Existing {
        event_id: EventId,
        fingerprint: String,
    },
}

/// A delivery the sweep should look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    pub tenant_id: TenantId,
    pub delivery_id: DeliveryId,
    pub due_at: Timestamp,
}

/// An event whose fan-out is overdue: its job was lost, or its worker died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueFanOut {
    pub tenant_id: TenantId,
    pub event_id: EventId,
    pub due_at: Timestamp,
}

/// The system of record. Every method is scoped to a tenant except the sweep's index query.
pub trait Store: Send + Sync + 'static {
    /// Registers a key, insert-only: a key already registered for the same tenant is left as
    /// it is (`Ok`: a retried call), one registered for another tenant is `Conflict` (a key never
    /// moves to another tenant).
    fn put_api_key(&self, key: &ApiKeyRecord) -> impl Future<Output = StoreResult<()>> + Send;
    fn tenant_for_api_key(
        &self,
        key_hash: &str,
    ) -> impl Future<Output = StoreResult<Option<TenantId>>> + Send;

    /// Fails with `Conflict` if the id exists.
    fn insert_subscription(
        &self,
        subscription: &Subscription,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn get_subscription(
        &self,
        tenant: &TenantId,
        id: &SubscriptionId,
    ) -> impl Future<Output = StoreResult<Option<Subscription>>> + Send;
    /// Oldest first.
    fn list_subscriptions(
        &self,
        tenant: &TenantId,
        page: &PageRequest,
    ) -> impl Future<Output = StoreResult<Page<Subscription>>> + Send;
    /// Writes `subscription` (whose `version` is already bumped) only if the stored version is
    /// `expected_version`: `Conflict` if it changed meanwhile, `NotFound` if it is gone.
    fn update_subscription(
        &self,
        subscription: &Subscription,
        expected_version: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// `NotFound` if it is not there (or belongs to another tenant).
    fn delete_subscription(
        &self,
        tenant: &TenantId,
        id: &SubscriptionId,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Every subscription of the tenant (fan-out filters them by status and pattern).
    fn tenant_subscriptions(
        &self,
        tenant: &TenantId,
    ) -> impl Future<Output = StoreResult<Vec<Subscription>>> + Send;

    fn insert_event(
        &self,
        new: &NewEvent,
    ) -> impl Future<Output = StoreResult<InsertOutcome>> + Send;
    fn get_event(
        &self,
        tenant: &TenantId,
        id: &EventId,
    ) -> impl Future<Output = StoreResult<Option<Event>>> + Send;
    /// The event and when its fan-out is due (`None`: done, or never owed). A read that may lag
    /// a moment behind a write shows the fan-out as still owed, never as done too early.
    fn get_event_for_fan_out(
        &self,
        tenant: &TenantId,
        id: &EventId,
    ) -> impl Future<Output = StoreResult<Option<(Event, Option<Timestamp>)>>> + Send;
    /// The event's fan-out is done: it is no longer due. Idempotent; `NotFound` if there is no
    /// such event.
    fn fanned_out(
        &self,
        tenant: &TenantId,
        id: &EventId,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Events due for fan-out with `due_at <= now`, earliest first, across tenants.
    fn due_fan_outs(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> impl Future<Output = StoreResult<Vec<DueFanOut>>> + Send;
    /// Moves a due fan-out to `next`, only if it is still due at `due.due_at` (so two sweeps
    /// never both take it): `Conflict` if it changed (or, on some stores, is done), `NotFound`
    /// if it is done or gone.
    fn claim_fan_out(
        &self,
        due: &DueFanOut,
        next: Timestamp,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    /// Writes a new delivery (its first attempt, or its hold, already in it): `Conflict` if a
    /// delivery with its id exists (another fan-out of the same event wrote it first).
    fn insert_delivery(&self, delivery: &Delivery) -> impl Future<Output = StoreResult<()>> + Send;

    fn get_delivery(
        &self,
        tenant: &TenantId,
        id: &DeliveryId,
    ) -> impl Future<Output = StoreResult<Option<Delivery>>> + Send;
    /// Writes `delivery` (whose `version` is already bumped) only if the stored version is
    /// `expected_version`; otherwise `Conflict`.
    fn update_delivery(
        &self,
        delivery: &Delivery,
        expected_version: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// A subscription's deliveries, newest first: by the time the delivery was made (SQLite) or
    /// its event was received (DynamoDB, whose order follows the delivery id); the two differ
    /// only for a delivery made late (a recovery, a resume).
    fn list_deliveries(
        &self,
        tenant: &TenantId,
        subscription: &SubscriptionId,
        page: &PageRequest,
    ) -> impl Future<Output = StoreResult<Page<Delivery>>> + Send;
    /// Deliveries with `due_at <= now`, earliest first, across tenants.
    fn due_deliveries(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> impl Future<Output = StoreResult<Vec<DueDelivery>>> + Send;

    /// Hands all unfinished work back to the sweep after a restart: every unfinished, not held
    /// delivery is released from any lease and due at its next attempt time, or `now` if that is
    /// earlier or unset ([`Delivery::recovered`]); every event that owes its fan-out is due by
    /// `now`. Final and held deliveries, and events whose fan-out is done, are left alone.
    /// Returns how many deliveries and events it changed. A delivery or event that changes
    /// meanwhile is left as it then is.
    ///
    /// Only for a runner that knows no other worker is alive (the local runner, which holds its
    /// data directory exclusively): a live worker's lease would be taken from it, and its
    /// delivery sent twice at once. Not for the sweep, which waits for leases to run out.
    fn recover_after_restart(
        &self,
        now: Timestamp,
    ) -> impl Future<Output = StoreResult<usize>> + Send;
}

#[derive(Debug, thiserror::Error)]
#[error("queue unavailable: {0}")]
pub struct QueueError(#[source] pub BoxError);

/// A message asking a worker to attempt one delivery.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryJob {
    pub tenant_id: TenantId,
    pub delivery_id: DeliveryId,
}

/// A message asking a worker to fan an event out: create its deliveries, each with its first
/// attempt made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FanOutJob {
    pub tenant_id: TenantId,
    pub event_id: EventId,
    /// Sent by the sweep for a fan-out that may have begun already: deliveries that exist are
    /// looked up first and left alone, not sent again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovery: bool,
    /// The store keeps no owed fan-out for this event ([`FanOutDuty::Stream`] or
    /// [`FanOutDuty::Caller`]): the job is the work's only record, so the fan-out runs whatever
    /// the store says, and a job it hands on must be sent or the fan-out fails. Otherwise a job
    /// for an event the store no longer owes a fan-out is a duplicate and does nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub untracked: bool,
}

/// Work for a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    Deliver(DeliveryJob),
    FanOut(FanOutJob),
}

impl From<DeliveryJob> for Job {
    fn from(job: DeliveryJob) -> Self {
        Self::Deliver(job)
    }
}

impl From<FanOutJob> for Job {
    fn from(job: FanOutJob) -> Self {
        Self::FanOut(job)
    }
}

/// Work to do soon. Losing a message is survivable (the sweep re-sends it); the store decides.
pub trait DeliveryQueue: Send + Sync + 'static {
    /// The longest delay the queue holds a job for; longer waits are left to the sweep.
    fn max_delay(&self) -> Duration;
    fn enqueue(
        &self,
        jobs: Vec<(Job, Duration)>,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
}

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock tests move by hand.
#[derive(Debug, Clone, Default)]
pub struct FakeClock(Arc<AtomicI64>);

impl FakeClock {
    pub fn at(t: Timestamp) -> Self {
        Self(Arc::new(AtomicI64::new(t.unix_millis())))
    }

    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(
            i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Ordering::SeqCst,
        );
    }

    pub fn set(&self, t: Timestamp) {
        self.0.store(t.unix_millis(), Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_millis(self.0.load(Ordering::SeqCst))
    }
}

impl<T: Store> Store for Arc<T> {
    fn put_api_key(&self, key: &ApiKeyRecord) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).put_api_key(key)
    }
    fn tenant_for_api_key(
        &self,
        key_hash: &str,
    ) -> impl Future<Output = StoreResult<Option<TenantId>>> + Send {
        (**self).tenant_for_api_key(key_hash)
    }
    fn insert_subscription(
        &self,
        subscription: &Subscription,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).insert_subscription(subscription)
    }
    fn get_subscription(
        &self,
        tenant: &TenantId,
        id: &SubscriptionId,
    ) -> impl Future<Output = StoreResult<Option<Subscription>>> + Send {
        (**self).get_subscription(tenant, id)
    }
    fn list_subscriptions(
        &self,
        tenant: &TenantId,
        page: &PageRequest,
    ) -> impl Future<Output = StoreResult<Page<Subscription>>> + Send {
        (**self).list_subscriptions(tenant, page)
    }
    fn update_subscription(
        &self,
        subscription: &Subscription,
        expected_version: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).update_subscription(subscription, expected_version)
    }
    fn delete_subscription(
        &self,
        tenant: &TenantId,
        id: &SubscriptionId,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).delete_subscription(tenant, id)
    }
    fn tenant_subscriptions(
        &self,
        tenant: &TenantId,
    ) -> impl Future<Output = StoreResult<Vec<Subscription>>> + Send {
        (**self).tenant_subscriptions(tenant)
    }
    fn insert_event(
        &self,
        new: &NewEvent,
    ) -> impl Future<Output = StoreResult<InsertOutcome>> + Send {
        (**self).insert_event(new)
    }
    fn get_event(
        &self,
        tenant: &TenantId,
        id: &EventId,
    ) -> impl Future<Output = StoreResult<Option<Event>>> + Send {
        (**self).get_event(tenant, id)
    }
    fn get_event_for_fan_out(
        &self,
        tenant: &TenantId,
        id: &EventId,
    ) -> impl Future<Output = StoreResult<Option<(Event, Option<Timestamp>)>>> + Send {
        (**self).get_event_for_fan_out(tenant, id)
    }
    fn fanned_out(
        &self,
        tenant: &TenantId,
        id: &EventId,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).fanned_out(tenant, id)
    }
    fn due_fan_outs(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> impl Future<Output = StoreResult<Vec<DueFanOut>>> + Send {
        (**self).due_fan_outs(now, limit)
    }
    fn claim_fan_out(
        &self,
        due: &DueFanOut,
        next: Timestamp,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).claim_fan_out(due, next)
    }
    fn insert_delivery(&self, delivery: &Delivery) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).insert_delivery(delivery)
    }
    fn get_delivery(
        &self,
        tenant: &TenantId,
        id: &DeliveryId,
    ) -> impl Future<Output = StoreResult<Option<Delivery>>> + Send {
        (**self).get_delivery(tenant, id)
    }
    fn update_delivery(
        &self,
        delivery: &Delivery,
        expected_version: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).update_delivery(delivery, expected_version)
    }
    fn list_deliveries(
        &self,
        tenant: &TenantId,
        subscription: &SubscriptionId,
        page: &PageRequest,
    ) -> impl Future<Output = StoreResult<Page<Delivery>>> + Send {
        (**self).list_deliveries(tenant, subscription, page)
    }
    fn due_deliveries(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> impl Future<Output = StoreResult<Vec<DueDelivery>>> + Send {
        (**self).due_deliveries(now, limit)
    }
    fn recover_after_restart(
        &self,
        now: Timestamp,
    ) -> impl Future<Output = StoreResult<usize>> + Send {
        (**self).recover_after_restart(now)
    }
}
