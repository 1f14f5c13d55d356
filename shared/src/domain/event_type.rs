//! Event types (`order.shipped`) and the patterns subscriptions use to pick them (`*`, `order.*`).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EventTypeError(String);

pub const MAX_EVENT_TYPE_LEN: usize = 128;

/// A dotted event type: segments of `[A-Za-z0-9_-]`, separated by single dots, at most 128 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(String);

fn check_segments(s: &str, what: &str) -> Result<(), EventTypeError> {
    if s.is_empty() {
        return Err(EventTypeError(format!("{what} must not be empty")));
    }
    if s.len() > MAX_EVENT_TYPE_LEN {
        return Err(EventTypeError(format!(
            "{what} must be at most {MAX_EVENT_TYPE_LEN} characters"
        )));
    }
    for segment in s.split('.') {
        if segment.is_empty() {
            return Err(EventTypeError(format!(
                "`{s}` has an empty segment: use single dots between names, like `order.shipped`"
            )));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(EventTypeError(format!(
                "`{s}`: segments may contain only letters, digits, `_` and `-`"
            )));
        }
    }
    Ok(())
}

impl EventType {
    pub fn parse(s: &str) -> Result<Self, EventTypeError> {
        check_segments(s, "event type")?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a subscription listens to: `*` (everything), an exact type, or a prefix `order.*` that
/// matches every type below `order.` (`order.shipped`, `order.item.added`), not `order` itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventTypePattern {
    All,
    Exact(EventType),
    Prefix(String),
}

impl EventTypePattern {
    pub fn parse(s: &str) -> Result<Self, EventTypeError> {
        if s == "*" {
            return Ok(Self::All);
        }
        if let Some(prefix) = s.strip_suffix(".*") {
            check_segments(prefix, "event type pattern")?;
            return Ok(Self::Prefix(format!("{prefix}.")));
        }
        if s.contains('*') {
            return Err(EventTypeError(format!(
                "`{s}`: `*` is allowed only alone or as the last segment, like `order.*`"
            )));
        }
        EventType::parse(s).map(Self::Exact)
    }

    pub fn matches(&self, event_type: &EventType) -> bool {
        match self {
            Self::All => true,
            Self::Exact(t) => t == event_type,
            Self::Prefix(p) => event_type.as_str().starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for EventTypePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Exact(t) => f.write_str(t.as_str()),
            Self::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}
string_serde!(EventType);
string_serde!(EventTypePattern);

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> EventType {
        EventType::parse(s).unwrap()
    }

    #[test]
    fn event_types_parse() {
        for good in ["order", "order.shipped", "a.b-c.d_e", "V2.Order.Created"] {
            assert!(EventType::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "order.",
            ".order",
            "order..shipped",
            "order shipped",
            "order.*",
            "ö",
        ] {
            assert!(EventType::parse(bad).is_err(), "{bad}");
        }
        assert!(EventType::parse(&"a".repeat(129)).is_err());
        assert!(EventType::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn patterns_parse_and_display_round_trip() {
        for s in ["*", "order.*", "order.shipped", "a.b.*"] {
            assert_eq!(EventTypePattern::parse(s).unwrap().to_string(), s);
        }
        for bad in [
            "",
            "**",
            "order*",
            "*.shipped",
            "order.*.x",
            ".*",
            "order..*",
        ] {
            assert!(EventTypePattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching() {
        let all = EventTypePattern::parse("*").unwrap();
        let orders = EventTypePattern::parse("order.*").unwrap();
        let shipped = EventTypePattern::parse("order.shipped").unwrap();
        assert!(all.matches(&t("anything.at.all")));
        assert!(orders.matches(&t("order.shipped")));
        assert!(orders.matches(&t("order.item.added")));
        assert!(!orders.matches(&t("order")));
        assert!(!orders.matches(&t("orders.shipped")));
        assert!(shipped.matches(&t("order.shipped")));
        assert!(!shipped.matches(&t("order.shipped.late")));
        assert!(!shipped.matches(&t("order.created")));
    }
}
