//! The domain: values that are valid by construction, and the entities built from them.

mod callback_url;
mod delivery;
mod event_type;
mod ids;
mod secret;
mod timestamp;

pub use callback_url::{CallbackUrl, CallbackUrlError, MAX_CALLBACK_URL_LEN};
pub use delivery::{
    Attempt, Delivery, DeliveryStatus, FollowUp, Lease, MAX_ERROR_BYTES, MAX_KEPT_ATTEMPTS,
    MAX_RESENDS, MAX_SNIPPET_BYTES, NotLeasable, NotResendable, RetryPlan, bounded_text,
};
pub use event_type::{EventType, EventTypeError, EventTypePattern, MAX_EVENT_TYPE_LEN};
pub use ids::{DeliveryId, EventId, IdError, SubscriptionId, TenantId};
pub use secret::{Secret, SecretError};
pub use timestamp::{Timestamp, TimestampError};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionStatus {
    Active,
    Paused,
    Disabled,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Disabled => "disabled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    pub id: SubscriptionId,
    pub tenant_id: TenantId,
    pub event_types: Vec<EventTypePattern>,
    pub callback_url: CallbackUrl,
    pub secret: Secret,
    pub description: String,
    pub status: SubscriptionStatus,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Bumped by every change; stores refuse a write whose expected version is stale, so two
    /// changes made at once (a PATCH and a `410 Gone`) never overwrite each other unseen.
    #[serde(default)]
    pub version: u64,
}

impl Subscription {
    /// Whether an event of this type gets a delivery to this subscription: an active one
    /// receives it, a paused one holds it until it is active again, a disabled one never.
    pub fn wants(&self, event_type: &EventType) -> bool {
        self.status != SubscriptionStatus::Disabled
            && self.event_types.iter().any(|p| p.matches(event_type))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: EventId,
    pub tenant_id: TenantId,
    pub event_type: EventType,
    pub occurred_at: Timestamp,
    /// The producer's `data`, byte for byte: consumers get exactly what was published.
    pub data: Box<RawValue>,
    pub received_at: Timestamp,
    /// A hash of what the producer sent (type, data, and the optional id and time), so a
    /// repeated idempotency key or event id with another body is told apart from a retry.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fingerprint: String,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.tenant_id == other.tenant_id
            && self.event_type == other.event_type
            && self.occurred_at == other.occurred_at
            && self.data.get() == other.data.get()
            && self.received_at == other.received_at
            && self.fingerprint == other.fingerprint
    }
}

impl Event {
    /// The delivered body: `{"eventId","eventType","occurredAt","data"}`.
    pub fn payload(&self) -> Vec<u8> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Payload<'a> {
            event_id: &'a EventId,
            event_type: &'a EventType,
            occurred_at: Timestamp,
            data: &'a RawValue,
        }
        serde_json::to_vec(&Payload {
            event_id: &self.id,
            event_type: &self.event_type,
            occurred_at: self.occurred_at,
            data: &self.data,
        })
        .unwrap_or_default()
    }
}

/// A stored API key: only the SHA-256 of the key is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyRecord {
    pub key_hash: String,
    pub tenant_id: TenantId,
    pub created_at: Timestamp,
}
