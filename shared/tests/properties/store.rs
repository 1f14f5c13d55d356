//! Through the SQLite store: every value the parsers accept is stored and reads back equal, and
//! list cursors are either ones the store handed out (which page through every item once, in
//! order) or refused as `BadCursor`, whatever their text.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::value::RawValue;
use tidings_core::domain::{
    CallbackUrl, Delivery, Event, EventId, EventType, EventTypePattern, Secret, Subscription,
    SubscriptionId, SubscriptionStatus, TenantId, Timestamp,
};
use tidings_core::ports::{FanOutDuty, InsertOutcome, NewEvent, PageRequest, Store, StoreError};
use tidings_core::sqlite::SqliteStore;
use tokio::runtime::Runtime;

use crate::bodies::json_text;
use crate::domain::url_like;
use crate::{config, text};

pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `property` on cases of `strategy`; a failure fails the test with proptest's report.
pub fn check<S: Strategy>(
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    if let Err(e) = TestRunner::new(config(cases)).run(&strategy, property) {
        panic!("{e}");
    }
}

/// A tenant no other case uses, so cases can share one store (and shrinking can rerun them).
fn fresh_tenant(name: &str) -> TenantId {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut id = format!("{n}-{name}");
    id.truncate(64);
    TenantId::parse(&id).unwrap()
}

fn instant() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        (-62_167_219_200_000i64..=253_402_300_799_999).prop_map(Timestamp::from_unix_millis),
        prop::sample::select(vec![-62_167_219_200_000i64, -1, 0, 253_402_300_799_999])
            .prop_map(Timestamp::from_unix_millis),
    ]
}

/// Accepted URLs: from good parts mostly (non-ASCII hosts and paths, any port, long paths up to
/// the limit once encoded), and the accepted ones among the hostile texts.
fn accepted_url() -> impl Strategy<Value = CallbackUrl> {
    let good = (
        prop::sample::select(vec!["http", "https", "HTTPS"]),
        prop::sample::select(vec![
            "example.com",
            "127.0.0.1",
            "[::1]",
            "bücher.example",
            "日本.example",
        ]),
        prop::option::of(any::<u16>()),
        prop_oneof![text(40), (0usize..=340).prop_map(|n| "é".repeat(n))],
        prop::option::of(text(20)),
    )
        .prop_map(|(scheme, host, port, path, query)| {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let query = query.map(|q| format!("?{q}")).unwrap_or_default();
            format!(
                "{scheme}://{host}{port}/{}{query}",
                path.replace('#', "%23")
            )
        });
    prop_oneof![3 => good, 1 => url_like()]
        .prop_filter_map("accepted", |s| CallbackUrl::parse(&s).ok())
}

fn pattern() -> impl Strategy<Value = EventTypePattern> {
    prop_oneof![
        Just("*".to_owned()),
        "[A-Za-z0-9_-]{1,20}(\\.[A-Za-z0-9_-]{1,20}){0,5}",
        "[A-Za-z0-9_-]{1,20}(\\.[A-Za-z0-9_-]{1,20}){0,5}\\.\\*",
        (120usize..=128).prop_map(|n| "x".repeat(n)),
        (120usize..=128).prop_map(|n| format!("{}.*", "x".repeat(n))),
    ]
    .prop_filter_map("accepted", |s| EventTypePattern::parse(&s).ok())
}

fn secret() -> impl Strategy<Value = Secret> {
    proptest::collection::vec(any::<u8>(), 24..=64).prop_map(|key| {
        use base64::Engine as _;
        Secret::parse(&format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        ))
        .unwrap()
    })
}

fn status() -> impl Strategy<Value = SubscriptionStatus> {
    prop::sample::select(vec![
        SubscriptionStatus::Active,
        SubscriptionStatus::Paused,
        SubscriptionStatus::Disabled,
    ])
}

/// A subscription of accepted parts (and a tenant name to make fresh).
fn subscription() -> impl Strategy<Value = (String, Subscription)> {
    (
        "[a-z0-9_-]{1,64}",
        proptest::collection::vec(pattern(), 1..5),
        accepted_url(),
        secret(),
        // Descriptions are any text up to 1,024 characters.
        prop_oneof![
            text(60),
            proptest::collection::vec(any::<char>(), 1000..=1024).prop_map(String::from_iter)
        ],
        status(),
        (instant(), instant()),
        any::<u64>(),
    )
        .prop_map(
            |(
                tenant,
                event_types,
                callback_url,
                secret,
                description,
                status,
                (created_at, updated_at),
                version,
            )| {
                let tenant_id = TenantId::parse(&tenant).unwrap();
                (
                    tenant,
                    Subscription {
                        id: SubscriptionId::generate(),
                        tenant_id,
                        event_types,
                        callback_url,
                        secret,
                        description,
                        status,
                        created_at,
                        updated_at,
                        version,
                    },
                )
            },
        )
}

/// An event of accepted parts: any event id, type, time and JSON data.
fn event() -> impl Strategy<Value = (String, Event, Option<String>)> {
    (
        "[a-z0-9_-]{1,64}",
        "[A-Za-z0-9._:-]{1,128}",
        "[A-Za-z0-9_-]{1,30}(\\.[A-Za-z0-9_-]{1,30}){0,3}",
        instant(),
        json_text(),
        instant(),
        prop::option::of(text(40).prop_filter("1 to 255 bytes", |k| (1..=255).contains(&k.len()))),
    )
        .prop_map(
            |(tenant, id, event_type, occurred_at, (_, data), received_at, key)| {
                let tenant_id = TenantId::parse(&tenant).unwrap();
                let event = Event {
                    id: EventId::parse(&id).unwrap(),
                    tenant_id,
                    event_type: EventType::parse(&event_type).unwrap(),
                    occurred_at,
                    data: RawValue::from_string(data).unwrap(),
                    received_at,
                    fingerprint: "f".into(),
                };
                (tenant, event, key)
            },
        )
}

#[test]
fn accepted_subscriptions_read_back_equal() {
    let rt = runtime();
    let store = SqliteStore::open_in_memory().unwrap();
    check(64, subscription(), |(tenant, mut s)| {
        s.tenant_id = fresh_tenant(&tenant);
        rt.block_on(async {
            store.insert_subscription(&s).await.unwrap();
            let back = store.get_subscription(&s.tenant_id, &s.id).await;
            prop_assert_eq!(back.unwrap(), Some(s.clone()));
            let listed = store.tenant_subscriptions(&s.tenant_id).await.unwrap();
            prop_assert_eq!(listed, vec![s.clone()]);
            Ok(())
        })
    });
}

#[test]
fn accepted_events_read_back_equal() {
    let rt = runtime();
    let store = SqliteStore::open_in_memory().unwrap();
    check(64, event(), |(tenant, mut e, key)| {
        e.tenant_id = fresh_tenant(&tenant);
        rt.block_on(async {
            let new = NewEvent {
                event: e.clone(),
                idempotency_key: key.clone(),
                fan_out: FanOutDuty::Owed {
                    due_at: e.received_at,
                },
            };
            prop_assert_eq!(
                store.insert_event(&new).await.unwrap(),
                InsertOutcome::Created
            );
            let back = store.get_event(&e.tenant_id, &e.id).await.unwrap();
            prop_assert_eq!(back, Some(e.clone()));
            // Published again: the same event, found by its id or its key.
            let again = store.insert_event(&new).await.unwrap();
            let expected = InsertOutcome::Existing {
                event_id: e.id.clone(),
                fingerprint: "f".into(),
            };
            prop_assert_eq!(again, expected);
            Ok(())
        })
    });
}

// ---- cursors ----

/// Text shaped like the store's cursors (`millis.dlv_…`, `sub_…`), nearly or not at all.
fn cursor_text() -> impl Strategy<Value = String> {
    let id = || "(dlv_|sub_|evt_)?[0-9a-z]{0,28}";
    prop_oneof![
        text(60),
        ("[+-]?[0-9]{0,20}", "[.#]", id()).prop_map(|(m, sep, id)| format!("{m}{sep}{id}")),
        id(),
        Just(String::new()),
        Just("9".repeat(2_000)),
    ]
}

fn plain_subscription(tenant: &TenantId) -> Subscription {
    Subscription {
        id: SubscriptionId::generate(),
        tenant_id: tenant.clone(),
        event_types: vec![EventTypePattern::parse("*").unwrap()],
        callback_url: CallbackUrl::parse("https://x.example/").unwrap(),
        secret: Secret::generate(),
        description: String::new(),
        status: SubscriptionStatus::Active,
        created_at: Timestamp::from_unix_millis(0),
        updated_at: Timestamp::from_unix_millis(0),
        version: 0,
    }
}

#[test]
fn list_cursors_are_handed_out_or_refused() {
    let rt = runtime();
    let store = SqliteStore::open_in_memory().unwrap();
    let tenant = fresh_tenant("cursors");
    let subscription = rt.block_on(async {
        let s = plain_subscription(&tenant);
        store.insert_subscription(&s).await.unwrap();
        s
    });
    check(256, cursor_text(), |cursor| {
        rt.block_on(async {
            let page = PageRequest {
                limit: 10,
                after: Some(cursor.clone()),
            };
            for result in [
                store
                    .list_deliveries(&tenant, &subscription.id, &page)
                    .await
                    .map(|p| p.items.len()),
                store
                    .list_subscriptions(&tenant, &page)
                    .await
                    .map(|p| p.items.len()),
            ] {
                prop_assert!(
                    matches!(result, Ok(_) | Err(StoreError::BadCursor)),
                    "{:?}: {:?}",
                    cursor,
                    result
                );
            }
            // The forms the store writes, and no other text, are accepted.
            let deliveries_ok = store
                .list_deliveries(&tenant, &subscription.id, &page)
                .await
                .is_ok();
            let subscriptions_ok = store.list_subscriptions(&tenant, &page).await.is_ok();
            // (Empty is no cursor: the first page.)
            let delivery_form = cursor.is_empty()
                || cursor.split_once('.').is_some_and(|(ms, id)| {
                    ms.parse::<i64>().is_ok() && tidings_core::domain::DeliveryId::parse(id).is_ok()
                });
            let subscription_form = cursor.is_empty() || SubscriptionId::parse(&cursor).is_ok();
            prop_assert_eq!(
                deliveries_ok,
                delivery_form,
                "deliveries after {:?}",
                cursor
            );
            prop_assert_eq!(
                subscriptions_ok,
                subscription_form,
                "subscriptions after {:?}",
                cursor
            );
            Ok(())
        })
    });
}

#[test]
fn handed_out_cursors_page_through_every_delivery_once_newest_first() {
    let rt = runtime();
    let store = SqliteStore::open_in_memory().unwrap();
    // Creation times often shared, so that the id breaks ties.
    let times = proptest::collection::vec(prop_oneof![0i64..3, 0i64..4_102_444_800_000], 0..30);
    check(64, (times, 1u32..8), |(times, limit)| {
        let tenant = fresh_tenant("pages");
        rt.block_on(async {
            let s = plain_subscription(&tenant);
            store.insert_subscription(&s).await.unwrap();
            let mut made: Vec<Delivery> = Vec::new();
            for (i, ms) in times.iter().enumerate() {
                let event = EventId::parse(&format!("e{i}")).unwrap();
                let at = Timestamp::from_unix_millis(*ms);
                let d = Delivery::new(
                    tenant.clone(),
                    event,
                    at,
                    s.id.clone(),
                    at,
                    Duration::ZERO,
                    Duration::from_secs(60),
                );
                store.insert_delivery(&d).await.unwrap();
                made.push(d);
            }
            made.sort_by(|a, b| (b.created_at(), b.id()).cmp(&(a.created_at(), a.id())));
            let mut listed = Vec::new();
            let mut after = None;
            for _ in 0..=made.len() {
                let page = store
                    .list_deliveries(
                        &tenant,
                        &s.id,
                        &PageRequest {
                            limit,
                            after: after.clone(),
                        },
                    )
                    .await
                    .unwrap();
                prop_assert!(page.items.len() <= limit as usize);
                listed.extend(page.items);
                after = page.next;
                if after.is_none() {
                    break;
                }
            }
            prop_assert!(after.is_none(), "the pages never end");
            prop_assert_eq!(listed, made);
            Ok(())
        })
    });
}
