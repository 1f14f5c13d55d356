//! The store conformance suite against DynamoDB, plus what only DynamoDB has (the table layout, the
//! sharded due index, fan-out past one transaction).
//!
//! Needs the AWS emulator (moto server) and the SDK's standard variables pointing at it:
//! `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`. Without it
//! every test fails (never skips). Each test gets its own, uniquely named table.
#![cfg(all(feature = "aws", feature = "testing"))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed assertion is a failed test

use std::collections::HashSet;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, BillingMode, ProjectionType, TimeToLiveStatus};
use tidings_core::aws::dynamo::{
    DUE_AT, DUE_INDEX, DUE_SHARD, DUE_SHARDS, DynamoStore, LIST_INDEX, PK, SINGLE_SK, SK,
    TTL_ATTRIBUTE, load_sdk_config,
};
use tidings_core::conformance::{new_event, subscription, tenant, ts};
use tidings_core::domain::{Subscription, TenantId, Timestamp};
use tidings_core::ports::{InsertOutcome, Store};

tidings_core::store_conformance_tests!(fresh_store);

const START_MOTO: &str = "start moto: tests/run.sh does it";

/// A client for the emulator; fails the test when there is none.
async fn client() -> Client {
    let endpoint = ["AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()));
    let Some(endpoint) = endpoint else {
        panic!(
            "AWS_ENDPOINT_URL is not set: the DynamoDB tests need the AWS emulator (moto server) \
             and refuse to run against real AWS; {START_MOTO}"
        );
    };
    let config = load_sdk_config().await;
    let client = Client::new(&config);
    if let Err(e) = client.list_tables().limit(1).send().await {
        panic!(
            "DynamoDB emulator at {endpoint} unreachable ({}); {START_MOTO}",
            aws_sdk_dynamodb::error::DisplayErrorContext(e)
        );
    }
    client
}

fn unique_table() -> String {
    format!(
        "tidings-test-{}",
        ulid::Ulid::new().to_string().to_ascii_lowercase()
    )
}

async fn fresh_store() -> DynamoStore {
    let client = client().await;
    let table = unique_table();
    DynamoStore::create_table(&client, &table)
        .await
        .unwrap_or_else(|e| panic!("create table {table}: {e:?}; {START_MOTO}"));
    DynamoStore::new(client, table)
}

/// Every entry of the due index: (`pk`, shard, due millis).
async fn due_index(client: &Client, table: &str) -> Vec<(String, u8, i64)> {
    // A Scan of the index is fine in a test: it shows exactly what the index holds.
    let out = client
        .scan()
        .table_name(table)
        .index_name(DUE_INDEX)
        .send()
        .await
        .unwrap();
    assert!(out.last_evaluated_key.is_none(), "one page is enough here");
    let n = |item: &std::collections::HashMap<String, AttributeValue>, attr: &str| {
        item[attr].as_n().unwrap().parse::<i64>().unwrap()
    };
    out.items
        .unwrap_or_default()
        .iter()
        .map(|item| {
            (
                item[PK].as_s().unwrap().clone(),
                u8::try_from(n(item, DUE_SHARD)).unwrap(),
                n(item, DUE_AT),
            )
        })
        .collect()
}

#[tokio::test]
async fn create_table_is_idempotent_and_sets_ttl_and_indexes() {
    let client = client().await;
    let table = unique_table();
    DynamoStore::create_table(&client, &table).await.unwrap();
    DynamoStore::create_table(&client, &table)
        .await
        .expect("creating an existing table is fine");

    let ttl = client
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    let ttl = ttl.time_to_live_description().unwrap();
    assert_eq!(ttl.time_to_live_status(), Some(&TimeToLiveStatus::Enabled));
    assert_eq!(ttl.attribute_name(), Some(TTL_ATTRIBUTE));

    let described = client
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    let t = described.table().unwrap();
    assert_eq!(
        t.billing_mode_summary().and_then(|b| b.billing_mode()),
        Some(&BillingMode::PayPerRequest)
    );
    let key: Vec<_> = t.key_schema().iter().map(|k| k.attribute_name()).collect();
    assert_eq!(key, vec![PK, SK]);
    let mut indexes: Vec<_> = t
        .global_secondary_indexes()
        .iter()
        .map(|i| {
            (
                i.index_name().unwrap().to_owned(),
                i.projection().and_then(|p| p.projection_type()).cloned(),
            )
        })
        .collect();
    indexes.sort();
    assert_eq!(
        indexes,
        vec![
            (DUE_INDEX.to_owned(), Some(ProjectionType::KeysOnly)),
            (LIST_INDEX.to_owned(), Some(ProjectionType::Include)),
        ]
    );

    // Retained items carry the TTL: received_at + retention, in seconds.
    let store = DynamoStore::new(client.clone(), &table).with_retention(Duration::from_secs(3_600));
    let a = tenant("a");
    let new = new_event(&a, &[], ts(5_000), "{}");
    assert_eq!(
        store.insert_event(&new.new_event()).await.unwrap(),
        InsertOutcome::Created
    );
    let item = client
        .get_item()
        .table_name(&table)
        .key(PK, AttributeValue::S(format!("T#a#EVT#{}", new.event.id)))
        .key(SK, AttributeValue::S(SINGLE_SK.into()))
        .send()
        .await
        .unwrap()
        .item
        .expect("the event item");
    assert_eq!(
        item[TTL_ATTRIBUTE],
        AttributeValue::N((new.event.received_at.unix_seconds() + 3_600).to_string())
    );
}

/// `n` subscriptions of `tenant` (fixtures only: a store writes deliveries for any id).
fn subscriptions(tenant: &TenantId, n: i64) -> Vec<Subscription> {
    (0..n).map(|i| subscription(tenant, ts(i))).collect()
}

#[tokio::test]
async fn sweep_reads_a_sparse_index_sharded_and_merged_in_due_order() {
    let client = client().await;
    let table = unique_table();
    DynamoStore::create_table(&client, &table).await.unwrap();
    let store = DynamoStore::new(client.clone(), &table);
    let a = tenant("a");
    let subs = subscriptions(&a, 41);

    // 40 deliveries due at distinct times, written in scrambled order, and one never due.
    let mut new = new_event(&a, &subs.iter().collect::<Vec<_>>(), ts(0), "{}");
    for (i, d) in new.deliveries.iter_mut().enumerate() {
        *d = d.with_due_at_for_tests(Some(ts(1_000 * ((i as i64 * 17) % 40 + 1))));
    }
    let not_due = {
        let d = new.deliveries.last_mut().unwrap();
        *d = d.with_due_at_for_tests(None);
        d.id().clone()
    };
    tidings_core::conformance::created(&store, &new).await;

    let index = due_index(&client, &table).await;
    assert_eq!(
        index.len(),
        40,
        "the never-due delivery is not in the index"
    );
    assert!(
        index
            .iter()
            .all(|(pk, _, _)| !pk.ends_with(not_due.as_str()))
    );
    let shards: HashSet<u8> = index.iter().map(|(_, shard, _)| *shard).collect();
    assert!(
        shards.len() > 1 && shards.iter().all(|s| *s < DUE_SHARDS),
        "spread over shards: {shards:?}"
    );

    let mut expected: Vec<_> = new
        .deliveries
        .iter()
        .filter_map(|d| d.due_at().map(|at| (at, d.id().clone())))
        .collect();
    expected.sort();
    let due = |now: Timestamp, limit: u32| {
        let (store, a) = (&store, &a);
        async move {
            store
                .due_deliveries(now, limit)
                .await
                .unwrap()
                .into_iter()
                .map(|d| {
                    assert_eq!(&d.tenant_id, a);
                    (d.due_at, d.delivery_id)
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        due(ts(1_000_000), 100).await,
        expected,
        "all, earliest first"
    );
    assert_eq!(due(ts(1_000_000), 7).await, expected[..7], "the earliest 7");
    assert_eq!(due(ts(12_500), 100).await, expected[..12], "due_at <= now");
    assert_eq!(due(ts(999), 100).await, vec![]);

    // Going final leaves the index; a later due time moves within it.
    let first = store
        .get_delivery(&a, &expected[0].1)
        .await
        .unwrap()
        .unwrap();
    let done = first.with_due_at_for_tests(None);
    store.update_delivery(&done, first.version()).await.unwrap();
    assert_eq!(due_index(&client, &table).await.len(), 39);
    assert_eq!(due(ts(1_000_000), 1).await, expected[1..2]);
}

#[tokio::test]
async fn a_found_api_key_is_remembered_for_the_cache_time_and_an_unknown_one_never() {
    let client = client().await;
    let table = unique_table();
    DynamoStore::create_table(&client, &table).await.unwrap();
    let cached =
        DynamoStore::new(client.clone(), &table).with_api_key_cache(Duration::from_secs(60));
    let uncached = DynamoStore::new(client.clone(), &table).with_api_key_cache(Duration::ZERO);
    let a = tenant("tenant-a");
    let record = tidings_core::domain::ApiKeyRecord {
        key_hash: "h1".into(),
        tenant_id: a.clone(),
        created_at: ts(0),
    };

    // Unknown first: not remembered as unknown, so the key works as soon as it exists.
    assert_eq!(cached.tenant_for_api_key("h1").await.unwrap(), None);
    cached.put_api_key(&record).await.unwrap();
    assert_eq!(
        cached.tenant_for_api_key("h1").await.unwrap(),
        Some(a.clone())
    );

    // Revoked (the item deleted, as docs/deploy.md does it): the cache still knows it, a store
    // without a cache does not.
    client
        .delete_item()
        .table_name(&table)
        .key(PK, AttributeValue::S("KEY#h1".into()))
        .key(SK, AttributeValue::S(SINGLE_SK.into()))
        .send()
        .await
        .unwrap();
    assert_eq!(cached.tenant_for_api_key("h1").await.unwrap(), Some(a));
    assert_eq!(uncached.tenant_for_api_key("h1").await.unwrap(), None);
}

/// Every value the parsers accept is stored and reads back equal, as through the SQLite store
/// (`shared/tests/properties/store.rs`, with wider generators): non-ASCII URLs up to the limit
/// once encoded, the longest types and ids, any description, years 0000 to 9999, any JSON text.
/// 32 cases (each a few requests to the emulator) unless `PROPTEST_CASES` says otherwise.
#[test]
fn accepted_values_read_back_equal() {
    use base64::Engine as _;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use serde_json::value::RawValue;
    use tidings_core::domain::{
        CallbackUrl, Event, EventId, EventType, EventTypePattern, Secret, SubscriptionStatus,
    };
    use tidings_core::ports::{FanOutDuty, NewEvent};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(fresh_store());
    let instant =
        || (-62_167_219_200_000i64..=253_402_300_799_999).prop_map(Timestamp::from_unix_millis);
    let url = (
        prop::sample::select(vec![
            "https://bücher.example",
            "http://[::1]:8080",
            "https://x.example",
        ]),
        prop_oneof![
            "[ -~]{0,40}".prop_map(|s| s.replace('#', "")),
            (0usize..=340).prop_map(|n| "é".repeat(n))
        ],
    )
        .prop_filter_map("accepted", |(origin, path)| {
            CallbackUrl::parse(&format!("{origin}/{path}")).ok()
        });
    let pattern = prop_oneof![
        Just("*".to_owned()),
        "[A-Za-z0-9_-]{1,40}(\\.[A-Za-z0-9_-]{1,40}){0,2}",
        "[A-Za-z0-9_-]{1,40}(\\.[A-Za-z0-9_-]{1,40}){0,2}\\.\\*",
    ]
    .prop_map(|p| EventTypePattern::parse(&p).unwrap());
    let secret = proptest::collection::vec(any::<u8>(), 24..=64).prop_map(|key| {
        let text = base64::engine::general_purpose::STANDARD.encode(key);
        Secret::parse(&format!("whsec_{text}")).unwrap()
    });
    let case = (
        (
            "[a-z0-9_-]{1,64}",
            proptest::collection::vec(pattern, 1..4),
            url,
            secret,
            proptest::collection::vec(any::<char>(), 0..=1024).prop_map(String::from_iter),
        ),
        (
            "[A-Za-z0-9._:-]{1,128}",
            "[A-Za-z0-9_-]{1,40}(\\.[A-Za-z0-9_-]{1,40}){0,2}",
            (instant(), instant()),
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            prop::option::of("[^\u{0}]{1,60}"),
        ),
    );
    let mut config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 32;
    }
    let result = TestRunner::new(config).run(&case, |(sub, ev)| {
        let (tenant, event_types, callback_url, secret, description) = sub;
        let (event_id, event_type, (occurred_at, received_at), data, key) = ev;
        // A tenant of its own per case: shrinking reruns cases against the same table.
        let mut unique = format!("{}{tenant}", ulid::Ulid::new()).to_ascii_lowercase();
        unique.truncate(64);
        let tenant = TenantId::parse(&unique).unwrap();
        let subscription = Subscription {
            event_types,
            callback_url,
            secret,
            description,
            status: SubscriptionStatus::Paused,
            created_at: occurred_at,
            updated_at: received_at,
            ..tidings_core::conformance::subscription(&tenant, Timestamp::from_unix_millis(0))
        };
        let event = Event {
            id: EventId::parse(&event_id).unwrap(),
            tenant_id: tenant.clone(),
            event_type: EventType::parse(&event_type).unwrap(),
            occurred_at,
            data: RawValue::from_string(data).unwrap(),
            received_at,
            fingerprint: "f".into(),
        };
        rt.block_on(async {
            store.insert_subscription(&subscription).await.unwrap();
            let back = store
                .get_subscription(&tenant, &subscription.id)
                .await
                .unwrap();
            prop_assert_eq!(back, Some(subscription.clone()));
            let new = NewEvent {
                event: event.clone(),
                idempotency_key: key,
                fan_out: FanOutDuty::Caller,
            };
            prop_assert_eq!(
                store.insert_event(&new).await.unwrap(),
                InsertOutcome::Created
            );
            prop_assert_eq!(
                store.get_event(&tenant, &event.id).await.unwrap(),
                Some(event)
            );
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
