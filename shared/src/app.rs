//! The application layer: every use case, generic over the seams. Handlers (HTTP, Lambda, the
//! local runner) decode their input, call one of these, and encode the result.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::{Rng as _, RngCore as _};
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};

use crate::concurrency::join_bounded;
use crate::domain::{
    ApiKeyRecord, Attempt, CallbackUrl, Delivery, DeliveryId, DeliveryStatus, Event, EventId,
    EventType, EventTypePattern, FollowUp, NotLeasable, NotResendable, RetryPlan, Secret,
    Subscription, SubscriptionId, SubscriptionStatus, TenantId, Timestamp,
};
use crate::ports::{
    Clock, DeliveryJob, DeliveryQueue, DueDelivery, FanOutDuty, FanOutJob, InsertOutcome, Job,
    NewEvent, Page, PageRequest, Store, StoreError,
};
use crate::retry::{self, AttemptClass, RetrySchedule};
use crate::sender::{HttpSender, OutboundRequest, SendOutcome, TransportFailure};
use crate::signing;

/// Largest `data` accepted in one event, in bytes of JSON. SQS messages cap at 256 KiB and the
/// delivery envelope needs room too.
pub const MAX_EVENT_DATA_BYTES: usize = 200 * 1024;
pub const MAX_DESCRIPTION_LEN: usize = 1024;
pub const MAX_EVENT_TYPES_PER_SUBSCRIPTION: usize = 100;
pub const MAX_PAGE_LIMIT: u32 = 250;
/// Most events one `POST /events/batch` carries.
pub const MAX_BATCH_EVENTS: usize = 100;
/// Events of one batch written to the store at once.
const BATCH_WRITES_AT_ONCE: usize = 16;
/// Due deliveries one sweep round claims at once (each claim is a read and a conditional write).
const SWEEP_CLAIMS_AT_ONCE: usize = 16;
pub const DEFAULT_PAGE_LIMIT: u32 = 50;
/// The shortest API key an operator may choose: 128 bits written as hex.
pub const MIN_API_KEY_LEN: usize = 32;
/// Why a delivery is held.
const PAUSED: &str = "subscription is paused";
/// When a worker looks again at a delivery it held (see `App::hold`): well past any index lag.
const HOLD_RECHECK: Duration = Duration::from_secs(60);
/// After that, how often a held delivery is looked at again: a safety net, so that none can stay
/// held under a subscription that is active, disabled or gone (a resume whose release failed
/// half-way, a delete whose answer was lost), nor outlive the store's retention unseen.
const HOLD_SAFETY_RECHECK: Duration = Duration::from_secs(6 * 3600);

/// A fan-out gives an event to subscriptions made up to this long after it was received: the
/// clocks of the machines that created the subscription and received the event may differ.
const SUBSCRIPTION_CLOCK_LEEWAY: Duration = Duration::from_secs(5);

/// First attempts one fan-out makes at once.
const FAN_OUT_AT_ONCE: usize = 16;

/// What one subscription's share of a fan-out came to.
enum FirstAttempt {
    Made {
        delivered: bool,
    },
    /// Made already, by an earlier or concurrent fan-out of the same event.
    Existing,
    /// Not started: it could not finish before the caller's deadline.
    NoTimeLeft,
}

/// How often a use case re-reads and re-applies a change that lost a version-checked write to
/// a concurrent one before answering 409.
const MAX_WRITE_RACES: usize = 8;

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub schedule: RetrySchedule,
    pub jitter_ratio: f64,
    /// How long a queued delivery may take to start before the sweep sends it again.
    pub sweep_grace: Duration,
    /// How long a worker owns a delivery for one attempt; longer than the sender's total timeout.
    pub lease_duration: Duration,
    /// How long one attempt may take with its store calls (the sender's total timeout and some):
    /// a fan-out with a deadline starts no attempt it could not finish before it.
    pub attempt_budget: Duration,
    /// Deliveries the sweep handles per run.
    pub sweep_batch: u32,
    /// How long a delivery may stay held before it is ended: a little less than the store's
    /// retention (DynamoDB's TTL), so none expires unseen. `None`: no limit (SQLite keeps all).
    pub hold_limit: Option<Duration>,
    /// What starts an accepted event's fan-out.
    pub fan_out_trigger: FanOutTrigger,
}

/// What starts the fan-out of an event accepted through the API (events from the AWS events
/// queue are fanned out where they are received, whatever this says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FanOutTrigger {
    /// A fan-out job through the queue; the store keeps the event owing its fan-out until it is
    /// done, and the sweep recovers it should the job be lost ([`FanOutDuty::Owed`]). Locally,
    /// and on AWS with `TIDINGS_FAN_OUT=queue`.
    #[default]
    Queue,
    /// The store's change stream: DynamoDB Streams hands each new event to `deliver` and retries
    /// until it is handled ([`FanOutDuty::Stream`]). No queue message, nothing marked done.
    StoreStream,
}

impl AppConfig {
    /// How long an owed fan-out may take to start and finish before the sweep sends it again:
    /// the grace, and at least a lease (so no recovery runs beside a worker that is still on it,
    /// which would send the deliveries it has not written yet a second time).
    pub fn fan_out_grace(&self) -> Duration {
        self.sweep_grace.max(self.lease_duration)
    }

    /// The delay before a new delivery's first attempt: the schedule's first entry.
    pub fn first_delay(&self) -> Duration {
        self.schedule.delays().first().copied().unwrap_or_default()
    }

    /// How long after a retry's time its delivery becomes due for the sweep (should its job be
    /// lost): the grace a job has to start, then a lease's time, so that a job that starts
    /// within the grace needs no lease written (see `App::deliver`).
    pub fn retry_grace(&self) -> Duration {
        self.sweep_grace.saturating_add(self.lease_duration)
    }

    fn retry_plan(&self, max_queue_delay: Duration) -> RetryPlan<'_> {
        RetryPlan {
            schedule: &self.schedule,
            jitter_ratio: self.jitter_ratio,
            jitter_unit: rand::rng().random::<f64>(),
            sweep_grace: self.retry_grace(),
            max_queue_delay,
        }
    }
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            schedule: RetrySchedule::default(),
            jitter_ratio: retry::DEFAULT_JITTER_RATIO,
            sweep_grace: Duration::from_secs(60),
            lease_duration: Duration::from_secs(60),
            attempt_budget: Duration::from_secs(45),
            sweep_batch: 500,
            hold_limit: None,
            fan_out_trigger: FanOutTrigger::Queue,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("invalid `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    Conflict(String),
    /// The same idempotency key (or event id) with another body.
    #[error("{0}")]
    IdempotencyMismatch(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl AppError {
    pub fn invalid(field: &'static str, message: impl ToString) -> Self {
        Self::Invalid {
            field,
            message: message.to_string(),
        }
    }
}

pub type AppResult<T> = Result<T, AppError>;

/// A subscription as a producer asks for it; already parsed.
#[derive(Debug, Clone)]
pub struct NewSubscription {
    pub event_types: Vec<EventTypePattern>,
    pub callback_url: CallbackUrl,
    pub secret: Option<Secret>,
    pub description: String,
}

/// A partial update; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionPatch {
    pub event_types: Option<Vec<EventTypePattern>>,
    pub callback_url: Option<CallbackUrl>,
    pub secret: Option<Secret>,
    pub description: Option<String>,
    pub status: Option<SubscriptionStatus>,
}

/// An event as published; already parsed.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub event_type: EventType,
    pub data: Box<RawValue>,
    pub event_id: Option<EventId>,
    pub occurred_at: Option<Timestamp>,
}

/// One event of a batch publish, with its own idempotency key.
#[derive(Debug, Clone)]
pub struct BatchItem {
    pub request: PublishRequest,
    pub idempotency_key: Option<String>,
}

/// A stored event and the job of its fan-out, not yet enqueued.
#[derive(Debug)]
pub struct Accepted {
    pub published: Published,
    pub jobs: Vec<(Job, Duration)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub event_id: EventId,
    /// False when an idempotency key or event id repeated an earlier publish.
    pub created: bool,
    /// The subscriptions it was published to (their deliveries are made by the fan-out).
    pub deliveries: usize,
}

/// What one fan-out job came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FanOutReport {
    /// Deliveries made, each with its first attempt (or held).
    pub created: usize,
    /// Of those, the ones whose first attempt succeeded.
    pub delivered: usize,
    /// Deliveries a recovery found made already and left alone.
    pub existing: usize,
    /// Deliveries not started for want of time: a recovery job carries them on.
    pub left: usize,
}

/// What one delivery job came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliverOutcome {
    Delivered,
    /// Will be tried again at this time.
    Retrying(Timestamp),
    Failed,
    Dead,
    /// Not attempted yet: the job arrived early; try again at this time.
    NotDue(Timestamp),
    /// Nothing to do: finished already, in another worker's hands, or gone.
    Skipped(&'static str),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub found: usize,
    pub enqueued: usize,
    /// Found due but under a live lease: a worker is on it, so the sweep left it alone.
    pub in_flight: usize,
    /// Of those, the ones now due only after their lease (out of the way of work behind them).
    pub deferred: usize,
    /// Events whose overdue fan-out was sent again (counted in `enqueued` too).
    pub fan_outs: usize,
}

impl SweepReport {
    /// Whether another round may find more: this one was full and moved something on (in-flight
    /// deliveries it met are deferred past their leases, so the next round reads past them).
    pub fn more_may_be_due(&self, batch: u32) -> bool {
        self.found >= batch as usize && (self.enqueued > 0 || self.deferred > 0)
    }
}

pub fn hash_api_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 24 random bytes, URL-safe base64: API keys and lease tokens.
pub fn random_secret_text() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The job that asks a worker to attempt `delivery`.
fn job_for(delivery: &Delivery) -> Job {
    Job::Deliver(DeliveryJob {
        tenant_id: delivery.tenant_id().clone(),
        delivery_id: delivery.id().clone(),
    })
}

/// What identifies a publish request's body: the type, the data bytes, and the fields the
/// producer chose (a default `occurredAt` is the time of receipt, which a retry changes).
pub fn publish_fingerprint(request: &PublishRequest) -> String {
    let mut hash = Sha256::new();
    let occurred_at = request.occurred_at.map(|t| t.to_string());
    for part in [
        Some(request.event_type.as_str()),
        Some(request.data.get()),
        request.event_id.as_ref().map(EventId::as_str),
        occurred_at.as_deref(),
    ] {
        match part {
            Some(text) => {
                hash.update([1]);
                hash.update((text.len() as u64).to_be_bytes());
                hash.update(text.as_bytes());
            }
            None => hash.update([0]),
        }
    }
    URL_SAFE_NO_PAD.encode(&hash.finalize()[..18])
}

fn random_token(prefix: &str) -> String {
    format!("{prefix}{}", random_secret_text())
}

fn validate_description(d: &str) -> AppResult<()> {
    if d.chars().count() > MAX_DESCRIPTION_LEN {
        return Err(AppError::invalid(
            "description",
            format!("must be at most {MAX_DESCRIPTION_LEN} characters"),
        ));
    }
    Ok(())
}

fn validate_event_types(types: &[EventTypePattern]) -> AppResult<()> {
    if types.is_empty() {
        return Err(AppError::invalid(
            "eventTypes",
            "must name at least one event type",
        ));
    }
    if types.len() > MAX_EVENT_TYPES_PER_SUBSCRIPTION {
        return Err(AppError::invalid(
            "eventTypes",
            format!("at most {MAX_EVENT_TYPES_PER_SUBSCRIPTION} patterns"),
        ));
    }
    Ok(())
}

fn clamp_page(mut page: PageRequest) -> PageRequest {
    page.limit = match page.limit {
        0 => DEFAULT_PAGE_LIMIT,
        n => n.min(MAX_PAGE_LIMIT),
    };
    page
}

pub struct App<S, Q, C> {
    pub store: S,
    pub queue: Q,
    pub clock: C,
    pub config: AppConfig,
}

impl<S: Store, Q: DeliveryQueue, C: Clock> App<S, Q, C> {
    pub fn new(store: S, queue: Q, clock: C, config: AppConfig) -> Self {
        Self {
            store,
            queue,
            clock,
            config,
        }
    }

    // ---- API keys ----

    /// Creates a key for `tenant` and returns it; only its hash is stored.
    pub async fn create_api_key(&self, tenant: &TenantId) -> AppResult<String> {
        let key = random_token("tdk_");
        self.add_api_key(tenant, &key).await?;
        Ok(key)
    }

    /// Registers a key chosen by the operator (e.g. `--api-key`). Idempotent for its tenant; a
    /// key registered for another tenant is refused (409), never moved.
    pub async fn add_api_key(&self, tenant: &TenantId, key: &str) -> AppResult<()> {
        if key.len() < MIN_API_KEY_LEN {
            return Err(AppError::invalid(
                "apiKey",
                format!("must be at least {MIN_API_KEY_LEN} characters (128 bits as hex, or more)"),
            ));
        }
        let record = ApiKeyRecord {
            key_hash: hash_api_key(key),
            tenant_id: tenant.clone(),
            created_at: self.clock.now(),
        };
        match self.store.put_api_key(&record).await {
            Err(StoreError::Conflict) => Err(AppError::Conflict(
                "this key is registered for another tenant; choose another key".into(),
            )),
            other => Ok(other?),
        }
    }

    pub async fn authenticate(&self, key: &str) -> AppResult<Option<TenantId>> {
        Ok(self.store.tenant_for_api_key(&hash_api_key(key)).await?)
    }

    // ---- subscriptions ----

    pub async fn create_subscription(
        &self,
        tenant: &TenantId,
        new: NewSubscription,
    ) -> AppResult<Subscription> {
        validate_event_types(&new.event_types)?;
        validate_description(&new.description)?;
        let now = self.clock.now();
        let subscription = Subscription {
            id: SubscriptionId::generate(),
            tenant_id: tenant.clone(),
            event_types: new.event_types,
            callback_url: new.callback_url,
            secret: new.secret.unwrap_or_else(Secret::generate),
            description: new.description,
            status: SubscriptionStatus::Active,
            created_at: now,
            updated_at: now,
            version: 0,
        };
        self.store.insert_subscription(&subscription).await?;
        tracing::info!(tenant = %tenant, subscription = %subscription.id, url = %subscription.callback_url.for_logs(), "subscription created");
        Ok(subscription)
    }

    pub async fn get_subscription(
        &self,
        tenant: &TenantId,
        id: &SubscriptionId,
    ) -> AppResult<Subscription> {
        self.store
            .get_subscription(tenant, id)
            .await?
            .ok_or(AppError::NotFound("subscription"))
    }

    pub async fn list_subscriptions(
        &self,
        tenant: &TenantId,
        page: PageRequest,
    ) -> AppResult<Page<Subscription>> {
        Ok(self
            .store
            .list_subscriptions(tenant, &clamp_page(page))
            .await?)
    }

    /// Applies `patch` with a version-checked write; a concurrent change (another PATCH, a
    /// `410 Gone`) makes it read the subscription again and re-apply the patch, so both changes
    /// stay. Pausing holds the subscription's waiting deliveries when they come up; resuming
    /// sends the held ones; disabling ends them.
    pub async fn update_subscription(
        &self,
        tenant: &TenantId,
        id: &SubscriptionId,
        patch: SubscriptionPatch,
    ) -> AppResult<Subscription> {
        if let Some(types) = &patch.event_types {
            validate_event_types(types)?;
        }
        if let Some(description) = &patch.description {
            validate_description(description)?;
        }
        for _ in 0..MAX_WRITE_RACES {
            let current = self.get_subscription(tenant, id).await?;
            let mut next = current.clone();
            if let Some(types) = &patch.event_types {
                next.event_types = types.clone();
            }
            if let Some(url) = &patch.callback_url {
                next.callback_url = url.clone();
            }
            if let Some(secret) = &patch.secret {
                next.secret = secret.clone();
            }
            if let Some(description) = &patch.description {
                next.description = description.clone();
            }
            if let Some(status) = patch.status {
                next.status = status;
            }
            next.updated_at = self.clock.now();
            next.version = current.version + 1;
            match self.store.update_subscription(&next, current.version).await {
                Ok(()) => {
                    // Only a paused subscription holds deliveries. (Should this release fail
                    // half-way, the held deliveries' own rechecks release them later.)
                    if current.status == SubscriptionStatus::Paused && next.status != current.status
                    {
                        self.settle_held_deliveries(&next).await?;
                    }
                    return Ok(next);
                }
                Err(StoreError::Conflict) => continue,
                Err(StoreError::NotFound) => return Err(AppError::NotFound("subscription")),
                Err(e) => return Err(e.into()),
            }
        }
        Err(AppError::Conflict(
            "the subscription kept changing while this update was applied; try again".into(),
        ))
    }

    pub async fn delete_subscription(
        &self,
        tenant: &TenantId,
        id: &SubscriptionId,
    ) -> AppResult<()> {
        let current = self.get_subscription(tenant, id).await?;
        match self.store.delete_subscription(tenant, id).await {
            Err(StoreError::NotFound) => return Err(AppError::NotFound("subscription")),
            other => other?,
        }
        // Its waiting deliveries end when a worker next takes them; held ones wait for no
        // worker, so they end now (or at their next recheck, should this fail half-way).
        if current.status == SubscriptionStatus::Paused {
            self.end_held_deliveries(&current, "subscription was deleted")
                .await?;
        }
        Ok(())
    }

    /// After a status change: an active subscription gets its held deliveries back, a disabled
    /// one ends them. A paused one holds each waiting delivery as a worker comes to it.
    async fn settle_held_deliveries(&self, subscription: &Subscription) -> AppResult<()> {
        match subscription.status {
            SubscriptionStatus::Active => self.release_held_deliveries(subscription).await,
            SubscriptionStatus::Disabled => {
                self.end_held_deliveries(subscription, "subscription is disabled")
                    .await
            }
            SubscriptionStatus::Paused => Ok(()),
        }
    }

    async fn release_held_deliveries(&self, subscription: &Subscription) -> AppResult<()> {
        let grace = self.config.sweep_grace;
        let released = self
            .rewrite_held(subscription, |d, now| d.released(now, grace))
            .await?;
        let jobs = released
            .into_iter()
            .map(|d| (job_for(&d), Duration::ZERO))
            .collect();
        self.send_jobs(jobs).await;
        Ok(())
    }

    async fn end_held_deliveries(&self, subscription: &Subscription, why: &str) -> AppResult<()> {
        self.rewrite_held(subscription, |d, now| d.ended(now, why))
            .await?;
        Ok(())
    }

    /// Applies `transition` to every held delivery of `subscription` (version-checked; one that
    /// changed meanwhile is read again), returning what was written.
    async fn rewrite_held(
        &self,
        subscription: &Subscription,
        transition: impl Fn(&Delivery, Timestamp) -> Option<Delivery>,
    ) -> AppResult<Vec<Delivery>> {
        let tenant = &subscription.tenant_id;
        let mut written = Vec::new();
        let mut page = PageRequest {
            limit: MAX_PAGE_LIMIT,
            after: None,
        };
        loop {
            let found = self
                .store
                .list_deliveries(tenant, &subscription.id, &page)
                .await?;
            for listed in found
                .items
                .into_iter()
                .filter(|d| d.status() == DeliveryStatus::Held)
            {
                let mut current = listed;
                for _ in 0..MAX_WRITE_RACES {
                    let Some(next) = transition(&current, self.clock.now()) else {
                        break;
                    };
                    match self.store.update_delivery(&next, current.version()).await {
                        Ok(()) => {
                            written.push(next);
                            break;
                        }
                        Err(StoreError::Conflict) => {
                            match self.store.get_delivery(tenant, current.id()).await? {
                                Some(again) => current = again,
                                None => break,
                            }
                        }
                        Err(StoreError::NotFound) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            match found.next {
                Some(after) => page.after = Some(after),
                None => return Ok(written),
            }
        }
    }

    // ---- events ----

    /// Stores the event, owing its fan-out, then queues the fan-out (after the schedule's first
    /// entry). A failed enqueue loses nothing: the sweep finds the owed fan-out after the grace.
    pub async fn publish_event(
        &self,
        tenant: &TenantId,
        request: PublishRequest,
        idempotency_key: Option<String>,
    ) -> AppResult<Published> {
        let accepted = self.accept_event(tenant, request, idempotency_key).await?;
        self.send_jobs(accepted.jobs).await;
        Ok(accepted.published)
    }

    /// [`publish_event`](Self::publish_event) without the enqueue: the event is stored, owing
    /// its fan-out, and the fan-out job is the caller's to send with
    /// [`send_jobs`](Self::send_jobs) (together with other events' jobs in one queue request) or
    /// to run at once. Should it never run, the sweep finds the owed fan-out.
    pub async fn accept_event(
        &self,
        tenant: &TenantId,
        request: PublishRequest,
        idempotency_key: Option<String>,
    ) -> AppResult<Accepted> {
        let subscriptions = self.store.tenant_subscriptions(tenant).await?;
        self.accept_event_with(tenant, &subscriptions, request, idempotency_key)
            .await
    }

    /// Publishes up to [`MAX_BATCH_EVENTS`] events in one call: one read of the tenant's
    /// subscriptions for all of them, the events stored concurrently, and every job sent in one
    /// enqueue (the queue batches them). Each event succeeds or fails on its own: one result per
    /// item, in order. `Err` only when nothing could be done (the subscriptions were unreadable).
    pub async fn publish_batch(
        &self,
        tenant: &TenantId,
        items: Vec<BatchItem>,
    ) -> AppResult<Vec<AppResult<Published>>> {
        if items.len() > MAX_BATCH_EVENTS {
            return Err(AppError::invalid(
                "events",
                format!("at most {MAX_BATCH_EVENTS} events per request"),
            ));
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let subscriptions = self.store.tenant_subscriptions(tenant).await?;
        let accepted = join_bounded(
            items.into_iter().map(|item| {
                self.accept_event_with(tenant, &subscriptions, item.request, item.idempotency_key)
            }),
            BATCH_WRITES_AT_ONCE,
        )
        .await;
        let mut jobs = Vec::new();
        let results = accepted
            .into_iter()
            .map(|a| {
                a.map(|a| {
                    jobs.extend(a.jobs);
                    a.published
                })
            })
            .collect();
        self.send_jobs(jobs).await;
        Ok(results)
    }

    /// [`accept_event`](Self::accept_event) against the tenant's subscriptions read already
    /// (once for many events: a batch, or the records of one queue receive).
    pub async fn accept_event_with(
        &self,
        tenant: &TenantId,
        subscriptions: &[Subscription],
        request: PublishRequest,
        idempotency_key: Option<String>,
    ) -> AppResult<Accepted> {
        let first_delay = self.config.first_delay();
        let trigger = self.config.fan_out_trigger;
        let grace = self.config.fan_out_grace();
        let (published, event) = self
            .store_event(
                tenant,
                subscriptions,
                request,
                idempotency_key,
                |now| match trigger {
                    FanOutTrigger::Queue => FanOutDuty::Owed {
                        due_at: now.saturating_add(first_delay).saturating_add(grace),
                    },
                    FanOutTrigger::StoreStream => FanOutDuty::Stream,
                },
            )
            .await?;
        let jobs = match (event, trigger) {
            (Some(event), FanOutTrigger::Queue) => {
                let job = FanOutJob {
                    tenant_id: event.tenant_id,
                    event_id: event.id,
                    recovery: false,
                    untracked: false,
                };
                vec![(job.into(), first_delay)]
            }
            // Repeated (nothing to do), or the stream starts it.
            _ => Vec::new(),
        };
        Ok(Accepted { published, jobs })
    }

    /// Stores an event its caller fans out at once with [`fan_out_event`](Self::fan_out_event),
    /// keeping its own durable record meanwhile ([`FanOutDuty::Caller`]: the SQS message it came
    /// in). Returns the event when it is new; for a repeat (its id or idempotency key seen
    /// before), the caller runs a recovery of the stored one, since it cannot know whether an
    /// earlier receive of the same message finished it.
    pub async fn accept_event_to_fan_out(
        &self,
        tenant: &TenantId,
        subscriptions: &[Subscription],
        request: PublishRequest,
        idempotency_key: Option<String>,
    ) -> AppResult<(Published, Option<Event>)> {
        self.store_event(tenant, subscriptions, request, idempotency_key, |_| {
            FanOutDuty::Caller
        })
        .await
    }

    /// Checks and stores an event; the event back when it is new.
    async fn store_event(
        &self,
        tenant: &TenantId,
        subscriptions: &[Subscription],
        request: PublishRequest,
        idempotency_key: Option<String>,
        duty: impl FnOnce(Timestamp) -> FanOutDuty,
    ) -> AppResult<(Published, Option<Event>)> {
        if request.data.get().len() > MAX_EVENT_DATA_BYTES {
            return Err(AppError::invalid(
                "data",
                format!("must be at most {MAX_EVENT_DATA_BYTES} bytes of JSON"),
            ));
        }
        if let Some(key) = &idempotency_key
            && (key.is_empty() || key.len() > 255)
        {
            return Err(AppError::invalid(
                "Idempotency-Key",
                "must be 1 to 255 characters",
            ));
        }
        let now = self.clock.now();
        let fingerprint = publish_fingerprint(&request);
        let event = Event {
            id: request.event_id.unwrap_or_else(EventId::generate),
            tenant_id: tenant.clone(),
            event_type: request.event_type,
            occurred_at: request.occurred_at.unwrap_or(now),
            data: request.data,
            received_at: now,
            fingerprint,
        };
        // Reported in the answer; the deliveries themselves are made by the fan-out.
        let deliveries = subscriptions
            .iter()
            .filter(|s| s.wants(&event.event_type))
            .count();
        let new = NewEvent {
            event,
            idempotency_key,
            fan_out: duty(now),
        };
        match self.store.insert_event(&new).await? {
            InsertOutcome::Existing {
                event_id,
                fingerprint,
            } => {
                if !fingerprint.is_empty() && fingerprint != new.event.fingerprint {
                    let what = if new.idempotency_key.is_some() {
                        "Idempotency-Key"
                    } else {
                        "eventId"
                    };
                    return Err(AppError::IdempotencyMismatch(format!(
                        "this {what} was used for event {event_id} with another body; a retry must \
                         send the same body, a new event needs a new {what}"
                    )));
                }
                let published = Published {
                    event_id,
                    created: false,
                    deliveries: 0,
                };
                Ok((published, None))
            }
            InsertOutcome::Created => {
                let published = Published {
                    event_id: new.event.id.clone(),
                    created: true,
                    deliveries,
                };
                Ok((published, Some(new.event)))
            }
        }
    }

    /// Enqueues jobs (at once, however many: the queue batches them). A failure is only logged:
    /// what they ask for is stored and due, so the sweep sends it.
    pub async fn send_jobs(&self, jobs: Vec<(Job, Duration)>) {
        if jobs.is_empty() {
            return;
        }
        let count = jobs.len();
        if let Err(e) = self.queue.enqueue(jobs).await {
            tracing::warn!(error = %e, jobs = count, "enqueue failed; the sweep will send this work once it is overdue");
        }
    }

    pub async fn get_event(&self, tenant: &TenantId, id: &EventId) -> AppResult<Event> {
        self.store
            .get_event(tenant, id)
            .await?
            .ok_or(AppError::NotFound("event"))
    }

    // ---- deliveries ----

    pub async fn get_delivery(&self, tenant: &TenantId, id: &DeliveryId) -> AppResult<Delivery> {
        self.store
            .get_delivery(tenant, id)
            .await?
            .ok_or(AppError::NotFound("delivery"))
    }

    pub async fn list_deliveries(
        &self,
        tenant: &TenantId,
        subscription: &SubscriptionId,
        page: PageRequest,
    ) -> AppResult<Page<Delivery>> {
        // 404 for another tenant's subscription, as for any unknown id.
        self.get_subscription(tenant, subscription).await?;
        Ok(self
            .store
            .list_deliveries(tenant, subscription, &clamp_page(page))
            .await?)
    }

    /// An operator's resend of a finished delivery (succeeded included) under the same id, so
    /// the same `webhook-id`: 409 while it is still pending, retrying, held or in flight, and
    /// once it was resent [`MAX_RESENDS`](crate::domain::MAX_RESENDS) times.
    pub async fn resend_delivery(&self, tenant: &TenantId, id: &DeliveryId) -> AppResult<Delivery> {
        let current = self.get_delivery(tenant, id).await?;
        let now = self.clock.now();
        let next = current
            .resent(now, self.config.sweep_grace)
            .map_err(|e| match e {
                NotResendable::Unfinished(_) => AppError::Conflict(format!(
                    "{e}; it is still being delivered (see nextAttemptAt)"
                )),
                NotResendable::TooManyResends => {
                    AppError::Conflict(format!("{e}; publish the event again to send it once more"))
                }
            })?;
        match self.store.update_delivery(&next, current.version()).await {
            Err(StoreError::Conflict) => {
                return Err(AppError::Conflict(
                    "delivery changed while resending; try again".into(),
                ));
            }
            other => other?,
        }
        self.send_jobs(vec![(job_for(&next), Duration::ZERO)]).await;
        Ok(next)
    }

    /// Fans an event out: every subscription that wants it (and existed when it was received)
    /// gets its delivery, made with its first attempt done (or held, while the subscription is
    /// paused) and written once, with what was sent and what came back. Then the event is marked
    /// fanned out. `subscriptions`: the tenant's, when the caller read them already (a batch).
    /// `Err`: the store failed; the job should come back (should it not, the sweep sends the
    /// fan-out again once it is overdue, as a recovery that leaves made deliveries alone; an
    /// [`untracked`](FanOutJob::untracked) one has no such net, so its job must come back).
    #[tracing::instrument(skip_all, fields(event = %job.event_id, tenant = %job.tenant_id))]
    pub async fn fan_out<H: HttpSender>(
        &self,
        sender: &H,
        job: &FanOutJob,
        subscriptions: Option<&[Subscription]>,
        deadline: Option<Timestamp>,
    ) -> Result<FanOutReport, StoreError> {
        let Some((event, owed)) = self
            .store
            .get_event_for_fan_out(&job.tenant_id, &job.event_id)
            .await?
        else {
            // Events are stored before their fan-out is sent: this one expired meanwhile.
            tracing::warn!("fan-out of an event that is not stored");
            return Ok(FanOutReport::default());
        };
        if owed.is_none() && !job.untracked {
            // Done already: a duplicate of the job, a late one the sweep's recovery overtook,
            // or a redrive. Nothing is sent again.
            tracing::info!("fan-out done already");
            return Ok(FanOutReport::default());
        }
        self.fan_out_event(sender, &event, job, subscriptions, deadline)
            .await
    }

    /// [`fan_out`](Self::fan_out) of an event at hand (from the store's change stream, or just
    /// stored by the caller): nothing is read but the subscriptions, when not given.
    #[tracing::instrument(skip_all, fields(event = %job.event_id, tenant = %job.tenant_id))]
    pub async fn fan_out_event<H: HttpSender>(
        &self,
        sender: &H,
        event: &Event,
        job: &FanOutJob,
        subscriptions: Option<&[Subscription]>,
        deadline: Option<Timestamp>,
    ) -> Result<FanOutReport, StoreError> {
        // Not before the first attempt is due (the schedule's first entry): a queue caps its
        // delays (SQS at 15 minutes), and a recovery may come early. Sent again for then.
        let due = event.received_at.saturating_add(self.config.first_delay());
        let now = self.clock.now();
        if now < due {
            let left = now.until(due).min(self.queue.max_delay());
            // An untracked job may come back (its record returned after a failure): as a
            // recovery, it then leaves what it made alone.
            let later = FanOutJob {
                recovery: job.recovery || job.untracked,
                ..job.clone()
            };
            self.hand_on(later, left).await?;
            return Ok(FanOutReport::default());
        }
        let read;
        let subscriptions = match subscriptions {
            Some(s) => s,
            None => {
                read = self.store.tenant_subscriptions(&job.tenant_id).await?;
                &read[..]
            }
        };
        // A subscription made after the event was received does not get it (a recovery may run
        // long after); a few seconds' leeway for the clocks of different machines.
        let newest = event.received_at.saturating_add(SUBSCRIPTION_CLOCK_LEEWAY);
        let mut attempts = Vec::new();
        for s in subscriptions {
            if s.wants(&event.event_type) && s.created_at <= newest {
                attempts.push(self.first_attempt(sender, event, s, job.recovery, deadline));
            }
        }
        let made = join_bounded(attempts, FAN_OUT_AT_ONCE).await;
        let mut report = FanOutReport::default();
        for made in made {
            match made? {
                FirstAttempt::Existing => report.existing += 1,
                FirstAttempt::Made { delivered } => {
                    report.created += 1;
                    report.delivered += usize::from(delivered);
                }
                FirstAttempt::NoTimeLeft => report.left += 1,
            }
        }
        if report.left > 0 {
            // The caller's time ran short (a function's timeout): the rest goes on in another
            // worker at once, as a recovery, which leaves the deliveries made here alone. An
            // owed event stays owed until then.
            tracing::info!(
                left = report.left,
                "fan-out continues elsewhere: too little time left here"
            );
            let rest = FanOutJob {
                recovery: true,
                ..job.clone()
            };
            self.hand_on(rest, Duration::ZERO).await?;
            return Ok(report);
        }
        if !job.untracked {
            match self.store.fanned_out(&job.tenant_id, &job.event_id).await {
                Ok(()) | Err(StoreError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        tracing::info!(
            created = report.created,
            delivered = report.delivered,
            existing = report.existing,
            "event fanned out"
        );
        Ok(report)
    }

    /// Sends a fan-out job on (for later, or to another worker). An owed fan-out has the sweep as
    /// its net, so a failed send is only logged; for an untracked one the job is the only record
    /// of the work, so a failed send fails the fan-out, and its own record comes back.
    async fn hand_on(&self, job: FanOutJob, delay: Duration) -> Result<(), StoreError> {
        if !job.untracked {
            self.send_jobs(vec![(job.into(), delay)]).await;
            return Ok(());
        }
        self.queue
            .enqueue(vec![(job.into(), delay)])
            .await
            // Reported as the store's kind of failure: something to try again.
            .map_err(|e| StoreError::unavailable(format!("fan-out not handed on: {e}")))
    }

    /// One subscription's delivery of `event`, made with its first attempt (or held). A
    /// `recovery` first looks whether it exists already, and then leaves it alone. Nothing is
    /// started that could not finish before `deadline`.
    async fn first_attempt<H: HttpSender>(
        &self,
        sender: &H,
        event: &Event,
        subscription: &Subscription,
        recovery: bool,
        deadline: Option<Timestamp>,
    ) -> Result<FirstAttempt, StoreError> {
        let tenant = &event.tenant_id;
        if let Some(deadline) = deadline
            && self.clock.now().saturating_add(self.config.attempt_budget) > deadline
        {
            return Ok(FirstAttempt::NoTimeLeft);
        }
        if recovery {
            let id = DeliveryId::derive(tenant, &event.id, &subscription.id, event.received_at);
            if self.store.get_delivery(tenant, &id).await?.is_some() {
                return Ok(FirstAttempt::Existing);
            }
        }
        let now = self.clock.now();
        let new = Delivery::new(
            tenant.clone(),
            event.id.clone(),
            event.received_at,
            subscription.id.clone(),
            now,
            Duration::ZERO,
            self.config.sweep_grace,
        );
        if subscription.status == SubscriptionStatus::Paused {
            let Some(held) = new.held(now, PAUSED, Some(now.saturating_add(HOLD_RECHECK))) else {
                return Ok(FirstAttempt::Existing);
            };
            match self.store.insert_delivery(&held).await {
                Err(StoreError::Conflict) => return Ok(FirstAttempt::Existing),
                other => other?,
            }
            // Resumed since the subscriptions were read? Then it goes out at once.
            self.settle_hold(&held).await?;
            return Ok(FirstAttempt::Made { delivered: false });
        }
        let leased = match new.leased(now, random_token(""), self.config.lease_duration) {
            Ok(leased) => leased,
            // A new delivery is due at once and has no lease.
            Err(_) => return Ok(FirstAttempt::Existing),
        };
        let (attempt, retry_after) = self.attempt(sender, &leased, event, subscription).await;
        let status_code = attempt.status_code;
        let (done, follow_up) = leased.recorded(
            attempt.clone(),
            retry_after,
            &self.config.retry_plan(self.queue.max_delay()),
            self.clock.now(),
        );
        let done = match self.store.insert_delivery(&done).await {
            Ok(()) => {
                if let FollowUp::Enqueue(delay) = follow_up {
                    self.send_jobs(vec![(job_for(&done), delay)]).await;
                }
                done
            }
            // Another fan-out of this event (a duplicate job) made it first: ours is recorded
            // on it all the same.
            Err(StoreError::Conflict) => self.record_late(&leased, attempt).await?,
            Err(e) => return Err(e),
        };
        if status_code == Some(410) {
            self.disable_gone_subscription(tenant, &subscription.id)
                .await;
        }
        tracing::info!(status = done.status().as_str(), code = ?status_code, subscription = %subscription.id, "first attempt recorded");
        Ok(FirstAttempt::Made {
            delivered: done.status() == DeliveryStatus::Succeeded,
        })
    }

    /// Makes one attempt at one delivery, if it is due and no other worker holds it.
    /// `Err` means the store failed: the job should come back later.
    #[tracing::instrument(skip_all, fields(delivery = %job.delivery_id, tenant = %job.tenant_id))]
    pub async fn deliver<H: HttpSender>(
        &self,
        sender: &H,
        job: &DeliveryJob,
    ) -> Result<DeliverOutcome, StoreError> {
        let Some(current) = self
            .store
            .get_delivery(&job.tenant_id, &job.delivery_id)
            .await?
        else {
            return Ok(DeliverOutcome::Skipped("delivery not found"));
        };
        let now = self.clock.now();
        let leased = match current.leased(now, random_token(""), self.config.lease_duration) {
            Ok(d) => d,
            Err(NotLeasable::NotDue(at)) => return Ok(DeliverOutcome::NotDue(at)),
            Err(NotLeasable::Final(_)) => return Ok(DeliverOutcome::Skipped("already final")),
            Err(NotLeasable::Held) => return self.recheck_hold(&current).await,
            Err(NotLeasable::Leased(_)) => return Ok(DeliverOutcome::Skipped("leased elsewhere")),
        };
        // The sweep takes a delivery only once its due time has passed, and a lease keeps it off
        // until the lease ends. When the due time comes after the end the lease would have (a
        // retry's job on time: see `AppConfig::retry_grace`), the lease keeps nobody off that
        // the due time does not already: the attempt goes ahead with the lease in memory only,
        // as a first attempt does, and its result is written on the version read. (A duplicate
        // of this job, which SQS may deliver, then sends too: the first write stands and the
        // second attempt is recorded on it, under the same `webhook-id`.) Not once the sweep
        // has claimed it: each claim sent another job, and those must find a lease, or every
        // copy would send and count an attempt.
        let lease_ends = now.saturating_add(self.config.lease_duration);
        let lease_free =
            current.claims() == 0 && current.due_at().is_some_and(|due| lease_ends < due);
        let expected = if lease_free {
            current.version()
        } else {
            match self.store.update_delivery(&leased, current.version()).await {
                Err(StoreError::Conflict) => {
                    return Ok(DeliverOutcome::Skipped("lost the lease race"));
                }
                other => other?,
            }
            leased.version()
        };

        let subscription = self
            .store
            .get_subscription(&job.tenant_id, leased.subscription_id())
            .await?;
        let sub = match subscription {
            None => {
                return self
                    .end(&leased, expected, "subscription was deleted")
                    .await;
            }
            Some(sub) if sub.status == SubscriptionStatus::Disabled => {
                return self
                    .end(&leased, expected, "subscription is disabled")
                    .await;
            }
            Some(sub) if sub.status == SubscriptionStatus::Paused => {
                return self.hold(&leased, expected).await;
            }
            Some(sub) => sub,
        };
        let Some(event) = self
            .store
            .get_event(&job.tenant_id, leased.event_id())
            .await?
        else {
            // Events are stored before their deliveries: this one expired meanwhile.
            return self
                .end(&leased, expected, "its event is no longer stored")
                .await;
        };

        let (attempt, retry_after) = self.attempt(sender, &leased, &event, &sub).await;
        let status_code = attempt.status_code;
        let finished_at = self.clock.now();
        let (done, follow_up) = leased.recorded(
            attempt.clone(),
            retry_after,
            &self.config.retry_plan(self.queue.max_delay()),
            finished_at,
        );
        let done = match self.store.update_delivery(&done, expected).await {
            Ok(()) => {
                if let FollowUp::Enqueue(delay) = follow_up {
                    self.send_jobs(vec![(job.clone().into(), delay)]).await;
                }
                done
            }
            Err(StoreError::Conflict) => self.record_late(&leased, attempt).await?,
            Err(e) => return Err(e),
        };
        if status_code == Some(410) {
            self.disable_gone_subscription(&job.tenant_id, done.subscription_id())
                .await;
        }
        tracing::info!(status = done.status().as_str(), attempt = done.attempt_count(), code = ?status_code, "delivery attempt recorded");
        Ok(match done.status() {
            DeliveryStatus::Succeeded => DeliverOutcome::Delivered,
            DeliveryStatus::Failed => DeliverOutcome::Failed,
            DeliveryStatus::Dead => DeliverOutcome::Dead,
            DeliveryStatus::Retrying | DeliveryStatus::Pending | DeliveryStatus::Held => {
                DeliverOutcome::Retrying(done.next_attempt_at().unwrap_or(finished_at))
            }
        })
    }

    /// Our lease ran out while the attempt ran and the delivery moved on: the attempt is
    /// recorded all the same (a 2xx finishes the delivery), on whatever version is current.
    async fn record_late(
        &self,
        leased: &Delivery,
        attempt: Attempt,
    ) -> Result<Delivery, StoreError> {
        tracing::warn!("lease lost during the attempt; recording it on the current state");
        for _ in 0..MAX_WRITE_RACES {
            let Some(current) = self
                .store
                .get_delivery(leased.tenant_id(), leased.id())
                .await?
            else {
                break;
            };
            let next = current.with_late_attempt(attempt.clone(), self.clock.now());
            match self.store.update_delivery(&next, current.version()).await {
                Ok(()) => return Ok(next),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    /// Ends a leased delivery without an attempt, the reason in its log.
    /// Ends `leased` without an attempt; `expected`: the stored version it was read or leased at.
    async fn end(
        &self,
        leased: &Delivery,
        expected: u64,
        why: &str,
    ) -> Result<DeliverOutcome, StoreError> {
        let Some(ended) = leased.ended(self.clock.now(), why) else {
            return Ok(DeliverOutcome::Skipped("already final"));
        };
        match self.store.update_delivery(&ended, expected).await {
            Err(StoreError::Conflict) => Ok(DeliverOutcome::Skipped("lease lost")),
            Err(e) => Err(e),
            Ok(()) => {
                tracing::info!(reason = why, "delivery ended without an attempt");
                Ok(DeliverOutcome::Failed)
            }
        }
    }

    /// Holds a leased delivery while its subscription is paused, with a recheck after
    /// [`HOLD_RECHECK`]: a resume that ran meanwhile may not have seen this delivery (on DynamoDB
    /// it reads a list that lags by a moment). Should the subscription be active by now, the
    /// delivery is released again at once.
    async fn hold(&self, leased: &Delivery, expected: u64) -> Result<DeliverOutcome, StoreError> {
        let now = self.clock.now();
        let Some(held) = leased.held(now, PAUSED, Some(now.saturating_add(HOLD_RECHECK))) else {
            return Ok(DeliverOutcome::Skipped("already final"));
        };
        match self.store.update_delivery(&held, expected).await {
            Err(StoreError::Conflict) => return Ok(DeliverOutcome::Skipped("lease lost")),
            other => other?,
        }
        self.settle_hold(&held).await
    }

    /// A held delivery whose recheck is due (the sweep sent its job): released if its
    /// subscription is active, ended if it is gone or disabled (or held about as long as the
    /// store keeps it), else held again until [`HOLD_SAFETY_RECHECK`] from now; the
    /// subscription's resume normally releases it long before.
    async fn recheck_hold(&self, held: &Delivery) -> Result<DeliverOutcome, StoreError> {
        if !held.is_recheck_due() {
            return Ok(DeliverOutcome::Skipped(
                "held while the subscription is paused",
            ));
        }
        let subscription = self
            .store
            .get_subscription(held.tenant_id(), held.subscription_id())
            .await?;
        match subscription.map(|s| s.status) {
            None => {
                self.end(held, held.version(), "subscription was deleted")
                    .await
            }
            Some(SubscriptionStatus::Disabled) => {
                self.end(held, held.version(), "subscription is disabled")
                    .await
            }
            Some(SubscriptionStatus::Active) => self.settle_hold(held).await,
            Some(SubscriptionStatus::Paused) => {
                let now = self.clock.now();
                if let Some(limit) = self.config.hold_limit
                    && now >= held.created_at().saturating_add(limit)
                {
                    // The store would let it expire unseen: end it visibly first.
                    return self
                        .end(
                            held,
                            held.version(),
                            "held longer than the retention period allows",
                        )
                        .await;
                }
                let again = now.saturating_add(HOLD_SAFETY_RECHECK);
                let Some(for_good) = held.held(now, PAUSED, Some(again)) else {
                    return Ok(DeliverOutcome::Skipped("held"));
                };
                match self.store.update_delivery(&for_good, held.version()).await {
                    Err(StoreError::Conflict) | Ok(()) => Ok(DeliverOutcome::Skipped(
                        "held while the subscription is paused",
                    )),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Releases `held` at once should its subscription be active (again).
    async fn settle_hold(&self, held: &Delivery) -> Result<DeliverOutcome, StoreError> {
        let active = self
            .store
            .get_subscription(held.tenant_id(), held.subscription_id())
            .await?
            .is_some_and(|s| s.status == SubscriptionStatus::Active);
        if active
            && let Some(released) = held.released(self.clock.now(), self.config.sweep_grace)
            && self
                .store
                .update_delivery(&released, held.version())
                .await
                .is_ok()
        {
            self.send_jobs(vec![(job_for(&released), Duration::ZERO)])
                .await;
            return Ok(DeliverOutcome::Skipped(
                "released again: the subscription was resumed",
            ));
        }
        Ok(DeliverOutcome::Skipped(
            "held while the subscription is paused",
        ))
    }

    async fn attempt<H: HttpSender>(
        &self,
        sender: &H,
        delivery: &Delivery,
        event: &Event,
        subscription: &Subscription,
    ) -> (Attempt, Option<Duration>) {
        let started_at = self.clock.now();
        let body = event.payload();
        let msg_id = delivery.id().as_str();
        let timestamp = started_at.unix_seconds();
        let signature = signing::sign(subscription.secret.key(), msg_id, timestamp, &body);
        let request = OutboundRequest {
            url: subscription.callback_url.as_url().clone(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("webhook-id".into(), msg_id.to_owned()),
                ("webhook-timestamp".into(), timestamp.to_string()),
                ("webhook-signature".into(), signature),
            ],
            body: body.into(),
        };
        // The delivery numbers its attempts when it records them.
        let number = 0;
        match sender.send(request).await {
            SendOutcome::Response {
                status,
                retry_after,
                body_snippet,
                latency,
            } => {
                let retry_after = retry_after
                    .as_deref()
                    .and_then(|v| retry::parse_retry_after(v, std::time::SystemTime::now()));
                let attempt = Attempt {
                    number,
                    started_at,
                    latency_ms: latency.as_millis() as u64,
                    outcome: retry::classify_status(status),
                    status_code: Some(status),
                    error: None,
                    response_snippet: (!body_snippet.is_empty()).then_some(body_snippet),
                };
                (attempt, retry_after)
            }
            SendOutcome::Failed {
                failure,
                message,
                latency,
            } => {
                let outcome = match failure {
                    TransportFailure::Refused | TransportFailure::InvalidUrl => {
                        tracing::warn!(url = %subscription.callback_url.for_logs(), reason = %message, "callback refused by the egress guard");
                        AttemptClass::Permanent
                    }
                    TransportFailure::Connect
                    | TransportFailure::Timeout
                    | TransportFailure::Other => AttemptClass::Retryable,
                };
                let attempt = Attempt {
                    number,
                    started_at,
                    latency_ms: latency.as_millis() as u64,
                    outcome,
                    status_code: None,
                    error: Some(message),
                    response_snippet: None,
                };
                (attempt, None)
            }
        }
    }

    /// `410 Gone` means the receiver wants no more deliveries.
    async fn disable_gone_subscription(&self, tenant: &TenantId, id: &SubscriptionId) {
        let patch = SubscriptionPatch {
            status: Some(SubscriptionStatus::Disabled),
            ..Default::default()
        };
        match self.update_subscription(tenant, id, patch).await {
            Ok(_) => {
                tracing::warn!(subscription = %id, "receiver answered 410 Gone: subscription disabled")
            }
            Err(e) => {
                tracing::warn!(subscription = %id, error = %e, "could not disable subscription after 410")
            }
        }
    }

    // ---- sweep ----

    /// At start-up, before any worker runs: hands every unfinished delivery and owed fan-out
    /// back to the sweep, due now (or at a delivery's next attempt), whatever lease or due time
    /// the last run left on it. Returns how many it changed.
    ///
    /// Only for a runner that knows no other worker is alive, as the local runner does (it holds
    /// its data directory exclusively, and its queue died with the last run): see
    /// [`Store::recover_after_restart`].
    pub async fn recover_after_restart(&self) -> Result<usize, StoreError> {
        self.store.recover_after_restart(self.clock.now()).await
    }

    /// Re-sends deliveries whose queue message is overdue or lost, and those whose worker's lease
    /// ran out. Each one is claimed with a conditional write first, so two sweeps running at once
    /// never both enqueue it.
    pub async fn sweep_due(&self) -> Result<SweepReport, StoreError> {
        let now = self.clock.now();
        let due = self
            .store
            .due_deliveries(now, self.config.sweep_batch)
            .await?;
        let mut report = SweepReport {
            found: due.len(),
            ..Default::default()
        };
        // Claimed a few at a time, not one after another: each claim is its own version-checked
        // write, and on SQLite each waits for a commit's fsync, so one by one a sweep moved about
        // 450 deliveries a second on a 2-core machine, and that was the drain rate after a crash
        // with a backlog (found by the local fault suite, tests/it/faults.rs). The claims are
        // independent; the outcome is the same as in sequence.
        let swept = join_bounded(
            due.into_iter().map(|item| self.sweep_one(item, now)),
            SWEEP_CLAIMS_AT_ONCE,
        )
        .await;
        let mut jobs = Vec::with_capacity(swept.len());
        for outcome in swept {
            match outcome? {
                Swept::Skipped => {}
                Swept::InFlight { deferred } => {
                    report.in_flight += 1;
                    report.deferred += usize::from(deferred);
                }
                Swept::Claimed(job) => jobs.push(job),
            }
        }
        // Events whose fan-out job was lost, or whose worker died on the way: fanned out again,
        // as a recovery (deliveries made already are left alone). A failure here does not keep
        // the deliveries claimed above from being sent.
        match self.claim_fan_outs(now).await {
            Ok(fan_outs) => {
                report.found += fan_outs.found;
                report.fan_outs += fan_outs.claimed.len();
                jobs.extend(fan_outs.claimed);
            }
            Err(e) => tracing::warn!(error = %e, "sweep could not read or claim overdue fan-outs"),
        }
        report.enqueued = jobs.len();
        if !jobs.is_empty()
            && let Err(e) = self.queue.enqueue(jobs).await
        {
            // The claims expire after the grace and the next sweep tries again.
            tracing::warn!(error = %e, "sweep enqueue failed");
            report.enqueued = 0;
        }
        Ok(report)
    }

    /// Claims the overdue fan-outs (a few at a time, like deliveries) and makes their
    /// recovery jobs. Each claim moves the fan-out a grace on, so two sweeps never both send it.
    async fn claim_fan_outs(&self, now: Timestamp) -> Result<ClaimedFanOuts, StoreError> {
        let due = self
            .store
            .due_fan_outs(now, self.config.sweep_batch)
            .await?;
        let found = due.len();
        let next = now.saturating_add(self.config.fan_out_grace());
        let claims = join_bounded(
            due.into_iter().map(|due| async move {
                match self.store.claim_fan_out(&due, next).await {
                    Ok(()) => Ok(Some(due)),
                    Err(StoreError::Conflict | StoreError::NotFound) => Ok(None),
                    Err(e) => Err(e),
                }
            }),
            SWEEP_CLAIMS_AT_ONCE,
        )
        .await;
        let mut claimed = Vec::new();
        for claim in claims {
            if let Some(due) = claim? {
                let job = FanOutJob {
                    tenant_id: due.tenant_id,
                    event_id: due.event_id,
                    recovery: true,
                    untracked: false,
                };
                claimed.push((job.into(), Duration::ZERO));
            }
        }
        Ok(ClaimedFanOuts { found, claimed })
    }

    /// One due delivery of a sweep: claimed (its job to enqueue), deferred past a live lease, or
    /// left alone (changed since the index was read, or claimed by another sweep).
    async fn sweep_one(&self, item: DueDelivery, now: Timestamp) -> Result<Swept, StoreError> {
        let Some(current) = self
            .store
            .get_delivery(&item.tenant_id, &item.delivery_id)
            .await?
        else {
            return Ok(Swept::Skipped);
        };
        if current.due_at() != Some(item.due_at) {
            return Ok(Swept::Skipped); // changed since the index was read
        }
        let Some(claimed) = current.claimed(now, self.config.sweep_grace) else {
            // A worker holds it: due again once its lease runs out (should the worker die),
            // and out of the way of what is due behind it meanwhile.
            let Some(deferred) = current.deferred(now, self.config.sweep_grace) else {
                return Ok(Swept::InFlight { deferred: false });
            };
            return match self
                .store
                .update_delivery(&deferred, current.version())
                .await
            {
                Ok(()) => Ok(Swept::InFlight { deferred: true }),
                Err(StoreError::Conflict) => Ok(Swept::InFlight { deferred: false }),
                Err(e) => Err(e),
            };
        };
        match self
            .store
            .update_delivery(&claimed, current.version())
            .await
        {
            Err(StoreError::Conflict) => return Ok(Swept::Skipped),
            other => other?,
        }
        let delay = claimed
            .next_attempt_at()
            .map(|t| now.until(t).min(self.queue.max_delay()))
            .unwrap_or_default();
        Ok(Swept::Claimed((job_for(&claimed), delay)))
    }
}

/// What the sweep did with one due delivery.
/// What the sweep found of overdue fan-outs, and the recovery jobs of those it claimed.
struct ClaimedFanOuts {
    found: usize,
    claimed: Vec<(Job, Duration)>,
}

enum Swept {
    Skipped,
    InFlight { deferred: bool },
    Claimed((Job, Duration)),
}

#[cfg(all(test, feature = "sqlite"))]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::conformance::{new_event, save, subscription, tenant, ts};
    use crate::domain::Subscription;
    use crate::ports::{FakeClock, QueueError};
    use crate::sqlite::SqliteStore;

    /// The jobs enqueued, and their delays.
    #[derive(Default)]
    /// The jobs queued, their delays, and whether the queue is down.
    struct Jobs(
        Mutex<Vec<Job>>,
        Mutex<Vec<Duration>>,
        std::sync::atomic::AtomicBool,
    );

    impl DeliveryQueue for Jobs {
        fn max_delay(&self) -> Duration {
            Duration::from_secs(900)
        }
        async fn enqueue(&self, jobs: Vec<(Job, Duration)>) -> Result<(), QueueError> {
            if self.2.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(QueueError("the fake queue is down".into()));
            }
            for (job, delay) in jobs {
                self.0.lock().unwrap().push(job);
                self.1.lock().unwrap().push(delay);
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_sweep_leaves_a_delivery_in_flight_alone_and_takes_it_once_the_lease_runs_out() {
        let clock = FakeClock::at(ts(0));
        let config = AppConfig::default();
        let (grace, lease) = (config.sweep_grace, config.lease_duration);
        let app = App::new(
            SqliteStore::open_in_memory().unwrap(),
            Jobs::default(),
            clock.clone(),
            config,
        );
        let a = tenant("a");
        let sub = subscription(&a, ts(0));
        app.store.insert_subscription(&sub).await.unwrap();
        let new = new_event(&a, &[&sub], ts(0), "{}");
        crate::conformance::created(&app.store, &new).await;
        let created = new.deliveries[0].clone();

        // A worker leases it a second in, then dies without a word.
        let taken = created.leased(ts(1_000), "worker".into(), lease).unwrap();
        let taken = save(&app.store, &created, taken).await;
        assert_eq!(
            taken.due_at(),
            created.due_at(),
            "the lease kept the due time"
        );

        // Due (created + grace) while the lease still runs: not claimed, no job; due again only
        // once the lease has run out (plus the grace), same version, so the worker's result
        // still lands.
        clock.set(
            ts(0)
                .saturating_add(grace)
                .saturating_add(Duration::from_millis(500)),
        );
        let report = app.sweep_due().await.unwrap();
        assert_eq!(
            (
                report.found,
                report.in_flight,
                report.deferred,
                report.enqueued
            ),
            (1, 1, 1, 0)
        );
        assert!(report.more_may_be_due(1), "it moved one out of the way");
        let now = app
            .store
            .get_delivery(&a, created.id())
            .await
            .unwrap()
            .unwrap();
        let lease_end = ts(1_000).saturating_add(lease);
        assert_eq!(now.due_at(), Some(lease_end.saturating_add(grace)));
        assert_eq!(now.version(), taken.version());
        assert!(app.queue.0.lock().unwrap().is_empty());
        let report = app.sweep_due().await.unwrap();
        assert_eq!(report.found, 0, "nothing due at its old time");

        // The lease ran out (the worker died): the sweep takes it and the job delivers it.
        clock.set(
            lease_end
                .saturating_add(grace)
                .saturating_add(Duration::from_millis(1)),
        );
        let report = app.sweep_due().await.unwrap();
        assert_eq!((report.found, report.in_flight, report.enqueued), (1, 0, 1));
        let job = take_jobs(&app).pop().expect("a job");
        assert_eq!(&job.delivery_id, created.id());
        let outcome = app.deliver(&Answers(200), &job).await.unwrap();
        assert_eq!(outcome, DeliverOutcome::Delivered);
        let done = app
            .store
            .get_delivery(&a, created.id())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.status(), DeliveryStatus::Succeeded);
        assert_eq!(done.due_at(), None);
    }

    #[tokio::test]
    async fn a_thousand_deliveries_in_flight_at_the_head_of_the_due_index_do_not_hide_one_behind() {
        let clock = FakeClock::at(ts(0));
        let config = AppConfig::default();
        let (grace, lease, batch) = (
            config.sweep_grace,
            config.lease_duration,
            config.sweep_batch,
        );
        let app = App::new(
            SqliteStore::open_in_memory().unwrap(),
            Jobs::default(),
            clock.clone(),
            config,
        );
        let a = tenant("a");
        let subs: Vec<_> = (0..1_001).map(|i| subscription(&a, ts(i))).collect();
        for s in &subs {
            app.store.insert_subscription(s).await.unwrap();
        }
        // 1,000 deliveries created first, each leased by a worker that is still at it...
        let all: Vec<&Subscription> = subs.iter().collect();
        let busy = new_event(&a, &all[..1_000], ts(0), "{}");
        crate::conformance::created(&app.store, &busy).await;
        for d in &busy.deliveries {
            let leased = d.leased(ts(1_000), "worker".into(), lease).unwrap();
            save(&app.store, d, leased).await;
        }
        // ...and one a moment later whose queue message was lost.
        let lost = new_event(&a, &all[1_000..], ts(10), "{}");
        crate::conformance::created(&app.store, &lost).await;

        // Past the grace: all 1,001 are due, the 1,000 in flight first.
        clock.set(ts(10).saturating_add(grace));
        let mut rounds = 0;
        loop {
            let report = app.sweep_due().await.unwrap();
            rounds += 1;
            if !report.more_may_be_due(batch) {
                break;
            }
            assert!(rounds < 10, "the sweep keeps going round");
        }
        let jobs = take_jobs(&app);
        assert_eq!(
            jobs.iter()
                .map(|j| j.delivery_id.clone())
                .collect::<Vec<_>>(),
            vec![lost.deliveries[0].id().clone()],
            "the lost one is sent in this sweep; the ones in flight are left to their workers"
        );
        assert!(rounds <= 4, "{rounds} rounds");
        // The workers' results still land on the deferred deliveries.
        let one = app
            .store
            .get_delivery(&a, busy.deliveries[0].id())
            .await
            .unwrap()
            .unwrap();
        assert!(
            one.due_at().unwrap() > clock.now(),
            "deferred past its lease"
        );
    }

    type TestApp = App<SqliteStore, Jobs, FakeClock>;

    /// An app on an in-memory store at t = 0, with one subscription of tenant `a` to `order.*`.
    async fn app_with_subscription(config: AppConfig) -> (TestApp, TenantId, Subscription) {
        let app = App::new(
            SqliteStore::open_in_memory().unwrap(),
            Jobs::default(),
            FakeClock::at(ts(0)),
            config,
        );
        let a = tenant("a");
        let sub = subscribe_to_orders(&app, &a, "https://receiver.example.com/").await;
        (app, a, sub)
    }

    /// A new subscription of `tenant` to `order.*` at `url`.
    async fn subscribe_to_orders(app: &TestApp, tenant: &TenantId, url: &str) -> Subscription {
        app.create_subscription(
            tenant,
            NewSubscription {
                event_types: vec![EventTypePattern::parse("order.*").unwrap()],
                callback_url: CallbackUrl::parse(url).unwrap(),
                secret: None,
                description: String::new(),
            },
        )
        .await
        .unwrap()
    }

    fn order(data: &str) -> PublishRequest {
        PublishRequest {
            event_type: EventType::parse("order.created").unwrap(),
            data: RawValue::from_string(data.to_owned()).unwrap(),
            event_id: None,
            occurred_at: None,
        }
    }

    /// The queued jobs `pick` takes (the others stay queued).
    fn take_queued<T>(app: &TestApp, pick: impl Fn(&Job) -> Option<T>) -> Vec<T> {
        let mut queue = app.queue.0.lock().unwrap();
        let mut taken = Vec::new();
        queue.retain(|job| match pick(job) {
            Some(t) => {
                taken.push(t);
                false
            }
            None => true,
        });
        taken
    }

    /// The delivery jobs queued (fan-out jobs stay queued).
    fn take_jobs(app: &TestApp) -> Vec<DeliveryJob> {
        take_queued(app, |job| match job {
            Job::Deliver(d) => Some(d.clone()),
            Job::FanOut(_) => None,
        })
    }

    /// The fan-out jobs queued (delivery jobs stay queued).
    fn take_fan_outs(app: &TestApp) -> Vec<FanOutJob> {
        take_queued(app, |job| match job {
            Job::FanOut(f) => Some(f.clone()),
            Job::Deliver(_) => None,
        })
    }

    /// Runs the queued fan-outs with `sender`; the jobs of the deliveries they made (or found).
    async fn fan_out_queued<H: HttpSender>(app: &TestApp, sender: &H) -> Vec<DeliveryJob> {
        let fan_outs = take_fan_outs(app);
        let mut made = Vec::new();
        for job in fan_outs {
            app.fan_out(sender, &job, None, None).await.unwrap();
            let event = app
                .store
                .get_event(&job.tenant_id, &job.event_id)
                .await
                .unwrap()
                .unwrap();
            for s in app
                .store
                .tenant_subscriptions(&job.tenant_id)
                .await
                .unwrap()
            {
                let id = DeliveryId::derive(&job.tenant_id, &event.id, &s.id, event.received_at);
                if s.wants(&event.event_type)
                    && app
                        .store
                        .get_delivery(&job.tenant_id, &id)
                        .await
                        .unwrap()
                        .is_some()
                {
                    made.push(DeliveryJob {
                        tenant_id: job.tenant_id.clone(),
                        delivery_id: id,
                    });
                }
            }
        }
        made
    }

    fn status(status: SubscriptionStatus) -> SubscriptionPatch {
        SubscriptionPatch {
            status: Some(status),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_paused_subscription_holds_its_deliveries_and_gets_them_when_resumed() {
        let (app, a, sub) = app_with_subscription(AppConfig::default()).await;
        app.publish_event(&a, order("{}"), None).await.unwrap();
        app.update_subscription(&a, &sub.id, status(SubscriptionStatus::Paused))
            .await
            .unwrap();

        // The fan-out comes while paused: held, not failed, nothing sent.
        let jobs = fan_out_queued(&app, &Refuses).await;
        let held = app.get_delivery(&a, &jobs[0].delivery_id).await.unwrap();
        assert_eq!(held.status(), DeliveryStatus::Held);
        assert_eq!(held.attempt_count(), 0);
        assert_eq!(app.sweep_due().await.unwrap().found, 0, "not the sweep's");

        // Resumed: sent again, and delivered under the same id.
        app.update_subscription(&a, &sub.id, status(SubscriptionStatus::Active))
            .await
            .unwrap();
        let resent = take_jobs(&app);
        assert_eq!(resent, jobs);
        let outcome = app.deliver(&Answers(204), &resent[0]).await.unwrap();
        assert_eq!(outcome, DeliverOutcome::Delivered);
    }

    #[tokio::test]
    async fn a_held_delivery_a_resume_missed_is_released_at_its_recheck() {
        let (app, a, sub) = app_with_subscription(AppConfig::default()).await;
        app.publish_event(&a, order("{}"), None).await.unwrap();
        app.update_subscription(&a, &sub.id, status(SubscriptionStatus::Paused))
            .await
            .unwrap();
        let held = fan_out_queued(&app, &Refuses).await;
        assert_eq!(held.len(), 1);
        // Resumed by a write the release did not follow (as when the resume's list lagged).
        let mut active = app.get_subscription(&a, &sub.id).await.unwrap();
        active.status = SubscriptionStatus::Active;
        active.version += 1;
        app.store
            .update_subscription(&active, active.version - 1)
            .await
            .unwrap();
        assert_eq!(
            app.sweep_due().await.unwrap().found,
            0,
            "not before its recheck"
        );

        app.clock.advance(HOLD_RECHECK);
        assert_eq!(app.sweep_due().await.unwrap().enqueued, 1);
        let job = take_jobs(&app).remove(0);
        let outcome = app.deliver(&Refuses, &job).await.unwrap();
        assert!(matches!(outcome, DeliverOutcome::Skipped(_)), "{outcome:?}");
        let released = take_jobs(&app);
        assert_eq!(released, vec![job.clone()]);
        assert_eq!(
            app.deliver(&Answers(200), &job).await.unwrap(),
            DeliverOutcome::Delivered
        );
    }

    #[tokio::test]
    async fn a_held_delivery_still_paused_at_its_recheck_waits_for_the_resume() {
        let (app, a, sub) = app_with_subscription(AppConfig::default()).await;
        app.update_subscription(&a, &sub.id, status(SubscriptionStatus::Paused))
            .await
            .unwrap();
        app.publish_event(&a, order("{}"), None).await.unwrap();
        // Fanned out while paused: held, nothing sent.
        let job = fan_out_queued(&app, &Refuses).await.remove(0);
        app.clock.advance(HOLD_RECHECK);
        assert_eq!(app.sweep_due().await.unwrap().enqueued, 1);
        app.deliver(&Refuses, &take_jobs(&app)[0]).await.unwrap();
        let held = app.get_delivery(&a, &job.delivery_id).await.unwrap();
        assert_eq!(held.status(), DeliveryStatus::Held);
        assert_eq!(
            held.due_at(),
            Some(app.clock.now().saturating_add(HOLD_SAFETY_RECHECK)),
            "looked at again in six hours, a safety net"
        );
        app.clock.advance(Duration::from_secs(3_600));
        assert_eq!(app.sweep_due().await.unwrap().found, 0, "not before");
        app.update_subscription(&a, &sub.id, status(SubscriptionStatus::Active))
            .await
            .unwrap();
        assert_eq!(take_jobs(&app), vec![job.clone()], "the resume finds it");
        assert_eq!(
            app.deliver(&Answers(200), &job).await.unwrap(),
            DeliverOutcome::Delivered
        );
    }

    #[tokio::test]
    async fn a_delivery_a_failed_resume_left_held_is_released_by_its_safety_recheck() {
        let (app, a, sub) = app_with_subscription(AppConfig::default()).await;
        app.update_subscription(&a, &sub.id, status(SubscriptionStatus::Paused))
            .await
            .unwrap();
        app.publish_event(&a, order("{}"), None).await.unwrap();
        // Fanned out while paused: held, nothing sent.
        let job = fan_out_queued(&app, &Refuses).await.remove(0);
        app.clock.advance(HOLD_RECHECK);
        app.sweep_due().await.unwrap();
        app.deliver(&Refuses, &take_jobs(&app)[0]).await.unwrap();
        // Resumed, and the release never ran (the request died after the subscription write;
        // a retried PATCH finds the subscription active already and has nothing to change).
        let mut active = app.get_subscription(&a, &sub.id).await.unwrap();
        active.status = SubscriptionStatus::Active;
        active.version += 1;
        app.store
            .update_subscription(&active, active.version - 1)
            .await
            .unwrap();
        app.clock.advance(HOLD_SAFETY_RECHECK);
        assert_eq!(app.sweep_due().await.unwrap().enqueued, 1);
        app.deliver(&Refuses, &take_jobs(&app)[0]).await.unwrap();
        assert_eq!(take_jobs(&app), vec![job.clone()], "released");
        assert_eq!(
            app.deliver(&Answers(200), &job).await.unwrap(),
            DeliverOutcome::Delivered
        );
    }

    #[tokio::test]
    async fn a_delivery_held_about_as_long_as_the_store_keeps_it_is_ended_visibly() {
        let config = AppConfig {
            hold_limit: Some(Duration::from_secs(24 * 3600)),
            ..AppConfig::default()
        };
        let (app, a, sub) = app_with_subscription(config).await;
        app.update_subscription(&a, &sub.id, status(SubscriptionStatus::Paused))
            .await
            .unwrap();
        app.publish_event(&a, order("{}"), None).await.unwrap();
        // Fanned out while paused: held, nothing sent.
        let job = fan_out_queued(&app, &Refuses).await.remove(0);
        for _ in 0..6 {
            app.clock.advance(HOLD_SAFETY_RECHECK);
            app.sweep_due().await.unwrap();
            for job in take_jobs(&app) {
                app.deliver(&Refuses, &job).await.unwrap();
            }
        }
        let d = app.get_delivery(&a, &job.delivery_id).await.unwrap();
        assert_eq!(d.status(), DeliveryStatus::Failed);
        assert_eq!(
            d.reason(),
            Some("held longer than the retention period allows")
        );
    }

    #[tokio::test]
    async fn deleting_or_disabling_ends_held_deliveries_with_the_reason() {
        for (end, reason) in [
            (None, "subscription was deleted"),
            (
                Some(SubscriptionStatus::Disabled),
                "subscription is disabled",
            ),
        ] {
            let (app, a, sub) = app_with_subscription(AppConfig::default()).await;
            app.publish_event(&a, order("{}"), None).await.unwrap();
            app.update_subscription(&a, &sub.id, status(SubscriptionStatus::Paused))
                .await
                .unwrap();
            let jobs = fan_out_queued(&app, &Refuses).await;
            match end {
                None => app.delete_subscription(&a, &sub.id).await.unwrap(),
                Some(s) => {
                    app.update_subscription(&a, &sub.id, status(s))
                        .await
                        .unwrap();
                }
            }
            let ended = app.get_delivery(&a, &jobs[0].delivery_id).await.unwrap();
            assert_eq!(ended.status(), DeliveryStatus::Failed);
            assert_eq!(ended.reason(), Some(reason));
        }
    }

    #[tokio::test]
    async fn a_patch_that_loses_a_race_is_applied_again_on_top() {
        let (app, a, sub) = app_with_subscription(AppConfig::default()).await;
        // The 410 handler's write lands between the PATCH's read and its write.
        let mut disabled = sub.clone();
        disabled.status = SubscriptionStatus::Disabled;
        disabled.version = 1;
        let store = RacingStore {
            inner: app.store.clone(),
            racer: Mutex::new(Some(disabled)),
        };
        let racing = App::new(
            store,
            Jobs::default(),
            app.clock.clone(),
            AppConfig::default(),
        );
        let patch = SubscriptionPatch {
            description: Some("patched".into()),
            ..Default::default()
        };
        let after = racing
            .update_subscription(&a, &sub.id, patch)
            .await
            .unwrap();
        assert_eq!(after.description, "patched");
        assert_eq!(
            after.status,
            SubscriptionStatus::Disabled,
            "the other change stays"
        );
        assert_eq!(after.version, 2);
        assert_eq!(app.get_subscription(&a, &sub.id).await.unwrap(), after);
    }

    #[tokio::test]
    async fn a_resend_keeps_the_id_refuses_unfinished_deliveries_and_is_bounded() {
        let (app, a, _) = app_with_subscription(AppConfig::default()).await;
        app.publish_event(&a, order("{}"), None).await.unwrap();
        let job = fan_out_queued(&app, &Answers(503)).await.remove(0);
        let id = job.delivery_id.clone();
        assert!(
            matches!(
                app.resend_delivery(&a, &id).await,
                Err(AppError::Conflict(_))
            ),
            "a delivery still retrying is not resent"
        );
        assert_eq!(take_jobs(&app), vec![job.clone()], "its retry");
        app.clock.advance(Duration::from_secs(60));
        assert_eq!(
            app.deliver(&Answers(200), &job).await.unwrap(),
            DeliverOutcome::Delivered
        );
        for _ in 0..crate::domain::MAX_RESENDS {
            let resent = app.resend_delivery(&a, &id).await.unwrap();
            assert_eq!(resent.id(), &id);
            assert_eq!(resent.status(), DeliveryStatus::Pending);
            assert_eq!(take_jobs(&app), vec![job.clone()]);
            assert_eq!(
                app.deliver(&Answers(200), &job).await.unwrap(),
                DeliverOutcome::Delivered
            );
        }
        let beyond = app.resend_delivery(&a, &id).await;
        assert!(matches!(beyond, Err(AppError::Conflict(_))), "{beyond:?}");
        let d = app.get_delivery(&a, &id).await.unwrap();
        assert_eq!(d.attempt_count(), crate::domain::MAX_RESENDS + 2);
        assert!(d.attempts().len() <= crate::domain::MAX_KEPT_ATTEMPTS);
    }

    #[tokio::test]
    async fn a_reused_idempotency_key_with_another_body_is_refused() {
        let (app, a, _) = app_with_subscription(AppConfig::default()).await;
        let first = app
            .publish_event(&a, order(r#"{"n":1}"#), Some("k1".into()))
            .await
            .unwrap();
        let same = app
            .publish_event(&a, order(r#"{"n":1}"#), Some("k1".into()))
            .await
            .unwrap();
        assert_eq!(
            (same.event_id, same.created),
            (first.event_id.clone(), false)
        );
        let other = app
            .publish_event(&a, order(r#"{"n":2}"#), Some("k1".into()))
            .await;
        assert!(
            matches!(other, Err(AppError::IdempotencyMismatch(_))),
            "{other:?}"
        );
        // The same for a producer's event id.
        let mut with_id = order("1");
        with_id.event_id = Some(EventId::parse("order-7").unwrap());
        app.publish_event(&a, with_id.clone(), None).await.unwrap();
        assert!(
            !app.publish_event(&a, with_id.clone(), None)
                .await
                .unwrap()
                .created
        );
        with_id.data = RawValue::from_string("2".into()).unwrap();
        let r = app.publish_event(&a, with_id, None).await;
        assert!(matches!(r, Err(AppError::IdempotencyMismatch(_))), "{r:?}");
    }

    #[tokio::test]
    async fn the_first_schedule_entry_delays_the_first_attempt() {
        let config = AppConfig {
            schedule: RetrySchedule::parse("3s,5s").unwrap(),
            ..AppConfig::default()
        };
        let grace = config.sweep_grace;
        let (app, a, _) = app_with_subscription(config).await;
        let published = app.publish_event(&a, order("{}"), None).await.unwrap();
        assert_eq!(
            *app.queue.1.lock().unwrap(),
            vec![Duration::from_secs(3)],
            "the fan-out (and so the first attempt) waits the first entry"
        );
        // Should its job be lost, the sweep fans it out once that and the grace have passed.
        let due = app
            .store
            .due_fan_outs(ts(3_000).saturating_add(grace), 10)
            .await
            .unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].event_id, published.event_id);
        assert!(
            app.store
                .due_fan_outs(ts(2_999).saturating_add(grace), 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_2xx_is_recorded_even_when_the_lease_was_lost_during_the_attempt() {
        let (app, a, _) = app_with_subscription(AppConfig::default()).await;
        app.publish_event(&a, order("{}"), None).await.unwrap();
        let job = fan_out_queued(&app, &Answers(503)).await.remove(0);
        app.clock.advance(Duration::from_secs(60));
        // While the receiver takes its time, the lease runs out and the delivery moves on.
        let sender = Meddles {
            store: app.store.clone(),
            tenant: a.clone(),
            job: job.clone(),
        };
        let outcome = app.deliver(&sender, &job).await.unwrap();
        assert_eq!(outcome, DeliverOutcome::Delivered);
        let d = app.get_delivery(&a, &job.delivery_id).await.unwrap();
        assert_eq!(d.status(), DeliveryStatus::Succeeded);
        assert_eq!(d.attempt_count(), 2);
    }

    #[tokio::test]
    async fn a_first_attempt_is_recorded_on_the_delivery_a_concurrent_fan_out_wrote_first() {
        let (app, a, sub) = app_with_subscription(AppConfig::default()).await;
        let published = app.publish_event(&a, order("{}"), None).await.unwrap();
        // A duplicate of the fan-out job (SQS is at-least-once) got there first and failed.
        let other = crate::conformance::attempted(
            &Delivery::new(
                a.clone(),
                published.event_id.clone(),
                ts(0),
                sub.id.clone(),
                ts(0),
                Duration::ZERO,
                app.config.sweep_grace,
            ),
            ts(0),
            AttemptClass::Retryable,
            Duration::from_secs(5),
        );
        let sender = WritesFirst {
            store: app.store.clone(),
            delivery: other.clone(),
        };
        let jobs = fan_out_queued(&app, &sender).await;
        assert_eq!(jobs.len(), 1);
        let d = app.get_delivery(&a, other.id()).await.unwrap();
        assert_eq!(d.status(), DeliveryStatus::Succeeded, "our 2xx counts");
        assert_eq!(d.attempt_count(), 2, "both attempts are in its log");
    }

    /// A sender that answers `status` and notes whether the delivery was stored leased while
    /// its request was out.
    struct SeesLease {
        store: SqliteStore,
        tenant: TenantId,
        status: u16,
        leased_while_sending: Mutex<Vec<bool>>,
    }

    impl HttpSender for SeesLease {
        async fn send(&self, request: OutboundRequest) -> SendOutcome {
            let id = request
                .headers
                .iter()
                .find(|(name, _)| name == "webhook-id")
                .map(|(_, v)| DeliveryId::parse(v).unwrap());
            if let Some(id) = id
                && let Some(stored) = self.store.get_delivery(&self.tenant, &id).await.unwrap()
            {
                self.leased_while_sending
                    .lock()
                    .unwrap()
                    .push(stored.current_lease().is_some());
            }
            SendOutcome::Response {
                status: self.status,
                retry_after: None,
                body_snippet: String::new(),
                latency: Duration::from_millis(1),
            }
        }
    }

    /// An event whose first attempt failed (503), so its delivery waits for a retry; the retry's
    /// job, and the failing sender that notes leases.
    async fn a_retry_waiting() -> (TestApp, TenantId, SeesLease, DeliveryJob) {
        let config = AppConfig {
            schedule: RetrySchedule::parse("0s,10s,10s").unwrap(),
            jitter_ratio: 0.0,
            ..AppConfig::default()
        };
        let (app, a, _) = app_with_subscription(config).await;
        let failing = SeesLease {
            store: app.store.clone(),
            tenant: a.clone(),
            status: 503,
            leased_while_sending: Mutex::new(Vec::new()),
        };
        app.publish_event(&a, order("{}"), None).await.unwrap();
        fan_out_queued(&app, &failing).await;
        let job = take_jobs(&app).remove(0);
        (app, a, failing, job)
    }

    #[tokio::test]
    async fn a_retry_on_time_writes_no_lease_and_a_late_one_does() {
        let (app, a, failing, job) = a_retry_waiting().await;
        let waiting = app.get_delivery(&a, &job.delivery_id).await.unwrap();
        let next = waiting.next_attempt_at().unwrap();
        assert!(
            waiting.due_at().unwrap() > next.saturating_add(app.config.lease_duration),
            "a retry is due for the sweep only after a lease's time"
        );

        // On time: the due time keeps the sweep off; nothing is written before the POST.
        app.clock.set(next);
        let version = waiting.version();
        app.deliver(&failing, &job).await.unwrap();
        let after = app.get_delivery(&a, &job.delivery_id).await.unwrap();
        assert_eq!(after.attempt_count(), 2);
        assert!(after.current_lease().is_none());
        // (The first attempt's delivery was not stored yet while it was sent.)
        assert_eq!(*failing.leased_while_sending.lock().unwrap(), [false]);
        assert!(
            after.version() > version,
            "the result is written version-checked"
        );

        // Late (a backlog held the job past a lease before its due time): leased first.
        let late = after.due_at().unwrap();
        let lease_ms = i64::try_from(app.config.lease_duration.as_millis()).unwrap();
        app.clock
            .set(Timestamp::from_unix_millis(late.unix_millis() - lease_ms));
        let job = take_jobs(&app).remove(0);
        app.deliver(&failing, &job).await.unwrap();
        assert_eq!(*failing.leased_while_sending.lock().unwrap(), [false, true]);
    }

    #[tokio::test]
    async fn a_job_the_sweep_sent_writes_a_lease() {
        let (app, a, failing, lost) = a_retry_waiting().await;
        // The retry's job was lost: the sweep claims the delivery once it is due and sends
        // another; each claim is one more job that might run, so the job must find a lease.
        let waiting = app.get_delivery(&a, &lost.delivery_id).await.unwrap();
        app.clock.set(waiting.due_at().unwrap());
        app.sweep_due().await.unwrap();
        let claimed = app.get_delivery(&a, &lost.delivery_id).await.unwrap();
        assert_eq!(claimed.claims(), 1);
        let job = take_jobs(&app).remove(0);
        app.deliver(&failing, &job).await.unwrap();
        assert_eq!(*failing.leased_while_sending.lock().unwrap(), [true]);
    }

    #[tokio::test]
    async fn an_api_key_is_long_and_stays_with_its_tenant() {
        let (app, a, _) = app_with_subscription(AppConfig::default()).await;
        let short = app.add_api_key(&a, "tdk_only-twenty-nine-chars-xx").await;
        assert!(
            matches!(
                &short,
                Err(AppError::Invalid {
                    field: "apiKey",
                    ..
                })
            ),
            "{short:?}"
        );
        let key = "tdk_an-operator-chosen-key-0123456789";
        app.add_api_key(&a, key).await.unwrap();
        app.add_api_key(&a, key).await.unwrap(); // a restart registers it again
        let other = app.add_api_key(&tenant("b"), key).await;
        assert!(matches!(other, Err(AppError::Conflict(_))), "{other:?}");
        assert_eq!(app.authenticate(key).await.unwrap(), Some(a));
    }

    #[tokio::test]
    async fn a_fan_out_job_that_comes_again_once_done_sends_nothing() {
        let (app, a, _) = app_with_subscription(AppConfig::default()).await;
        app.publish_event(&a, order("{}"), None).await.unwrap();
        let job = take_fan_outs(&app).remove(0);
        let sender = Counts::default();
        app.fan_out(&sender, &job, None, None).await.unwrap();
        // A duplicate, a redrive days later, the original after a recovery overtook it.
        let again = app.fan_out(&sender, &job, None, None).await.unwrap();
        assert_eq!(again, FanOutReport::default());
        assert_eq!(sender.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_fan_out_that_comes_before_the_first_attempt_is_due_waits_for_it() {
        let config = AppConfig {
            schedule: RetrySchedule::parse("3s,5s").unwrap(),
            ..AppConfig::default()
        };
        let (app, a, _) = app_with_subscription(config).await;
        app.publish_event(&a, order("{}"), None).await.unwrap();
        app.queue.1.lock().unwrap().clear();
        let job = take_fan_outs(&app).remove(0);
        let sender = Counts::default();
        // Early (a restart's recovery, or a queue that cut the delay short): sent again for then.
        app.clock.advance(Duration::from_secs(1));
        app.fan_out(&sender, &job, None, None).await.unwrap();
        assert_eq!(sender.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(take_fan_outs(&app), vec![job.clone()]);
        assert_eq!(*app.queue.1.lock().unwrap(), vec![Duration::from_secs(2)]);
        app.clock.advance(Duration::from_secs(2));
        app.fan_out(&sender, &job, None, None).await.unwrap();
        assert_eq!(sender.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_fan_out_short_of_time_starts_nothing_it_cannot_finish_and_hands_on_the_rest() {
        let (app, a, _) = app_with_subscription(AppConfig::default()).await;
        let published = app.publish_event(&a, order("{}"), None).await.unwrap();
        let job = take_fan_outs(&app).remove(0);
        let sender = Counts::default();
        // The invocation ends in less than one attempt's budget.
        let deadline = app
            .clock
            .now()
            .saturating_add(app.config.attempt_budget)
            .saturating_add(Duration::from_millis(1));
        app.clock.advance(Duration::from_millis(2));
        let report = app
            .fan_out(&sender, &job, None, Some(deadline))
            .await
            .unwrap();
        assert_eq!((report.created, report.left), (0, 1));
        assert_eq!(sender.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        let rest = take_fan_outs(&app);
        assert_eq!(
            rest,
            vec![FanOutJob {
                recovery: true,
                ..job.clone()
            }],
            "carried on at once, elsewhere"
        );
        let (_, owed) = app
            .store
            .get_event_for_fan_out(&a, &published.event_id)
            .await
            .unwrap()
            .unwrap();
        assert!(owed.is_some(), "still owed meanwhile");
        app.fan_out(&sender, &rest[0], None, None).await.unwrap();
        assert_eq!(sender.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stream_started_fan_out_sends_no_job_and_marks_nothing() {
        let config = AppConfig {
            fan_out_trigger: FanOutTrigger::StoreStream,
            ..AppConfig::default()
        };
        let (app, a, sub) = app_with_subscription(config).await;
        let published = app.publish_event(&a, order("{}"), None).await.unwrap();
        assert_eq!(published.deliveries, 1);
        assert!(
            app.queue.0.lock().unwrap().is_empty(),
            "no queue message: the store's stream starts the fan-out"
        );
        let now = app.clock.now().saturating_add(Duration::from_secs(3600));
        assert!(
            app.store.due_fan_outs(now, 10).await.unwrap().is_empty(),
            "nothing for the sweep: the stream retries until it is handled"
        );

        // The stream hands the new item over.
        let event = app
            .store
            .get_event(&a, &published.event_id)
            .await
            .unwrap()
            .unwrap();
        let job = FanOutJob {
            tenant_id: a.clone(),
            event_id: event.id.clone(),
            recovery: false,
            untracked: true,
        };
        let sender = Counts::default();
        let report = app
            .fan_out_event(&sender, &event, &job, None, None)
            .await
            .unwrap();
        assert_eq!((report.created, report.delivered), (1, 1));
        assert_eq!(sender.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        let id = DeliveryId::derive(&a, &event.id, &sub.id, event.received_at);
        assert!(app.store.get_delivery(&a, &id).await.unwrap().is_some());

        // A job handed on for it (a worker short of time) runs though the store owes nothing,
        // and as a recovery it leaves the delivery made alone.
        let rest = FanOutJob {
            recovery: true,
            ..job
        };
        let report = app.fan_out(&sender, &rest, None, None).await.unwrap();
        assert_eq!((report.created, report.existing), (0, 1));
        assert_eq!(sender.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_untracked_fan_out_fails_when_it_cannot_hand_on_its_rest() {
        let (app, a, _) = app_with_subscription(AppConfig::default()).await;
        let (published, event) = app
            .accept_event_to_fan_out(&a, &[], order("{}"), None)
            .await
            .unwrap();
        let event = event.expect("new");
        let job = FanOutJob {
            tenant_id: a.clone(),
            event_id: published.event_id.clone(),
            recovery: false,
            untracked: true,
        };
        let deadline = app.clock.now();
        app.queue.2.store(true, std::sync::atomic::Ordering::SeqCst);
        let sender = Counts::default();
        // Nothing but the caller's own record (an SQS message) keeps this work: it must come back.
        let result = app
            .fan_out_event(&sender, &event, &job, None, Some(deadline))
            .await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        // An owed one has the sweep: the failed send is only logged.
        let owed = FanOutJob {
            untracked: false,
            ..job
        };
        let report = app
            .fan_out_event(&sender, &event, &owed, None, Some(deadline))
            .await
            .unwrap();
        assert_eq!(report.left, 1);
    }

    #[tokio::test]
    async fn an_overdue_fan_out_is_recovered_without_sending_what_was_made() {
        let (app, a, sub) = app_with_subscription(AppConfig::default()).await;
        let second = subscribe_to_orders(&app, &a, "https://other.example.com/").await;
        let published = app.publish_event(&a, order("{}"), None).await.unwrap();
        // The worker made one delivery and died: its job is gone, the event still owes.
        take_fan_outs(&app);
        let made = crate::conformance::attempted(
            &Delivery::new(
                a.clone(),
                published.event_id.clone(),
                ts(0),
                sub.id.clone(),
                ts(0),
                Duration::ZERO,
                app.config.sweep_grace,
            ),
            ts(0),
            AttemptClass::Delivered,
            Duration::ZERO,
        );
        app.store.insert_delivery(&made).await.unwrap();
        assert_eq!(
            app.sweep_due().await.unwrap().fan_outs,
            0,
            "not before the grace"
        );

        app.clock.advance(app.config.sweep_grace);
        let report = app.sweep_due().await.unwrap();
        assert_eq!((report.fan_outs, report.enqueued), (1, 1));
        assert_eq!(app.sweep_due().await.unwrap().fan_outs, 0, "claimed once");
        let sender = Counts::default();
        let jobs = fan_out_queued(&app, &sender).await;
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            sender.0.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "only the missing one is sent"
        );
        let received = app
            .get_event(&a, &published.event_id)
            .await
            .unwrap()
            .received_at;
        let other = DeliveryId::derive(&a, &published.event_id, &second.id, received);
        assert_eq!(
            app.get_delivery(&a, &other).await.unwrap().status(),
            DeliveryStatus::Succeeded
        );
        assert_eq!(
            app.get_delivery(&a, made.id()).await.unwrap(),
            made,
            "left alone"
        );
        app.clock.advance(Duration::from_secs(24 * 3600));
        assert_eq!(
            app.sweep_due().await.unwrap().found,
            0,
            "the event owes nothing now"
        );
    }

    /// Answers every request with one status.
    struct Answers(u16);

    impl HttpSender for Answers {
        async fn send(&self, _request: OutboundRequest) -> SendOutcome {
            SendOutcome::Response {
                status: self.0,
                retry_after: None,
                body_snippet: String::new(),
                latency: Duration::from_millis(1),
            }
        }
    }

    /// Fails the test if anything is sent.
    struct Refuses;

    impl HttpSender for Refuses {
        async fn send(&self, request: OutboundRequest) -> SendOutcome {
            panic!("nothing may be sent, but {} was", request.url)
        }
    }

    /// Answers 200, after moving the delivery on behind the worker's back (as the sweep does
    /// once a lease has run out).
    struct Meddles {
        store: SqliteStore,
        tenant: TenantId,
        job: DeliveryJob,
    }

    impl HttpSender for Meddles {
        async fn send(&self, _request: OutboundRequest) -> SendOutcome {
            let current = self
                .store
                .get_delivery(&self.tenant, &self.job.delivery_id)
                .await
                .unwrap()
                .unwrap();
            let moved = current.with_due_at_for_tests(current.due_at());
            self.store
                .update_delivery(&moved, current.version())
                .await
                .unwrap();
            SendOutcome::Response {
                status: 200,
                retry_after: None,
                body_snippet: String::new(),
                latency: Duration::from_millis(1),
            }
        }
    }

    /// Writes `delivery` while the attempt runs (as a concurrent fan-out would), then answers 200.
    struct WritesFirst {
        store: SqliteStore,
        delivery: Delivery,
    }

    impl HttpSender for WritesFirst {
        async fn send(&self, _request: OutboundRequest) -> SendOutcome {
            self.store.insert_delivery(&self.delivery).await.unwrap();
            SendOutcome::Response {
                status: 200,
                retry_after: None,
                body_snippet: String::new(),
                latency: Duration::from_millis(1),
            }
        }
    }

    /// Answers 200 and counts the requests.
    #[derive(Default)]
    struct Counts(std::sync::atomic::AtomicUsize);

    impl HttpSender for Counts {
        async fn send(&self, _request: OutboundRequest) -> SendOutcome {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            SendOutcome::Response {
                status: 200,
                retry_after: None,
                body_snippet: String::new(),
                latency: Duration::from_millis(1),
            }
        }
    }

    /// A store whose first subscription update loses to `racer`, written just before it.
    struct RacingStore {
        inner: SqliteStore,
        racer: Mutex<Option<Subscription>>,
    }

    impl Store for RacingStore {
        async fn put_api_key(&self, key: &ApiKeyRecord) -> crate::ports::StoreResult<()> {
            self.inner.put_api_key(key).await
        }
        async fn tenant_for_api_key(&self, h: &str) -> crate::ports::StoreResult<Option<TenantId>> {
            self.inner.tenant_for_api_key(h).await
        }
        async fn insert_subscription(&self, s: &Subscription) -> crate::ports::StoreResult<()> {
            self.inner.insert_subscription(s).await
        }
        async fn get_subscription(
            &self,
            t: &TenantId,
            id: &SubscriptionId,
        ) -> crate::ports::StoreResult<Option<Subscription>> {
            self.inner.get_subscription(t, id).await
        }
        async fn list_subscriptions(
            &self,
            t: &TenantId,
            p: &PageRequest,
        ) -> crate::ports::StoreResult<Page<Subscription>> {
            self.inner.list_subscriptions(t, p).await
        }
        async fn update_subscription(
            &self,
            s: &Subscription,
            expected: u64,
        ) -> crate::ports::StoreResult<()> {
            let racer = self.racer.lock().unwrap().take();
            if let Some(racer) = racer {
                self.inner.update_subscription(&racer, expected).await?;
            }
            self.inner.update_subscription(s, expected).await
        }
        async fn delete_subscription(
            &self,
            t: &TenantId,
            id: &SubscriptionId,
        ) -> crate::ports::StoreResult<()> {
            self.inner.delete_subscription(t, id).await
        }
        async fn tenant_subscriptions(
            &self,
            t: &TenantId,
        ) -> crate::ports::StoreResult<Vec<Subscription>> {
            self.inner.tenant_subscriptions(t).await
        }
        async fn insert_event(&self, n: &NewEvent) -> crate::ports::StoreResult<InsertOutcome> {
            self.inner.insert_event(n).await
        }
        async fn get_event(
            &self,
            t: &TenantId,
            id: &EventId,
        ) -> crate::ports::StoreResult<Option<Event>> {
            self.inner.get_event(t, id).await
        }
        async fn get_event_for_fan_out(
            &self,
            t: &TenantId,
            id: &EventId,
        ) -> crate::ports::StoreResult<Option<(Event, Option<Timestamp>)>> {
            self.inner.get_event_for_fan_out(t, id).await
        }
        async fn fanned_out(&self, t: &TenantId, id: &EventId) -> crate::ports::StoreResult<()> {
            self.inner.fanned_out(t, id).await
        }
        async fn due_fan_outs(
            &self,
            now: Timestamp,
            limit: u32,
        ) -> crate::ports::StoreResult<Vec<crate::ports::DueFanOut>> {
            self.inner.due_fan_outs(now, limit).await
        }
        async fn claim_fan_out(
            &self,
            due: &crate::ports::DueFanOut,
            next: Timestamp,
        ) -> crate::ports::StoreResult<()> {
            self.inner.claim_fan_out(due, next).await
        }
        async fn insert_delivery(&self, d: &Delivery) -> crate::ports::StoreResult<()> {
            self.inner.insert_delivery(d).await
        }
        async fn get_delivery(
            &self,
            t: &TenantId,
            id: &DeliveryId,
        ) -> crate::ports::StoreResult<Option<Delivery>> {
            self.inner.get_delivery(t, id).await
        }
        async fn update_delivery(&self, d: &Delivery, v: u64) -> crate::ports::StoreResult<()> {
            self.inner.update_delivery(d, v).await
        }
        async fn list_deliveries(
            &self,
            t: &TenantId,
            s: &SubscriptionId,
            p: &PageRequest,
        ) -> crate::ports::StoreResult<Page<Delivery>> {
            self.inner.list_deliveries(t, s, p).await
        }
        async fn due_deliveries(
            &self,
            now: Timestamp,
            limit: u32,
        ) -> crate::ports::StoreResult<Vec<crate::ports::DueDelivery>> {
            self.inner.due_deliveries(now, limit).await
        }
        async fn recover_after_restart(&self, now: Timestamp) -> crate::ports::StoreResult<usize> {
            self.inner.recover_after_restart(now).await
        }
    }
}
