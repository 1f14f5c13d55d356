//! Prefixed identifiers. A value of these types is always well formed: parse at the edge.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Timestamp;

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

/// One event's delivery to one subscription: `dlv_`, then the subscription's ULID, then a ULID
/// of its own (56 characters in all). The id names its subscription, so a store can keep a
/// subscription's deliveries together and still find one from its id alone; its own part sorts
/// by the event's receive time, which orders a subscription's list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryId(String);

impl DeliveryId {
    pub const PREFIX: &'static str = "dlv_";
    /// Characters of a ULID.
    const ULID_LEN: usize = 26;

    /// The id of the delivery of `event` to `subscription`: the subscription's ULID, then a ULID
    /// whose time is the event's receive time and whose rest is a hash of the three, so every
    /// path that creates this delivery (the API, the events queue, a redelivered message, a
    /// retry after a crash: all fan out the stored event) names the same one, and its
    /// `webhook-id` never changes.
    pub fn derive(
        tenant: &TenantId,
        event: &EventId,
        subscription: &SubscriptionId,
        received_at: Timestamp,
    ) -> Self {
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
        // ULIDs carry 48 bits of milliseconds from 1970: enough until the year 10889.
        let time_ms = u64::try_from(received_at.unix_millis()).unwrap_or(0) & ((1 << 48) - 1);
        let own = ulid::Ulid::from_parts(time_ms, u128::from_be_bytes(random));
        Self::from_parts(subscription, &own)
    }

    /// A random id (tests, and unknown ids in examples).
    pub fn generate() -> Self {
        Self::from_parts(&SubscriptionId::generate(), &ulid::Ulid::new())
    }

    fn from_parts(subscription: &SubscriptionId, own: &ulid::Ulid) -> Self {
        Self(format!(
            "{}{}{}",
            Self::PREFIX,
            &subscription.as_str()[SubscriptionId::PREFIX.len()..],
            own.to_string().to_ascii_lowercase()
        ))
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        let rest = s
            .strip_prefix(Self::PREFIX)
            .ok_or_else(|| IdError(format!("must start with `{}`", Self::PREFIX)))?;
        let valid = rest.len() == 2 * Self::ULID_LEN
            && rest.is_char_boundary(Self::ULID_LEN)
            && ulid::Ulid::from_string(&rest[..Self::ULID_LEN].to_ascii_uppercase()).is_ok()
            && ulid::Ulid::from_string(&rest[Self::ULID_LEN..].to_ascii_uppercase()).is_ok();
        if !valid {
            return Err(IdError(format!("`{s}` is not a valid dlv id")));
        }
        // ULIDs are case-insensitive; ids are handed out in lower case.
        Ok(Self(format!(
            "{}{}",
            Self::PREFIX,
            rest.to_ascii_lowercase()
        )))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The subscription this delivery is for.
    pub fn subscription_id(&self) -> SubscriptionId {
        let ulid = &self.0[Self::PREFIX.len()..Self::PREFIX.len() + Self::ULID_LEN];
        SubscriptionId(format!("{}{ulid}", SubscriptionId::PREFIX))
    }

    /// The delivery's own part (a ULID, lower case): it sorts by the event's receive time, then
    /// by a hash.
    pub fn own_part(&self) -> &str {
        &self.0[Self::PREFIX.len() + Self::ULID_LEN..]
    }

    /// The id of the delivery to `subscription` whose own part is `own` (as
    /// [`own_part`](Self::own_part) gives it).
    pub fn from_own_part(subscription: &SubscriptionId, own: &str) -> Result<Self, IdError> {
        Self::parse(&format!(
            "{}{}{own}",
            Self::PREFIX,
            &subscription.as_str()[SubscriptionId::PREFIX.len()..]
        ))
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for DeliveryId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DeliveryId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
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
    fn a_delivery_id_names_its_subscription_and_sorts_by_the_events_receive_time() {
        let tenant = TenantId::parse("acme").unwrap();
        let sub = SubscriptionId::generate();
        let event = EventId::parse("order-7").unwrap();
        let at = Timestamp::from_unix_millis(1_764_000_000_000);
        let id = DeliveryId::derive(&tenant, &event, &sub, at);
        assert_eq!(id, DeliveryId::derive(&tenant, &event, &sub, at), "stable");
        assert_eq!(id.as_str().len(), 4 + 52);
        assert_eq!(DeliveryId::parse(id.as_str()).unwrap(), id);
        assert_eq!(id.subscription_id(), sub);
        assert_eq!(DeliveryId::from_own_part(&sub, id.own_part()).unwrap(), id);
        let own = ulid::Ulid::from_string(&id.own_part().to_ascii_uppercase()).unwrap();
        assert_eq!(own.timestamp_ms(), 1_764_000_000_000);
        let later = DeliveryId::derive(
            &tenant,
            &EventId::parse("order-6").unwrap(),
            &sub,
            Timestamp::from_unix_millis(1_764_000_000_001),
        );
        assert!(later.own_part() > id.own_part(), "sorts by receive time");
        // Another tenant, event or subscription: another delivery.
        let other_tenant = TenantId::parse("acme-2").unwrap();
        assert_ne!(id, DeliveryId::derive(&other_tenant, &event, &sub, at));
        assert_ne!(
            id.own_part(),
            DeliveryId::derive(&tenant, &event, &SubscriptionId::generate(), at).own_part()
        );
        // Before 1970: the earliest time, still a valid id.
        let old = DeliveryId::derive(&tenant, &event, &sub, Timestamp::from_unix_millis(-5));
        assert_eq!(DeliveryId::parse(old.as_str()).unwrap(), old);
    }

    #[test]
    fn prefixed_ids_reject_wrong_prefix_and_garbage() {
        let dlv = DeliveryId::generate();
        assert!(SubscriptionId::parse(dlv.as_str()).is_err());
        assert!(SubscriptionId::parse("sub_").is_err());
        assert!(SubscriptionId::parse("sub_not-a-ulid-at-all-xxxxxxxx").is_err());
        assert!(SubscriptionId::parse("").is_err());
        assert!(DeliveryId::parse("dlv_01h!").is_err());
        let sub_only = format!("dlv_{}", &SubscriptionId::generate().as_str()[4..]);
        assert!(
            DeliveryId::parse(&sub_only).is_err(),
            "one ULID is not enough"
        );
        assert!(DeliveryId::parse(&format!("{}é", &dlv.as_str()[..55])).is_err());
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
