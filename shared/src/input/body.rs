//! Request bodies, parsed field by field so every error names its field. The same parsers read
//! events arriving on the SQS events queue.

use std::collections::{BTreeMap, HashSet};

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::Problem;
use crate::app::{BatchItem, MAX_BATCH_EVENTS, NewSubscription, PublishRequest, SubscriptionPatch};
use crate::domain::{
    CallbackUrl, EventId, EventType, EventTypePattern, Secret, SubscriptionStatus, Timestamp,
};

/// A JSON object whose fields are still raw, so each can be parsed (and blamed) on its own.
pub struct Fields<'a> {
    fields: BTreeMap<&'a str, &'a RawValue>,
}

impl<'a> Fields<'a> {
    /// 400 unless `bytes` is one JSON object; 422 for a field not in `known`.
    pub fn parse(bytes: &'a [u8], known: &[&str]) -> Result<Self, Problem> {
        let fields: BTreeMap<&'a str, &'a RawValue> =
            serde_json::from_slice(bytes).map_err(|e| {
                if e.is_data() {
                    Problem::malformed("the body must be a JSON object")
                } else {
                    Problem::malformed(format!("the body is not valid JSON: {e}"))
                }
            })?;
        if let Some(unknown) = fields.keys().find(|k| !known.contains(k)) {
            return Err(Problem::invalid(
                *unknown,
                format!("unknown field; expected one of: {}", known.join(", ")),
            ));
        }
        Ok(Self { fields })
    }

    fn raw(&self, name: &str) -> Option<&'a RawValue> {
        // An explicit `null` reads as absent.
        self.fields.get(name).copied().filter(|v| v.get() != "null")
    }

    pub fn optional<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, Problem> {
        self.raw(name)
            .map(|raw| {
                serde_json::from_str(raw.get()).map_err(|e| Problem::invalid(name, clean(&e)))
            })
            .transpose()
    }

    pub fn required<T: DeserializeOwned>(&self, name: &str) -> Result<T, Problem> {
        self.optional(name)?
            .ok_or_else(|| Problem::invalid(name, "is required"))
    }

    /// A string field parsed by a domain constructor.
    pub fn parsed<T, E: std::fmt::Display>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<Option<T>, Problem> {
        self.optional::<String>(name)?
            .map(|s| parse(&s).map_err(|e| Problem::invalid(name, e.to_string())))
            .transpose()
    }

    fn has(&self, name: &str) -> bool {
        self.raw(name).is_some()
    }
}

/// serde's messages carry a position that means nothing once a field is singled out.
fn clean(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// `eventType: "a.b"` or `eventTypes: ["a.b", "c.*"]`, exactly one of them.
fn event_types(
    fields: &Fields<'_>,
    required: bool,
) -> Result<Option<Vec<EventTypePattern>>, Problem> {
    match (fields.has("eventType"), fields.has("eventTypes")) {
        (true, true) => Err(Problem::invalid(
            "eventTypes",
            "give either `eventType` or `eventTypes`, not both",
        )),
        (true, false) => Ok(fields
            .parsed("eventType", EventTypePattern::parse)?
            .map(|p| vec![p])),
        (false, true) => {
            let raw: Vec<String> = fields.required("eventTypes")?;
            let mut patterns = Vec::with_capacity(raw.len());
            // A set, not `patterns.contains`: a 256 KiB body lists some 40,000 types, and the
            // limit on how many a subscription may have is checked after this.
            let mut seen = HashSet::with_capacity(raw.len());
            for (i, s) in raw.iter().enumerate() {
                let p = EventTypePattern::parse(s)
                    .map_err(|e| Problem::invalid(format!("eventTypes[{i}]"), e.to_string()))?;
                if seen.insert(p.clone()) {
                    patterns.push(p);
                }
            }
            if patterns.is_empty() {
                return Err(Problem::invalid("eventTypes", "must not be empty"));
            }
            Ok(Some(patterns))
        }
        (false, false) if required => Err(Problem::invalid(
            "eventType",
            "is required (or `eventTypes`, an array)",
        )),
        (false, false) => Ok(None),
    }
}

const SUBSCRIPTION_FIELDS: &[&str] = &[
    "eventType",
    "eventTypes",
    "callbackUrl",
    "secret",
    "description",
    "status",
];

pub fn parse_new_subscription(bytes: &[u8]) -> Result<NewSubscription, Problem> {
    let f = Fields::parse(bytes, &SUBSCRIPTION_FIELDS[..5])?;
    Ok(NewSubscription {
        event_types: event_types(&f, true)?.unwrap_or_default(),
        callback_url: f
            .parsed("callbackUrl", CallbackUrl::parse)?
            .ok_or_else(|| Problem::invalid("callbackUrl", "is required"))?,
        secret: f.parsed("secret", Secret::parse)?,
        description: f.optional("description")?.unwrap_or_default(),
    })
}

pub fn parse_subscription_patch(bytes: &[u8]) -> Result<SubscriptionPatch, Problem> {
    let f = Fields::parse(bytes, SUBSCRIPTION_FIELDS)?;
    let status = match f.optional::<String>("status")?.as_deref() {
        None => None,
        Some("active") => Some(SubscriptionStatus::Active),
        Some("paused") => Some(SubscriptionStatus::Paused),
        Some(other) => {
            return Err(Problem::invalid(
                "status",
                format!("`{other}` is not one of: active, paused"),
            ));
        }
    };
    Ok(SubscriptionPatch {
        event_types: event_types(&f, false)?,
        callback_url: f.parsed("callbackUrl", CallbackUrl::parse)?,
        secret: f.parsed("secret", Secret::parse)?,
        description: f.optional("description")?,
        status,
    })
}

/// `{eventType, data, eventId?, occurredAt?}`: the `POST /events` body and the SQS message body.
pub fn parse_publish(bytes: &[u8]) -> Result<PublishRequest, Problem> {
    publish_request(&Fields::parse(bytes, PUBLISH_FIELDS)?)
}

const PUBLISH_FIELDS: &[&str] = &["eventType", "data", "eventId", "occurredAt"];
const BATCH_ITEM_FIELDS: &[&str] = &[
    "eventType",
    "data",
    "eventId",
    "occurredAt",
    "idempotencyKey",
];

/// `{"events": [{eventType, data, eventId?, occurredAt?, idempotencyKey?}, …]}`, the body of
/// `POST /events/batch`. The request as a whole is refused only when it is not that shape or has
/// too many events; each item is parsed on its own, and a bad one is answered in its own result
/// (its problem names the field as `events[3].data`).
pub fn parse_publish_batch(bytes: &[u8]) -> Result<Vec<Result<BatchItem, Problem>>, Problem> {
    let f = Fields::parse(bytes, &["events"])?;
    let events: Vec<Box<RawValue>> = f.required("events")?;
    if events.is_empty() {
        return Err(Problem::invalid("events", "must hold at least one event"));
    }
    if events.len() > MAX_BATCH_EVENTS {
        return Err(Problem::invalid(
            "events",
            format!(
                "at most {MAX_BATCH_EVENTS} events per request, not {}",
                events.len()
            ),
        ));
    }
    Ok(events
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            batch_item(raw.get().as_bytes()).map_err(|p| p.within(&format!("events[{i}]")))
        })
        .collect())
}

fn batch_item(bytes: &[u8]) -> Result<BatchItem, Problem> {
    let f = Fields::parse(bytes, BATCH_ITEM_FIELDS)?;
    let idempotency_key: Option<String> = f.optional("idempotencyKey")?;
    if let Some(key) = &idempotency_key
        && (key.is_empty() || key.len() > 255)
    {
        return Err(Problem::invalid(
            "idempotencyKey",
            "must be 1 to 255 characters",
        ));
    }
    Ok(BatchItem {
        request: publish_request(&f)?,
        idempotency_key,
    })
}

fn publish_request(f: &Fields<'_>) -> Result<PublishRequest, Problem> {
    let data = f
        .fields
        .get("data")
        .map(|raw| (*raw).to_owned())
        .ok_or_else(|| Problem::invalid("data", "is required (any JSON value)"))?;
    Ok(PublishRequest {
        event_type: f
            .parsed("eventType", EventType::parse)?
            .ok_or_else(|| Problem::invalid("eventType", "is required"))?,
        data,
        event_id: f.parsed("eventId", EventId::parse)?,
        occurred_at: f.parsed("occurredAt", Timestamp::parse)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: Result<impl Sized, Problem>) -> (u16, Option<String>) {
        match r {
            Ok(_) => (200, None),
            Err(p) => (p.status, p.field),
        }
    }

    #[test]
    fn malformed_json_is_400_and_wrong_values_name_the_field() {
        assert_eq!(field_of(parse_publish(b"{nope")), (400, None));
        assert_eq!(field_of(parse_publish(b"[1,2]")), (400, None));
        assert_eq!(
            field_of(parse_publish(br#"{"eventType":"a..b","data":1}"#)),
            (422, Some("eventType".into()))
        );
        assert_eq!(
            field_of(parse_publish(br#"{"eventType":"a.b"}"#)),
            (422, Some("data".into()))
        );
        assert_eq!(
            field_of(parse_publish(
                br#"{"eventType":"a.b","data":1,"occurredAt":"soon"}"#
            )),
            (422, Some("occurredAt".into()))
        );
        assert_eq!(
            field_of(parse_publish(
                br#"{"eventType":"a.b","data":1,"colour":"red"}"#
            )),
            (422, Some("colour".into()))
        );
        assert_eq!(
            field_of(parse_new_subscription(
                br#"{"eventType":"a.b","callbackUrl":"ftp://x"}"#
            )),
            (422, Some("callbackUrl".into()))
        );
        assert_eq!(
            field_of(parse_new_subscription(
                br#"{"eventTypes":["a.b","c d"],"callbackUrl":"https://x.example/"}"#
            )),
            (422, Some("eventTypes[1]".into()))
        );
        assert_eq!(
            field_of(parse_new_subscription(
                br#"{"eventType":5,"callbackUrl":"https://x.example/"}"#
            )),
            (422, Some("eventType".into()))
        );
    }

    #[test]
    fn a_batch_is_refused_whole_only_for_its_shape_and_each_item_names_its_field() {
        assert_eq!(field_of(parse_publish_batch(b"[1]")), (400, None));
        assert_eq!(
            field_of(parse_publish_batch(br#"{"events":[]}"#)),
            (422, Some("events".into()))
        );
        let many = format!(
            r#"{{"events":[{}]}}"#,
            vec![r#"{"eventType":"a.b","data":1}"#; MAX_BATCH_EVENTS + 1].join(",")
        );
        assert_eq!(
            field_of(parse_publish_batch(many.as_bytes())),
            (422, Some("events".into()))
        );
        let items = parse_publish_batch(
            br#"{"events":[{"eventType":"a.b","data":1,"idempotencyKey":"k"},{"eventType":"a b","data":1},7,{"eventType":"a.b"}]}"#,
        )
        .unwrap();
        assert_eq!(items.len(), 4);
        let long_key = format!(
            r#"{{"events":[{{"eventType":"a.b","data":1,"idempotencyKey":"{}"}}]}}"#,
            "k".repeat(256)
        );
        let refused = parse_publish_batch(long_key.as_bytes()).unwrap();
        assert_eq!(
            refused[0]
                .as_ref()
                .err()
                .and_then(|p| p.field.clone())
                .as_deref(),
            Some("events[0].idempotencyKey")
        );
        let first = items[0].as_ref().unwrap();
        assert_eq!(first.idempotency_key.as_deref(), Some("k"));
        assert_eq!(first.request.data.get(), "1");
        let fields: Vec<_> = items[1..]
            .iter()
            .map(|i| match i {
                Err(p) => (p.status, p.field.clone()),
                Ok(_) => (200, None),
            })
            .collect();
        assert_eq!(
            fields,
            [
                (422, Some("events[1].eventType".to_owned())),
                (422, Some("events[2]".to_owned())),
                (422, Some("events[3].data".to_owned())),
            ]
        );
    }

    #[test]
    fn data_bytes_are_kept_exactly() {
        let p = parse_publish(br#"{"eventType":"a.b","data":{"z":1,  "a":[true,null]}}"#).unwrap();
        assert_eq!(p.data.get(), r#"{"z":1,  "a":[true,null]}"#);
        let p = parse_publish(br#"{"eventType":"a.b","data":null}"#).unwrap();
        assert_eq!(p.data.get(), "null");
    }

    #[test]
    fn event_type_or_event_types() {
        let s = parse_new_subscription(
            br#"{"eventType":"order.*","callbackUrl":"https://x.example/"}"#,
        )
        .unwrap();
        assert_eq!(s.event_types.len(), 1);
        let s = parse_new_subscription(
            br#"{"eventTypes":["a.b","a.b","c.*"],"callbackUrl":"https://x.example/"}"#,
        )
        .unwrap();
        assert_eq!(s.event_types.len(), 2, "duplicates collapse");
        assert_eq!(
            field_of(parse_new_subscription(
                br#"{"eventType":"a","eventTypes":["b"],"callbackUrl":"https://x.example/"}"#
            ))
            .0,
            422
        );
        assert_eq!(
            field_of(parse_new_subscription(
                br#"{"callbackUrl":"https://x.example/"}"#
            )),
            (422, Some("eventType".into()))
        );
    }

    /// Work per request is linear in its size: a largest body (256 KiB) listing some 40,000
    /// distinct event types is parsed (to be refused later, past the 100-pattern limit) in
    /// milliseconds. De-duplicating with `Vec::contains` took 12 s in a debug build.
    #[test]
    fn a_body_of_many_event_types_is_parsed_in_linear_time() {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-";
        let mut names = Vec::new();
        let mut body_len = 0;
        'outer: for a in ALPHABET {
            for b in ALPHABET {
                for c in ALPHABET {
                    body_len += 6;
                    if body_len > 250 * 1024 {
                        break 'outer;
                    }
                    names.push(String::from_utf8(vec![*a, *b, *c]).unwrap());
                }
            }
        }
        let body = serde_json::json!({ "eventTypes": names, "callbackUrl": "https://x.example/" })
            .to_string();
        assert!(body.len() <= crate::api::MAX_BODY_BYTES);
        let started = std::time::Instant::now();
        let parsed = parse_new_subscription(body.as_bytes()).unwrap();
        let took = started.elapsed();
        assert_eq!(parsed.event_types.len(), names.len());
        assert!(
            took < std::time::Duration::from_secs(1),
            "{} event types took {took:?}",
            names.len()
        );
    }
}
