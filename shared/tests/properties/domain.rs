//! The domain types: ids, event types and patterns, callback URLs, secrets, timestamps.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;
use tidings_core::domain::{
    CallbackUrl, DeliveryId, EventId, EventType, EventTypePattern, MAX_CALLBACK_URL_LEN,
    MAX_EVENT_TYPE_LEN, Secret, SubscriptionId, TenantId, Timestamp,
};

use crate::{config, text};

/// The Crockford base32 alphabet of ULIDs, lower case.
const CROCKFORD: &str = "0123456789abcdefghjkmnpqrstvwxyz";

/// A ULID as text, canonical (lower case) or with its letters upper-cased.
fn ulid_text() -> impl Strategy<Value = String> {
    (any::<u128>(), any::<bool>()).prop_map(|(n, upper)| {
        let s = ulid::Ulid(n).to_string();
        if upper { s } else { s.to_ascii_lowercase() }
    })
}

/// 26 characters that look like a ULID and often are not one (a letter outside the alphabet, a
/// first character past `7`, which would not fit 128 bits).
fn ulid_like() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop::sample::select(
            "0123456789abcdefghijklmnopqrstuvwxyzILOU!é"
                .chars()
                .collect::<Vec<_>>(),
        ),
        20..30,
    )
    .prop_map(String::from_iter)
}

/// The text of a prefixed id: right or wrong prefix, ULID or not.
fn prefixed_id_text() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["sub_", "dlv_", "evt_", "SUB_", "sub", ""]),
        prop_oneof![ulid_text(), ulid_like(), text(40)],
        // A delivery id is two ULIDs (its subscription's, then its own).
        prop_oneof![Just(String::new()), ulid_text(), ulid_like(), text(30)],
    )
        .prop_map(|(prefix, rest, more)| format!("{prefix}{rest}{more}"))
}

/// What a prefixed id must be, written independently of the parser: the prefix and `ulids`
/// times 26 base32 characters (either case), each a ULID whose first character fits (128 bits
/// is `7ZZZ…`).
fn is_prefixed_id(s: &str, prefix: &str, ulids: usize) -> bool {
    let Some(rest) = s.strip_prefix(prefix) else {
        return false;
    };
    rest.len() == 26 * ulids
        && rest
            .chars()
            .all(|c| CROCKFORD.contains(c.to_ascii_lowercase()))
        && (0..ulids).all(|i| rest.as_bytes()[26 * i] <= b'7')
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn prefixed_ids_accept_exactly_prefix_and_ulid(s in prefixed_id_text()) {
        for (prefix, ulids, parsed) in [
            ("sub_", 1, SubscriptionId::parse(&s).map(|id| id.to_string())),
            ("dlv_", 2, DeliveryId::parse(&s).map(|id| id.to_string())),
        ] {
            prop_assert_eq!(parsed.is_ok(), is_prefixed_id(&s, prefix, ulids), "{:?} as {}", s, prefix);
            if let Ok(shown) = parsed {
                // ULIDs are case-insensitive: an id is kept in the lower case it is handed out in.
                prop_assert_eq!(&shown, &s.to_ascii_lowercase());
            }
        }
        if let Ok(id) = SubscriptionId::parse(&s) {
            prop_assert_eq!(SubscriptionId::parse(&id.to_string()), Ok(id.clone()));
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<SubscriptionId>(&json).unwrap(), id);
        }
        if let Ok(id) = DeliveryId::parse(&s) {
            prop_assert_eq!(DeliveryId::parse(&id.to_string()), Ok(id.clone()));
            let subscription = id.subscription_id();
            prop_assert_eq!(DeliveryId::from_own_part(&subscription, id.own_part()), Ok(id));
        }
    }

    #[test]
    fn generated_and_derived_ids_parse_back(
        tenant in "[a-z0-9_-]{1,64}",
        event in "[A-Za-z0-9._:-]{1,128}",
        sent_at in any::<u64>(),
        message_id in text(80),
        received_ms in any::<i64>(),
    ) {
        let tenant = TenantId::parse(&tenant).unwrap();
        let event = EventId::parse(&event).unwrap();
        let subscription = SubscriptionId::generate();
        let received = Timestamp::from_unix_millis(received_ms);
        let derived = DeliveryId::derive(&tenant, &event, &subscription, received);
        prop_assert_eq!(DeliveryId::parse(derived.as_str()), Ok(derived.clone()));
        prop_assert_eq!(DeliveryId::derive(&tenant, &event, &subscription, received), derived.clone());
        prop_assert_eq!(derived.subscription_id(), subscription);
        let from_message = EventId::for_message(sent_at, &message_id);
        prop_assert_eq!(EventId::parse(from_message.as_str()), Ok(from_message.clone()));
        prop_assert_eq!(EventId::for_message(sent_at, &message_id), from_message);
    }

    #[test]
    fn event_ids_are_1_to_128_of_a_small_charset(s in prop_oneof![text(140), "[A-Za-z0-9._:-]{0,130}"]) {
        let valid = (1..=128).contains(&s.len())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
        let parsed = EventId::parse(&s);
        prop_assert_eq!(parsed.is_ok(), valid, "{:?}", s);
        if let Ok(id) = parsed {
            prop_assert_eq!(id.as_str(), s.as_str());
            prop_assert_eq!(EventId::parse(&id.to_string()), Ok(id.clone()));
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<EventId>(&json).unwrap(), id);
        }
    }

    #[test]
    fn tenant_ids_are_1_to_64_lower_case(s in prop_oneof![text(80), "[a-zA-Z0-9_-]{0,70}"]) {
        let valid = (1..=64).contains(&s.len())
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        let parsed = TenantId::parse(&s);
        prop_assert_eq!(parsed.is_ok(), valid, "{:?}", s);
        if let Ok(id) = parsed {
            prop_assert_eq!(TenantId::parse(&id.to_string()), Ok(id.clone()));
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<TenantId>(&json).unwrap(), id);
        }
    }
}

// ---- event types and patterns ----

/// Dotted names from a small alphabet, so that patterns and types often share segments.
fn dotted(max_segments: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop::sample::select(vec!["a", "b", "ab", "a-b", "A_1", "x"]),
        1..=max_segments,
    )
    .prop_map(|segments| segments.join("."))
}

/// Text that is often nearly an event type or pattern.
fn type_like() -> impl Strategy<Value = String> {
    prop_oneof![
        dotted(4),
        dotted(4).prop_map(|s| format!("{s}.*")),
        "[a-z.*_ -]{0,12}",
        text(20),
        // Around the length limit: 128 bytes is the most an event type may have.
        (120usize..=135).prop_map(|n| "a".repeat(n)),
        (120usize..=135).prop_map(|n| format!("{}.*", "a".repeat(n))),
    ]
}

/// What an event type must be, written as a scan rather than as the parser's split: at most 128
/// bytes of `[A-Za-z0-9_-]`, dots only between two of them.
fn is_event_type(s: &str) -> bool {
    let mut previous_was_name = false;
    for c in s.chars() {
        if c == '.' {
            if !previous_was_name {
                return false;
            }
            previous_was_name = false;
        } else if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            previous_was_name = true;
        } else {
            return false;
        }
    }
    previous_was_name && s.len() <= MAX_EVENT_TYPE_LEN
}

fn is_pattern(s: &str) -> bool {
    s == "*" || s.strip_suffix(".*").is_some_and(is_event_type) || is_event_type(s)
}

/// The reference model of matching, by segments: `*` takes everything, `p.*` every type with
/// more segments than `p` that begins with all of `p`'s, anything else only itself.
fn model_matches(pattern: &str, event_type: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let types: Vec<&str> = event_type.split('.').collect();
    match pattern.strip_suffix(".*") {
        Some(prefix) => {
            let prefix: Vec<&str> = prefix.split('.').collect();
            types.len() > prefix.len() && types[..prefix.len()] == prefix[..]
        }
        None => pattern == event_type,
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn event_types_accept_exactly_dotted_names(s in type_like()) {
        let parsed = EventType::parse(&s);
        prop_assert_eq!(parsed.is_ok(), is_event_type(&s), "{:?}", s);
        if let Ok(t) = parsed {
            prop_assert_eq!(t.to_string(), s.clone());
            prop_assert_eq!(EventType::parse(&t.to_string()), Ok(t.clone()));
            let json = serde_json::to_string(&t).unwrap();
            prop_assert_eq!(serde_json::from_str::<EventType>(&json).unwrap(), t);
        }
    }

    #[test]
    fn patterns_accept_star_prefixes_and_types_and_display_as_given(s in type_like()) {
        let parsed = EventTypePattern::parse(&s);
        prop_assert_eq!(parsed.is_ok(), is_pattern(&s), "{:?}", s);
        if let Ok(p) = parsed {
            prop_assert_eq!(p.to_string(), s.clone());
            prop_assert_eq!(EventTypePattern::parse(&p.to_string()), Ok(p.clone()));
            let json = serde_json::to_string(&p).unwrap();
            prop_assert_eq!(serde_json::from_str::<EventTypePattern>(&json).unwrap(), p);
        }
    }

    #[test]
    fn matching_agrees_with_the_segment_model(
        pattern in prop_oneof![
            Just("*".to_owned()),
            dotted(3),
            dotted(3).prop_map(|s| format!("{s}.*")),
        ],
        event_type in dotted(4),
    ) {
        let p = EventTypePattern::parse(&pattern).unwrap();
        let t = EventType::parse(&event_type).unwrap();
        prop_assert_eq!(p.matches(&t), model_matches(&pattern, &event_type), "{} vs {}", pattern, event_type);
    }
}

// ---- callback URLs ----

/// URLs built from parts that are each sometimes wrong: scheme, credentials, host, port, path,
/// query, fragment. Paths and queries with non-ASCII text grow when percent-encoded.
pub fn url_like() -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec![
        "http",
        "https",
        "HTTPS",
        "HtTp",
        "ftp",
        "file",
        "javascript",
        "ws",
        "",
    ]);
    let separator = prop::sample::select(vec!["://", "://", "://", ":", ":/", ":///", "//"]);
    let credentials = prop::sample::select(vec!["", "", "", "user@", "user:pw@", ":@", "@"]);
    let host = prop::sample::select(vec![
        "example.com",
        "EXAMPLE.com.",
        "127.0.0.1",
        "127.1",
        "0x7f.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "localhost",
        "bücher.example",
        "日本.example",
        "xn--bcher-kva.example",
        "",
        "a b",
        "%41.example",
        "[::1",
    ]);
    let port = prop_oneof![
        Just(String::new()),
        any::<u16>().prop_map(|p| format!(":{p}")),
        Just(":99999".to_owned()),
        Just(":".to_owned())
    ];
    let path = prop_oneof![
        text(40),
        "(/[a-z.%]{0,5}){0,4}",
        // Long paths around the limit, before and after percent-encoding (é: 2 bytes, 6 once encoded).
        (
            300usize..=1100,
            prop::sample::select(vec!["é", "a", "日", " ", "%"])
        )
            .prop_map(|(n, c)| format!("/{}", c.repeat(n))),
        (2000usize..=2100).prop_map(|n| format!("/{}", "a".repeat(n))),
    ];
    let query = prop_oneof![
        Just(String::new()),
        Just(String::new()),
        "\\?[a-z=&é ]{0,10}"
    ];
    let fragment = prop_oneof![
        Just(String::new()),
        Just(String::new()),
        Just(String::new()),
        "#[a-z]{0,3}"
    ];
    (
        scheme,
        separator,
        credentials,
        host,
        port,
        path,
        query,
        fragment,
    )
        .prop_map(
            |(scheme, separator, credentials, host, port, path, query, fragment)| {
                format!("{scheme}{separator}{credentials}{host}{port}{path}{query}{fragment}")
            },
        )
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn accepted_callback_urls_keep_their_invariants_and_read_back(
        s in prop_oneof![url_like(), text(60)]
    ) {
        let Ok(url) = CallbackUrl::parse(&s) else {
            return Ok(());
        };
        let u = url.as_url();
        prop_assert!(matches!(u.scheme(), "http" | "https"), "{}", url);
        prop_assert!(u.host().is_some(), "{}", url);
        prop_assert!(u.username().is_empty() && u.password().is_none(), "{}", url);
        prop_assert!(u.fragment().is_none(), "{}", url);
        // Checked in the form it is stored in: what the stores keep is `as_str`.
        prop_assert!(
            url.as_str().len() <= MAX_CALLBACK_URL_LEN,
            "{} bytes once encoded, from {} given", url.as_str().len(), s.len()
        );
        prop_assert_eq!(url.to_string(), url.as_str());
        prop_assert_eq!(CallbackUrl::parse(url.as_str()), Ok(url.clone()));
        let json = serde_json::to_string(&url).unwrap();
        prop_assert_eq!(serde_json::from_str::<CallbackUrl>(&json).unwrap(), url);
    }
}

// ---- secrets ----

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn secrets_are_whsec_and_24_to_64_bytes_of_base64(key in proptest::collection::vec(any::<u8>(), 0..80)) {
        let text = format!("whsec_{}", STANDARD.encode(&key));
        let parsed = Secret::parse(&text);
        prop_assert_eq!(parsed.is_ok(), (24..=64).contains(&key.len()), "{} bytes", key.len());
        if let Ok(secret) = parsed {
            prop_assert_eq!(secret.key(), &key[..]);
            prop_assert_eq!(secret.expose(), text.as_str());
            prop_assert_eq!(Secret::parse(secret.expose()), Ok(secret.clone()));
            let json = serde_json::to_string(&secret).unwrap();
            prop_assert_eq!(serde_json::from_str::<Secret>(&json).unwrap(), secret.clone());
            // Debug never shows the key.
            let debug = format!("{:?}", secret);
            prop_assert!(!debug.contains(&text[6..]));
        }
        prop_assert!(Secret::parse(&STANDARD.encode(&key)).is_err(), "the prefix is required");
    }

    #[test]
    fn any_text_parses_to_a_canonical_secret_or_an_error(
        s in prop_oneof![
            text(100),
            "whsec_[A-Za-z0-9+/=]{28,92}",
            "whsec_[A-Za-z0-9+/=_ -]{0,100}",
        ]
    ) {
        if let Ok(secret) = Secret::parse(&s) {
            prop_assert!((24..=64).contains(&secret.key().len()));
            prop_assert_eq!(format!("whsec_{}", STANDARD.encode(secret.key())), s);
        }
    }
}

// ---- timestamps ----

/// 0000-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z: the instants RFC 3339 can write.
const FIRST_MILLIS: i64 = -62_167_219_200_000;
const LAST_MILLIS: i64 = 253_402_300_799_999;

/// RFC 3339 texts, often at the edges: years 0000 and 9999 with offsets that move them out of
/// range in UTC, leap seconds, more fraction digits than milliseconds, lower-case `t` and `z`.
fn rfc3339_like() -> impl Strategy<Value = String> {
    let year = prop_oneof![0u32..=9999, Just(0u32), Just(1969), Just(1970), Just(9999)];
    let offset = prop_oneof![
        prop::sample::select(vec!["Z", "z", "+00:00", "-00:00"]).prop_map(str::to_owned),
        (any::<bool>(), 0u32..=23, 0u32..=59)
            .prop_map(|(east, h, m)| format!("{}{h:02}:{m:02}", if east { '+' } else { '-' })),
    ];
    let fraction = prop_oneof![Just(String::new()), "\\.[0-9]{1,12}"];
    (
        year,
        1u32..=12,
        1u32..=31,
        0u32..=23,
        0u32..=59,
        0u32..=60,
        fraction,
        offset,
        prop::sample::select(vec!["T", "t", " "]),
    )
        .prop_map(|(y, mo, d, h, mi, s, fraction, offset, t)| {
            format!("{y:04}-{mo:02}-{d:02}{t}{h:02}:{mi:02}:{s:02}{fraction}{offset}")
        })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn timestamps_display_as_24_characters_and_parse_back(ms in FIRST_MILLIS..=LAST_MILLIS) {
        let t = Timestamp::from_unix_millis(ms);
        let shown = t.to_string();
        prop_assert_eq!(shown.len(), 24, "{}", shown);
        prop_assert_eq!(Timestamp::parse(&shown), Ok(t));
        let json = serde_json::to_string(&t).unwrap();
        prop_assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
    }

    #[test]
    fn displayed_timestamps_sort_like_the_instants(
        a in FIRST_MILLIS..=LAST_MILLIS,
        b in FIRST_MILLIS..=LAST_MILLIS,
    ) {
        let (ta, tb) = (Timestamp::from_unix_millis(a), Timestamp::from_unix_millis(b));
        prop_assert_eq!(ta.to_string().cmp(&tb.to_string()), a.cmp(&b));
    }

    #[test]
    fn accepted_timestamps_are_in_range_and_read_back(s in prop_oneof![rfc3339_like(), text(40)]) {
        let Ok(t) = Timestamp::parse(&s) else {
            return Ok(());
        };
        prop_assert!(
            (FIRST_MILLIS..=LAST_MILLIS).contains(&t.unix_millis()),
            "{:?} is {} ms, outside years 0000-9999", s, t.unix_millis()
        );
        prop_assert_eq!(Timestamp::parse(&t.to_string()), Ok(t), "{:?} shown as {}", s, t);
        // Millisecond precision, rounded down: the instant given is in [t, t + 1 ms).
        let given = time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp_nanos();
        let at = i128::from(t.unix_millis()) * 1_000_000;
        prop_assert!(at <= given && given < at + 1_000_000, "{:?} became {}", s, t);
    }
}
