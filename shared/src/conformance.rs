//! The store conformance suite: what every [`Store`] backend must do, checked the way a user
//! would notice it. SQLite runs it now and DynamoDB runs it unchanged, so the cases use only the
//! trait and assume nothing else about the backend (not even that the store is in-process).
//!
//! A backend's tests call [`store_conformance_tests!`](crate::store_conformance_tests) with an
//! `async fn() -> impl Store` returning a fresh, empty store; each case becomes one test.

// Test support: a failed fixture or assertion is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::value::RawValue;

use crate::domain::{
    ApiKeyRecord, Attempt, CallbackUrl, Delivery, Event, EventId, EventType, EventTypePattern,
    RetryPlan, Secret, Subscription, SubscriptionId, SubscriptionStatus, TenantId, Timestamp,
};
use crate::ports::{
    DueFanOut, FanOutDuty, InsertOutcome, NewEvent, Page, PageRequest, Store, StoreError,
};
use crate::retry::AttemptClass;
use crate::retry::RetrySchedule;

/// Expands to one `#[tokio::test]` per conformance case, named after the case.
///
/// `$fresh` is an `async fn() -> impl Store` giving a fresh, empty store for each test. The
/// calling crate needs `tokio` with the `macros` feature.
#[macro_export]
macro_rules! store_conformance_tests {
    ($fresh:path) => {
        // Every `pub async fn` case of `conformance` must be listed here.
        $crate::store_conformance_tests!(@cases $fresh;
            api_keys_put_and_lookup,
            subscription_insert_get_update_delete,
            duplicate_subscription_insert_conflicts,
            missing_subscription_update_and_delete_are_not_found,
            subscriptions_are_isolated_by_tenant,
            events_and_deliveries_are_isolated_by_tenant,
            list_subscriptions_pages_oldest_first,
            known_idempotency_key_returns_first_event,
            repeated_event_id_returns_existing,
            event_ids_and_idempotency_keys_are_per_tenant,
            deliveries_are_written_with_their_event,
            list_deliveries_pages_newest_first,
            deleting_a_subscription_keeps_its_deliveries,
            event_data_bytes_are_preserved,
            update_delivery_is_version_checked,
            update_subscription_is_version_checked,
            a_delivery_is_written_once,
            events_owe_their_fan_out_until_it_is_done,
            list_cursors_are_checked,
            update_of_unknown_delivery_is_not_found,
            due_deliveries_returns_due_work_earliest_first,
            due_index_follows_delivery_updates,
            recover_after_restart_makes_unfinished_work_due,
            timestamps_round_trip_exactly,
            accepted_edge_values_read_back,
        );
    };
    (@cases $fresh:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                $crate::conformance::$case(&$fresh().await).await;
            }
        )*
    };
}

// ---- fixtures ----

/// A fixed origin for fixture times (2023-11-14T22:13:20Z), so failures print readable instants.
pub const BASE_MILLIS: i64 = 1_700_000_000_000;

/// How long after creation the sweep picks up a delivery no queue message started.
pub const GRACE: Duration = Duration::from_secs(60);

/// `BASE_MILLIS + offset_ms`.
pub fn ts(offset_ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(BASE_MILLIS + offset_ms)
}

pub fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("fixture tenant id")
}

/// The lower-case ULID text of an id created at `at`. Ids made this way sort like their times,
/// even when a test creates many within one millisecond.
fn ulid_at(at: Timestamp) -> String {
    let ms = u64::try_from(at.unix_millis()).expect("fixture times are after 1970");
    ulid::Ulid::from_parts(ms, rand::random::<u128>())
        .to_string()
        .to_ascii_lowercase()
}

pub fn subscription_id_at(at: Timestamp) -> SubscriptionId {
    SubscriptionId::parse(&format!("{}{}", SubscriptionId::PREFIX, ulid_at(at)))
        .expect("fixture subscription id")
}

/// An active subscription to `order.*` of `tenant`, created at `created_at`.
pub fn subscription(tenant: &TenantId, created_at: Timestamp) -> Subscription {
    Subscription {
        id: subscription_id_at(created_at),
        tenant_id: tenant.clone(),
        event_types: vec![EventTypePattern::parse("order.*").expect("fixture pattern")],
        callback_url: CallbackUrl::parse("https://receiver.example.com/hooks")
            .expect("fixture url"),
        secret: Secret::generate(),
        description: format!("created at {created_at}"),
        status: SubscriptionStatus::Active,
        created_at,
        updated_at: created_at,
        version: 0,
    }
}

/// An `order.created` event of `tenant` with the given `data` JSON text (kept byte for byte).
pub fn event(tenant: &TenantId, at: Timestamp, data: &str) -> Event {
    Event {
        id: EventId::parse(&format!("evt_{}", ulid_at(at))).expect("fixture event id"),
        tenant_id: tenant.clone(),
        event_type: EventType::parse("order.created").expect("fixture event type"),
        occurred_at: at,
        data: RawValue::from_string(data.to_owned()).expect("fixture data is JSON"),
        received_at: at,
        fingerprint: format!("fixture-{}", data.len()),
    }
}

/// A new (pending) delivery to `subscription`, created at `at`, for a fresh event id.
pub fn delivery_for(tenant: &TenantId, subscription: &Subscription, at: Timestamp) -> Delivery {
    let event_id = EventId::parse(&format!("evt_{}", ulid_at(at))).expect("fixture event id");
    Delivery::new(
        tenant.clone(),
        event_id,
        at,
        subscription.id.clone(),
        at,
        Duration::ZERO,
        GRACE,
    )
}

/// `d` with another tenant in it (a hostile writer's forgery; the id stays).
pub fn with_tenant(d: &Delivery, tenant: &TenantId) -> Delivery {
    let mut json = serde_json::to_value(d).expect("delivery to JSON");
    json["tenantId"] = serde_json::Value::String(tenant.to_string());
    serde_json::from_value(json).expect("delivery from JSON")
}

/// `d` leased at `at` and one attempt with `outcome` recorded. A retryable outcome is retried
/// `retry_in` later, left to the sweep (due then too).
pub fn attempted(
    d: &Delivery,
    at: Timestamp,
    outcome: AttemptClass,
    retry_in: Duration,
) -> Delivery {
    let schedule = RetrySchedule::new(
        vec![Duration::ZERO; d.attempts_in_round() as usize + 1]
            .into_iter()
            .chain([retry_in])
            .collect(),
    )
    .expect("fixture schedule");
    let plan = RetryPlan {
        schedule: &schedule,
        jitter_ratio: 0.0,
        jitter_unit: 0.5,
        sweep_grace: GRACE,
        max_queue_delay: Duration::ZERO,
    };
    let leased = d
        .leased(at, "fixture-worker".into(), Duration::from_secs(30))
        .expect("fixture delivery is leasable");
    leased.recorded(attempt(0, at, outcome), None, &plan, at).0
}

/// An event and the deliveries its fan-out makes (each as it is before its first attempt).
#[derive(Debug, Clone)]
pub struct TestEvent {
    pub event: Event,
    pub deliveries: Vec<Delivery>,
    pub idempotency_key: Option<String>,
    pub fan_out_due_at: Option<Timestamp>,
}

impl TestEvent {
    /// What a publish hands the store.
    pub fn new_event(&self) -> NewEvent {
        NewEvent {
            event: self.event.clone(),
            idempotency_key: self.idempotency_key.clone(),
            fan_out: match self.fan_out_due_at {
                Some(due_at) => FanOutDuty::Owed { due_at },
                None => FanOutDuty::Caller,
            },
        }
    }
}

/// An event at `at` with one new delivery per entry of `subscriptions` (repeats allowed), no
/// idempotency key, and no fan-out owed.
pub fn new_event(
    tenant: &TenantId,
    subscriptions: &[&Subscription],
    at: Timestamp,
    data: &str,
) -> TestEvent {
    let event = event(tenant, at, data);
    let deliveries = deliveries_of(&event, subscriptions, at);
    TestEvent {
        event,
        deliveries,
        idempotency_key: None,
        fan_out_due_at: None,
    }
}

/// A finished attempt, as a worker records it.
pub fn attempt(number: u32, started_at: Timestamp, outcome: AttemptClass) -> Attempt {
    Attempt {
        number,
        started_at,
        latency_ms: 42,
        outcome,
        status_code: Some(match outcome {
            AttemptClass::Delivered => 200,
            AttemptClass::Retryable => 503,
            AttemptClass::Permanent => 400,
        }),
        error: None,
        response_snippet: Some("ok".into()),
    }
}

/// Writes `next` (a transition of `current`) the way a use case does: checked against
/// `current`'s version. Returns what was written.
pub async fn save<S: Store>(store: &S, current: &Delivery, next: Delivery) -> Delivery {
    store
        .update_delivery(&next, current.version())
        .await
        .expect("version-checked write of the current version");
    next
}

/// One new delivery of `event` per subscription.
pub fn deliveries_of(
    event: &Event,
    subscriptions: &[&Subscription],
    at: Timestamp,
) -> Vec<Delivery> {
    subscriptions
        .iter()
        .map(|s| {
            Delivery::new(
                event.tenant_id.clone(),
                event.id.clone(),
                event.received_at,
                s.id.clone(),
                at,
                Duration::ZERO,
                GRACE,
            )
        })
        .collect()
}

/// The first page (up to 10) of a subscription's deliveries.
async fn first_page<S: Store>(store: &S, tenant: &TenantId, sub: &SubscriptionId) -> Vec<Delivery> {
    store
        .list_deliveries(
            tenant,
            sub,
            &PageRequest {
                limit: 10,
                after: None,
            },
        )
        .await
        .expect("list deliveries")
        .items
}

async fn insert_all<S: Store>(store: &S, subscriptions: &[&Subscription]) {
    for s in subscriptions {
        store
            .insert_subscription(s)
            .await
            .expect("insert subscription");
    }
}

/// Stores the event, then its deliveries, as a publish and its fan-out do.
pub async fn created<S: Store>(store: &S, new: &TestEvent) {
    assert_eq!(
        store
            .insert_event(&new.new_event())
            .await
            .expect("insert event"),
        InsertOutcome::Created,
        "a new event is created"
    );
    for d in &new.deliveries {
        store.insert_delivery(d).await.expect("insert delivery");
    }
}

/// Follows cursors from the first page to the last, failing if the pages never end.
pub async fn subscription_pages<S: Store>(
    store: &S,
    tenant: &TenantId,
    limit: u32,
) -> Vec<Page<Subscription>> {
    let mut pages = Vec::new();
    let mut after = None;
    for _ in 0..100 {
        let page = store
            .list_subscriptions(tenant, &PageRequest { limit, after })
            .await
            .expect("list subscriptions");
        after = page.next.clone();
        pages.push(page);
        if after.is_none() {
            return pages;
        }
    }
    panic!("list_subscriptions never returned a last page");
}

/// Follows cursors from the first page to the last, failing if the pages never end.
pub async fn delivery_pages<S: Store>(
    store: &S,
    tenant: &TenantId,
    subscription: &SubscriptionId,
    limit: u32,
) -> Vec<Page<Delivery>> {
    let mut pages = Vec::new();
    let mut after = None;
    for _ in 0..100 {
        let page = store
            .list_deliveries(tenant, subscription, &PageRequest { limit, after })
            .await
            .expect("list deliveries");
        after = page.next.clone();
        pages.push(page);
        if after.is_none() {
            return pages;
        }
    }
    panic!("list_deliveries never returned a last page");
}

fn ids<T>(items: &[T], id: impl Fn(&T) -> String) -> Vec<String> {
    items.iter().map(id).collect()
}

fn sub_ids(items: &[Subscription]) -> Vec<String> {
    ids(items, |s| s.id.to_string())
}

fn delivery_ids(items: &[Delivery]) -> Vec<String> {
    ids(items, |d| d.id().to_string())
}

// ---- cases ----

pub async fn api_keys_put_and_lookup<S: Store>(store: &S) {
    let (a, b) = (tenant("tenant-a"), tenant("tenant-b"));
    let key_a = ApiKeyRecord {
        key_hash: "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8".into(),
        tenant_id: a.clone(),
        created_at: ts(1),
    };
    let key_b = ApiKeyRecord {
        key_hash: "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b".into(),
        tenant_id: b.clone(),
        created_at: ts(2),
    };
    assert_eq!(
        store.tenant_for_api_key(&key_a.key_hash).await.unwrap(),
        None
    );
    store.put_api_key(&key_a).await.unwrap();
    store.put_api_key(&key_b).await.unwrap();
    assert_eq!(
        store.tenant_for_api_key(&key_a.key_hash).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        store.tenant_for_api_key(&key_b.key_hash).await.unwrap(),
        Some(b)
    );
    assert_eq!(store.tenant_for_api_key("unknown").await.unwrap(), None);
    // Putting the same key again (a retried CLI call) is harmless.
    store.put_api_key(&key_a).await.unwrap();
    assert_eq!(
        store.tenant_for_api_key(&key_a.key_hash).await.unwrap(),
        Some(a.clone())
    );
    // A key never moves to another tenant.
    let stolen = ApiKeyRecord {
        tenant_id: tenant("tenant-c"),
        ..key_a.clone()
    };
    assert!(matches!(
        store.put_api_key(&stolen).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store.tenant_for_api_key(&key_a.key_hash).await.unwrap(),
        Some(a)
    );
}

pub async fn subscription_insert_get_update_delete<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let s = subscription(&a, ts(0));
    store.insert_subscription(&s).await.unwrap();
    assert_eq!(
        store.get_subscription(&a, &s.id).await.unwrap(),
        Some(s.clone())
    );

    let mut changed = s.clone();
    changed.description = "changed".into();
    changed.status = SubscriptionStatus::Paused;
    changed.event_types = vec![
        EventTypePattern::parse("invoice.paid").unwrap(),
        EventTypePattern::parse("*").unwrap(),
    ];
    changed.callback_url = CallbackUrl::parse("https://other.example.com/x?y=1").unwrap();
    changed.secret = Secret::generate();
    changed.updated_at = ts(5_000);
    changed.version = 1;
    store.update_subscription(&changed, 0).await.unwrap();
    assert_eq!(
        store.get_subscription(&a, &s.id).await.unwrap(),
        Some(changed.clone())
    );
    assert_eq!(store.tenant_subscriptions(&a).await.unwrap(), vec![changed]);

    store.delete_subscription(&a, &s.id).await.unwrap();
    assert_eq!(store.get_subscription(&a, &s.id).await.unwrap(), None);
    assert_eq!(store.tenant_subscriptions(&a).await.unwrap(), vec![]);
    let again = store.delete_subscription(&a, &s.id).await;
    assert!(
        matches!(again, Err(StoreError::NotFound)),
        "second delete: {again:?}"
    );
}

pub async fn duplicate_subscription_insert_conflicts<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let s = subscription(&a, ts(0));
    store.insert_subscription(&s).await.unwrap();
    let mut imposter = s.clone();
    imposter.description = "imposter".into();
    imposter.callback_url = CallbackUrl::parse("https://evil.example.com/").unwrap();
    let r = store.insert_subscription(&imposter).await;
    assert!(
        matches!(r, Err(StoreError::Conflict)),
        "duplicate insert: {r:?}"
    );
    assert_eq!(
        store.get_subscription(&a, &s.id).await.unwrap(),
        Some(s.clone())
    );
    assert_eq!(store.tenant_subscriptions(&a).await.unwrap(), vec![s]);
}

pub async fn missing_subscription_update_and_delete_are_not_found<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let ghost = subscription(&a, ts(0));
    let r = store.update_subscription(&ghost, 0).await;
    assert!(
        matches!(r, Err(StoreError::NotFound)),
        "update of a missing one: {r:?}"
    );
    // The failed update must not have created it.
    assert_eq!(store.get_subscription(&a, &ghost.id).await.unwrap(), None);
    let r = store.delete_subscription(&a, &ghost.id).await;
    assert!(
        matches!(r, Err(StoreError::NotFound)),
        "delete of a missing one: {r:?}"
    );
}

pub async fn subscriptions_are_isolated_by_tenant<S: Store>(store: &S) {
    let (a, b) = (tenant("tenant-a"), tenant("tenant-b"));
    let (a1, a2, b1) = (
        subscription(&a, ts(0)),
        subscription(&a, ts(1)),
        subscription(&b, ts(2)),
    );
    insert_all(store, &[&a1, &a2, &b1]).await;

    assert_eq!(store.get_subscription(&b, &a1.id).await.unwrap(), None);
    assert_eq!(store.get_subscription(&a, &b1.id).await.unwrap(), None);

    // B addressing A's subscription by its id: not found, and A's is untouched.
    let mut hijack = a1.clone();
    hijack.tenant_id = b.clone();
    hijack.callback_url = CallbackUrl::parse("https://evil.example.com/").unwrap();
    let r = store.update_subscription(&hijack, 0).await;
    assert!(
        matches!(r, Err(StoreError::NotFound)),
        "cross-tenant update: {r:?}"
    );
    let r = store.delete_subscription(&b, &a1.id).await;
    assert!(
        matches!(r, Err(StoreError::NotFound)),
        "cross-tenant delete: {r:?}"
    );
    assert_eq!(
        store.get_subscription(&a, &a1.id).await.unwrap(),
        Some(a1.clone())
    );
    assert_eq!(store.get_subscription(&b, &a1.id).await.unwrap(), None);

    let page_b = store
        .list_subscriptions(
            &b,
            &PageRequest {
                limit: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page_b,
        Page {
            items: vec![b1.clone()],
            next: None
        }
    );
    let page_a = store
        .list_subscriptions(
            &a,
            &PageRequest {
                limit: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(sub_ids(&page_a.items), sub_ids(&[a1.clone(), a2.clone()]));
    assert_eq!(store.tenant_subscriptions(&b).await.unwrap(), vec![b1]);
    let mut all_a = store.tenant_subscriptions(&a).await.unwrap();
    all_a.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(all_a, vec![a1, a2]);
    assert_eq!(
        store
            .tenant_subscriptions(&tenant("tenant-c"))
            .await
            .unwrap(),
        vec![]
    );
}

pub async fn events_and_deliveries_are_isolated_by_tenant<S: Store>(store: &S) {
    let (a, b) = (tenant("tenant-a"), tenant("tenant-b"));
    let sa = subscription(&a, ts(0));
    let sb = subscription(&b, ts(1));
    insert_all(store, &[&sa, &sb]).await;
    let ea = new_event(&a, &[&sa], ts(10), r#"{"secret":"a"}"#);
    created(store, &ea).await;
    let da = &ea.deliveries[0];

    assert_eq!(store.get_event(&b, &ea.event.id).await.unwrap(), None);
    assert_eq!(store.get_delivery(&b, da.id()).await.unwrap(), None);
    let listed = store
        .list_deliveries(
            &b,
            &sa.id,
            &PageRequest {
                limit: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        listed,
        Page {
            items: vec![],
            next: None
        }
    );

    // B writing A's delivery (same id, B's tenant): not found, and A's is untouched.
    let hijack = with_tenant(
        &da.leased(ts(20), "b-worker".into(), Duration::from_secs(30))
            .unwrap(),
        &b,
    );
    let r = store.update_delivery(&hijack, da.version()).await;
    assert!(
        matches!(r, Err(StoreError::NotFound)),
        "cross-tenant delivery write: {r:?}"
    );
    assert_eq!(
        store.get_delivery(&a, da.id()).await.unwrap().as_ref(),
        Some(da)
    );
    assert_eq!(
        store.get_event(&a, &ea.event.id).await.unwrap(),
        Some(ea.event.clone())
    );

    // The sweep sees the delivery under its own tenant.
    let due = store
        .due_deliveries(ts(10).saturating_add(GRACE), 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!((&due[0].tenant_id, &due[0].delivery_id), (&a, da.id()));
}

pub async fn list_subscriptions_pages_oldest_first<S: Store>(store: &S) {
    let (a, b) = (tenant("tenant-a"), tenant("tenant-b"));
    let subs: Vec<Subscription> = (0..7).map(|i| subscription(&a, ts(i * 1_000))).collect();
    // Inserted out of order, with another tenant's in between: the listing must not care.
    for i in [3, 0, 6, 1, 5, 2, 4] {
        store.insert_subscription(&subs[i]).await.unwrap();
        store
            .insert_subscription(&subscription(&b, ts(i as i64 * 1_000 + 1)))
            .await
            .unwrap();
    }

    let pages = subscription_pages(store, &a, 3).await;
    let sizes: Vec<usize> = pages.iter().map(|p| p.items.len()).collect();
    assert_eq!(sizes, vec![3, 3, 1], "7 items by 3");
    assert!(pages[0].next.is_some() && pages[1].next.is_some());
    assert_eq!(pages[2].next, None);
    let listed: Vec<Subscription> = pages.into_iter().flat_map(|p| p.items).collect();
    assert_eq!(listed, subs, "every item once, oldest first");

    // A page that holds exactly the rest has no cursor: there is no empty last page.
    let exact = subscription_pages(store, &a, 7).await;
    assert_eq!(exact.len(), 1);
    assert_eq!(exact[0].items, subs);
    assert_eq!(exact[0].next, None);
    let pages = subscription_pages(store, &a, 1).await;
    assert_eq!(pages.len(), 7);
    let listed: Vec<Subscription> = pages.into_iter().flat_map(|p| p.items).collect();
    assert_eq!(listed, subs);

    let none = subscription_pages(store, &tenant("tenant-c"), 3).await;
    assert_eq!(
        none,
        vec![Page {
            items: vec![],
            next: None
        }]
    );
}

pub async fn known_idempotency_key_returns_first_event<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let s = subscription(&a, ts(0));
    insert_all(store, &[&s]).await;
    let mut first = new_event(&a, &[&s], ts(10), r#"{"n":1}"#);
    first.idempotency_key = Some("retry-me".into());
    created(store, &first).await;
    let existing = InsertOutcome::Existing {
        event_id: first.event.id.clone(),
        fingerprint: first.event.fingerprint.clone(),
    };

    // A retried publish: new event id, same key.
    let mut retry = new_event(&a, &[&s], ts(20), r#"{"n":2}"#);
    retry.idempotency_key = Some("retry-me".into());
    assert_eq!(
        store.insert_event(&retry.new_event()).await.unwrap(),
        existing
    );
    assert_eq!(store.get_event(&a, &retry.event.id).await.unwrap(), None);
    assert_eq!(
        store
            .get_delivery(&a, retry.deliveries[0].id())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.get_event(&a, &first.event.id).await.unwrap(),
        Some(first.event.clone())
    );
    assert_eq!(
        first_page(store, &a, &s.id).await,
        first.deliveries,
        "no second set of deliveries"
    );

    // The same retry again, this time with the first event id too.
    let same = first.clone();
    assert_eq!(
        store.insert_event(&same.new_event()).await.unwrap(),
        existing
    );
    assert_eq!(first_page(store, &a, &s.id).await, first.deliveries);
}

pub async fn repeated_event_id_returns_existing<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let (s, t) = (subscription(&a, ts(0)), subscription(&a, ts(1)));
    insert_all(store, &[&s, &t]).await;
    let first = new_event(&a, &[&s], ts(10), r#"{"v":"first"}"#);
    created(store, &first).await;

    // The producer supplied the same eventId again (no Idempotency-Key), with other data, and
    // meanwhile another subscription came.
    let mut again = new_event(&a, &[], ts(20), r#"{"v":"second"}"#);
    again.event.id = first.event.id.clone();
    // A fan-out makes deliveries of the event as stored (its first receive time).
    again.deliveries = deliveries_of(&first.event, &[&s, &t], ts(20));
    assert_eq!(
        again.deliveries[0].id(),
        first.deliveries[0].id(),
        "derived ids"
    );
    assert_eq!(
        store.insert_event(&again.new_event()).await.unwrap(),
        InsertOutcome::Existing {
            event_id: first.event.id.clone(),
            fingerprint: first.event.fingerprint.clone(),
        }
    );
    let stored = store.get_event(&a, &first.event.id).await.unwrap().unwrap();
    assert_eq!(
        stored.data.get(),
        r#"{"v":"first"}"#,
        "the first event stays"
    );
    assert_eq!(
        first_page(store, &a, &s.id).await,
        first.deliveries,
        "the first delivery stays as it was"
    );
    assert_eq!(
        first_page(store, &a, &t.id).await,
        vec![],
        "a repeat creates nothing, not even for a subscription made since"
    );
}

/// Two fan-outs of one event (a duplicate job, a recovery racing a slow worker) make the same
/// delivery: the first write stands and the second is told `Conflict`, so it records its attempt
/// on what is there; the very same write repeated (its answer lost, the SDK retried it) is no
/// conflict.
pub async fn a_delivery_is_written_once<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let s = subscription(&a, ts(0));
    insert_all(store, &[&s]).await;
    let new = new_event(&a, &[&s], ts(10), "{}");
    store.insert_event(&new.new_event()).await.unwrap();
    let first = attempted(
        &new.deliveries[0],
        ts(11),
        AttemptClass::Delivered,
        Duration::ZERO,
    );
    store.insert_delivery(&first).await.unwrap();
    store
        .insert_delivery(&first)
        .await
        .expect("the same write again is no conflict");
    let other = attempted(
        &new.deliveries[0],
        ts(12),
        AttemptClass::Retryable,
        Duration::from_secs(5),
    );
    assert!(matches!(
        store.insert_delivery(&other).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store.get_delivery(&a, first.id()).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(first_page(store, &a, &s.id).await, vec![first]);
}

/// An event owes its fan-out until it is marked done: due from its time on, earliest first,
/// claimed by one sweep at a time, and gone from the due work once done.
pub async fn events_owe_their_fan_out_until_it_is_done<S: Store>(store: &S) {
    let (a, b) = (tenant("tenant-a"), tenant("tenant-b"));
    let mut late = new_event(&a, &[], ts(10), "1");
    late.fan_out_due_at = Some(ts(1_000));
    let mut early = new_event(&b, &[], ts(20), "2");
    early.fan_out_due_at = Some(ts(500));
    let owes_nothing = new_event(&a, &[], ts(30), "3");
    for e in [&late, &early, &owes_nothing] {
        created(store, e).await;
    }
    let due_ids = |due: Vec<DueFanOut>| {
        due.into_iter()
            .map(|d| (d.tenant_id, d.event_id, d.due_at))
            .collect::<Vec<_>>()
    };
    assert_eq!(store.due_fan_outs(ts(499), 10).await.unwrap(), vec![]);
    let due = store.due_fan_outs(ts(1_000), 10).await.unwrap();
    assert_eq!(
        due_ids(due.clone()),
        vec![
            (b.clone(), early.event.id.clone(), ts(500)),
            (a.clone(), late.event.id.clone(), ts(1_000)),
        ],
        "earliest first, across tenants"
    );
    assert_eq!(store.due_fan_outs(ts(1_000), 1).await.unwrap().len(), 1);

    // A sweep claims the early one: it moves on, and a second claim of what was read conflicts.
    store.claim_fan_out(&due[0], ts(60_500)).await.unwrap();
    assert!(matches!(
        store.claim_fan_out(&due[0], ts(60_500)).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        due_ids(store.due_fan_outs(ts(1_000), 10).await.unwrap()),
        vec![(a.clone(), late.event.id.clone(), ts(1_000))]
    );

    // Owed, as the fan-out reads it.
    assert_eq!(
        store
            .get_event_for_fan_out(&a, &late.event.id)
            .await
            .unwrap(),
        Some((late.event.clone(), Some(ts(1_000))))
    );
    // Done: no longer due, and no sweep can claim it any more. Saying so twice is fine.
    store.fanned_out(&a, &late.event.id).await.unwrap();
    store.fanned_out(&a, &late.event.id).await.unwrap();
    assert_eq!(
        store
            .get_event_for_fan_out(&a, &late.event.id)
            .await
            .unwrap(),
        Some((late.event.clone(), None))
    );
    assert!(matches!(
        store.claim_fan_out(&due[1], ts(2_000)).await,
        Err(StoreError::Conflict | StoreError::NotFound)
    ));
    assert_eq!(
        store
            .get_event_for_fan_out(&a, &owes_nothing.event.id)
            .await
            .unwrap(),
        Some((owes_nothing.event.clone(), None))
    );
    assert_eq!(
        store
            .get_event_for_fan_out(&b, &late.event.id)
            .await
            .unwrap(),
        None,
        "another tenant's event"
    );
    assert_eq!(
        due_ids(store.due_fan_outs(ts(100_000), 10).await.unwrap()),
        vec![(b.clone(), early.event.id.clone(), ts(60_500))]
    );
    // Another tenant's event, or none: not found.
    assert!(matches!(
        store.fanned_out(&a, &early.event.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .fanned_out(&a, &EventId::parse("never-published").unwrap())
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store.get_event(&a, &late.event.id).await.unwrap(),
        Some(late.event.clone()),
        "the event itself stays as it was"
    );
}

pub async fn event_ids_and_idempotency_keys_are_per_tenant<S: Store>(store: &S) {
    let (a, b) = (tenant("tenant-a"), tenant("tenant-b"));
    let id = EventId::parse("order-1001").unwrap();
    let mut ea = new_event(&a, &[], ts(10), r#"{"for":"a"}"#);
    ea.event.id = id.clone();
    let mut eb = new_event(&b, &[], ts(11), r#"{"for":"b"}"#);
    eb.event.id = id.clone();
    created(store, &ea).await;
    created(store, &eb).await;
    assert_eq!(store.get_event(&a, &id).await.unwrap(), Some(ea.event));
    assert_eq!(store.get_event(&b, &id).await.unwrap(), Some(eb.event));

    // One idempotency key used by two tenants: two events.
    let mut ka = new_event(&a, &[], ts(20), "1");
    ka.idempotency_key = Some("shared-key".into());
    let mut kb = new_event(&b, &[], ts(21), "2");
    kb.idempotency_key = Some("shared-key".into());
    created(store, &ka).await;
    created(store, &kb).await;
    assert_eq!(
        store.get_event(&b, &kb.event.id).await.unwrap(),
        Some(kb.event)
    );
}

pub async fn deliveries_are_written_with_their_event<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let (s1, s2, s3) = (
        subscription(&a, ts(0)),
        subscription(&a, ts(1)),
        subscription(&a, ts(2)),
    );
    insert_all(store, &[&s1, &s2, &s3]).await;
    // Another tenant's event with two deliveries (on DynamoDB written deliveries first): all of
    // it readable, due and listed.
    let f = tenant("tenant-f");
    let (f1, f2) = (subscription(&f, ts(0)), subscription(&f, ts(1)));
    insert_all(store, &[&f1, &f2]).await;
    let fresh = new_event(&f, &[&f1, &f2], ts(5), r#"{"id":6}"#);
    created(store, &fresh).await;
    assert_eq!(
        store.get_event(&f, &fresh.event.id).await.unwrap(),
        Some(fresh.event.clone())
    );
    let due: Vec<_> = store
        .due_deliveries(ts(3_600_000), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.delivery_id)
        .collect();
    for (s, d) in [&f1, &f2].into_iter().zip(&fresh.deliveries) {
        assert_eq!(
            store.get_delivery(&f, d.id()).await.unwrap().as_ref(),
            Some(d)
        );
        assert!(due.contains(d.id()), "{} is due", d.id());
        assert_eq!(first_page(store, &f, &s.id).await, vec![d.clone()]);
    }

    let new = new_event(&a, &[&s1, &s2, &s3], ts(10), r#"{"id":7}"#);
    created(store, &new).await;
    for d in &new.deliveries {
        assert_eq!(
            store.get_delivery(&a, d.id()).await.unwrap().as_ref(),
            Some(d)
        );
    }
    for (s, d) in [&s1, &s2, &s3].into_iter().zip(&new.deliveries) {
        let listed = store
            .list_deliveries(
                &a,
                &s.id,
                &PageRequest {
                    limit: 10,
                    after: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            listed,
            Page {
                items: vec![d.clone()],
                next: None
            }
        );
    }
    // An event no subscription wants is still stored.
    let lonely = new_event(&a, &[], ts(20), "null");
    created(store, &lonely).await;
    assert_eq!(
        store.get_event(&a, &lonely.event.id).await.unwrap(),
        Some(lonely.event)
    );
}

pub async fn list_deliveries_pages_newest_first<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let (x, y) = (subscription(&a, ts(0)), subscription(&a, ts(1)));
    insert_all(store, &[&x, &y]).await;
    let mut to_x = Vec::new();
    let mut to_y = Vec::new();
    // Enough for a store that spreads a subscription's deliveries to spread these.
    for i in 0..30 {
        let new = new_event(&a, &[&x, &y], ts(1_000 * (i + 1)), "{}");
        created(store, &new).await;
        to_x.push(new.deliveries[0].clone());
        to_y.push(new.deliveries[1].clone());
    }
    to_x.reverse();
    to_y.reverse();

    let pages = delivery_pages(store, &a, &x.id, 7).await;
    let sizes: Vec<usize> = pages.iter().map(|p| p.items.len()).collect();
    assert_eq!(sizes, vec![7, 7, 7, 7, 2]);
    let listed: Vec<Delivery> = pages.into_iter().flat_map(|p| p.items).collect();
    assert_eq!(
        delivery_ids(&listed),
        delivery_ids(&to_x),
        "newest first, only x's"
    );
    assert_eq!(listed, to_x);

    let exact = delivery_pages(store, &a, &y.id, 30).await;
    assert_eq!(exact.len(), 1, "exactly full page has no cursor");
    assert_eq!(exact[0].items, to_y);

    let none = delivery_pages(store, &a, &subscription_id_at(ts(2)), 2).await;
    assert_eq!(
        none,
        vec![Page {
            items: vec![],
            next: None
        }]
    );
}

pub async fn deleting_a_subscription_keeps_its_deliveries<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let s = subscription(&a, ts(0));
    insert_all(store, &[&s]).await;
    let new = new_event(&a, &[&s], ts(10), "{}");
    created(store, &new).await;
    store.delete_subscription(&a, &s.id).await.unwrap();
    let d = &new.deliveries[0];
    assert_eq!(
        store.get_delivery(&a, d.id()).await.unwrap().as_ref(),
        Some(d)
    );
    let listed = store
        .list_deliveries(
            &a,
            &s.id,
            &PageRequest {
                limit: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        listed.items, new.deliveries,
        "the delivery log outlives the subscription"
    );
}

pub async fn event_data_bytes_are_preserved<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let odd = [
        r#"{"b":1,  "a":[1,2]}"#,
        "{\n  \"z\" : 1.50e+2 ,\"a\":[ true,null ],\"s\":\"\\u00e9 é \\\" \\n\"}",
        r#"{"big":123456789012345678901234567890,"neg":-0.0}"#,
        r#""just a string""#,
        "[]",
    ];
    let mut written = Vec::new();
    for (i, data) in odd.iter().enumerate() {
        let new = new_event(&a, &[], ts(i as i64), data);
        created(store, &new).await;
        written.push(new.event);
    }
    for (event, data) in written.iter().zip(odd) {
        let stored = store.get_event(&a, &event.id).await.unwrap().unwrap();
        assert_eq!(stored.data.get(), data, "data bytes");
        assert_eq!(stored.payload(), event.payload(), "delivered body");
    }
}

pub async fn update_delivery_is_version_checked<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let s = subscription(&a, ts(0));
    let new = new_event(&a, &[&s], ts(10), "{}");
    created(store, &new).await;
    let d = new.deliveries[0].clone();

    let lease = Duration::from_secs(30);
    let w1 = save(
        store,
        &d,
        d.leased(ts(20), "worker-1".into(), lease).unwrap(),
    )
    .await;
    assert_eq!(
        store.get_delivery(&a, d.id()).await.unwrap(),
        Some(w1.clone())
    );

    // A second worker read the same version: its lease must lose.
    let w2 = d.leased(ts(21), "worker-2".into(), lease).unwrap();
    let r = store.update_delivery(&w2, d.version()).await;
    assert!(matches!(r, Err(StoreError::Conflict)), "stale write: {r:?}");
    assert_eq!(
        store.get_delivery(&a, d.id()).await.unwrap(),
        Some(w1.clone())
    );

    let done = save(
        store,
        &w1,
        attempted(&w1, ts(60_000), AttemptClass::Delivered, GRACE),
    )
    .await;
    assert_eq!(
        store.get_delivery(&a, d.id()).await.unwrap(),
        Some(done.clone())
    );
    // Writing over w1's version again is stale now.
    let late = w1.with_due_at_for_tests(w1.due_at());
    let r = store.update_delivery(&late, w1.version()).await;
    assert!(
        matches!(r, Err(StoreError::Conflict)),
        "stale write after success: {r:?}"
    );
    assert_eq!(
        store.get_delivery(&a, d.id()).await.unwrap(),
        Some(done.clone())
    );
    // The very write that succeeded, repeated (an SDK retry after its answer was lost),
    // recognises itself and succeeds.
    let repeated = store.update_delivery(&done, w1.version()).await;
    assert!(
        repeated.is_ok(),
        "a repeat of the committed write: {repeated:?}"
    );
    assert_eq!(store.get_delivery(&a, d.id()).await.unwrap(), Some(done));
}

pub async fn update_subscription_is_version_checked<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let s = subscription(&a, ts(0));
    insert_all(store, &[&s]).await;
    // Two writers read version 0: a PATCH and a `410 Gone` handler.
    let mut patched = s.clone();
    patched.description = "patched".into();
    patched.version = 1;
    let mut disabled = s.clone();
    disabled.status = SubscriptionStatus::Disabled;
    disabled.version = 1;
    store.update_subscription(&patched, 0).await.unwrap();
    let r = store.update_subscription(&disabled, 0).await;
    assert!(matches!(r, Err(StoreError::Conflict)), "stale write: {r:?}");
    assert_eq!(
        store.get_subscription(&a, &s.id).await.unwrap(),
        Some(patched.clone())
    );
    // The loser reads again and applies its change on top: both changes stay.
    let mut both = patched.clone();
    both.status = SubscriptionStatus::Disabled;
    both.version = 2;
    store.update_subscription(&both, 1).await.unwrap();
    assert_eq!(store.get_subscription(&a, &s.id).await.unwrap(), Some(both));
}

pub async fn list_cursors_are_checked<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let s = subscription(&a, ts(0));
    insert_all(store, &[&s]).await;
    let after = |cursor: &str| PageRequest {
        limit: 10,
        after: Some(cursor.to_owned()),
    };
    for cursor in [
        "nonsense",
        "#",
        &"9".repeat(2_000),
        "0000000000000#dlv_x",
        "0.nonsense",
        "0.",
    ] {
        let r = store.list_deliveries(&a, &s.id, &after(cursor)).await;
        assert!(
            matches!(r, Err(StoreError::BadCursor)),
            "deliveries after {:.40}: {r:?}",
            cursor
        );
    }
    // A subscription list's cursor is a subscription id; another id is not one.
    let other_id = crate::domain::DeliveryId::generate().to_string();
    for cursor in ["nonsense", "sub_x", &other_id, &"9".repeat(2_000)] {
        let r = store.list_subscriptions(&a, &after(cursor)).await;
        assert!(
            matches!(r, Err(StoreError::BadCursor)),
            "subscriptions after {:.40}: {r:?}",
            cursor
        );
    }
    // An empty cursor is no cursor: the first page.
    let first = store.list_subscriptions(&a, &after("")).await.unwrap();
    assert_eq!(sub_ids(&first.items), [s.id.to_string()]);
    let first = store.list_deliveries(&a, &s.id, &after("")).await.unwrap();
    assert_eq!(first.items, []);
}

pub async fn update_of_unknown_delivery_is_not_found<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let s = subscription(&a, ts(0));
    let ghost = delivery_for(&a, &s, ts(10));
    let next = ghost
        .leased(ts(20), "w".into(), Duration::from_secs(30))
        .unwrap();
    let r = store.update_delivery(&next, 0).await;
    assert!(
        matches!(r, Err(StoreError::NotFound)),
        "unknown delivery: {r:?}"
    );
    // The failed write must not have created it.
    assert_eq!(store.get_delivery(&a, ghost.id()).await.unwrap(), None);
    assert_eq!(
        store.due_deliveries(ts(1_000_000), 10).await.unwrap(),
        vec![]
    );
}

pub async fn due_deliveries_returns_due_work_earliest_first<S: Store>(store: &S) {
    let (a, b) = (tenant("tenant-a"), tenant("tenant-b"));
    let (sa, sa2) = (subscription(&a, ts(0)), subscription(&a, ts(1)));
    let (sb, sb2) = (subscription(&b, ts(0)), subscription(&b, ts(1)));
    let t0 = ts(0);
    let ea = new_event(&a, &[&sa, &sa2], t0, "{}");
    let eb = new_event(&b, &[&sb, &sb2], t0, "{}");
    created(store, &ea).await;
    created(store, &eb).await;
    let (pending, done) = (&ea.deliveries[0], &ea.deliveries[1]);
    let (leased, retrying) = (&eb.deliveries[0], &eb.deliveries[1]);

    // pending: untouched, due after the grace (t0 + 60 s).
    // leased, and due at t0 + 30 s (set by hand: this checks the store's index, not a policy).
    let next = leased
        .leased(t0, "w".into(), Duration::from_secs(30))
        .unwrap()
        .with_due_at_for_tests(Some(ts(30_000)));
    save(store, leased, next).await;
    // retrying: one failed attempt, due again at t0 + 10 s.
    let retry_at = ts(10_000);
    let next = attempted(
        retrying,
        t0,
        AttemptClass::Retryable,
        Duration::from_secs(10),
    );
    save(store, retrying, next).await;
    // done: succeeded, never due again.
    save(
        store,
        done,
        attempted(done, t0, AttemptClass::Delivered, GRACE),
    )
    .await;

    let due = |now: Timestamp, limit: u32| async move {
        store
            .due_deliveries(now, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.tenant_id, d.delivery_id, d.due_at))
            .collect::<Vec<_>>()
    };
    let r = (b.clone(), retrying.id().clone(), retry_at);
    let l = (b.clone(), leased.id().clone(), ts(30_000));
    let p = (a.clone(), pending.id().clone(), ts(60_000));

    assert_eq!(due(ts(9_999), 10).await, vec![], "nothing due yet");
    assert_eq!(
        due(ts(30_000), 10).await,
        vec![r.clone(), l.clone()],
        "due_at == now is due"
    );
    assert_eq!(
        due(ts(3_600_000), 10).await,
        vec![r.clone(), l.clone(), p],
        "final ones never"
    );
    assert_eq!(
        due(ts(3_600_000), 2).await,
        vec![r.clone(), l],
        "limit keeps the earliest"
    );
    assert_eq!(due(ts(3_600_000), 1).await, vec![r]);
}

pub async fn due_index_follows_delivery_updates<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let (s, t, u) = (
        subscription(&a, ts(0)),
        subscription(&a, ts(1)),
        subscription(&a, ts(2)),
    );
    insert_all(store, &[&s, &t, &u]).await;
    let new = new_event(&a, &[&s, &t, &u], ts(0), "{}");
    created(store, &new).await;
    let (finishing, postponed, holding) =
        (&new.deliveries[0], &new.deliveries[1], &new.deliveries[2]);
    let due_ids = |now: Timestamp| async move {
        let mut ids = store
            .due_deliveries(now, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.delivery_id)
            .collect::<Vec<_>>();
        ids.sort();
        ids
    };
    let grace_over = ts(0).saturating_add(GRACE);
    assert_eq!(due_ids(grace_over).await.len(), 3);

    // Going final leaves the due index.
    save(
        store,
        finishing,
        attempted(finishing, ts(5), AttemptClass::Permanent, GRACE),
    )
    .await;
    // Rescheduling moves it.
    let later = ts(7_200_005);
    let next = attempted(
        postponed,
        ts(5),
        AttemptClass::Retryable,
        Duration::from_secs(7_200),
    );
    save(store, postponed, next).await;
    // Holding leaves it.
    let held = save(store, holding, holding.held(ts(5), "paused", None).unwrap()).await;
    assert_eq!(
        due_ids(grace_over).await,
        vec![],
        "none is due at the old time"
    );
    assert_eq!(due_ids(later).await, vec![postponed.id().clone()]);

    // An operator's resend brings a final delivery back; a release, a held one.
    let failed = store
        .get_delivery(&a, finishing.id())
        .await
        .unwrap()
        .unwrap();
    save(store, &failed, failed.resent(ts(10), GRACE).unwrap()).await;
    save(store, &held, held.released(ts(10), GRACE).unwrap()).await;
    let back = ts(10).saturating_add(GRACE);
    let mut expected = vec![finishing.id().clone(), holding.id().clone()];
    expected.sort();
    assert_eq!(due_ids(back).await, expected);
}

/// After a crash of the only process that could hold leases, everything unfinished is handed
/// back to the sweep: a leased delivery is released and due now, an idle one (its queue message
/// died with the process) due now, one waiting for a later retry stays due then; an owed fan-out
/// due later is due now. Final and held deliveries, and a fan-out that is done, are left alone.
pub async fn recover_after_restart_makes_unfinished_work_due<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let subs: Vec<_> = (0..5).map(|i| subscription(&a, ts(1_000 + i))).collect();
    let subs: Vec<_> = subs.iter().collect();
    insert_all(store, &subs).await;
    let t0 = ts(10_000);
    let now = ts(20_000);
    let new = new_event(&a, &subs, t0, "{}");
    created(store, &new).await;
    let [idle, leased, finished, held, retrying] = new.deliveries.as_slice() else {
        panic!("five deliveries");
    };
    // An event whose fan-out was owed, due later, when the process died (its job died with
    // it); one owed and due already; one whose fan-out was done.
    let mut owing = new_event(&a, &[], t0, "1");
    owing.fan_out_due_at = Some(t0.saturating_add(GRACE));
    let mut overdue = new_event(&a, &[], t0, "2");
    overdue.fan_out_due_at = Some(ts(15_000));
    let mut done = new_event(&a, &[], t0, "3");
    done.fan_out_due_at = Some(t0.saturating_add(GRACE));
    for e in [&owing, &overdue, &done] {
        created(store, e).await;
    }
    store.fanned_out(&a, &done.event.id).await.unwrap();

    // Leased, as a worker that crashed mid-attempt leaves it.
    let lease = Duration::from_secs(60);
    let leased_then = save(
        store,
        leased,
        leased.leased(t0, "w1".into(), lease).unwrap(),
    )
    .await;
    // Final, and held: not live work.
    let finished = save(
        store,
        finished,
        attempted(finished, t0, AttemptClass::Delivered, GRACE),
    )
    .await;
    let held = save(store, held, held.held(t0, "paused", None).unwrap()).await;
    // Its next attempt is after `now`: nothing to change.
    let retry_at = ts(90_000);
    let retrying = save(
        store,
        retrying,
        attempted(retrying, t0, AttemptClass::Retryable, t0.until(retry_at)),
    )
    .await;
    assert_eq!(retrying.next_attempt_at(), Some(retry_at));
    assert_eq!(retrying.due_at(), Some(retry_at));

    // The leased delivery, the idle one and the owed fan-out due later.
    assert_eq!(store.recover_after_restart(now).await.unwrap(), 3);

    let released = store.get_delivery(&a, leased.id()).await.unwrap().unwrap();
    assert_eq!(released.current_lease(), None);
    assert_eq!(released.due_at(), Some(now));
    assert_eq!(released.version(), leased_then.version() + 1);
    assert_eq!(released.status(), leased_then.status());
    assert_eq!(released.attempts(), leased_then.attempts());
    // Leasable again at once (its lease had 50 s left).
    assert!(released.leased(now, "w2".into(), lease).is_ok());

    let idle_now = store.get_delivery(&a, idle.id()).await.unwrap().unwrap();
    assert_eq!(idle_now.due_at(), Some(now), "was {:?}", idle.due_at());
    assert_eq!(idle_now.next_attempt_at(), idle.next_attempt_at());
    for untouched in [&finished, &held, &retrying] {
        assert_eq!(
            store
                .get_delivery(&a, untouched.id())
                .await
                .unwrap()
                .as_ref(),
            Some(untouched)
        );
    }
    let mut due: Vec<_> = store
        .due_deliveries(now, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.delivery_id, d.due_at))
        .collect();
    due.sort();
    let mut expected = vec![(idle.id().clone(), now), (leased.id().clone(), now)];
    expected.sort();
    assert_eq!(due, expected, "the sweep sees both as due now");

    let owed = |e: &TestEvent| {
        let id = e.event.id.clone();
        let a = a.clone();
        async move {
            store
                .get_event_for_fan_out(&a, &id)
                .await
                .unwrap()
                .expect("the event is there")
                .1
        }
    };
    assert_eq!(owed(&owing).await, Some(now), "due now, not a grace later");
    assert_eq!(owed(&overdue).await, Some(ts(15_000)), "due already");
    assert_eq!(owed(&done).await, None, "done stays done");
    let mut fan_outs: Vec<_> = store
        .due_fan_outs(now, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.event_id, d.due_at))
        .collect();
    fan_outs.sort();
    let mut expected = vec![
        (owing.event.id.clone(), now),
        (overdue.event.id.clone(), ts(15_000)),
    ];
    expected.sort();
    assert_eq!(fan_outs, expected);

    // Nothing left to change.
    assert_eq!(store.recover_after_restart(now).await.unwrap(), 0);
}

pub async fn timestamps_round_trip_exactly<S: Store>(store: &S) {
    let a = tenant("tenant-a");
    let mut s = subscription(&a, ts(1));
    s.updated_at = ts(999);
    insert_all(store, &[&s]).await;
    assert_eq!(
        store.get_subscription(&a, &s.id).await.unwrap(),
        Some(s.clone())
    );

    let mut new = new_event(&a, &[&s], ts(7), "{}");
    new.event.occurred_at = Timestamp::from_unix_millis(-1); // 1969-12-31T23:59:59.999Z
    new.event.received_at = ts(7);
    created(store, &new).await;
    let stored = store.get_event(&a, &new.event.id).await.unwrap().unwrap();
    assert_eq!(stored.occurred_at, new.event.occurred_at);
    assert_eq!(stored.received_at, new.event.received_at);

    let d = &new.deliveries[0];
    let far = Timestamp::from_unix_millis(4_102_444_800_001); // 2100-01-01T00:00:00.001Z
    let next = attempted(
        d,
        ts(11),
        AttemptClass::Retryable,
        Duration::from_millis(123_457),
    )
    .with_due_at_for_tests(Some(far));
    let written = save(store, d, next).await;
    assert_eq!(store.get_delivery(&a, d.id()).await.unwrap(), Some(written));
    let due = store.due_deliveries(far, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].due_at, far);
}

/// The largest and strangest values the parsers accept, stored and read back equal: what is
/// accepted must be readable, or every later read of the tenant fails. (Property tests in
/// `shared/tests/properties` cover the values in between, through the SQLite store.)
pub async fn accepted_edge_values_read_back<S: Store>(store: &S) {
    let a = tenant(&"t".repeat(64));
    let longest_type = format!("{}.{}", "A".repeat(63), "z_-9".repeat(16));
    // 2,048 bytes once percent-encoded: each `é` is 6.
    let url = format!("https://xn--bcher-kva.example:65535/{}", "é".repeat(335));
    let url = format!(
        "{url}{}",
        "a".repeat(2_048 - CallbackUrl::parse(&url).unwrap().as_str().len())
    );
    let mut s = subscription(&a, ts(0));
    s.created_at = Timestamp::parse("0000-01-01T00:00:00Z").unwrap();
    s.event_types = ["*", &format!("{}.*", "a".repeat(128)), &longest_type]
        .into_iter()
        .map(|p| EventTypePattern::parse(p).unwrap())
        .collect();
    s.callback_url = CallbackUrl::parse(&url).unwrap();
    assert_eq!(s.callback_url.as_str().len(), 2_048);
    s.secret = Secret::parse(&format!("whsec_{}", "/+9A".repeat(21) + "/w==")).unwrap();
    assert_eq!(s.secret.key().len(), 64);
    s.description = "\u{0}\"\\\n\u{202e}é日😀"
        .chars()
        .cycle()
        .take(1_024)
        .collect();
    s.updated_at = Timestamp::parse("9999-12-31T23:59:59.999Z").unwrap();
    s.version = u64::MAX;
    insert_all(store, &[&s]).await;
    assert_eq!(
        store.get_subscription(&a, &s.id).await.unwrap(),
        Some(s.clone())
    );
    assert_eq!(
        store.tenant_subscriptions(&a).await.unwrap(),
        vec![s.clone()]
    );

    let mut new = new_event(
        &a,
        &[&s],
        ts(0),
        r#"{"\u0000":"😀\ud83d\ude00","a":[[[[1e308]]]]}"#,
    );
    new.event.id = EventId::parse(&"a._:-Z9".repeat(19)[..128]).unwrap();
    new.event.event_type = EventType::parse(&longest_type).unwrap();
    new.event.occurred_at = Timestamp::parse("0000-01-01T00:00:00Z").unwrap();
    new.idempotency_key = Some("é".repeat(127));
    new.deliveries.clear();
    created(store, &new).await;
    let stored = store.get_event(&a, &new.event.id).await.unwrap();
    assert_eq!(stored, Some(new.event.clone()));
    new.event.id = EventId::generate();
    new.event.occurred_at = Timestamp::parse("9999-12-31T23:59:59.999Z").unwrap();
    new.idempotency_key = None;
    created(store, &new).await;
    let stored = store.get_event(&a, &new.event.id).await.unwrap();
    assert_eq!(stored, Some(new.event));
}
