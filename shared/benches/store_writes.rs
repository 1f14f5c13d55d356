//! The store's hot writes on SQLite: `insert_event` of an event owing its fan-out (what every
//! publish commits) and `update_delivery` with its version check (what every retry commits,
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

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed set-up ends it

use std::time::{Duration, Instant};

use criterion::{
    BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use serde_json::value::RawValue;
use tidings_core::domain::{
    Delivery, Event, EventId, EventType, SubscriptionId, TenantId, Timestamp,
};
use tidings_core::ports::{FanOutDuty, InsertOutcome, NewEvent, Store};
use tidings_core::sqlite::SqliteStore;
use tokio::runtime::Runtime;

const GRACE: Duration = Duration::from_secs(30);
const LEASE: Duration = Duration::from_secs(30);
/// Writes in flight in the concurrent variant.
const CONCURRENCY: usize = 32;

/// An event with ~1 KiB of `data`, and the delivery its fan-out makes.
fn template() -> (NewEvent, Delivery) {
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
        fingerprint: String::new(),
    };
    let delivery = Delivery::new(
        tenant,
        event.id.clone(),
        now,
        SubscriptionId::generate(),
        now,
        Duration::ZERO,
        GRACE,
    );
    let owed = now.saturating_add(GRACE);
    let new = NewEvent {
        event,
        idempotency_key: None,
        fan_out: FanOutDuty::Owed { due_at: owed },
    };
    (new, delivery)
}

/// The template under a new event id (and so a new delivery id).
fn fresh(template: &(NewEvent, Delivery)) -> (NewEvent, Delivery) {
    let (mut new, d) = template.clone();
    new.event.id = EventId::generate();
    let d = Delivery::new(
        d.tenant_id().clone(),
        new.event.id.clone(),
        d.created_at(),
        d.subscription_id().clone(),
        d.created_at(),
        Duration::ZERO,
        GRACE,
    );
    (new, d)
}

/// The next state of a delivery in a busy worker's life: leased, then released again (as after
/// a crash), alternately. Every write is version-checked like a real one.
fn next_state(current: &Delivery, i: u64) -> Delivery {
    let now = current
        .created_at()
        .saturating_add(Duration::from_millis(i + 1));
    if current.current_lease().is_some() {
        current
            .recovered(now)
            .expect("a leased delivery is recoverable")
    } else {
        current
            .leased(now, "lease-token-0123456789".to_owned(), LEASE)
            .expect("leasable")
    }
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
                || fresh(&template).0,
                |new| async move {
                    let outcome = store.insert_event(&new).await.expect("insert_event");
                    assert_eq!(outcome, InsertOutcome::Created);
                },
                BatchSize::SmallInput,
            );
        });

        group.bench_function(BenchmarkId::new("update_delivery", name), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (new, delivery) = fresh(&template);
                async move {
                    store.insert_event(&new).await.expect("insert_event");
                    store
                        .insert_delivery(&delivery)
                        .await
                        .expect("insert_delivery");
                    let mut current = delivery.clone();
                    let states: Vec<Delivery> = (0..iters)
                        .map(|i| {
                            current = next_state(&current, i);
                            current.clone()
                        })
                        .collect();
                    let mut version = delivery.version();
                    let start = Instant::now();
                    for next in &states {
                        store
                            .update_delivery(next, version)
                            .await
                            .expect("update_delivery");
                        version = next.version();
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
                            .map(|_| fresh(&template).0)
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
