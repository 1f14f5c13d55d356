//! Fan-out's filter: one event type matched against 1,000 subscriptions of a tenant, with a
//! realistic mix of `*`, `prefix.*` and exact patterns (some subscriptions list several, some are
//! paused).
//!
//! `cargo bench -p tidings-core --bench matching`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed set-up ends it

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tidings_core::domain::{
    CallbackUrl, EventType, EventTypePattern, Secret, Subscription, SubscriptionId,
    SubscriptionStatus, TenantId, Timestamp,
};

const SUBSCRIPTIONS: usize = 1_000;

const DOMAINS: [&str; 12] = [
    "order",
    "invoice",
    "payment",
    "customer",
    "shipment",
    "refund",
    "product",
    "cart",
    "user",
    "account",
    "subscription",
    "inventory",
];
const ACTIONS: [&str; 8] = [
    "created",
    "updated",
    "deleted",
    "paid",
    "failed",
    "shipped",
    "cancelled",
    "item.added",
];

/// A fixed xorshift sequence: the same subscriptions on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn pattern(rng: &mut Rng) -> EventTypePattern {
    let domain = DOMAINS[rng.below(DOMAINS.len())];
    let text = match rng.below(100) {
        // 3 %: everything (audit logs, data lakes).
        0..3 => "*".to_owned(),
        // 30 %: a whole domain.
        3..33 => format!("{domain}.*"),
        // 67 %: one exact type.
        _ => format!("{domain}.{}", ACTIONS[rng.below(ACTIONS.len())]),
    };
    EventTypePattern::parse(&text).expect("valid pattern")
}

fn subscriptions() -> Vec<Subscription> {
    let tenant = TenantId::parse("acme").expect("tenant");
    let url = CallbackUrl::parse("https://hooks.example.com/tidings").expect("url");
    let now = Timestamp::from_unix_millis(1_735_000_000_000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..SUBSCRIPTIONS)
        .map(|i| {
            // 1 to 3 patterns each; 5 % paused.
            let patterns = 1 + rng.below(3);
            Subscription {
                id: SubscriptionId::generate(),
                tenant_id: tenant.clone(),
                event_types: (0..patterns).map(|_| pattern(&mut rng)).collect(),
                callback_url: url.clone(),
                secret: Secret::generate(),
                description: format!("subscription {i}"),
                status: if rng.below(20) == 0 {
                    SubscriptionStatus::Paused
                } else {
                    SubscriptionStatus::Active
                },
                created_at: now,
                updated_at: now,
                version: 0,
            }
        })
        .collect()
}

fn matching(c: &mut Criterion) {
    let subs = subscriptions();
    let mut group = c.benchmark_group("match_1000_subscriptions");
    group
        .throughput(Throughput::Elements(subs.len() as u64))
        .measurement_time(Duration::from_secs(3));
    // A common type, a deep one only prefixes and `*` reach, and one nobody listens to.
    for event_type in ["order.created", "order.item.added", "audit.login"] {
        let event_type = EventType::parse(event_type).expect("event type");
        let wanted = subs.iter().filter(|s| s.wants(&event_type)).count();
        group.bench_with_input(
            BenchmarkId::new(format!("{wanted}_match"), event_type.as_str()),
            &event_type,
            |b, event_type| {
                b.iter(|| {
                    black_box(&subs)
                        .iter()
                        .filter(|s| s.wants(black_box(event_type)))
                        .count()
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, matching);
criterion_main!(benches);
