//! A delivery is a small state machine. Its transitions are pure; stores only persist the result
//! with a version check, so two workers can never both record an outcome for the same lease.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::{DeliveryId, EventId, SubscriptionId, TenantId, Timestamp};
use crate::retry::AttemptClass;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waiting for its first attempt (or a manual retry).
    Pending,
    /// An attempt failed and another is scheduled.
    Retrying,
    /// The receiver answered 2xx.
    Succeeded,
    /// Ended by a permanent failure (a non-retryable status, or a refused address).
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

/// A worker's exclusive, time-bounded claim on a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub token: String,
    pub expires_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub id: DeliveryId,
    pub tenant_id: TenantId,
    pub event_id: EventId,
    pub subscription_id: SubscriptionId,
    pub status: DeliveryStatus,
    pub attempts: Vec<Attempt>,
    /// When the next attempt may start; `None` once final.
    pub next_attempt_at: Option<Timestamp>,
    /// When the sweep should look at this delivery: the safety net for lost queue messages and
    /// crashed workers. `None` once final (the store's due index is sparse).
    pub due_at: Option<Timestamp>,
    pub lease: Option<Lease>,
    /// The attempt count when the current retry round began (a manual retry starts a new round).
    pub round_start: u32,
    /// Bumped by every write; stores refuse a write whose expected version is stale.
    pub version: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotLeasable {
    #[error("delivery is already {}", .0.as_str())]
    Final(DeliveryStatus),
    #[error("delivery is leased by another worker until {0}")]
    Leased(Timestamp),
    #[error("delivery is not due until {0}")]
    NotDue(Timestamp),
}

impl Delivery {
    /// A new delivery, due now; if no queue message arrives within `grace`, the sweep sends one.
    pub fn new(
        tenant_id: TenantId,
        event_id: EventId,
        subscription_id: SubscriptionId,
        now: Timestamp,
        grace: Duration,
    ) -> Self {
        Self {
            id: DeliveryId::generate(),
            tenant_id,
            event_id,
            subscription_id,
            status: DeliveryStatus::Pending,
            attempts: Vec::new(),
            next_attempt_at: Some(now),
            due_at: Some(now.saturating_add(grace)),
            lease: None,
            round_start: 0,
            version: 0,
            created_at: now,
            updated_at: now,
        }
    }

    /// Attempts made in the current retry round.
    pub fn attempts_in_round(&self) -> u32 {
        (self.attempts.len() as u32).saturating_sub(self.round_start)
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
        if let Some(lease) = &self.lease
            && lease.expires_at > now
        {
            return Err(NotLeasable::Leased(lease.expires_at));
        }
        if let Some(next) = self.next_attempt_at
            && next > now
        {
            return Err(NotLeasable::NotDue(next));
        }
        let expires_at = now.saturating_add(duration);
        let mut next = self.clone();
        next.lease = Some(Lease { token, expires_at });
        // `due_at` stays: should the worker die, the sweep finds the delivery at its due time and
        // takes it once the lease has run out. Moving it would rewrite the store's due index on
        // every attempt (on DynamoDB, two index writes: a third of a first attempt's units).
        if next.due_at.is_none() {
            next.due_at = Some(expires_at);
        }
        next.updated_at = now;
        Ok(next)
    }

    /// Records a finished attempt and releases the lease. `retry_at` is when the next attempt may
    /// start (`None`: no more attempts), `due_at` when the sweep should check on it.
    pub fn with_attempt(
        &self,
        attempt: Attempt,
        status: DeliveryStatus,
        retry_at: Option<Timestamp>,
        due_at: Option<Timestamp>,
        now: Timestamp,
    ) -> Self {
        let mut next = self.clone();
        next.attempts.push(attempt);
        next.status = status;
        next.lease = None;
        if status.is_final() {
            next.next_attempt_at = None;
            next.due_at = None;
        } else {
            next.next_attempt_at = retry_at;
            next.due_at = due_at;
        }
        next.updated_at = now;
        next
    }

    /// An operator's retry: a new round with the full schedule, starting now.
    pub fn rescheduled(&self, now: Timestamp, grace: Duration) -> Self {
        let mut next = self.clone();
        next.status = DeliveryStatus::Pending;
        next.round_start = self.attempts.len() as u32;
        next.next_attempt_at = Some(now);
        next.due_at = Some(now.saturating_add(grace));
        next.lease = None;
        next.updated_at = now;
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(now: Timestamp) -> Delivery {
        Delivery::new(
            TenantId::parse("t1").unwrap(),
            EventId::generate(),
            SubscriptionId::generate(),
            now,
            Duration::from_secs(5),
        )
    }

    fn attempt(n: u32, outcome: AttemptClass) -> Attempt {
        Attempt {
            number: n,
            started_at: Timestamp::from_unix_millis(0),
            latency_ms: 1,
            outcome,
            status_code: Some(500),
            error: None,
            response_snippet: None,
        }
    }

    #[test]
    fn new_delivery_is_due_now_and_swept_after_grace() {
        let now = Timestamp::from_unix_millis(10_000);
        let d = delivery(now);
        assert_eq!(d.status, DeliveryStatus::Pending);
        assert_eq!(d.next_attempt_at, Some(now));
        assert_eq!(d.due_at, Some(Timestamp::from_unix_millis(15_000)));
    }

    #[test]
    fn lease_is_exclusive_until_it_expires() {
        let now = Timestamp::from_unix_millis(10_000);
        let d = delivery(now);
        let leased = d.leased(now, "a".into(), Duration::from_secs(30)).unwrap();
        assert_eq!(
            leased.due_at, d.due_at,
            "a lease leaves the due time (and the store's due index) alone"
        );
        assert!(matches!(
            leased.leased(now, "b".into(), Duration::from_secs(30)),
            Err(NotLeasable::Leased(_))
        ));
        let later = Timestamp::from_unix_millis(40_000);
        let stolen = leased
            .leased(later, "b".into(), Duration::from_secs(30))
            .unwrap();
        assert_eq!(stolen.lease.unwrap().token, "b");
    }

    #[test]
    fn not_due_and_final_deliveries_cannot_be_leased() {
        let now = Timestamp::from_unix_millis(10_000);
        let mut d = delivery(now);
        d.next_attempt_at = Some(Timestamp::from_unix_millis(20_000));
        assert!(matches!(
            d.leased(now, "a".into(), Duration::from_secs(1)),
            Err(NotLeasable::NotDue(_))
        ));
        let done = d.with_attempt(
            attempt(1, AttemptClass::Delivered),
            DeliveryStatus::Succeeded,
            None,
            None,
            now,
        );
        assert_eq!(done.due_at, None);
        assert_eq!(done.next_attempt_at, None);
        assert!(matches!(
            done.leased(
                Timestamp::from_unix_millis(99_999),
                "a".into(),
                Duration::from_secs(1)
            ),
            Err(NotLeasable::Final(DeliveryStatus::Succeeded))
        ));
    }

    #[test]
    fn manual_retry_starts_a_new_round() {
        let now = Timestamp::from_unix_millis(10_000);
        let d = delivery(now)
            .with_attempt(
                attempt(1, AttemptClass::Retryable),
                DeliveryStatus::Retrying,
                Some(now),
                Some(now),
                now,
            )
            .with_attempt(
                attempt(2, AttemptClass::Retryable),
                DeliveryStatus::Dead,
                None,
                None,
                now,
            );
        assert_eq!(d.attempts_in_round(), 2);
        let r = d.rescheduled(now, Duration::from_secs(5));
        assert_eq!(r.status, DeliveryStatus::Pending);
        assert_eq!(r.attempts_in_round(), 0);
        assert_eq!(r.attempts.len(), 2, "the attempt log is kept");
        assert!(r.leased(now, "x".into(), Duration::from_secs(1)).is_ok());
    }
}
