//! The application layer: every use case, generic over the seams. Handlers (HTTP, Lambda, the
//! local runner) decode their input, call one of these, and encode the result.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::{Rng as _, RngCore as _};
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};

use crate::domain::{
    ApiKeyRecord, Attempt, CallbackUrl, Delivery, DeliveryId, DeliveryStatus, Event, EventId,
    EventType, EventTypePattern, NotLeasable, Secret, Subscription, SubscriptionId,
    SubscriptionStatus, TenantId, Timestamp,
};
use crate::ports::{
    Clock, DeliveryJob, DeliveryQueue, InsertOutcome, NewEvent, Page, PageRequest, Store,
    StoreError,
};
use crate::retry::{self, AttemptClass, NextStep, RetrySchedule};
use crate::sender::{HttpSender, OutboundRequest, SendOutcome, TransportFailure};
use crate::signing;

/// Largest `data` accepted in one event, in bytes of JSON. SQS messages cap at 256 KiB and the
/// delivery envelope needs room too.
pub const MAX_EVENT_DATA_BYTES: usize = 200 * 1024;
pub const MAX_DESCRIPTION_LEN: usize = 1024;
pub const MAX_EVENT_TYPES_PER_SUBSCRIPTION: usize = 100;
pub const MAX_PAGE_LIMIT: u32 = 250;
pub const DEFAULT_PAGE_LIMIT: u32 = 50;

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub schedule: RetrySchedule,
    pub jitter_ratio: f64,
    /// How long a queued delivery may take to start before the sweep sends it again.
    pub sweep_grace: Duration,
    /// How long a worker owns a delivery for one attempt; longer than the sender's total timeout.
    pub lease_duration: Duration,
    /// Deliveries the sweep handles per run.
    pub sweep_batch: u32,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            schedule: RetrySchedule::default(),
            jitter_ratio: retry::DEFAULT_JITTER_RATIO,
            sweep_grace: Duration::from_secs(60),
            lease_duration: Duration::from_secs(60),
            sweep_batch: 500,
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

/// A stored event and the jobs of its new deliveries, not yet enqueued.
#[derive(Debug)]
pub struct Accepted {
    pub published: Published,
    pub jobs: Vec<(DeliveryJob, Duration)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub event_id: EventId,
    /// False when an idempotency key or event id repeated an earlier publish.
    pub created: bool,
    pub deliveries: usize,
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
}

impl SweepReport {
    /// Whether another round may find more: this one was full and made progress (a batch that
    /// only met deliveries in flight would meet them again).
    pub fn more_may_be_due(&self, batch: u32) -> bool {
        self.found >= batch as usize && self.enqueued > 0
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

    /// Registers a key chosen by the operator (e.g. `--api-key`). Idempotent.
    pub async fn add_api_key(&self, tenant: &TenantId, key: &str) -> AppResult<()> {
        if key.len() < 16 {
            return Err(AppError::invalid(
                "apiKey",
                "must be at least 16 characters",
            ));
        }
        let record = ApiKeyRecord {
            key_hash: hash_api_key(key),
            tenant_id: tenant.clone(),
            created_at: self.clock.now(),
        };
        Ok(self.store.put_api_key(&record).await?)
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
        };
        self.store.insert_subscription(&subscription).await?;
        tracing::info!(tenant = %tenant, subscription = %subscription.id, url = %subscription.callback_url, "subscription created");
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

    pub async fn update_subscription(
        &self,
        tenant: &TenantId,
        id: &SubscriptionId,
        patch: SubscriptionPatch,
    ) -> AppResult<Subscription> {
        let mut subscription = self.get_subscription(tenant, id).await?;
        if let Some(types) = patch.event_types {
            validate_event_types(&types)?;
            subscription.event_types = types;
        }
        if let Some(url) = patch.callback_url {
            subscription.callback_url = url;
        }
        if let Some(secret) = patch.secret {
            subscription.secret = secret;
        }
        if let Some(description) = patch.description {
            validate_description(&description)?;
            subscription.description = description;
        }
        if let Some(status) = patch.status {
            subscription.status = status;
        }
        subscription.updated_at = self.clock.now();
        match self.store.update_subscription(&subscription).await {
            Err(StoreError::NotFound) => Err(AppError::NotFound("subscription")),
            other => other.map(|()| subscription).map_err(Into::into),
        }
    }

    pub async fn delete_subscription(
        &self,
        tenant: &TenantId,
        id: &SubscriptionId,
    ) -> AppResult<()> {
        match self.store.delete_subscription(tenant, id).await {
            Err(StoreError::NotFound) => Err(AppError::NotFound("subscription")),
            other => Ok(other?),
        }
    }

    // ---- events ----

    /// Stores the event and one delivery per matching active subscription in one write, then
    /// queues the deliveries. A failed enqueue loses nothing: the sweep finds them after the grace.
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

    /// [`publish_event`](Self::publish_event) without the enqueue: the event and its deliveries
    /// are stored, and the jobs are the caller's to send with [`send_jobs`](Self::send_jobs),
    /// e.g. together with other events' jobs in one queue request. Should they never be sent,
    /// the deliveries' due time makes the sweep send them.
    pub async fn accept_event(
        &self,
        tenant: &TenantId,
        request: PublishRequest,
        idempotency_key: Option<String>,
    ) -> AppResult<Accepted> {
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
        let event = Event {
            id: request.event_id.unwrap_or_else(EventId::generate),
            tenant_id: tenant.clone(),
            event_type: request.event_type,
            occurred_at: request.occurred_at.unwrap_or(now),
            data: request.data,
            received_at: now,
        };
        let deliveries: Vec<Delivery> = self
            .store
            .tenant_subscriptions(tenant)
            .await?
            .into_iter()
            .filter(|s| s.wants(&event.event_type))
            .map(|s| {
                Delivery::new(
                    tenant.clone(),
                    event.id.clone(),
                    s.id,
                    now,
                    self.config.sweep_grace,
                )
            })
            .collect();
        let new = NewEvent {
            event,
            deliveries,
            idempotency_key,
        };
        match self.store.insert_event(&new).await? {
            InsertOutcome::Existing(event_id) => Ok(Accepted {
                published: Published {
                    event_id,
                    created: false,
                    deliveries: 0,
                },
                jobs: Vec::new(),
            }),
            InsertOutcome::Created => {
                let jobs = new
                    .deliveries
                    .iter()
                    .map(|d| {
                        (
                            DeliveryJob {
                                tenant_id: tenant.clone(),
                                delivery_id: d.id.clone(),
                            },
                            Duration::ZERO,
                        )
                    })
                    .collect::<Vec<_>>();
                Ok(Accepted {
                    published: Published {
                        event_id: new.event.id,
                        created: true,
                        deliveries: new.deliveries.len(),
                    },
                    jobs,
                })
            }
        }
    }

    /// Enqueues delivery jobs (at once, however many: the queue batches them). A failure is only
    /// logged: the deliveries are stored and due, so the sweep sends them.
    pub async fn send_jobs(&self, jobs: Vec<(DeliveryJob, Duration)>) {
        if jobs.is_empty() {
            return;
        }
        let count = jobs.len();
        if let Err(e) = self.queue.enqueue(jobs).await {
            tracing::warn!(error = %e, jobs = count, "enqueue failed; the sweep will send these deliveries");
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

    /// An operator's re-send of a failed or dead delivery (or a nudge to a waiting one).
    pub async fn retry_delivery(&self, tenant: &TenantId, id: &DeliveryId) -> AppResult<Delivery> {
        let current = self.get_delivery(tenant, id).await?;
        if current.status == DeliveryStatus::Succeeded {
            return Err(AppError::Conflict(
                "delivery already succeeded; publish the event again to re-send it".into(),
            ));
        }
        let now = self.clock.now();
        if current.lease.as_ref().is_some_and(|l| l.expires_at > now) {
            return Err(AppError::Conflict(
                "delivery is being attempted right now".into(),
            ));
        }
        let mut next = current.rescheduled(now, self.config.sweep_grace);
        next.version = current.version + 1;
        match self.store.update_delivery(&next, current.version).await {
            Err(StoreError::Conflict) => {
                return Err(AppError::Conflict(
                    "delivery changed while retrying; try again".into(),
                ));
            }
            other => other?,
        }
        let job = DeliveryJob {
            tenant_id: tenant.clone(),
            delivery_id: id.clone(),
        };
        if let Err(e) = self.queue.enqueue(vec![(job, Duration::ZERO)]).await {
            tracing::warn!(error = %e, delivery = %id, "enqueue failed; the sweep will send it");
        }
        Ok(next)
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
        let token = random_token("");
        let mut leased = match current.leased(now, token, self.config.lease_duration) {
            Ok(d) => d,
            Err(NotLeasable::NotDue(at)) => return Ok(DeliverOutcome::NotDue(at)),
            Err(NotLeasable::Final(_)) => return Ok(DeliverOutcome::Skipped("already final")),
            Err(NotLeasable::Leased(_)) => return Ok(DeliverOutcome::Skipped("leased elsewhere")),
        };
        leased.version = current.version + 1;
        match self.store.update_delivery(&leased, current.version).await {
            Err(StoreError::Conflict) => return Ok(DeliverOutcome::Skipped("lost the lease race")),
            other => other?,
        }

        let event = self
            .store
            .get_event(&job.tenant_id, &leased.event_id)
            .await?;
        let subscription = self
            .store
            .get_subscription(&job.tenant_id, &leased.subscription_id)
            .await?;
        let (attempt, retry_after) = match (&event, &subscription) {
            (Some(event), Some(sub)) if sub.status == SubscriptionStatus::Active => {
                self.attempt(sender, &leased, event, sub).await
            }
            (None, _) => (self.no_send_attempt(&leased, "event not found"), None),
            (_, None) => (
                self.no_send_attempt(&leased, "subscription was deleted"),
                None,
            ),
            (_, Some(sub)) => {
                let why = format!("subscription is {}", sub.status.as_str());
                (self.no_send_attempt(&leased, &why), None)
            }
        };

        let finished_at = self.clock.now();
        let class = attempt.outcome;
        let status_code = attempt.status_code;
        let (status, retry_at, due_at, requeue) = match class {
            AttemptClass::Delivered => (DeliveryStatus::Succeeded, None, None, None),
            AttemptClass::Permanent => (DeliveryStatus::Failed, None, None, None),
            AttemptClass::Retryable => match retry::next_step(
                &self.config.schedule,
                leased.attempts_in_round() + 1,
                class,
                retry_after,
            ) {
                NextStep::GiveUp => (DeliveryStatus::Dead, None, None, None),
                NextStep::RetryAfter(delay) => {
                    let floor = retry_after
                        .map(|d| d.min(retry::MAX_RETRY_AFTER))
                        .unwrap_or_default();
                    let delay = retry::with_jitter(
                        delay,
                        self.config.jitter_ratio,
                        rand::rng().random::<f64>(),
                        floor,
                    );
                    let retry_at = finished_at.saturating_add(delay);
                    if delay <= self.queue.max_delay() {
                        let due = retry_at.saturating_add(self.config.sweep_grace);
                        (
                            DeliveryStatus::Retrying,
                            Some(retry_at),
                            Some(due),
                            Some(delay),
                        )
                    } else {
                        // Too long for the queue: the sweep sends it when it is due.
                        (
                            DeliveryStatus::Retrying,
                            Some(retry_at),
                            Some(retry_at),
                            None,
                        )
                    }
                }
            },
        };
        let mut done = leased.with_attempt(attempt, status, retry_at, due_at, finished_at);
        done.version = leased.version + 1;
        match self.store.update_delivery(&done, leased.version).await {
            Err(StoreError::Conflict) => {
                // Our lease ran out and another worker took over; it records its own attempt.
                tracing::warn!("lease lost before the attempt was recorded");
                return Ok(DeliverOutcome::Skipped("lease lost"));
            }
            other => other?,
        }
        if let Some(delay) = requeue {
            let next_job = job.clone();
            if let Err(e) = self.queue.enqueue(vec![(next_job, delay)]).await {
                tracing::warn!(error = %e, "enqueue of the retry failed; the sweep will send it");
            }
        }
        if status_code == Some(410) {
            self.disable_gone_subscription(&job.tenant_id, &done.subscription_id)
                .await;
        }
        tracing::info!(status = status.as_str(), attempt = done.attempts.len(), code = ?status_code, "delivery attempt recorded");
        Ok(match status {
            DeliveryStatus::Succeeded => DeliverOutcome::Delivered,
            DeliveryStatus::Failed => DeliverOutcome::Failed,
            DeliveryStatus::Dead => DeliverOutcome::Dead,
            DeliveryStatus::Retrying | DeliveryStatus::Pending => {
                DeliverOutcome::Retrying(retry_at.unwrap_or(finished_at))
            }
        })
    }

    fn no_send_attempt(&self, delivery: &Delivery, why: &str) -> Attempt {
        Attempt {
            number: delivery.attempts.len() as u32 + 1,
            started_at: self.clock.now(),
            latency_ms: 0,
            outcome: AttemptClass::Permanent,
            status_code: None,
            error: Some(why.to_owned()),
            response_snippet: None,
        }
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
        let msg_id = delivery.id.as_str();
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
        let number = delivery.attempts.len() as u32 + 1;
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
                        tracing::warn!(url = %subscription.callback_url, reason = %message, "callback refused by the egress guard");
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
        let mut jobs = Vec::with_capacity(due.len());
        for item in due {
            let Some(current) = self
                .store
                .get_delivery(&item.tenant_id, &item.delivery_id)
                .await?
            else {
                continue;
            };
            if current.due_at != Some(item.due_at) {
                continue; // changed since the index was read
            }
            if current.lease.as_ref().is_some_and(|l| l.expires_at > now) {
                // A worker holds it. Claiming would bump the version and void that worker's
                // result; should the worker die, a later sweep takes it once the lease runs out.
                report.in_flight += 1;
                continue;
            }
            let mut claimed = current.clone();
            claimed.due_at = Some(now.saturating_add(self.config.sweep_grace));
            claimed.updated_at = now;
            claimed.version = current.version + 1;
            match self.store.update_delivery(&claimed, current.version).await {
                Err(StoreError::Conflict) => continue,
                other => other?,
            }
            let delay = claimed
                .next_attempt_at
                .map(|t| now.until(t).min(self.queue.max_delay()))
                .unwrap_or_default();
            jobs.push((
                DeliveryJob {
                    tenant_id: item.tenant_id,
                    delivery_id: item.delivery_id,
                },
                delay,
            ));
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
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::conformance::{new_event, save, subscription, tenant, ts};
    use crate::ports::{FakeClock, QueueError};
    use crate::sqlite::SqliteStore;

    #[derive(Default)]
    struct Jobs(Mutex<Vec<DeliveryJob>>);

    impl DeliveryQueue for Jobs {
        fn max_delay(&self) -> Duration {
            Duration::from_secs(900)
        }
        async fn enqueue(&self, jobs: Vec<(DeliveryJob, Duration)>) -> Result<(), QueueError> {
            self.0
                .lock()
                .unwrap()
                .extend(jobs.into_iter().map(|(j, _)| j));
            Ok(())
        }
    }

    struct Answers200;

    impl HttpSender for Answers200 {
        async fn send(&self, _request: OutboundRequest) -> SendOutcome {
            SendOutcome::Response {
                status: 200,
                retry_after: None,
                body_snippet: String::new(),
                latency: Duration::from_millis(1),
            }
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
        app.store.insert_event(&new).await.unwrap();
        let created = new.deliveries[0].clone();

        // A worker leases it a second in, then dies without a word.
        let taken = created.leased(ts(1_000), "worker".into(), lease).unwrap();
        let taken = save(&app.store, &created, taken).await;
        assert_eq!(taken.due_at, created.due_at, "the lease kept the due time");

        // Due (created + grace) while the lease still runs: left alone, not even written.
        clock.set(
            ts(0)
                .saturating_add(grace)
                .saturating_add(Duration::from_millis(500)),
        );
        let report = app.sweep_due().await.unwrap();
        assert_eq!((report.found, report.in_flight, report.enqueued), (1, 1, 0));
        assert!(!report.more_may_be_due(1), "no progress: no second round");
        let now = app.store.get_delivery(&a, &created.id).await.unwrap();
        assert_eq!(now.as_ref(), Some(&taken));
        assert!(app.queue.0.lock().unwrap().is_empty());

        // The lease ran out: the sweep takes it and the job delivers it.
        clock.set(
            ts(1_000)
                .saturating_add(lease)
                .saturating_add(Duration::from_millis(1)),
        );
        let report = app.sweep_due().await.unwrap();
        assert_eq!((report.found, report.in_flight, report.enqueued), (1, 0, 1));
        let job = app.queue.0.lock().unwrap().pop().expect("a job");
        assert_eq!(job.delivery_id, created.id);
        let outcome = app.deliver(&Answers200, &job).await.unwrap();
        assert_eq!(outcome, DeliverOutcome::Delivered);
        let done = app
            .store
            .get_delivery(&a, &created.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.status, DeliveryStatus::Succeeded);
        assert_eq!(done.due_at, None);
    }
}
