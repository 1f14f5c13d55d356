//! The API bodies (also the events queue's message bodies): any bytes are refused with a problem
//! (400 for what is not a JSON object, 422 naming the field otherwise), and a body built from
//! fields known to be good or bad is accepted exactly when all its fields are good, with the
//! values given, and refused naming one of the bad ones.

use std::collections::BTreeSet;

use proptest::prelude::*;
use serde_json::{Value, json};
use tidings_core::api::Problem;
use tidings_core::api::body::{
    parse_new_subscription, parse_publish, parse_publish_batch, parse_subscription_patch,
};
use tidings_core::app::MAX_BATCH_EVENTS;
use tidings_core::domain::{CallbackUrl, EventTypePattern, Secret, Timestamp};

use crate::{config, text};

/// Any JSON value, nested a few levels, with the numbers and strings that trip parsers.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        text(20).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::btree_map(text(8), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON value as text, compact or indented: `data` must come back byte for byte either way.
pub fn json_text() -> impl Strategy<Value = (Value, String)> {
    (json_value(), any::<bool>()).prop_map(|(v, pretty)| {
        let text = if pretty {
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            serde_json::to_string(&v).unwrap()
        };
        (v, text)
    })
}

/// One field of a generated body: left out, or its JSON text and whether the parser must refuse it.
#[derive(Debug, Clone)]
enum Field {
    Absent,
    Good(String),
    Bad(String),
}

impl Field {
    fn good(v: impl Into<Value>) -> Self {
        Self::Good(v.into().to_string())
    }

    fn bad(v: impl Into<Value>) -> Self {
        Self::Bad(v.into().to_string())
    }
}

fn event_type_name() -> impl Strategy<Value = String> {
    proptest::collection::vec("[A-Za-z0-9_-]{1,6}", 1..4).prop_map(|s| s.join("."))
}

/// `eventType` of an event: required, so leaving it out is a fault.
fn event_type_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        4 => event_type_name().prop_map(Field::good),
        1 => Just(Field::Bad(String::new())),
        1 => prop::sample::select(vec![
            json!("a..b"), json!(""), json!("a b"), json!("order.*"), json!("*"), json!(".a"),
            json!("ö"), json!(5), json!(["a"]), json!({"a": 1}), json!(true), json!("a".repeat(129)),
        ])
        .prop_map(Field::bad),
    ]
}

fn optional(good: BoxedStrategy<Value>, bad: Vec<Value>) -> impl Strategy<Value = Field> {
    prop_oneof![
        2 => Just(Field::Absent),
        // An explicit null reads as absent.
        1 => Just(Field::Good("null".to_owned())),
        3 => good.prop_map(Field::good),
        1 => prop::sample::select(bad).prop_map(Field::bad),
    ]
}

fn event_id_field() -> impl Strategy<Value = Field> {
    optional(
        "[A-Za-z0-9._:-]{1,128}".prop_map(Value::from).boxed(),
        vec![
            json!(""),
            json!("a b"),
            json!("a/b"),
            json!("x".repeat(129)),
            json!(5),
            json!(["a"]),
        ],
    )
}

fn occurred_at_field() -> impl Strategy<Value = Field> {
    optional(
        (-62_167_219_200_000i64..=253_402_300_799_999)
            .prop_map(|ms| Value::from(Timestamp::from_unix_millis(ms).to_string()))
            .boxed(),
        vec![
            json!("soon"),
            json!("2026-13-01T00:00:00Z"),
            json!("2026-11-25"),
            json!(1_614_265_330),
            json!("0000-01-01T00:00:00+01:00"),
            json!("9999-12-31T23:59:59-01:00"),
        ],
    )
}

fn unknown_field() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        6 => Just(None),
        1 => prop::sample::select(vec!["colour", "event_type", "EventType", "Data", ""]).prop_map(Some),
    ]
}

/// `{name: text, …}` from the fields present, in a random order, and the names of the bad ones.
fn object(fields: Vec<(&str, &Field)>) -> (String, BTreeSet<String>) {
    let mut parts = Vec::new();
    let mut faults = BTreeSet::new();
    for (name, field) in fields {
        match field {
            Field::Absent => {}
            Field::Good(v) => parts.push(format!("{}: {v}", json!(name))),
            Field::Bad(v) => {
                if !v.is_empty() {
                    parts.push(format!("{}: {v}", json!(name)));
                }
                faults.insert(name.to_owned());
            }
        }
    }
    (format!("{{{}}}", parts.join(", ")), faults)
}

/// A refusal names a field when it is 422, none when it is 400; anything else is wrong.
fn assert_clean(problem: &Problem) -> Result<(), TestCaseError> {
    match problem.status {
        400 => prop_assert!(problem.field.is_none(), "{:?}", problem),
        422 => prop_assert!(problem.field.is_some(), "{:?}", problem),
        other => prop_assert!(false, "status {} for {:?}", other, problem),
    }
    Ok(())
}

/// The field a 422 names, which must be one of `faults`.
fn assert_names_a_fault(problem: &Problem, faults: &BTreeSet<String>) -> Result<(), TestCaseError> {
    prop_assert_eq!(problem.status, 422, "{:?}", problem);
    let field = problem.field.clone().unwrap_or_default();
    prop_assert!(
        faults.contains(&field),
        "{:?} names none of {:?}",
        problem,
        faults
    );
    Ok(())
}

/// The keys of the top-level object `bytes` holds, if it is one.
fn keys_of(bytes: &[u8]) -> BTreeSet<String> {
    serde_json::from_slice::<serde_json::Map<String, Value>>(bytes)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Bytes that are sometimes JSON: random, or a valid body with a few bytes changed.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let valid = br#"{"eventType":"order.shipped","data":{"id":[1,2.5e3,"x"]},"eventId":"e-1","occurredAt":"2026-01-01T00:00:00Z","callbackUrl":"https://x.example/","eventTypes":["a.*"],"events":[{"eventType":"a","data":1}]}"#.to_vec();
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        text(200).prop_map(String::into_bytes),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6)
            .prop_map(move |edits| {
                let mut bytes = valid.clone();
                for (at, byte, how) in edits {
                    let i = at.index(bytes.len());
                    match how {
                        0 => bytes[i] = byte,
                        1 => bytes.insert(i, byte),
                        _ => {
                            bytes.remove(i);
                        }
                    }
                }
                bytes
            }),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_bytes_are_a_body_or_a_clean_problem(bytes in hostile_bytes()) {
        let keys = keys_of(&bytes);
        let known = |f: &str, fields: &[&str]| fields.contains(&f) || keys.contains(f);
        if let Err(p) = parse_publish(&bytes) {
            assert_clean(&p)?;
            if let Some(f) = &p.field {
                prop_assert!(known(f, &["eventType", "data", "eventId", "occurredAt"]), "{:?}", p);
            }
        }
        let refusals = [parse_new_subscription(&bytes).err(), parse_subscription_patch(&bytes).err()];
        for p in refusals.into_iter().flatten() {
            assert_clean(&p)?;
            let f = p.field.clone().unwrap_or_default();
            prop_assert!(
                p.field.is_none() || f.starts_with("eventTypes[")
                    || known(&f, &["eventType", "eventTypes", "callbackUrl", "secret", "description", "status"]),
                "{:?}", p
            );
        }
        match parse_publish_batch(&bytes) {
            Err(p) => assert_clean(&p)?,
            Ok(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Err(p) = item {
                        prop_assert_eq!(p.status, 422);
                        let f = p.field.clone().unwrap_or_default();
                        prop_assert!(f.starts_with(&format!("events[{i}]")), "{:?}", p);
                    }
                }
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused_or_kept_never_a_crash(depth in prop_oneof![1usize..200, 10_000usize..200_000], open in any::<bool>()) {
        let nested = format!("{}{}", "[".repeat(depth), if open { String::new() } else { "]".repeat(depth) });
        let body = format!(r#"{{"eventType":"a","data":{nested}}}"#);
        match parse_publish(body.as_bytes()) {
            Ok(p) => prop_assert_eq!(p.data.get(), nested.as_str()),
            Err(p) => assert_clean(&p)?,
        }
        let body = format!(r#"{{"events":[{{"eventType":"a","data":{nested}}}]}}"#);
        if let Err(p) = parse_publish_batch(body.as_bytes()) {
            assert_clean(&p)?;
        }
        let body = format!(r#"{{"eventTypes":{nested},"callbackUrl":"https://x.example/"}}"#);
        if let Err(p) = parse_new_subscription(body.as_bytes()) {
            assert_clean(&p)?;
        }
    }

    #[test]
    fn publish_accepts_exactly_good_fields_and_keeps_them(
        event_type in event_type_field(),
        data in prop_oneof![4 => json_text().prop_map(Some), 1 => Just(None)],
        event_id in event_id_field(),
        occurred_at in occurred_at_field(),
        unknown in unknown_field(),
        shift in 0usize..5,
    ) {
        let data_field = match &data {
            Some((_, text)) => Field::Good(text.clone()),
            None => Field::Bad(String::new()),
        };
        let unknown_field = Field::bad(1);
        let mut fields = vec![
            ("eventType", &event_type),
            ("data", &data_field),
            ("eventId", &event_id),
            ("occurredAt", &occurred_at),
        ];
        if let Some(name) = unknown {
            fields.push((name, &unknown_field));
        }
        let n = fields.len();
        fields.rotate_left(shift % n);
        let (body, faults) = object(fields);
        match parse_publish(body.as_bytes()) {
            Err(p) => assert_names_a_fault(&p, &faults)?,
            Ok(p) => {
                prop_assert!(faults.is_empty(), "{} accepted despite {:?}", body, faults);
                let Field::Good(t) = &event_type else { unreachable!() };
                prop_assert_eq!(json!(p.event_type.as_str()).to_string(), t.clone());
                prop_assert_eq!(p.data.get(), data.map(|(_, text)| text).unwrap_or_default());
                let id = p.event_id.map(|id| json!(id.as_str()).to_string());
                prop_assert_eq!(id, good_text(&event_id));
                let at = p.occurred_at.map(|t| json!(t.to_string()).to_string());
                prop_assert_eq!(at, good_text(&occurred_at));
            }
        }
    }
}

/// A good field's text, None when it is absent or null.
fn good_text(field: &Field) -> Option<String> {
    match field {
        Field::Good(v) if v != "null" => Some(v.clone()),
        _ => None,
    }
}

// ---- batches ----

#[derive(Debug, Clone)]
enum Item {
    Good(String),
    GoodWithKey(String),
    BadType,
    NotAnObject,
    BadKey,
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        6 => event_type_name().prop_map(Item::Good),
        2 => event_type_name().prop_map(Item::GoodWithKey),
        1 => Just(Item::BadType),
        1 => Just(Item::NotAnObject),
        1 => Just(Item::BadKey),
    ]
}

impl Item {
    fn json(&self, i: usize) -> Value {
        match self {
            Self::Good(t) => json!({"eventType": t, "data": i}),
            Self::GoodWithKey(t) => {
                json!({"eventType": t, "data": i, "idempotencyKey": format!("k{i}")})
            }
            Self::BadType => json!({"eventType": "a b", "data": i}),
            Self::NotAnObject => json!(i),
            Self::BadKey => json!({"eventType": "a", "data": i, "idempotencyKey": "k".repeat(256)}),
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn a_batch_answers_each_item_on_its_own(items in proptest::collection::vec(item(), 0..=MAX_BATCH_EVENTS + 5)) {
        let events: Vec<Value> = items.iter().enumerate().map(|(i, item)| item.json(i)).collect();
        let body = json!({ "events": events }).to_string();
        let results = parse_publish_batch(body.as_bytes());
        if items.is_empty() || items.len() > MAX_BATCH_EVENTS {
            let p = results.err().unwrap();
            prop_assert_eq!((p.status, p.field.as_deref()), (422, Some("events")));
            return Ok(());
        }
        let results = results.unwrap();
        prop_assert_eq!(results.len(), items.len());
        for (i, (item, result)) in items.iter().zip(&results).enumerate() {
            match (item, result) {
                (Item::Good(t), Ok(b)) => {
                    prop_assert_eq!(b.request.event_type.as_str(), t.as_str());
                    prop_assert_eq!(b.request.data.get(), i.to_string());
                    prop_assert_eq!(b.idempotency_key.as_deref(), None);
                }
                (Item::GoodWithKey(_), Ok(b)) => {
                    prop_assert_eq!(b.idempotency_key.clone(), Some(format!("k{i}")));
                }
                (Item::BadType, Err(p)) => prop_assert_eq!(p.field.clone(), Some(format!("events[{i}].eventType"))),
                (Item::NotAnObject, Err(p)) => prop_assert_eq!(p.field.clone(), Some(format!("events[{i}]"))),
                (Item::BadKey, Err(p)) => prop_assert_eq!(p.field.clone(), Some(format!("events[{i}].idempotencyKey"))),
                (item, result) => prop_assert!(false, "item {} {:?} gave {:?}", i, item, result.as_ref().err()),
            }
            if let Err(p) = result {
                prop_assert_eq!(p.status, 422);
                let field = p.field.clone().unwrap();
                prop_assert!(p.detail.starts_with(&format!("`{field}`")), "{:?}", p);
            }
        }
    }
}

// ---- subscriptions ----

fn pattern_text() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("*".to_owned()),
        3 => event_type_name(),
        2 => event_type_name().prop_map(|t| format!("{t}.*")),
        // A small pool, so lists repeat themselves and de-duplication shows.
        2 => prop::sample::select(vec!["a".to_owned(), "a.*".to_owned(), "b.c".to_owned()]),
    ]
}

/// `eventTypes`: a list of patterns, one of them sometimes bad (or not a string), or not a list.
#[derive(Debug, Clone)]
enum Patterns {
    Absent,
    Good(Vec<String>),
    BadAt(Vec<String>, usize),
    NotAString(Vec<String>, usize),
    Empty,
    NotAList,
}

fn patterns_field() -> impl Strategy<Value = Patterns> {
    let list = || proptest::collection::vec(pattern_text(), 1..8);
    prop_oneof![
        3 => Just(Patterns::Absent),
        4 => list().prop_map(Patterns::Good),
        1 => (list(), any::<prop::sample::Index>()).prop_map(|(l, i)| { let i = i.index(l.len()); Patterns::BadAt(l, i) }),
        1 => (list(), any::<prop::sample::Index>()).prop_map(|(l, i)| { let i = i.index(l.len()); Patterns::NotAString(l, i) }),
        1 => Just(Patterns::Empty),
        1 => Just(Patterns::NotAList),
    ]
}

impl Patterns {
    fn field(&self) -> Field {
        let with = |l: &[String], i: usize, v: Value| {
            let mut l: Vec<Value> = l.iter().map(|s| json!(s)).collect();
            l[i] = v;
            Value::Array(l).to_string()
        };
        match self {
            Self::Absent => Field::Absent,
            Self::Good(l) => Field::good(l.clone()),
            Self::BadAt(l, i) => Field::Good(with(l, *i, json!("a..*"))),
            Self::NotAString(l, i) => Field::Good(with(l, *i, json!(7))),
            Self::Empty => Field::Good("[]".into()),
            Self::NotAList => Field::Good(r#""a.b""#.into()),
        }
    }

    /// The field a refusal of this list names, if it is bad.
    fn fault(&self) -> Option<String> {
        match self {
            Self::Absent | Self::Good(_) => None,
            Self::BadAt(_, i) => Some(format!("eventTypes[{i}]")),
            Self::NotAString(..) | Self::Empty | Self::NotAList => Some("eventTypes".into()),
        }
    }
}

/// `eventType` of a subscription: one pattern.
fn pattern_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        3 => Just(Field::Absent),
        4 => pattern_text().prop_map(Field::good),
        1 => prop::sample::select(vec![
            json!("a..b"), json!(""), json!("a b"), json!(".*"), json!("**"), json!("order*"),
            json!("*.a"), json!(5), json!(["a"]), json!("a".repeat(129)),
        ])
        .prop_map(Field::bad),
    ]
}

fn callback_url_field(required: bool) -> impl Strategy<Value = Field> {
    let absent = if required {
        Field::Bad(String::new())
    } else {
        Field::Absent
    };
    prop_oneof![
        4 => prop::sample::select(vec![
            "https://example.com/hooks", "http://127.0.0.1:9000/x?y=1", "https://[::1]:8443/",
            "HTTPS://Bücher.example/ö?q=é",
        ])
        .prop_map(Field::good),
        1 => Just(absent),
        1 => prop::sample::select(vec![
            json!("ftp://x.example/"), json!("https://u:p@x.example/"), json!("https://x.example/#f"),
            json!(""), json!(5), json!(format!("https://x.example/{}", "é".repeat(400))),
        ])
        .prop_map(Field::bad),
    ]
}

fn secret_field() -> impl Strategy<Value = Field> {
    optional(
        proptest::collection::vec(any::<u8>(), 24..=64)
            .prop_map(|key| {
                use base64::Engine as _;
                Value::from(format!(
                    "whsec_{}",
                    base64::engine::general_purpose::STANDARD.encode(key)
                ))
            })
            .boxed(),
        vec![
            json!("whsec_"),
            json!("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            json!("whsec_c2hvcnQ="),
            json!(5),
        ],
    )
}

fn description_field() -> impl Strategy<Value = Field> {
    optional(
        text(60).prop_map(Value::from).boxed(),
        vec![json!(5), json!(["a"]), json!({})],
    )
}

/// The fault of the `eventType`/`eventTypes` pair: at most one of them, and `required` one.
fn event_types_fault(one: &Field, many: &Patterns, required: bool) -> Option<String> {
    let one_given = matches!(one, Field::Good(v) | Field::Bad(v) if !v.is_empty() && v != "null");
    let many_given = !matches!(many, Patterns::Absent);
    match (one_given, many_given) {
        (true, true) => Some("eventTypes".into()),
        (true, false) => matches!(one, Field::Bad(_)).then(|| "eventType".into()),
        (false, true) => many.fault(),
        (false, false) => required.then(|| "eventType".into()),
    }
}

/// The patterns a good pair gives: the one, or the list without repeats, first ones first.
fn expected_patterns(one: &Field, many: &Patterns) -> Option<Vec<EventTypePattern>> {
    let texts: Vec<String> = match (one, many) {
        (Field::Good(v), _) if v != "null" => vec![serde_json::from_str(v).unwrap()],
        (_, Patterns::Good(l)) => l.clone(),
        _ => return None,
    };
    let mut patterns: Vec<EventTypePattern> = Vec::new();
    for t in texts {
        let p = EventTypePattern::parse(&t).unwrap();
        if !patterns.contains(&p) {
            patterns.push(p);
        }
    }
    Some(patterns)
}

fn parsed<T>(field: &Field, parse: impl Fn(&str) -> T) -> Option<T> {
    good_text(field).map(|v| parse(&serde_json::from_str::<String>(&v).unwrap()))
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_new_subscription_accepts_exactly_good_fields_and_keeps_them(
        one in pattern_field(),
        many in patterns_field(),
        url in callback_url_field(true),
        secret in secret_field(),
        description in description_field(),
        unknown in prop_oneof![4 => Just(None), 1 => Just(Some("status")), 1 => Just(Some("colour"))],
        shift in 0usize..6,
    ) {
        let many_field = many.field();
        let extra = Field::good("active");
        let mut fields = vec![
            ("eventType", &one), ("eventTypes", &many_field), ("callbackUrl", &url),
            ("secret", &secret), ("description", &description),
        ];
        if let Some(name) = unknown {
            fields.push((name, &extra));
        }
        let n = fields.len();
        fields.rotate_left(shift % n);
        let (body, mut faults) = object(fields);
        faults.remove("eventType");
        faults.extend(event_types_fault(&one, &many, true));
        faults.extend(unknown.map(str::to_owned));
        match parse_new_subscription(body.as_bytes()) {
            Err(p) => assert_names_a_fault(&p, &faults)?,
            Ok(s) => {
                prop_assert!(faults.is_empty(), "{} accepted despite {:?}", body, faults);
                prop_assert_eq!(Some(s.event_types), expected_patterns(&one, &many));
                prop_assert_eq!(Some(s.callback_url), parsed(&url, |u| CallbackUrl::parse(u).unwrap()));
                prop_assert_eq!(s.secret, parsed(&secret, |t| Secret::parse(t).unwrap()));
                prop_assert_eq!(s.description, parsed(&description, str::to_owned).unwrap_or_default());
            }
        }
    }

    #[test]
    fn a_patch_accepts_exactly_good_fields_and_keeps_them(
        one in pattern_field(),
        many in patterns_field(),
        url in callback_url_field(false),
        secret in secret_field(),
        description in description_field(),
        status in optional(
            prop::sample::select(vec![json!("active"), json!("paused")]).boxed(),
            vec![json!("disabled"), json!("ACTIVE"), json!(""), json!(1)],
        ),
        shift in 0usize..6,
    ) {
        let many_field = many.field();
        let mut fields = vec![
            ("eventType", &one), ("eventTypes", &many_field), ("callbackUrl", &url),
            ("secret", &secret), ("description", &description), ("status", &status),
        ];
        fields.rotate_left(shift);
        let (body, mut faults) = object(fields);
        faults.remove("eventType");
        faults.extend(event_types_fault(&one, &many, false));
        match parse_subscription_patch(body.as_bytes()) {
            Err(p) => assert_names_a_fault(&p, &faults)?,
            Ok(patch) => {
                prop_assert!(faults.is_empty(), "{} accepted despite {:?}", body, faults);
                prop_assert_eq!(patch.event_types, expected_patterns(&one, &many));
                prop_assert_eq!(patch.callback_url, parsed(&url, |u| CallbackUrl::parse(u).unwrap()));
                prop_assert_eq!(patch.secret, parsed(&secret, |t| Secret::parse(t).unwrap()));
                prop_assert_eq!(patch.description, parsed(&description, str::to_owned));
                prop_assert_eq!(
                    patch.status.map(|s| s.as_str().to_owned()),
                    parsed(&status, str::to_owned)
                );
            }
        }
    }
}
