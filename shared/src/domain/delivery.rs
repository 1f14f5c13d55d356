//! A delivery is a state machine that owns its transitions. Every decision (may it be leased,
//! what an attempt's result means, when the sweep should look at it, whether it may be resent)
//! is made here, by pure code over a clock value; the application layer loads a delivery, asks
//! it for the next state, stores that with a version check, and sends what it says to send.
//!
//! | from | on | to |
//! | --- | --- | --- |
//! | [`new`](Delivery::new), in memory (an event's fan-out) | [`leased`](Delivery::leased) | pending, in flight; written once its first attempt is recorded |
//! | pending / retrying | [`leased`](Delivery::leased) | same status, with a lease (in flight) |
//! | in flight | [`recorded`](Delivery::recorded) 2xx | succeeded |
//! | in flight | retryable outcome, attempts left | retrying (next attempt at t) |
//! | in flight | retryable outcome, none left | dead |
//! | in flight | permanent outcome (4xx but 408/429, refused address) | failed |
//! | pending / retrying | [`held`](Delivery::held): subscription paused | held, with a recheck time |
//! | held, recheck due | [`held`](Delivery::held) again: still paused | held, a later recheck |
//! | held | [`released`](Delivery::released): subscription active again | pending |
//! | any unfinished | [`ended`](Delivery::ended): subscription deleted, disabled | failed, with the reason |
//! | succeeded / failed / dead | [`resent`](Delivery::resent) | pending (same id, at most [`MAX_RESENDS`]) |
//!
//! Every transition bumps the version; stores refuse a write whose expected version is stale,
//! so two workers can never both record an outcome for the same lease. What a delivery keeps is
//! bounded: the last [`MAX_KEPT_ATTEMPTS`] attempts (with a count of all), each with a short
//! error and response snippet, and at most [`MAX_RESENDS`] manual resends.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::{DeliveryId, EventId, SubscriptionId, TenantId, Timestamp};
use crate::retry::{self, AttemptClass, NextStep, RetrySchedule};

/// Attempts a delivery keeps in its log; older ones are dropped (the count stays).
pub const MAX_KEPT_ATTEMPTS: usize = 10;
/// Manual resends one delivery accepts.
pub const MAX_RESENDS: u32 = 20;
/// Longest response snippet kept per attempt, in bytes.
pub const MAX_SNIPPET_BYTES: usize = 256;
/// Longest error text kept per attempt (and per reason), in bytes.
pub const MAX_ERROR_BYTES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waiting for its first attempt (or a resend).
    Pending,
    /// An attempt failed and another is scheduled.
    Retrying,
    /// Waiting for its paused subscription to be active again.
    Held,
    /// The receiver answered 2xx.
    Succeeded,
    /// Ended by a permanent failure (a non-retryable status, a refused address), or because its
    /// subscription was deleted or disabled.
    Failed,
    /// Every scheduled attempt failed.
    Dead,
}

impl DeliveryStatus {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Dead)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Retrying => "retrying",
            Self::Held => "held",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
        }
    }
}

/// One HTTP attempt, as the attempt log shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub number: u32,
    pub started_at: Timestamp,
    pub latency_ms: u64,
    pub outcome: AttemptClass,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_snippet: Option<String>,
}

impl Attempt {
    /// The attempt as the log keeps it: texts cut to their caps, control characters (which JSON
    /// would escape to six bytes each) replaced, so a kept attempt has a small, known size.
    fn bounded(mut self) -> Self {
        self.error = self.error.map(|e| bounded_text(&e, MAX_ERROR_BYTES));
        self.response_snippet = self
            .response_snippet
            .map(|s| bounded_text(&s, MAX_SNIPPET_BYTES));
        self
    }
}

/// `text` cut to at most `max` bytes on a character boundary, control characters as spaces.
pub fn bounded_text(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A worker's exclusive, time-bounded claim on a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub token: String,
    pub expires_at: Timestamp,
}

/// What the retry policy needs to decide an attempt's consequence.
#[derive(Debug, Clone, Copy)]
pub struct RetryPlan<'a> {
    pub schedule: &'a RetrySchedule,
    pub jitter_ratio: f64,
    /// A random value in [0, 1) (tests pass a fixed one).
    pub jitter_unit: f64,
    /// How long a queued delivery may take to start before the sweep sends it again.
    pub sweep_grace: Duration,
    /// The longest delay the queue holds a job for.
    pub max_queue_delay: Duration,
}

/// What the caller must do after storing a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowUp {
    /// Nothing: the delivery is finished, or its next attempt is the sweep's to send.
    None,
    /// Enqueue a job for it after this delay.
    Enqueue(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    id: DeliveryId,
    tenant_id: TenantId,
    event_id: EventId,
    subscription_id: SubscriptionId,
    status: DeliveryStatus,
    /// The last [`MAX_KEPT_ATTEMPTS`] attempts.
    attempts: Vec<Attempt>,
    /// Every attempt ever made; stored records written before it existed count their log.
    #[serde(default)]
    attempt_count: u32,
    /// When the next attempt may start; `None` once final or held.
    next_attempt_at: Option<Timestamp>,
    /// When the sweep should look at this delivery: the safety net for lost queue messages and
    /// crashed workers. `None` once final or held (the store's due index is sparse).
    due_at: Option<Timestamp>,
    lease: Option<Lease>,
    /// The attempt count when the current retry round began (a resend starts a new round).
    round_start: u32,
    /// Manual resends so far.
    #[serde(default)]
    resends: u32,
    /// The sweep's claims since a worker last leased it: each one waits twice as long as the
    /// one before, so a queue backlog does not multiply its jobs.
    #[serde(default)]
    claims: u32,
    /// Why the delivery is held, or ended without an attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Bumped by every transition; stores refuse a write whose expected version is stale.
    version: u64,
    created_at: Timestamp,
    updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotLeasable {
    #[error("delivery is already {}", .0.as_str())]
    Final(DeliveryStatus),
    #[error("delivery is held while its subscription is paused")]
    Held,
    #[error("delivery is leased by another worker until {0}")]
    Leased(Timestamp),
    #[error("delivery is not due until {0}")]
    NotDue(Timestamp),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotResendable {
    #[error("delivery is {}; only a finished delivery can be resent", .0.as_str())]
    Unfinished(DeliveryStatus),
    #[error("delivery was resent {MAX_RESENDS} times already")]
    TooManyResends,
}

impl Delivery {
    /// A new delivery of `event_id` to `subscription_id`. Its first attempt may start after
    /// `first_delay` (the retry schedule's first entry); if no queue message starts it within
    /// `grace` after that, the sweep sends one. The id is derived (from the ids and the event's
    /// receive time, as stored), so every path that creates this delivery names the same one.
    pub fn new(
        tenant_id: TenantId,
        event_id: EventId,
        event_received_at: Timestamp,
        subscription_id: SubscriptionId,
        now: Timestamp,
        first_delay: Duration,
        grace: Duration,
    ) -> Self {
        let first = now.saturating_add(first_delay);
        Self {
            id: DeliveryId::derive(&tenant_id, &event_id, &subscription_id, event_received_at),
            tenant_id,
            event_id,
            subscription_id,
            status: DeliveryStatus::Pending,
            attempts: Vec::new(),
            attempt_count: 0,
            next_attempt_at: Some(first),
            due_at: Some(first.saturating_add(grace)),
            lease: None,
            round_start: 0,
            resends: 0,
            claims: 0,
            reason: None,
            version: 0,
            created_at: now,
            updated_at: now,
        }
    }

    pub fn id(&self) -> &DeliveryId {
        &self.id
    }
    pub fn tenant_id(&self) -> &TenantId {
        &self.tenant_id
    }
    pub fn event_id(&self) -> &EventId {
        &self.event_id
    }
    pub fn subscription_id(&self) -> &SubscriptionId {
        &self.subscription_id
    }
    pub fn status(&self) -> DeliveryStatus {
        self.status
    }
    /// The kept attempts, oldest first.
    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }
    /// All attempts ever made, including those no longer kept.
    pub fn attempt_count(&self) -> u32 {
        self.attempt_count.max(self.attempts.len() as u32)
    }
    pub fn resends(&self) -> u32 {
        self.resends
    }
    pub fn next_attempt_at(&self) -> Option<Timestamp> {
        self.next_attempt_at
    }
    pub fn due_at(&self) -> Option<Timestamp> {
        self.due_at
    }
    pub fn current_lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }
    /// The sweep's claims since a worker last took it (each one sent another job).
    pub fn claims(&self) -> u32 {
        self.claims
    }
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }
    pub fn updated_at(&self) -> Timestamp {
        self.updated_at
    }

    /// Attempts made in the current retry round.
    pub fn attempts_in_round(&self) -> u32 {
        self.attempt_count().saturating_sub(self.round_start)
    }

    /// Whether a worker holds a live lease on it at `now`.
    pub fn is_in_flight(&self, now: Timestamp) -> bool {
        self.lease.as_ref().is_some_and(|l| l.expires_at > now)
    }

    /// The next version of this delivery, stamped at `now`.
    fn next(&self, now: Timestamp) -> Self {
        let mut next = self.clone();
        next.version = self.version.saturating_add(1);
        next.updated_at = now;
        next
    }

    /// Claims the delivery for one attempt.
    pub fn leased(
        &self,
        now: Timestamp,
        token: String,
        duration: Duration,
    ) -> Result<Self, NotLeasable> {
        if self.status.is_final() {
            return Err(NotLeasable::Final(self.status));
        }
        if self.status == DeliveryStatus::Held {
            return Err(NotLeasable::Held);
        }
        if let Some(lease) = &self.lease
            && lease.expires_at > now
        {
            return Err(NotLeasable::Leased(lease.expires_at));
        }
        if let Some(at) = self.next_attempt_at
            && at > now
        {
            return Err(NotLeasable::NotDue(at));
        }
        let expires_at = now.saturating_add(duration);
        let mut next = self.next(now);
        next.lease = Some(Lease { token, expires_at });
        next.claims = 0;
        // `due_at` stays: should the worker die, the sweep finds the delivery at its due time and
        // takes it once the lease has run out. Moving it would rewrite the store's due index on
        // every attempt (on DynamoDB, two index writes: a third of a first attempt's units).
        if next.due_at.is_none() {
            next.due_at = Some(expires_at);
        }
        Ok(next)
    }

    /// Appends an attempt to the bounded log.
    fn push_attempt(&mut self, mut attempt: Attempt) {
        let count = self.attempt_count().saturating_add(1);
        attempt.number = count;
        self.attempts.push(attempt.bounded());
        if self.attempts.len() > MAX_KEPT_ATTEMPTS {
            let excess = self.attempts.len() - MAX_KEPT_ATTEMPTS;
            self.attempts.drain(..excess);
        }
        self.attempt_count = count;
    }

    /// Records the attempt the lease holder made and releases the lease: the state the result
    /// leads to, and what the caller must enqueue. `retry_after` is the receiver's `Retry-After`.
    pub fn recorded(
        &self,
        attempt: Attempt,
        retry_after: Option<Duration>,
        plan: &RetryPlan<'_>,
        now: Timestamp,
    ) -> (Self, FollowUp) {
        let class = attempt.outcome;
        let mut next = self.next(now);
        next.push_attempt(attempt);
        next.lease = None;
        next.reason = None;
        let (status, retry_at, due_at, follow_up) = match class {
            AttemptClass::Delivered => (DeliveryStatus::Succeeded, None, None, FollowUp::None),
            AttemptClass::Permanent => (DeliveryStatus::Failed, None, None, FollowUp::None),
            AttemptClass::Retryable => {
                match retry::next_step(plan.schedule, next.attempts_in_round(), class, retry_after)
                {
                    NextStep::GiveUp => (DeliveryStatus::Dead, None, None, FollowUp::None),
                    NextStep::RetryAfter(delay) => {
                        let floor = retry_after
                            .map(|d| d.min(retry::MAX_RETRY_AFTER))
                            .unwrap_or_default();
                        let delay =
                            retry::with_jitter(delay, plan.jitter_ratio, plan.jitter_unit, floor);
                        let retry_at = now.saturating_add(delay);
                        if delay <= plan.max_queue_delay {
                            let due = retry_at.saturating_add(plan.sweep_grace);
                            (
                                DeliveryStatus::Retrying,
                                Some(retry_at),
                                Some(due),
                                FollowUp::Enqueue(delay),
                            )
                        } else {
                            // Too long for the queue: the sweep sends it when it is due.
                            (
                                DeliveryStatus::Retrying,
                                Some(retry_at),
                                Some(retry_at),
                                FollowUp::None,
                            )
                        }
                    }
                }
            }
        };
        next.status = status;
        next.next_attempt_at = retry_at;
        next.due_at = due_at;
        (next, follow_up)
    }

    /// Records an attempt whose lease was lost while it ran (another worker or the sweep moved
    /// the delivery on): what was sent and what came back goes into the log all the same, and a
    /// 2xx finishes an unfinished delivery, since the receiver has it. Anything else leaves the
    /// state to whoever holds it now.
    pub fn with_late_attempt(&self, attempt: Attempt, now: Timestamp) -> Self {
        let delivered = attempt.outcome == AttemptClass::Delivered;
        let mut next = self.next(now);
        next.push_attempt(attempt);
        if delivered && !self.status.is_final() {
            next.status = DeliveryStatus::Succeeded;
            next.lease = None;
            next.next_attempt_at = None;
            next.due_at = None;
            next.reason = None;
        }
        next
    }

    /// Holds a waiting delivery while its subscription is paused: no attempt made, due again at
    /// `recheck_at` (`None`: out of the due index). The application gives the first hold a
    /// recheck a minute on, in case a resume could not see this delivery yet (on DynamoDB the
    /// list it reads lags by a moment), and later ones a six-hourly safety recheck. A held
    /// delivery whose recheck came may be held again. `None` if it is finished, or held with no
    /// recheck.
    pub fn held(
        &self,
        now: Timestamp,
        reason: &str,
        recheck_at: Option<Timestamp>,
    ) -> Option<Self> {
        if self.status.is_final() || (self.status == DeliveryStatus::Held && self.due_at.is_none())
        {
            return None;
        }
        let mut next = self.stopped(now, DeliveryStatus::Held, recheck_at, reason);
        next.claims = 0;
        Some(next)
    }

    /// Whether this is a held delivery whose recheck came: the sweep claimed it at its recheck
    /// time (a stray job for it does not count).
    pub fn is_recheck_due(&self) -> bool {
        self.status == DeliveryStatus::Held && self.due_at.is_some() && self.claims > 0
    }

    /// A held delivery, waiting again now that its subscription is active: due now, and sent by
    /// the sweep after `grace` should its queue message be lost. `None` unless held.
    pub fn released(&self, now: Timestamp, grace: Duration) -> Option<Self> {
        if self.status != DeliveryStatus::Held {
            return None;
        }
        let mut next = self.next(now);
        next.status = DeliveryStatus::Pending;
        next.next_attempt_at = Some(now);
        next.due_at = Some(now.saturating_add(grace));
        next.reason = None;
        Some(next)
    }

    /// Ends an unfinished delivery without an attempt (its subscription was deleted or
    /// disabled, its event is gone), with the reason visible in its log. `None` if finished.
    pub fn ended(&self, now: Timestamp, reason: &str) -> Option<Self> {
        if self.status.is_final() {
            return None;
        }
        Some(self.stopped(now, DeliveryStatus::Failed, None, reason))
    }

    /// The next version with no attempt in view: `status`, no lease, due at `due_at`, `reason`.
    fn stopped(
        &self,
        now: Timestamp,
        status: DeliveryStatus,
        due_at: Option<Timestamp>,
        reason: &str,
    ) -> Self {
        let mut next = self.next(now);
        next.status = status;
        next.lease = None;
        next.next_attempt_at = None;
        next.due_at = due_at;
        next.reason = Some(bounded_text(reason, MAX_ERROR_BYTES));
        next
    }

    /// An operator's resend of a finished delivery (succeeded included): a new round with the
    /// full schedule, starting now, under the same id (so the same `webhook-id`).
    pub fn resent(&self, now: Timestamp, grace: Duration) -> Result<Self, NotResendable> {
        if !self.status.is_final() {
            return Err(NotResendable::Unfinished(self.status));
        }
        if self.resends >= MAX_RESENDS {
            return Err(NotResendable::TooManyResends);
        }
        let mut next = self.next(now);
        next.status = DeliveryStatus::Pending;
        next.round_start = self.attempt_count();
        next.resends = self.resends + 1;
        next.next_attempt_at = Some(now);
        next.due_at = Some(now.saturating_add(grace));
        next.lease = None;
        next.reason = None;
        Ok(next)
    }

    /// The sweep's claim on a due delivery whose queue message is late or lost: due again after
    /// `grace`, doubled for every claim since a worker last leased it (at most 64 times), so two
    /// sweeps never both send it, and a queue backlog (messages waiting, not lost) gets a few
    /// more jobs, not one per grace period. `None` while a worker holds a live lease (claiming
    /// would bump the version and void that worker's result; see [`deferred`](Self::deferred)).
    pub fn claimed(&self, now: Timestamp, grace: Duration) -> Option<Self> {
        if self.status.is_final() || self.is_in_flight(now) || self.due_at.is_none() {
            return None;
        }
        let mut next = self.next(now);
        let backoff = grace.saturating_mul(1 << self.claims.min(6));
        next.due_at = Some(now.saturating_add(backoff));
        next.claims = self.claims.saturating_add(1);
        Some(next)
    }

    /// A delivery in flight that is due (a lease keeps the due time): due again only after the
    /// lease runs out, so it stops standing at the head of the due index in front of work that
    /// is really due. The version stays, so the lease holder's result still lands; it sets its
    /// own due time. `None` unless leased and due before the lease ends.
    pub fn deferred(&self, now: Timestamp, grace: Duration) -> Option<Self> {
        let lease = self.lease.as_ref().filter(|l| l.expires_at > now)?;
        let after = lease.expires_at.saturating_add(grace);
        if self.due_at.is_none_or(|due| due >= after) {
            return None;
        }
        let mut next = self.clone();
        next.due_at = Some(after);
        Some(next)
    }

    /// After a crash of the only process that could hold leases (the local runner): released
    /// from any lease and due at its next attempt time (or now). `None` if nothing changes.
    pub fn recovered(&self, now: Timestamp) -> Option<Self> {
        if self.status.is_final() || self.status == DeliveryStatus::Held {
            return None;
        }
        let due = self.next_attempt_at.map_or(now, |t| t.max(now));
        if self.lease.is_none() && self.due_at == Some(due) {
            return None;
        }
        let mut next = self.next(now);
        next.lease = None;
        next.due_at = Some(due);
        Some(next)
    }

    /// Test fixtures only: this delivery with another due time (as if scheduled so).
    #[cfg(any(test, feature = "testing"))]
    pub fn with_due_at_for_tests(&self, due_at: Option<Timestamp>) -> Self {
        let mut next = self.next(self.updated_at);
        next.due_at = due_at;
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(5);
    const LEASE: Duration = Duration::from_secs(30);

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    fn delivery(now: Timestamp) -> Delivery {
        Delivery::new(
            TenantId::parse("t1").unwrap(),
            EventId::generate(),
            now,
            SubscriptionId::generate(),
            now,
            Duration::ZERO,
            GRACE,
        )
    }

    fn attempt(outcome: AttemptClass) -> Attempt {
        Attempt {
            number: 0,
            started_at: ts(0),
            latency_ms: 1,
            outcome,
            status_code: Some(match outcome {
                AttemptClass::Delivered => 200,
                AttemptClass::Retryable => 503,
                AttemptClass::Permanent => 400,
            }),
            error: None,
            response_snippet: None,
        }
    }

    fn plan(schedule: &RetrySchedule) -> RetryPlan<'_> {
        RetryPlan {
            schedule,
            jitter_ratio: 0.0,
            jitter_unit: 0.5,
            sweep_grace: GRACE,
            max_queue_delay: Duration::from_secs(900),
        }
    }

    /// Leases `d` at `now` and records one attempt with `outcome`.
    fn attempted(
        d: &Delivery,
        now: Timestamp,
        outcome: AttemptClass,
        schedule: &RetrySchedule,
    ) -> (Delivery, FollowUp) {
        let leased = d.leased(now, "w".into(), LEASE).expect("leasable");
        leased.recorded(attempt(outcome), None, &plan(schedule), now)
    }

    #[test]
    fn the_id_is_a_function_of_tenant_event_and_subscription() {
        let (t, e, s) = (
            TenantId::parse("t1").unwrap(),
            EventId::parse("order-42").unwrap(),
            SubscriptionId::generate(),
        );
        let a = Delivery::new(
            t.clone(),
            e.clone(),
            ts(0),
            s.clone(),
            ts(0),
            Duration::ZERO,
            GRACE,
        );
        // The event as stored, whenever the delivery is made.
        let b = Delivery::new(
            t.clone(),
            e.clone(),
            ts(0),
            s.clone(),
            ts(9_999),
            Duration::ZERO,
            GRACE,
        );
        assert_eq!(a.id(), b.id(), "created twice, at two times: one id");
        let other_sub = Delivery::new(
            t.clone(),
            e.clone(),
            ts(0),
            SubscriptionId::generate(),
            ts(0),
            Duration::ZERO,
            GRACE,
        );
        let other_tenant = Delivery::new(
            TenantId::parse("t2").unwrap(),
            e,
            ts(0),
            s.clone(),
            ts(0),
            Duration::ZERO,
            GRACE,
        );
        assert_ne!(a.id(), other_sub.id());
        assert_ne!(a.id(), other_tenant.id());
        assert_eq!(DeliveryId::parse(a.id().as_str()).as_ref(), Ok(a.id()));
        // Its own part sorts by the event's receive time, whatever the event's id.
        let id = |e: &str, received: Timestamp| {
            Delivery::new(
                t.clone(),
                EventId::parse(e).unwrap(),
                received,
                s.clone(),
                ts(50_000),
                Duration::ZERO,
                GRACE,
            )
            .id()
            .clone()
        };
        let (earlier, later) = (id("zzz", ts(1)), id("aaa", ts(2)));
        assert!(earlier.own_part() < later.own_part());
        assert_eq!(later, id("aaa", ts(2)), "and stay a function of the three");
    }

    #[test]
    fn a_new_delivery_waits_for_the_schedules_first_entry() {
        let now = ts(10_000);
        let d = delivery(now);
        assert_eq!(d.status(), DeliveryStatus::Pending);
        assert_eq!(d.next_attempt_at(), Some(now));
        assert_eq!(d.due_at(), Some(ts(15_000)));
        let later = Delivery::new(
            TenantId::parse("t1").unwrap(),
            EventId::generate(),
            now,
            SubscriptionId::generate(),
            now,
            Duration::from_secs(2),
            GRACE,
        );
        assert_eq!(later.next_attempt_at(), Some(ts(12_000)));
        assert_eq!(later.due_at(), Some(ts(17_000)));
        assert!(matches!(
            later.leased(ts(11_999), "w".into(), LEASE),
            Err(NotLeasable::NotDue(_))
        ));
        assert!(later.leased(ts(12_000), "w".into(), LEASE).is_ok());
    }

    #[test]
    fn every_transition_bumps_the_version() {
        let d = delivery(ts(0));
        let leased = d.leased(ts(0), "w".into(), LEASE).unwrap();
        assert_eq!(leased.version(), d.version() + 1);
        let (done, _) = leased.recorded(
            attempt(AttemptClass::Delivered),
            None,
            &plan(&RetrySchedule::default()),
            ts(1),
        );
        assert_eq!(done.version(), leased.version() + 1);
        let resent = done.resent(ts(2), GRACE).unwrap();
        assert_eq!(resent.version(), done.version() + 1);
        let held = d.held(ts(3), "paused", Some(ts(9))).unwrap();
        assert_eq!(held.version(), d.version() + 1);
        let claimed = held.claimed(ts(10), GRACE).unwrap();
        assert_eq!(claimed.version(), held.version() + 1);
        let released = claimed.released(ts(11), GRACE).unwrap();
        assert_eq!(released.version(), claimed.version() + 1);
        let ended = released.ended(ts(12), "gone").unwrap();
        assert_eq!(ended.version(), released.version() + 1);
        let recovered = leased.recovered(ts(14)).unwrap();
        assert_eq!(recovered.version(), leased.version() + 1);
        let late = leased.with_late_attempt(attempt(AttemptClass::Delivered), ts(15));
        assert_eq!(late.version(), leased.version() + 1);
        // The one exception, on purpose: a deferral keeps the lease holder's version.
        let deferred = leased.deferred(ts(6_000), GRACE).unwrap();
        assert_eq!(deferred.version(), leased.version());
    }

    #[test]
    fn lease_is_exclusive_until_it_expires() {
        let now = ts(10_000);
        let d = delivery(now);
        let leased = d.leased(now, "a".into(), LEASE).unwrap();
        assert_eq!(
            leased.due_at(),
            d.due_at(),
            "a lease leaves the due time (and the store's due index) alone"
        );
        assert!(leased.is_in_flight(now));
        assert!(matches!(
            leased.leased(now, "b".into(), LEASE),
            Err(NotLeasable::Leased(_))
        ));
        let stolen = leased.leased(ts(40_000), "b".into(), LEASE).unwrap();
        assert_eq!(stolen.current_lease().unwrap().token, "b");
    }

    #[test]
    fn outcomes_lead_to_their_states() {
        let schedule = RetrySchedule::parse("0s,5s,1h").unwrap();
        let d = delivery(ts(0));

        let (ok, f) = attempted(&d, ts(0), AttemptClass::Delivered, &schedule);
        assert_eq!(
            (ok.status(), f),
            (DeliveryStatus::Succeeded, FollowUp::None)
        );
        assert_eq!(
            (ok.due_at(), ok.next_attempt_at(), ok.current_lease()),
            (None, None, None)
        );

        let (no, f) = attempted(&d, ts(0), AttemptClass::Permanent, &schedule);
        assert_eq!((no.status(), f), (DeliveryStatus::Failed, FollowUp::None));
        assert_eq!(no.due_at(), None);

        // 1st failure: 5 s later, through the queue, due for the sweep a grace after.
        let (r1, f) = attempted(&d, ts(0), AttemptClass::Retryable, &schedule);
        assert_eq!(r1.status(), DeliveryStatus::Retrying);
        assert_eq!(f, FollowUp::Enqueue(Duration::from_secs(5)));
        assert_eq!(r1.next_attempt_at(), Some(ts(5_000)));
        assert_eq!(r1.due_at(), Some(ts(10_000)));
        // 2nd failure: an hour is beyond the queue's 15 minutes; the sweep sends it when due.
        let (r2, f) = attempted(&r1, ts(5_000), AttemptClass::Retryable, &schedule);
        assert_eq!(f, FollowUp::None);
        assert_eq!(r2.next_attempt_at(), Some(ts(3_605_000)));
        assert_eq!(r2.due_at(), r2.next_attempt_at());
        // 3rd failure: the schedule is spent.
        let (dead, f) = attempted(&r2, ts(3_605_000), AttemptClass::Retryable, &schedule);
        assert_eq!((dead.status(), f), (DeliveryStatus::Dead, FollowUp::None));
        assert_eq!(dead.attempt_count(), 3);
        assert_eq!(
            dead.attempts().iter().map(|a| a.number).collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    #[test]
    fn retry_after_is_a_floor_on_the_next_attempt() {
        let schedule = RetrySchedule::parse("0s,5s").unwrap();
        let leased = delivery(ts(0)).leased(ts(0), "w".into(), LEASE).unwrap();
        let (next, f) = leased.recorded(
            attempt(AttemptClass::Retryable),
            Some(Duration::from_secs(120)),
            &plan(&schedule),
            ts(0),
        );
        assert_eq!(f, FollowUp::Enqueue(Duration::from_secs(120)));
        assert_eq!(next.next_attempt_at(), Some(ts(120_000)));
    }

    #[test]
    fn not_due_held_and_final_deliveries_cannot_be_leased() {
        let schedule = RetrySchedule::default();
        let d = delivery(ts(0));
        let (waiting, _) = attempted(&d, ts(0), AttemptClass::Retryable, &schedule);
        assert!(matches!(
            waiting.leased(ts(1), "a".into(), LEASE),
            Err(NotLeasable::NotDue(_))
        ));
        let held = d.held(ts(1), "subscription is paused", None).unwrap();
        assert_eq!(
            held.leased(ts(2), "a".into(), LEASE),
            Err(NotLeasable::Held)
        );
        let (done, _) = attempted(&d, ts(0), AttemptClass::Delivered, &schedule);
        assert_eq!(
            done.leased(ts(99_999), "a".into(), LEASE),
            Err(NotLeasable::Final(DeliveryStatus::Succeeded))
        );
    }

    #[test]
    fn a_held_delivery_leaves_the_due_index_and_comes_back_pending() {
        let schedule = RetrySchedule::default();
        let (retrying, _) = attempted(&delivery(ts(0)), ts(0), AttemptClass::Retryable, &schedule);
        let leased = retrying.leased(ts(6_000), "w".into(), LEASE).unwrap();
        let first = leased
            .held(ts(6_000), "subscription is paused", Some(ts(66_000)))
            .unwrap();
        assert_eq!(first.due_at(), Some(ts(66_000)), "due for its recheck");
        assert!(!first.is_recheck_due(), "a stray job is no recheck");
        let claimed = first.claimed(ts(66_000), GRACE).unwrap();
        assert!(claimed.is_recheck_due(), "the sweep's claim at its time is");
        let held = claimed
            .held(ts(66_000), "subscription is paused", None)
            .unwrap();
        assert_eq!(held.status(), DeliveryStatus::Held);
        assert_eq!((held.due_at(), held.next_attempt_at()), (None, None));
        assert_eq!(held.current_lease(), None, "holding releases the lease");
        assert_eq!(held.reason(), Some("subscription is paused"));
        assert!(!held.is_recheck_due());
        assert_eq!(
            held.held(ts(67_000), "again", None),
            None,
            "held with no recheck: nothing more to hold"
        );
        assert_eq!(held.attempt_count(), 1, "holding is no attempt");

        let back = held.released(ts(60_000), GRACE).unwrap();
        assert_eq!(back.status(), DeliveryStatus::Pending);
        assert_eq!(back.next_attempt_at(), Some(ts(60_000)));
        assert_eq!(back.due_at(), Some(ts(65_000)));
        assert_eq!(back.reason(), None);
        assert_eq!(
            back.attempts_in_round(),
            1,
            "the round goes on where it was"
        );
        assert!(back.leased(ts(60_000), "w".into(), LEASE).is_ok());
        assert_eq!(back.released(ts(61_000), GRACE), None, "only a held one");
    }

    #[test]
    fn ending_fails_any_unfinished_delivery_with_its_reason() {
        let schedule = RetrySchedule::default();
        let d = delivery(ts(0));
        let held = d.held(ts(1), "paused", None).unwrap();
        for unfinished in [&d, &held] {
            let ended = unfinished.ended(ts(2), "subscription was deleted").unwrap();
            assert_eq!(ended.status(), DeliveryStatus::Failed);
            assert_eq!(ended.reason(), Some("subscription was deleted"));
            assert_eq!((ended.due_at(), ended.next_attempt_at()), (None, None));
            assert_eq!(ended.attempt_count(), 0);
        }
        let (done, _) = attempted(&d, ts(0), AttemptClass::Delivered, &schedule);
        assert_eq!(
            done.ended(ts(3), "deleted"),
            None,
            "a finished one stays as it is"
        );
    }

    #[test]
    fn a_resend_starts_a_new_round_under_the_same_id_a_bounded_number_of_times() {
        let schedule = RetrySchedule::parse("0s,1s").unwrap();
        let d = delivery(ts(0));
        assert_eq!(
            d.resent(ts(0), GRACE),
            Err(NotResendable::Unfinished(DeliveryStatus::Pending))
        );
        let (mut current, _) = attempted(&d, ts(0), AttemptClass::Delivered, &schedule);
        for n in 1..=MAX_RESENDS {
            let resent = current.resent(ts(1), GRACE).unwrap();
            assert_eq!(resent.id(), d.id());
            assert_eq!(resent.status(), DeliveryStatus::Pending);
            assert_eq!(resent.attempts_in_round(), 0);
            assert_eq!(resent.resends(), n);
            // Each resend's round has the whole schedule: fail, fail, dead.
            let (r, _) = attempted(&resent, ts(1), AttemptClass::Retryable, &schedule);
            assert_eq!(r.status(), DeliveryStatus::Retrying);
            let (dead, _) = attempted(&r, ts(2_000), AttemptClass::Retryable, &schedule);
            assert_eq!(dead.status(), DeliveryStatus::Dead);
            current = dead;
        }
        assert_eq!(
            current.resent(ts(9), GRACE),
            Err(NotResendable::TooManyResends)
        );
    }

    #[test]
    fn the_log_keeps_the_last_attempts_and_counts_them_all() {
        let schedule = RetrySchedule::parse("0s").unwrap();
        let mut current = delivery(ts(0));
        let mut resends = 0;
        for _ in 0..(MAX_KEPT_ATTEMPTS * 2 + 3) {
            let leased = current.leased(ts(0), "w".into(), LEASE).unwrap();
            let mut a = attempt(AttemptClass::Permanent);
            a.response_snippet = Some("\u{1}é".repeat(1_000));
            a.error = Some("x".repeat(10_000));
            let (failed, _) = leased.recorded(a, None, &plan(&schedule), ts(0));
            current = match failed.resent(ts(0), GRACE) {
                Ok(r) => {
                    resends += 1;
                    r
                }
                Err(_) => {
                    current = failed;
                    break;
                }
            };
        }
        assert_eq!(resends, MAX_RESENDS);
        assert_eq!(current.attempt_count(), MAX_RESENDS + 1);
        assert_eq!(current.attempts().len(), MAX_KEPT_ATTEMPTS);
        let numbers: Vec<u32> = current.attempts().iter().map(|a| a.number).collect();
        let first_kept = MAX_RESENDS + 1 - MAX_KEPT_ATTEMPTS as u32 + 1;
        assert_eq!(numbers, (first_kept..=MAX_RESENDS + 1).collect::<Vec<_>>());
        for a in current.attempts() {
            let snippet = a.response_snippet.as_deref().unwrap();
            assert!(snippet.len() <= MAX_SNIPPET_BYTES);
            assert!(!snippet.chars().any(char::is_control));
            assert!(a.error.as_deref().unwrap().len() <= MAX_ERROR_BYTES);
        }
        let json = serde_json::to_string(&current).unwrap();
        assert!(
            json.len() < 8 * 1024,
            "a full delivery record is {} bytes",
            json.len()
        );
    }

    #[test]
    fn a_late_2xx_finishes_the_delivery_and_anything_late_is_logged() {
        let d = delivery(ts(0));
        let first = d.leased(ts(0), "a".into(), LEASE).unwrap();
        // The lease ran out; the sweep claimed it and a second worker took it.
        let second = first.leased(ts(31_000), "b".into(), LEASE).unwrap();
        let late = second.with_late_attempt(attempt(AttemptClass::Delivered), ts(31_500));
        assert_eq!(late.status(), DeliveryStatus::Succeeded);
        assert_eq!(late.attempt_count(), 1);
        assert_eq!(late.due_at(), None);
        // The second worker's own result then arrives late too: logged, still succeeded.
        let after = late.with_late_attempt(attempt(AttemptClass::Retryable), ts(32_000));
        assert_eq!(after.status(), DeliveryStatus::Succeeded);
        assert_eq!(after.attempt_count(), 2);
        // A late failure on an unfinished delivery leaves the state to the lease holder.
        let failed_late = second.with_late_attempt(attempt(AttemptClass::Retryable), ts(31_500));
        assert_eq!(failed_late.status(), second.status());
        assert_eq!(failed_late.current_lease(), second.current_lease());
    }

    #[test]
    fn the_sweep_claims_only_what_no_worker_holds() {
        let d = delivery(ts(0));
        let claimed = d.claimed(ts(6_000), GRACE).unwrap();
        assert_eq!(claimed.due_at(), Some(ts(11_000)));
        let leased = d.leased(ts(0), "w".into(), LEASE).unwrap();
        assert_eq!(leased.claimed(ts(6_000), GRACE), None, "in flight");
        assert!(leased.claimed(ts(30_001), GRACE).is_some(), "lease ran out");
        let held = d.held(ts(0), "paused", None).unwrap();
        assert_eq!(held.claimed(ts(6_000), GRACE), None);
        let rechecked = d.held(ts(0), "paused", Some(ts(5_000))).unwrap();
        assert!(
            rechecked.claimed(ts(6_000), GRACE).is_some(),
            "its recheck is due"
        );
    }

    #[test]
    fn repeated_claims_back_off_and_a_lease_resets_them() {
        let d = delivery(ts(0));
        let c1 = d.claimed(ts(5_000), GRACE).unwrap();
        assert_eq!(c1.due_at(), Some(ts(10_000)));
        let c2 = c1.claimed(ts(10_000), GRACE).unwrap();
        assert_eq!(c2.due_at(), Some(ts(20_000)), "twice the grace");
        let c3 = c2.claimed(ts(20_000), GRACE).unwrap();
        assert_eq!(c3.due_at(), Some(ts(40_000)));
        let mut c = c3;
        for _ in 0..20 {
            c = c.claimed(ts(100_000), GRACE).unwrap();
        }
        assert_eq!(
            c.due_at(),
            Some(ts(100_000 + 64 * 5_000)),
            "at most 64 graces"
        );
        let leased = c.leased(ts(100_000), "w".into(), LEASE).unwrap();
        let (retrying, _) = leased.recorded(
            attempt(AttemptClass::Retryable),
            None,
            &plan(&RetrySchedule::default()),
            ts(100_000),
        );
        let again = retrying.claimed(ts(200_000), GRACE).unwrap();
        assert_eq!(
            again.due_at(),
            Some(ts(205_000)),
            "a lease starts the count anew"
        );
    }

    #[test]
    fn a_delivery_in_flight_is_deferred_past_its_lease_without_a_new_version() {
        let d = delivery(ts(0));
        let leased = d.leased(ts(1_000), "w".into(), LEASE).unwrap();
        assert_eq!(
            leased.due_at(),
            Some(ts(5_000)),
            "the lease kept the due time"
        );
        let deferred = leased.deferred(ts(6_000), GRACE).unwrap();
        assert_eq!(deferred.due_at(), Some(ts(36_000)));
        assert_eq!(
            deferred.version(),
            leased.version(),
            "the worker's write still lands"
        );
        assert_eq!(deferred.current_lease(), leased.current_lease());
        assert_eq!(deferred.deferred(ts(6_000), GRACE), None, "once");
        assert_eq!(d.deferred(ts(6_000), GRACE), None, "not leased");
        assert_eq!(leased.deferred(ts(31_000), GRACE), None, "lease ran out");
    }

    #[test]
    fn recovery_releases_leases_and_makes_waiting_work_due() {
        let schedule = RetrySchedule::default();
        let d = delivery(ts(0));
        let leased = d.leased(ts(0), "w".into(), LEASE).unwrap();
        let r = leased.recovered(ts(1_000)).unwrap();
        assert_eq!((r.current_lease(), r.due_at()), (None, Some(ts(1_000))));
        assert_eq!(r.recovered(ts(1_000)), None, "nothing more to do");
        let (retrying, _) = attempted(&d, ts(0), AttemptClass::Retryable, &schedule);
        let r = retrying.recovered(ts(1_000)).unwrap();
        assert_eq!(
            r.due_at(),
            retrying.next_attempt_at(),
            "due when its retry is"
        );
        assert_eq!(d.held(ts(0), "p", None).unwrap().recovered(ts(1)), None);
    }

    #[test]
    fn stored_records_from_before_the_counters_read_back() {
        let d = delivery(ts(0));
        let (done, _) = attempted(
            &d,
            ts(0),
            AttemptClass::Delivered,
            &RetrySchedule::default(),
        );
        let mut json: serde_json::Value = serde_json::to_value(&done).unwrap();
        let object = json.as_object_mut().unwrap();
        object.remove("attemptCount");
        object.remove("resends");
        let old: Delivery = serde_json::from_value(json).unwrap();
        assert_eq!(old.attempt_count(), 1);
        assert_eq!(old.resends(), 0);
    }
}
