//! Queue messages as a use case: what the `deliver` function does with each record of an SQS
//! batch, independent of Lambda (the handler only maps the event to [`QueueMessage`]s and the
//! returned ids to `batchItemFailures`).
//!
//! Two queues trigger it, and a record is one of three kinds:
//!
//! | kind | message attributes (String) | body |
//! | --- | --- | --- |
//! | delivery job (from [`SqsQueue`](super::sqs::SqsQueue)) | `tidings-kind` = `delivery-job` | `{"tenantId":"…","deliveryId":"dlv_…"}` |
//! | fan-out job (from [`SqsQueue`](super::sqs::SqsQueue)) | `tidings-kind` = `fan-out` | `{"tenantId":"…","eventId":"…","recovery":true?}` |
//! | producer event (the "events" queue) | no `tidings-kind`; `tenant` (required); `idempotency-key` (optional); `tidings-original-message-id` and `tidings-original-sent-at` (set by a redrive, see below) | the `POST /events` JSON: `{"eventType","data","eventId"?,"occurredAt"?}` |
//!
//! A producer event without `idempotency-key` is deduplicated by its `eventId`. Without one, its
//! event id is derived from the SQS message id and send time ([`EventId::for_message`]), so SQS's
//! own redeliveries of one message name the same event and never publish twice, and the store needs
//! no separate idempotency item (a transaction's worth of writes) to tell. A move to the DLQ keeps
//! both (standard queues), but a redrive out of it does not: SQS's redrive (`StartMessageMoveTask`)
//! sends a new message with a new id and send time. So the events DLQ is redriven by copying each
//! message with its original id and `SentTimestamp` in the attributes
//! [`ORIGINAL_MESSAGE_ID_ATTRIBUTE`] and [`ORIGINAL_SENT_AT_ATTRIBUTE`] (docs/producers.md has the
//! script), and the id is derived from those when present. A record that cannot be
//! handled is reported back (so it returns to its queue, and the queue's redrive policy moves a
//! malformed one to the DLQ after `maxReceiveCount` receives); it never affects the other records.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tracing::Instrument as _;

use crate::app::{App, AppError, DeliverOutcome, FanOutReport, PublishRequest, Published};
use crate::concurrency::join_bounded;
use crate::domain::{EventId, IdError, Subscription, TenantId, Timestamp};
use crate::input::Problem;
use crate::input::body::parse_publish;
use crate::ports::{Clock, DeliveryJob, DeliveryQueue, FanOutJob, Job, Store, StoreError};
use crate::sender::HttpSender;

/// Message attribute naming what a message is; absent on producer events.
pub const KIND_ATTRIBUTE: &str = "tidings-kind";
/// [`KIND_ATTRIBUTE`] of a delivery job.
pub const DELIVERY_JOB_KIND: &str = "delivery-job";
/// [`KIND_ATTRIBUTE`] of a fan-out job.
pub const FAN_OUT_JOB_KIND: &str = "fan-out";
/// Message attribute of a producer event: the tenant it is published for.
pub const TENANT_ATTRIBUTE: &str = "tenant";
/// Optional message attribute of a producer event: its idempotency key.
pub const IDEMPOTENCY_KEY_ATTRIBUTE: &str = "idempotency-key";
/// Message attribute of a redriven producer event: the SQS message id it was first sent with.
pub const ORIGINAL_MESSAGE_ID_ATTRIBUTE: &str = "tidings-original-message-id";
/// Message attribute of a redriven producer event: its first `SentTimestamp` (epoch ms).
pub const ORIGINAL_SENT_AT_ATTRIBUTE: &str = "tidings-original-sent-at";

/// One queue record, as any queue trigger delivers it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueMessage {
    pub message_id: String,
    pub body: String,
    /// The message attributes with a string value.
    pub attributes: HashMap<String, String>,
    /// When the queue received the message (SQS's `SentTimestamp`, epoch milliseconds; 0 when
    /// unknown): the time part of an event id derived from the message.
    pub sent_at_ms: u64,
    /// The record came from the deliveries queue, the one Tidings sends its jobs to. Jobs are
    /// taken from there only: whoever may send to the events queue (any producer) cannot send a
    /// job for another tenant's delivery or event.
    pub from_jobs_queue: bool,
}

/// What a record asks for.
#[derive(Debug)]
pub enum Message {
    Deliver(DeliveryJob),
    FanOut(FanOutJob),
    Publish {
        tenant: TenantId,
        request: PublishRequest,
        idempotency_key: Option<String>,
    },
}

/// Why a record is not a valid message. Retrying will not help: it ends in the DLQ.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("unknown `{KIND_ATTRIBUTE}` attribute `{0}`")]
    UnknownKind(String),
    #[error(
        "a `{KIND_ATTRIBUTE}` = `{0}` message on the events queue: jobs are taken from the deliveries queue only"
    )]
    JobOutsideJobsQueue(String),
    #[error("the job body is invalid: {0}")]
    BadJob(#[source] serde_json::Error),
    #[error("the event message has no `{TENANT_ATTRIBUTE}` attribute")]
    MissingTenant,
    #[error("the `{TENANT_ATTRIBUTE}` attribute is invalid: {0}")]
    BadTenant(#[source] IdError),
    #[error("the event body is invalid: {}", .0.detail)]
    BadEvent(Problem),
    #[error(
        "`{ORIGINAL_MESSAGE_ID_ATTRIBUTE}` needs `{ORIGINAL_SENT_AT_ATTRIBUTE}` (epoch milliseconds) beside it"
    )]
    BadOriginal,
}

impl MessageError {
    /// The field or attribute at fault, if one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::UnknownKind(_) | Self::JobOutsideJobsQueue(_) => Some(KIND_ATTRIBUTE),
            Self::MissingTenant | Self::BadTenant(_) => Some(TENANT_ATTRIBUTE),
            Self::BadEvent(p) => p.field.as_deref(),
            Self::BadOriginal => Some(ORIGINAL_SENT_AT_ATTRIBUTE),
            Self::BadJob(_) => None,
        }
    }
}

impl Message {
    pub fn parse(message: &QueueMessage) -> Result<Self, MessageError> {
        let kind = message.attributes.get(KIND_ATTRIBUTE).map(String::as_str);
        if let Some(kind) = kind
            && !message.from_jobs_queue
        {
            return Err(MessageError::JobOutsideJobsQueue(kind.to_owned()));
        }
        match kind {
            Some(DELIVERY_JOB_KIND) => serde_json::from_str(&message.body)
                .map(Self::Deliver)
                .map_err(MessageError::BadJob),
            Some(FAN_OUT_JOB_KIND) => serde_json::from_str(&message.body)
                .map(Self::FanOut)
                .map_err(MessageError::BadJob),
            Some(other) => Err(MessageError::UnknownKind(other.to_owned())),
            None => {
                let tenant = message
                    .attributes
                    .get(TENANT_ATTRIBUTE)
                    .ok_or(MessageError::MissingTenant)?;
                let tenant = TenantId::parse(tenant).map_err(MessageError::BadTenant)?;
                let mut request =
                    parse_publish(message.body.as_bytes()).map_err(MessageError::BadEvent)?;
                let idempotency_key = message.attributes.get(IDEMPOTENCY_KEY_ATTRIBUTE).cloned();
                if idempotency_key.is_none() && request.event_id.is_none() {
                    let (sent_at_ms, message_id) = first_identity(message)?;
                    request.event_id = Some(EventId::for_message(sent_at_ms, message_id));
                }
                Ok(Self::Publish {
                    tenant,
                    request,
                    idempotency_key,
                })
            }
        }
    }
}

/// The send time and id of the message as it was first sent: from the redrive attributes when
/// present, else the message's own.
fn first_identity(message: &QueueMessage) -> Result<(u64, &str), MessageError> {
    match message.attributes.get(ORIGINAL_MESSAGE_ID_ATTRIBUTE) {
        None => Ok((message.sent_at_ms, &message.message_id)),
        Some(id) => {
            let sent_at = message
                .attributes
                .get(ORIGINAL_SENT_AT_ATTRIBUTE)
                .and_then(|t| t.trim().parse().ok())
                .ok_or(MessageError::BadOriginal)?;
            Ok((sent_at, id))
        }
    }
}

/// What handling a record came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    Delivered(DeliverOutcome),
    FannedOut(FanOutReport),
    /// A producer's event, stored and (when new) fanned out at once.
    Published(Published, Option<FanOutReport>),
}

/// Why a record must come back.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not a valid message; it will fail the same way until the DLQ takes it.
    #[error(transparent)]
    Malformed(#[from] MessageError),
    /// A valid message the use case refused (e.g. `data` too large).
    #[error("event refused: {0}")]
    Refused(#[source] AppError),
    /// The store failed; a later receive may succeed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<AppError> for RecordError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Store(e) => Self::Store(e),
            other => Self::Refused(other),
        }
    }
}

/// Handles one record: a delivery job is attempted, a producer event is published.
pub async fn handle_message<S, Q, C, H>(
    app: &App<S, Q, C>,
    sender: &H,
    message: &QueueMessage,
) -> Result<Handled, RecordError>
where
    S: Store,
    Q: DeliveryQueue,
    C: Clock,
    H: HttpSender,
{
    let (handled, jobs) =
        handle_message_deferred(app, sender, message, &HashMap::new(), None).await?;
    app.send_jobs(jobs).await;
    Ok(handled)
}

/// The subscriptions of the tenants whose events a batch publishes, read once for the batch
/// (fan-out's read is the one access that concentrates on a tenant's partition; docs/scaling.md).
/// A tenant whose read fails is left out: its records read for themselves.
async fn subscriptions_of<S, Q, C>(
    app: &App<S, Q, C>,
    messages: &[QueueMessage],
) -> HashMap<TenantId, Vec<Subscription>>
where
    S: Store,
    Q: DeliveryQueue,
    C: Clock,
{
    let tenants = messages
        .iter()
        .filter_map(|m| match Message::parse(m) {
            Ok(Message::Publish { tenant, .. }) => Some(tenant),
            Ok(Message::FanOut(job)) => Some(job.tenant_id),
            _ => None,
        })
        .collect();
    read_subscriptions(app, tenants).await
}

/// The subscriptions of each of `tenants`, one read each; a tenant whose read fails is left out
/// (its fan-outs read for themselves).
pub(super) async fn read_subscriptions<S, Q, C>(
    app: &App<S, Q, C>,
    tenants: BTreeSet<TenantId>,
) -> HashMap<TenantId, Vec<Subscription>>
where
    S: Store,
    Q: DeliveryQueue,
    C: Clock,
{
    let reads = tenants.into_iter().map(|tenant| async move {
        let read = app.store.tenant_subscriptions(&tenant).await;
        (tenant, read)
    });
    let mut found = HashMap::new();
    for (tenant, read) in join_bounded(reads, SUBSCRIPTION_READS_AT_ONCE).await {
        match read {
            Ok(subscriptions) => {
                found.insert(tenant, subscriptions);
            }
            Err(e) => tracing::warn!(error = %e, %tenant, "could not read the subscriptions"),
        }
    }
    found
}

/// Tenants whose subscriptions one batch reads at once.
const SUBSCRIPTION_READS_AT_ONCE: usize = 8;

/// [`handle_message`], leaving the jobs it makes to the caller: a published event's delivery
/// jobs, and a job that arrived before its delivery is due, again with the time left.
async fn handle_message_deferred<S, Q, C, H>(
    app: &App<S, Q, C>,
    sender: &H,
    message: &QueueMessage,
    subscriptions: &HashMap<TenantId, Vec<Subscription>>,
    deadline: Option<Timestamp>,
) -> Result<(Handled, Vec<(Job, Duration)>), RecordError>
where
    S: Store,
    Q: DeliveryQueue,
    C: Clock,
    H: HttpSender,
{
    match Message::parse(message)? {
        Message::Deliver(job) => {
            let outcome = app.deliver(sender, &job).await?;
            let mut jobs = Vec::new();
            if let DeliverOutcome::NotDue(at) = outcome {
                // Early (clock skew between SQS and this function, or a stale duplicate): the job
                // goes back with the time left, as locally. Past the queue's longest delay the
                // sweep sends it when it is due, from its due time in the store.
                let left = app.clock.now().until(at);
                if left <= app.queue.max_delay() {
                    jobs.push((job.into(), left));
                }
            }
            Ok((Handled::Delivered(outcome), jobs))
        }
        Message::FanOut(job) => {
            let subs = subscriptions.get(&job.tenant_id).map(Vec::as_slice);
            let report = fan_out_or_leave_it_owed(app, sender, &job, subs, deadline).await?;
            Ok((Handled::FannedOut(report), Vec::new()))
        }
        Message::Publish {
            tenant,
            request,
            idempotency_key,
        } => {
            let read;
            let subs = match subscriptions.get(&tenant) {
                Some(subs) => subs.as_slice(),
                None => {
                    read = app
                        .store
                        .tenant_subscriptions(&tenant)
                        .await
                        .map_err(RecordError::Store)?;
                    read.as_slice()
                }
            };
            let (published, event) = app
                .accept_event_to_fan_out(&tenant, subs, request, idempotency_key)
                .await?;
            // Fanned out here and now, while SQS holds the message: no trip through the
            // deliveries queue for a first attempt, and nothing for the store to keep owed.
            // Should this fail or die half-way, the message comes back, finds its event stored,
            // and runs a recovery of it, which leaves the deliveries made alone. (A repeated
            // event id or idempotency key runs that recovery too: whether an earlier receive
            // finished cannot be told, and it costs a read per subscription.)
            let job = FanOutJob {
                tenant_id: tenant,
                event_id: published.event_id.clone(),
                recovery: event.is_none(),
                untracked: true,
            };
            let report = match &event {
                Some(event) => {
                    app.fan_out_event(sender, event, &job, Some(subs), deadline)
                        .await?
                }
                None => app.fan_out(sender, &job, Some(subs), deadline).await?,
            };
            Ok((Handled::Published(published, Some(report)), Vec::new()))
        }
    }
}

/// Fans an event out. A failure (the store, half-way) is logged, not returned: the message is
/// done with all the same, since the event still owes its fan-out and the sweep sends a recovery
/// for it, which leaves the deliveries made alone (sending the message back instead would run
/// this fan-out again from the start, sending to every subscription once more). A fan-out the
/// store does not keep owed has no such net: its failure sends the message back.
async fn fan_out_or_leave_it_owed<S, Q, C, H>(
    app: &App<S, Q, C>,
    sender: &H,
    job: &FanOutJob,
    subscriptions: Option<&[Subscription]>,
    deadline: Option<Timestamp>,
) -> Result<FanOutReport, StoreError>
where
    S: Store,
    Q: DeliveryQueue,
    C: Clock,
    H: HttpSender,
{
    match app.fan_out(sender, job, subscriptions, deadline).await {
        Ok(report) => Ok(report),
        // The job is the only record: handed on as a recovery (which leaves the deliveries made
        // alone), or, should that send fail too, the message comes back.
        Err(e) if job.untracked => {
            let recovery = FanOutJob {
                recovery: true,
                ..job.clone()
            };
            match app
                .queue
                .enqueue(vec![(recovery.into(), Duration::ZERO)])
                .await
            {
                Ok(()) => {
                    tracing::warn!(error = %e, event = %job.event_id, "fan-out failed; handed on as a recovery");
                    Ok(FanOutReport::default())
                }
                Err(queue) => {
                    tracing::warn!(error = %e, %queue, event = %job.event_id, "fan-out failed and could not be handed on; the message comes back");
                    Err(e)
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, event = %job.event_id, "fan-out failed; the sweep recovers it once overdue");
            Ok(FanOutReport::default())
        }
    }
}

/// Handles every record, at most `concurrency` at a time, each in its own span; returns the ids
/// of the messages that must come back (SQS `batchItemFailures`). One bad record never fails
/// the others. The delivery jobs of the events published from the batch, and the early jobs
/// sent back, go out together at the end (one `SendMessageBatch` per 10 instead of one per
/// record: a tenth of the SQS requests).
pub async fn process_messages<S, Q, C, H>(
    app: &App<S, Q, C>,
    sender: &H,
    messages: Vec<QueueMessage>,
    concurrency: usize,
    deadline: Option<Timestamp>,
) -> Vec<String>
where
    S: Store,
    Q: DeliveryQueue,
    C: Clock,
    H: HttpSender,
{
    let subscriptions = subscriptions_of(app, &messages).await;
    let subscriptions = &subscriptions;
    let records = messages.into_iter().map(|message| {
        let span = tracing::info_span!("record", message_id = %message.message_id);
        async move {
            match handle_message_deferred(app, sender, &message, subscriptions, deadline).await {
                Ok((handled, jobs)) => {
                    log_handled(&handled);
                    Ok(jobs)
                }
                Err(e) => {
                    log_failure(&e);
                    Err(message.message_id)
                }
            }
        }
        .instrument(span)
    });
    let mut jobs = Vec::new();
    let mut failed = Vec::new();
    for result in join_bounded(records, concurrency).await {
        match result {
            Ok(more) => jobs.extend(more),
            Err(message_id) => failed.push(message_id),
        }
    }
    app.send_jobs(jobs).await;
    failed
}

fn log_handled(handled: &Handled) {
    match handled {
        Handled::Delivered(DeliverOutcome::NotDue(at)) => {
            tracing::info!(due = %at, "job arrived before its delivery is due; sent back for then (the sweep's, if beyond the queue's longest delay)")
        }
        Handled::Delivered(outcome) => tracing::debug!(?outcome, "job handled"),
        Handled::FannedOut(r) => tracing::debug!(?r, "fan-out job handled"),
        Handled::Published(p, _) => tracing::info!(
            event = %p.event_id,
            created = p.created,
            deliveries = p.deliveries,
            "event from the queue published"
        ),
    }
}

fn log_failure(e: &RecordError) {
    match e {
        RecordError::Malformed(m) => tracing::error!(
            error = %m,
            field = m.field(),
            "malformed message; it returns to the queue and ends in the dead-letter queue"
        ),
        RecordError::Refused(_) => tracing::error!(
            error = %e,
            "event refused; it returns to the queue and ends in the dead-letter queue"
        ),
        RecordError::Store(_) => tracing::warn!(error = %e, "store failed; the message comes back"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::app::AppConfig;
    use crate::domain::{
        ApiKeyRecord, CallbackUrl, Delivery, DeliveryId, Event, EventId, EventTypePattern, Secret,
        Subscription, SubscriptionId, SubscriptionStatus, Timestamp,
    };
    use crate::ports::{
        DueDelivery, DueFanOut, FakeClock, InsertOutcome, NewEvent, Page, PageRequest, QueueError,
        StoreResult,
    };
    use crate::sender::{OutboundRequest, SendOutcome};

    // ---- fakes: just enough of a store, a queue and a receiver ----

    #[derive(Default)]
    struct MemStore {
        inner: Mutex<Mem>,
    }

    #[derive(Default)]
    struct Mem {
        subscriptions: Vec<Subscription>,
        events: Vec<(Event, Option<String>)>,
        deliveries: HashMap<DeliveryId, Delivery>,
        /// `get_delivery` of these fails as if the store were down.
        unavailable: Vec<DeliveryId>,
        /// Events whose fan-out is done.
        fanned_out: Vec<EventId>,
        /// `insert_delivery` fails as if the store were down.
        inserts_fail: bool,
    }

    impl MemStore {
        fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
            self.inner.lock().unwrap()
        }
    }

    impl Store for MemStore {
        async fn put_api_key(&self, _key: &ApiKeyRecord) -> StoreResult<()> {
            Ok(())
        }
        async fn tenant_for_api_key(&self, _key_hash: &str) -> StoreResult<Option<TenantId>> {
            Ok(None)
        }
        async fn insert_subscription(&self, s: &Subscription) -> StoreResult<()> {
            self.mem().subscriptions.push(s.clone());
            Ok(())
        }
        async fn get_subscription(
            &self,
            tenant: &TenantId,
            id: &SubscriptionId,
        ) -> StoreResult<Option<Subscription>> {
            Ok(self
                .mem()
                .subscriptions
                .iter()
                .find(|s| &s.tenant_id == tenant && &s.id == id)
                .cloned())
        }
        async fn list_subscriptions(
            &self,
            _tenant: &TenantId,
            _page: &PageRequest,
        ) -> StoreResult<Page<Subscription>> {
            Ok(Page {
                items: Vec::new(),
                next: None,
            })
        }
        async fn update_subscription(&self, _s: &Subscription, _v: u64) -> StoreResult<()> {
            Ok(())
        }
        async fn delete_subscription(
            &self,
            _tenant: &TenantId,
            _id: &SubscriptionId,
        ) -> StoreResult<()> {
            Ok(())
        }
        async fn tenant_subscriptions(&self, tenant: &TenantId) -> StoreResult<Vec<Subscription>> {
            Ok(self
                .mem()
                .subscriptions
                .iter()
                .filter(|s| &s.tenant_id == tenant)
                .cloned()
                .collect())
        }
        async fn insert_event(&self, new: &NewEvent) -> StoreResult<InsertOutcome> {
            let mut mem = self.mem();
            let seen = mem.events.iter().find(|(e, key)| {
                e.tenant_id == new.event.tenant_id
                    && (e.id == new.event.id || (key.is_some() && *key == new.idempotency_key))
            });
            if let Some((e, _)) = seen {
                return Ok(InsertOutcome::Existing {
                    event_id: e.id.clone(),
                    fingerprint: e.fingerprint.clone(),
                });
            }
            mem.events
                .push((new.event.clone(), new.idempotency_key.clone()));
            Ok(InsertOutcome::Created)
        }
        async fn get_event_for_fan_out(
            &self,
            tenant: &TenantId,
            id: &EventId,
        ) -> StoreResult<Option<(Event, Option<Timestamp>)>> {
            let mem = self.mem();
            let found = mem
                .events
                .iter()
                .map(|(e, _)| e)
                .find(|e| &e.tenant_id == tenant && &e.id == id)
                .cloned();
            let owed = !mem.fanned_out.contains(id);
            Ok(found.map(|e| (e.clone(), owed.then_some(e.received_at))))
        }
        async fn fanned_out(&self, _tenant: &TenantId, id: &EventId) -> StoreResult<()> {
            self.mem().fanned_out.push(id.clone());
            Ok(())
        }
        async fn due_fan_outs(&self, _now: Timestamp, _limit: u32) -> StoreResult<Vec<DueFanOut>> {
            Ok(Vec::new())
        }
        async fn claim_fan_out(&self, _due: &DueFanOut, _next: Timestamp) -> StoreResult<()> {
            Err(StoreError::NotFound)
        }
        async fn insert_delivery(&self, d: &Delivery) -> StoreResult<()> {
            let mut mem = self.mem();
            if mem.inserts_fail {
                return Err(StoreError::unavailable("the fake store is down"));
            }
            if mem.deliveries.contains_key(d.id()) {
                return Err(StoreError::Conflict);
            }
            mem.deliveries.insert(d.id().clone(), d.clone());
            Ok(())
        }
        async fn get_event(&self, tenant: &TenantId, id: &EventId) -> StoreResult<Option<Event>> {
            Ok(self
                .mem()
                .events
                .iter()
                .map(|(e, _)| e)
                .find(|e| &e.tenant_id == tenant && &e.id == id)
                .cloned())
        }
        async fn get_delivery(
            &self,
            tenant: &TenantId,
            id: &DeliveryId,
        ) -> StoreResult<Option<Delivery>> {
            let mem = self.mem();
            if mem.unavailable.contains(id) {
                return Err(StoreError::unavailable("the fake store is down"));
            }
            Ok(mem
                .deliveries
                .get(id)
                .filter(|d| d.tenant_id() == tenant)
                .cloned())
        }
        async fn update_delivery(&self, d: &Delivery, expected_version: u64) -> StoreResult<()> {
            let mut mem = self.mem();
            let current = mem.deliveries.get_mut(d.id()).ok_or(StoreError::NotFound)?;
            if current.version() != expected_version {
                return Err(StoreError::Conflict);
            }
            *current = d.clone();
            Ok(())
        }
        async fn list_deliveries(
            &self,
            _tenant: &TenantId,
            _subscription: &SubscriptionId,
            _page: &PageRequest,
        ) -> StoreResult<Page<Delivery>> {
            Ok(Page {
                items: Vec::new(),
                next: None,
            })
        }
        async fn due_deliveries(
            &self,
            _now: Timestamp,
            _limit: u32,
        ) -> StoreResult<Vec<DueDelivery>> {
            Ok(Vec::new())
        }
        /// Deliveries only: this fake keeps no due times for fan-outs.
        async fn recover_after_restart(&self, now: Timestamp) -> StoreResult<usize> {
            let mut mem = self.mem();
            let mut recovered = 0;
            for d in mem.deliveries.values_mut() {
                if let Some(next) = d.recovered(now) {
                    *d = next;
                    recovered += 1;
                }
            }
            Ok(recovered)
        }
    }

    #[derive(Default)]
    /// The jobs enqueued, and how many enqueue calls brought them.
    struct MemQueue(Mutex<Vec<(Job, Duration)>>, AtomicUsize);

    impl DeliveryQueue for MemQueue {
        fn max_delay(&self) -> Duration {
            Duration::from_secs(900)
        }
        async fn enqueue(&self, jobs: Vec<(Job, Duration)>) -> Result<(), QueueError> {
            self.0.lock().unwrap().extend(jobs);
            self.1.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// Answers 200 and counts requests.
    #[derive(Default)]
    struct OkReceiver(Mutex<Vec<OutboundRequest>>);

    impl HttpSender for OkReceiver {
        async fn send(&self, request: OutboundRequest) -> SendOutcome {
            self.0.lock().unwrap().push(request);
            SendOutcome::Response {
                status: 200,
                retry_after: None,
                body_snippet: String::new(),
                latency: Duration::from_millis(1),
            }
        }
    }

    type TestApp = App<MemStore, MemQueue, FakeClock>;

    fn tenant() -> TenantId {
        TenantId::parse("acme").unwrap()
    }

    async fn app_with_subscription() -> TestApp {
        let now = Timestamp::parse("2026-01-02T03:04:05Z").unwrap();
        let app = App::new(
            MemStore::default(),
            MemQueue::default(),
            FakeClock::at(now),
            AppConfig::default(),
        );
        app.store
            .insert_subscription(&Subscription {
                id: SubscriptionId::generate(),
                tenant_id: tenant(),
                event_types: vec![EventTypePattern::parse("order.*").unwrap()],
                callback_url: CallbackUrl::parse("https://receiver.example/hook").unwrap(),
                secret: Secret::generate(),
                description: String::new(),
                status: SubscriptionStatus::Active,
                created_at: now,
                updated_at: now,
                version: 0,
            })
            .await
            .unwrap();
        app
    }

    fn event_message(id: &str, body: &str, attributes: &[(&str, &str)]) -> QueueMessage {
        QueueMessage {
            message_id: id.to_owned(),
            body: body.to_owned(),
            attributes: attributes
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            sent_at_ms: 1_764_000_000_000,
            from_jobs_queue: false,
        }
    }

    /// A message on the deliveries queue.
    fn on_jobs_queue(message: QueueMessage) -> QueueMessage {
        QueueMessage {
            from_jobs_queue: true,
            ..message
        }
    }

    fn job_message(id: &str, job: &DeliveryJob) -> QueueMessage {
        on_jobs_queue(event_message(
            id,
            &serde_json::to_string(job).unwrap(),
            &[(KIND_ATTRIBUTE, DELIVERY_JOB_KIND)],
        ))
    }

    const ORDER: &str = r#"{"eventType":"order.created","data":{"id":1}}"#;

    // ---- classification ----

    #[test]
    fn messages_are_classified_by_the_kind_attribute() {
        let job = DeliveryJob {
            tenant_id: tenant(),
            delivery_id: DeliveryId::generate(),
        };
        match Message::parse(&job_message("m1", &job)).unwrap() {
            Message::Deliver(parsed) => assert_eq!(parsed, job),
            other => panic!("expected a job, got {other:?}"),
        }
        let m = event_message(
            "m2",
            ORDER,
            &[
                ("tenant", "acme"),
                ("idempotency-key", "k-1"),
                ("other", "x"),
            ],
        );
        match Message::parse(&m).unwrap() {
            Message::Publish {
                tenant: t,
                request,
                idempotency_key,
            } => {
                assert_eq!(t, tenant());
                assert_eq!(request.event_type.as_str(), "order.created");
                assert_eq!(request.data.get(), r#"{"id":1}"#);
                assert_eq!(idempotency_key.as_deref(), Some("k-1"));
            }
            other => panic!("expected an event, got {other:?}"),
        }
        // Without a key or an eventId, the event id comes from the message: every receive of
        // it publishes the same event.
        let m = event_message("m3", ORDER, &[("tenant", "acme")]);
        match Message::parse(&m).unwrap() {
            Message::Publish {
                idempotency_key,
                request,
                ..
            } => {
                assert_eq!(idempotency_key, None);
                assert_eq!(
                    request.event_id,
                    Some(EventId::for_message(m.sent_at_ms, "m3"))
                );
            }
            other => panic!("expected an event, got {other:?}"),
        }
        let with_id = event_message(
            "m4",
            r#"{"eventType":"order.created","eventId":"e-1","data":1}"#,
            &[("tenant", "acme")],
        );
        assert!(matches!(
            Message::parse(&with_id).unwrap(),
            Message::Publish {
                idempotency_key: None,
                ..
            }
        ));
    }

    #[test]
    fn malformed_messages_name_the_problem() {
        let cases: [(QueueMessage, Option<&str>); 8] = [
            (event_message("a", ORDER, &[]), Some("tenant")),
            (event_message("b", ORDER, &[("tenant", "")]), Some("tenant")),
            (event_message("c", "{nope", &[("tenant", "acme")]), None),
            (
                event_message(
                    "d",
                    r#"{"eventType":"order.created"}"#,
                    &[("tenant", "acme")],
                ),
                Some("data"),
            ),
            (
                event_message(
                    "e",
                    r#"{"eventType":"order..x","data":1}"#,
                    &[("tenant", "acme")],
                ),
                Some("eventType"),
            ),
            (
                on_jobs_queue(event_message(
                    "f",
                    ORDER,
                    &[(KIND_ATTRIBUTE, "mystery"), ("tenant", "acme")],
                )),
                Some(KIND_ATTRIBUTE),
            ),
            (
                on_jobs_queue(event_message(
                    "g",
                    ORDER,
                    &[(KIND_ATTRIBUTE, DELIVERY_JOB_KIND)],
                )),
                None,
            ),
            // A producer's job, for any tenant's delivery: refused on the events queue.
            (
                event_message(
                    "h",
                    r#"{"tenantId":"other","deliveryId":"dlv_x"}"#,
                    &[(KIND_ATTRIBUTE, DELIVERY_JOB_KIND)],
                ),
                Some(KIND_ATTRIBUTE),
            ),
        ];
        for (message, field) in cases {
            let e = Message::parse(&message).unwrap_err();
            assert_eq!(e.field(), field, "{}: {e}", message.message_id);
        }
    }

    // ---- processing ----

    #[tokio::test]
    async fn events_are_published_and_bad_records_alone_come_back() {
        let app = app_with_subscription().await;
        let receiver = OkReceiver::default();
        let messages = vec![
            event_message("good-1", ORDER, &[("tenant", "acme")]),
            event_message("no-tenant", ORDER, &[]),
            event_message("bad-json", "{", &[("tenant", "acme")]),
            event_message(
                "good-2",
                r#"{"eventType":"order.paid","data":[],"eventId":"evt_producer-7"}"#,
                &[("tenant", "acme")],
            ),
            event_message(
                "bad-key",
                ORDER,
                &[("tenant", "acme"), ("idempotency-key", "")],
            ),
            event_message(
                "good-3",
                r#"{"eventType":"user.x","data":null}"#,
                &[("tenant", "acme")],
            ),
        ];
        let mut failed = process_messages(&app, &receiver, messages, 2, None).await;
        failed.sort();
        assert_eq!(failed, ["bad-json", "bad-key", "no-tenant"]);

        let mem = app.store.mem();
        assert_eq!(mem.events.len(), 3);
        assert!(
            mem.events
                .iter()
                .any(|(e, _)| e.id.as_str() == "evt_producer-7"),
            "the producer's eventId is kept"
        );
        // order.created and order.paid match the subscription; user.x does not. They are
        // fanned out where they were received: delivered, no job through the deliveries queue.
        assert_eq!(mem.deliveries.len(), 2);
        assert!(
            mem.deliveries
                .values()
                .all(|d| d.status().as_str() == "succeeded")
        );
        assert_eq!(receiver.0.lock().unwrap().len(), 2);
        assert!(app.queue.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_repeated_event_id_or_idempotency_key_publishes_once() {
        let app = app_with_subscription().await;
        let receiver = OkReceiver::default();
        let with_id = r#"{"eventType":"order.paid","data":1,"eventId":"evt_same"}"#;
        let messages = vec![
            event_message("1", with_id, &[("tenant", "acme")]),
            event_message("2", with_id, &[("tenant", "acme")]),
            event_message("3", ORDER, &[("tenant", "acme"), ("idempotency-key", "k")]),
            event_message("4", ORDER, &[("tenant", "acme"), ("idempotency-key", "k")]),
            // No key and no eventId: two SQS messages are two events, and SQS's redelivery of
            // one message (same id, same send time) is the same event.
            event_message("5", ORDER, &[("tenant", "acme")]),
            event_message("6", ORDER, &[("tenant", "acme")]),
            event_message("6", ORDER, &[("tenant", "acme")]),
        ];
        // One at a time, so the duplicates see the first insert.
        assert!(
            process_messages(&app, &receiver, messages, 1, None)
                .await
                .is_empty()
        );
        assert_eq!(app.store.mem().events.len(), 4);
    }

    #[tokio::test]
    async fn jobs_are_delivered_and_store_failures_come_back() {
        let app = app_with_subscription().await;
        let receiver = OkReceiver::default();
        let published = handle_message(
            &app,
            &receiver,
            &event_message("e", ORDER, &[("tenant", "acme")]),
        )
        .await
        .unwrap();
        assert!(matches!(
            published,
            Handled::Published(
                Published { deliveries: 1, .. },
                Some(FanOutReport {
                    created: 1,
                    delivered: 1,
                    ..
                })
            )
        ));
        assert_eq!(receiver.0.lock().unwrap().len(), 1, "sent at once");
        assert!(
            app.queue.0.lock().unwrap().is_empty(),
            "a first attempt takes no trip through the deliveries queue"
        );
        let made = app.store.mem().deliveries.values().next().unwrap().clone();
        assert_eq!(made.status().as_str(), "succeeded");
        let job = DeliveryJob {
            tenant_id: tenant(),
            delivery_id: made.id().clone(),
        };

        let down = DeliveryJob {
            tenant_id: tenant(),
            delivery_id: DeliveryId::generate(),
        };
        app.store.mem().unavailable.push(down.delivery_id.clone());
        let unknown = DeliveryJob {
            tenant_id: tenant(),
            delivery_id: DeliveryId::generate(),
        };
        let messages = vec![
            job_message("job", &job),
            job_message("down", &down),
            job_message("unknown", &unknown),
            event_message("bad-job", "{}", &[(KIND_ATTRIBUTE, DELIVERY_JOB_KIND)]),
        ];
        let mut failed = process_messages(&app, &receiver, messages, 16, None).await;
        failed.sort();
        assert_eq!(failed, ["bad-job", "down"]);

        // A job for a finished delivery (a duplicate: SQS is at-least-once) sends nothing.
        let again = handle_message(&app, &receiver, &job_message("dup", &job))
            .await
            .unwrap();
        assert_eq!(
            again,
            Handled::Delivered(DeliverOutcome::Skipped("already final"))
        );
        assert_eq!(receiver.0.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_fan_out_that_fails_half_way_comes_back_and_its_next_receive_recovers_it() {
        let app = app_with_subscription().await;
        let receiver = OkReceiver::default();
        let message = event_message("e", ORDER, &[("tenant", "acme")]);
        app.store.mem().inserts_fail = true;
        let failed = process_messages(&app, &receiver, vec![message.clone()], 1, None).await;
        // The message is the fan-out's only record: it must come back.
        assert_eq!(failed, ["e"]);
        {
            let mem = app.store.mem();
            assert_eq!(mem.events.len(), 1, "the event is stored");
            assert!(mem.deliveries.is_empty());
            assert!(
                mem.fanned_out.is_empty(),
                "nothing is marked: the store keeps no owed fan-out for it"
            );
        }

        // SQS hands it over again: same message, same event; a recovery makes the delivery.
        app.store.mem().inserts_fail = false;
        let failed = process_messages(&app, &receiver, vec![message.clone()], 1, None).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(app.store.mem().events.len(), 1, "published once");
        assert_eq!(app.store.mem().deliveries.len(), 1);
        let sent = receiver.0.lock().unwrap().clone();
        assert_eq!(
            sent.len(),
            2,
            "the first try's POST went out before its write failed"
        );
        assert_eq!(
            sent[0].headers, sent[1].headers,
            "sent again under the same webhook-id"
        );

        // A third receive (SQS is at least once) leaves the delivery made alone.
        let failed = process_messages(&app, &receiver, vec![message], 1, None).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(receiver.0.lock().unwrap().len(), 2, "nothing sent again");
    }

    fn early_delivery(app: &TestApp, due_in: Duration) -> DeliveryJob {
        let now = app.clock.now();
        // The schedule's first entry delays its first attempt by `due_in`.
        let d = Delivery::new(
            tenant(),
            EventId::generate(),
            now,
            SubscriptionId::generate(),
            now,
            due_in,
            Duration::from_secs(60),
        );
        let job = DeliveryJob {
            tenant_id: tenant(),
            delivery_id: d.id().clone(),
        };
        app.store.mem().deliveries.insert(d.id().clone(), d);
        job
    }

    #[tokio::test]
    async fn a_job_that_arrives_early_is_sent_back_with_the_batch_for_the_time_left() {
        let app = app_with_subscription().await;
        let receiver = OkReceiver::default();
        let soon = early_delivery(&app, Duration::from_secs(30));
        let at_the_limit = early_delivery(&app, Duration::from_secs(900));
        let beyond = early_delivery(&app, Duration::from_secs(901));
        let messages = vec![
            job_message("soon", &soon),
            job_message("at-the-limit", &at_the_limit),
            job_message("beyond", &beyond),
            event_message("event", ORDER, &[("tenant", "acme")]),
        ];
        assert!(
            process_messages(&app, &receiver, messages, 4, None)
                .await
                .is_empty()
        );
        assert_eq!(
            receiver.0.lock().unwrap().len(),
            1,
            "the event's delivery only: nothing is sent early"
        );
        let sent = app.queue.0.lock().unwrap().clone();
        assert_eq!(
            app.queue.1.load(Ordering::Relaxed),
            1,
            "the early jobs go out together, in one enqueue"
        );
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert!(
            sent.contains(&(soon.into(), Duration::from_secs(30))),
            "{sent:?}"
        );
        assert!(sent.contains(&(at_the_limit.into(), Duration::from_secs(900))));
        // Beyond SQS's 15 minutes the sweep sends it from its due time in the store.
        let beyond = Job::from(beyond);
        assert!(sent.iter().all(|(j, _)| j != &beyond));

        // One record alone (handle_message) sends its early job back too.
        let alone = early_delivery(&app, Duration::from_secs(5));
        let handled = handle_message(&app, &receiver, &job_message("alone", &alone))
            .await
            .unwrap();
        assert!(matches!(
            handled,
            Handled::Delivered(DeliverOutcome::NotDue(_))
        ));
        assert_eq!(
            app.queue.0.lock().unwrap().last(),
            Some(&(alone.into(), Duration::from_secs(5)))
        );
    }

    // ---- redriven producer events ----

    #[test]
    fn a_redriven_event_is_named_by_the_message_it_first_was() {
        let first = event_message("first-id", ORDER, &[("tenant", "acme")]);
        let first_id = EventId::for_message(first.sent_at_ms, "first-id");
        let event_id = |m: &QueueMessage| match Message::parse(m).unwrap() {
            Message::Publish { request, .. } => request.event_id,
            other => panic!("expected an event, got {other:?}"),
        };
        assert_eq!(event_id(&first), Some(first_id.clone()));
        // A redrive sends a copy with a new id and send time, and the first ones as attributes.
        let sent_at = first.sent_at_ms.to_string();
        let redriven = |new_id: &str| {
            let mut m = event_message(
                new_id,
                ORDER,
                &[
                    ("tenant", "acme"),
                    (ORIGINAL_MESSAGE_ID_ATTRIBUTE, "first-id"),
                    (ORIGINAL_SENT_AT_ATTRIBUTE, &sent_at),
                ],
            );
            m.sent_at_ms += 86_400_000;
            m
        };
        assert_eq!(event_id(&redriven("copy-1")), Some(first_id.clone()));
        assert_eq!(event_id(&redriven("copy-2")), Some(first_id));
        // The producer's own eventId still wins.
        let mut with_id = redriven("copy-3");
        with_id.body = r#"{"eventType":"order.created","eventId":"e-1","data":1}"#.into();
        assert_eq!(event_id(&with_id), Some(EventId::parse("e-1").unwrap()));
        // An original id without its send time is refused, naming the missing attribute.
        for bad_time in [None, Some("yesterday")] {
            let mut m = redriven("copy-4");
            match bad_time {
                None => m.attributes.remove(ORIGINAL_SENT_AT_ATTRIBUTE),
                Some(t) => m
                    .attributes
                    .insert(ORIGINAL_SENT_AT_ATTRIBUTE.into(), t.into()),
            };
            let e = Message::parse(&m).unwrap_err();
            assert_eq!(e.field(), Some(ORIGINAL_SENT_AT_ATTRIBUTE), "{e}");
        }
    }

    #[tokio::test]
    async fn a_message_and_its_redriven_copies_publish_once() {
        let app = app_with_subscription().await;
        let receiver = OkReceiver::default();
        let first = event_message("first-id", ORDER, &[("tenant", "acme")]);
        let sent_at = first.sent_at_ms.to_string();
        let copy = |id: &str| {
            event_message(
                id,
                ORDER,
                &[
                    ("tenant", "acme"),
                    (ORIGINAL_MESSAGE_ID_ATTRIBUTE, "first-id"),
                    (ORIGINAL_SENT_AT_ATTRIBUTE, &sent_at),
                ],
            )
        };
        let messages = vec![first, copy("copy-1"), copy("copy-2")];
        assert!(
            process_messages(&app, &receiver, messages, 1, None)
                .await
                .is_empty()
        );
        assert_eq!(app.store.mem().events.len(), 1);
        assert_eq!(app.store.mem().deliveries.len(), 1);
    }
}
