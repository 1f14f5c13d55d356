//! The store's hot writes on SQLite: `insert_event` of an event with one delivery (what every
//! publish commits) and `update_delivery` with its version check (what every attempt commits,
//! twice: the lease, then the outcome).
//!
//! Each runs on a file-backed `SqliteStore` in a temporary directory (WAL, `synchronous=FULL`:
//! every commit is fsynced, as in production) and on `SqliteStore::open_in_memory()` (no disk):
//! the ratio of the two is what durability costs per write.
//!
//! `insert_event_x32` runs 32 inserts at once (as 32 concurrent publishes do) and reports the time
//! per insert: what a store that shares commits between writers (group commit) gains.
//!
//! `cargo bench -p tidings-core --bench store_writes`

use std::time::{Duration, Instant};

use criterion::{
    BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use serde_json::value::RawValue;
use tidings_core::domain::{
    Attempt, Delivery, DeliveryId, DeliveryStatus, Event, EventId, EventType, SubscriptionId,
    TenantId, Timestamp,
};
use tidings_core::ports::{InsertOutcome, NewEvent, Store};
use tidings_core::retry::AttemptClass;
use tidings_core::sqlite::SqliteStore;
use tokio::runtime::Runtime;

const GRACE: Duration = Duration::from_secs(30);
const LEASE: Duration = Duration::from_secs(30);
/// Writes in flight in the concurrent variant.
const CONCURRENCY: usize = 32;

/// An event with ~1 KiB of `data` and one pending delivery.
fn template() -> NewEvent {
    let tenant = TenantId::parse("acme").expect("tenant");
    let now = Timestamp::now();
    let data = format!(
        r#"{{"orderId":"ord_1842","customer":"cus_77","items":[{{"sku":"A-1","qty":2}},{{"sku":"B-7","qty":1}}],"total":"129.90","currency":"EUR","note":"{}"}}"#,
        "x".repeat(880)
    );
    let event = Event {
        id: EventId::generate(),
        tenant_id: tenant.clone(),
        event_type: EventType::parse("order.created").expect("event type"),
        occurred_at: now,
        data: RawValue::from_string(data).expect("JSON"),
        received_at: now,
    };
    let delivery = Delivery::new(
        tenant,
        event.id.clone(),
        SubscriptionId::generate(),
        now,
        GRACE,
    );
    NewEvent {
        event,
        deliveries: vec![delivery],
        idempotency_key: None,
    }
}

/// The template under new event and delivery ids.
fn fresh(template: &NewEvent) -> NewEvent {
    let mut new = template.clone();
    new.event.id = EventId::generate();
    for d in &mut new.deliveries {
        d.id = DeliveryId::generate();
        d.event_id = new.event.id.clone();
    }
    new
}

/// A successful delivery's two writes: the lease, then the outcome.
fn lease_and_outcome(pending: &Delivery) -> [Delivery; 2] {
    let now = pending.created_at;
    let leased = pending
        .leased(now, "lease-token-0123456789".to_owned(), LEASE)
        .expect("leasable");
    let attempt = Attempt {
        number: 1,
        started_at: now,
        latency_ms: 12,
        outcome: AttemptClass::Delivered,
        status_code: Some(200),
        error: None,
        response_snippet: Some(r#"{"ok":true}"#.to_owned()),
    };
    let done = leased.with_attempt(attempt, DeliveryStatus::Succeeded, None, None, now);
    [leased, done]
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn store_writes(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let backends = [
        (
            "file",
            SqliteStore::open(&dir.path().join("tidings.db")).expect("file store"),
        ),
        (
            "memory",
            SqliteStore::open_in_memory().expect("in-memory store"),
        ),
    ];
    let template = template();

    let mut group = c.benchmark_group("sqlite");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    for (name, store) in &backends {
        group.bench_function(BenchmarkId::new("insert_event", name), |b| {
            b.to_async(&rt).iter_batched(
                || fresh(&template),
                |new| async move {
                    let outcome = store.insert_event(&new).await.expect("insert_event");
                    assert_eq!(outcome, InsertOutcome::Created);
                },
                BatchSize::SmallInput,
            );
        });

        group.bench_function(BenchmarkId::new("update_delivery", name), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let new = fresh(&template);
                async move {
                    store.insert_event(&new).await.expect("insert_event");
                    let states = lease_and_outcome(&new.deliveries[0]);
                    let mut version = new.deliveries[0].version;
                    let start = Instant::now();
                    for i in 0..iters {
                        let mut next = states[(i % 2) as usize].clone();
                        next.version = version + 1;
                        store
                            .update_delivery(&next, version)
                            .await
                            .expect("update_delivery");
                        version = next.version;
                    }
                    start.elapsed()
                }
            });
        });
    }

    // Per insert (throughput in elements): criterion's time is for one round of 32.
    group.throughput(Throughput::Elements(CONCURRENCY as u64));
    for (name, store) in &backends {
        group.bench_function(
            BenchmarkId::new(format!("insert_event_x{CONCURRENCY}"), name),
            |b| {
                b.to_async(&rt).iter_batched(
                    || {
                        (0..CONCURRENCY)
                            .map(|_| fresh(&template))
                            .collect::<Vec<_>>()
                    },
                    |batch| async move {
                        let mut tasks = tokio::task::JoinSet::new();
                        for new in batch {
                            let store = store.clone();
                            tasks.spawn(async move { store.insert_event(&new).await });
                        }
                        while let Some(outcome) = tasks.join_next().await {
                            let outcome = outcome.expect("task").expect("insert_event");
                            assert_eq!(outcome, InsertOutcome::Created);
                        }
                    },
                    BatchSize::SmallInput,
                );
            },
        );
    }
    group.finish();
    drop(backends);
    drop(dir);
}

criterion_group!(benches, store_writes);
criterion_main!(benches);
