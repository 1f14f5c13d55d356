//! Prefixed identifiers. A value of these types is always well formed: parse at the edge.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(pub String);

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new id; ULIDs sort by creation time, which keeps listings in order.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, ulid::Ulid::new().to_string().to_ascii_lowercase()))
            }

            pub fn parse(s: &str) -> Result<Self, IdError> {
                let rest = s.strip_prefix($prefix).ok_or_else(|| {
                    IdError(format!("must start with `{}`", $prefix))
                })?;
                if rest.len() != 26 || ulid::Ulid::from_string(&rest.to_ascii_uppercase()).is_err() {
                    return Err(IdError(format!("`{s}` is not a valid {} id", $prefix.trim_end_matches('_'))));
                }
                // ULIDs are case-insensitive; ids are handed out in lower case, so one written
                // in upper case names the same thing.
                Ok(Self(format!("{}{}", $prefix, rest.to_ascii_lowercase())))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

prefixed_id!(
    /// A webhook subscription: `sub_…`.
    SubscriptionId,
    "sub_"
);
prefixed_id!(
    /// One event's delivery to one subscription: `dlv_…`.
    DeliveryId,
    "dlv_"
);

impl DeliveryId {
    /// The id of the delivery of `event` to `subscription`: a hash of the three (and the event's
    /// time, when its id carries one), shaped like the other ids, so every path that creates this delivery (the API, the events queue, a
    /// redelivered message, a retry after a crash) names the same one, and its `webhook-id`
    /// never changes.
    pub fn derive(tenant: &TenantId, event: &EventId, subscription: &SubscriptionId) -> Self {
        use sha2::Digest as _;
        let mut hash = sha2::Sha256::new();
        for part in [tenant.as_str(), event.as_str(), subscription.as_str()] {
            // Length-prefixed, so no two triples hash the same bytes.
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        let digest = hash.finalize();
        let mut random = [0u8; 16];
        random[6..].copy_from_slice(&digest[..10]);
        // The time part is the event's own, when its id is a ULID (generated, or derived from a
        // queue message): a delivery id then sorts by time like the others, and the store's
        // indexes take new ones at their end instead of at random places (which costs B-tree
        // page splits on every insert). A producer's own event id has no time: 0.
        let time_ms = event
            .as_str()
            .strip_prefix("evt_")
            .and_then(|rest| ulid::Ulid::from_string(&rest.to_ascii_uppercase()).ok())
            .map_or(0, |u| u.timestamp_ms());
        let ulid = ulid::Ulid::from_parts(time_ms, u128::from_be_bytes(random));
        Self(format!(
            "{}{}",
            Self::PREFIX,
            ulid.to_string().to_ascii_lowercase()
        ))
    }
}

/// An event id. Generated ids look like `evt_…`; producers may bring their own (it is also the
/// idempotency key), so any 1–128 characters of `[A-Za-z0-9._:-]` are accepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct EventId(String);

impl EventId {
    pub fn generate() -> Self {
        Self(format!(
            "evt_{}",
            ulid::Ulid::new().to_string().to_ascii_lowercase()
        ))
    }

    /// The id of an event a queue message publishes without an `eventId`: a ULID whose time is
    /// the message's send time and whose random part is a hash of the message id, so every
    /// receive of the one message names the same event (and the store's check on the event id
    /// makes SQS's redeliveries publish once).
    pub fn for_message(sent_at_ms: u64, message_id: &str) -> Self {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(message_id.as_bytes());
        let mut random = [0u8; 16];
        random[6..].copy_from_slice(&digest[..10]);
        let ulid = ulid::Ulid::from_parts(sent_at_ms, u128::from_be_bytes(random));
        Self(format!("evt_{}", ulid.to_string().to_ascii_lowercase()))
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > 128 {
            return Err(IdError("must be 1 to 128 characters".into()));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(IdError(
                "may contain only letters, digits and `._:-`".into(),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A tenant: the owner of API keys, subscriptions, events and deliveries.
/// Lower-case letters, digits, `-` and `_`, 1–64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > 64 {
            return Err(IdError("tenant must be 1 to 64 characters".into()));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'))
        {
            return Err(IdError(
                "tenant may contain only lower-case letters, digits, `-` and `_`".into(),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_written_in_upper_case_names_the_same_thing() {
        let sub = SubscriptionId::generate();
        let shouted = format!("sub_{}", sub.as_str()["sub_".len()..].to_ascii_uppercase());
        assert_eq!(SubscriptionId::parse(&shouted).unwrap(), sub);
        let dlv = DeliveryId::generate();
        let shouted = format!("dlv_{}", dlv.as_str()["dlv_".len()..].to_ascii_uppercase());
        assert_eq!(DeliveryId::parse(&shouted).unwrap(), dlv);
        assert!(SubscriptionId::parse(&shouted.replacen("dlv_", "SUB_", 1)).is_err());
    }

    #[test]
    fn generated_ids_parse_back() {
        let sub = SubscriptionId::generate();
        assert!(sub.as_str().starts_with("sub_"));
        assert_eq!(SubscriptionId::parse(sub.as_str()).unwrap(), sub);
        let dlv = DeliveryId::generate();
        assert_eq!(DeliveryId::parse(dlv.as_str()).unwrap(), dlv);
        let evt = EventId::generate();
        assert!(evt.as_str().starts_with("evt_"));
        assert_eq!(EventId::parse(evt.as_str()).unwrap(), evt);
    }

    #[test]
    fn a_message_names_one_event_however_often_it_is_received() {
        let sent = 1_764_000_000_000;
        let id = EventId::for_message(sent, "059f36b4-87a3-44ab-83d2-661975830a7d");
        assert_eq!(
            id,
            EventId::for_message(sent, "059f36b4-87a3-44ab-83d2-661975830a7d")
        );
        assert_ne!(
            id,
            EventId::for_message(sent, "059f36b4-87a3-44ab-83d2-661975830a7e")
        );
        assert_eq!(EventId::parse(id.as_str()).unwrap(), id);
        let ulid = ulid::Ulid::from_string(id.as_str().strip_prefix("evt_").unwrap()).unwrap();
        assert_eq!(
            ulid.timestamp_ms(),
            sent,
            "the ULID's time is the send time"
        );
    }

    #[test]
    fn prefixed_ids_reject_wrong_prefix_and_garbage() {
        let dlv = DeliveryId::generate();
        assert!(SubscriptionId::parse(dlv.as_str()).is_err());
        assert!(SubscriptionId::parse("sub_").is_err());
        assert!(SubscriptionId::parse("sub_not-a-ulid-at-all-xxxxxxxx").is_err());
        assert!(SubscriptionId::parse("").is_err());
        assert!(DeliveryId::parse("dlv_01h!").is_err());
    }

    #[test]
    fn event_ids_from_producers() {
        assert!(EventId::parse("order-123.shipped:v2_x").is_ok());
        assert!(EventId::parse("").is_err());
        assert!(EventId::parse(&"a".repeat(129)).is_err());
        assert!(EventId::parse(&"a".repeat(128)).is_ok());
        assert!(EventId::parse("has space").is_err());
        assert!(EventId::parse("slash/y").is_err());
    }

    #[test]
    fn tenant_ids() {
        assert!(TenantId::parse("acme-prod_1").is_ok());
        assert!(TenantId::parse("Acme").is_err());
        assert!(TenantId::parse("").is_err());
        assert!(TenantId::parse(&"a".repeat(65)).is_err());
    }
}
