//! Standard Webhooks signing and verification of a ~1 KiB body: the per-attempt CPU cost on the
//! sender, and what a verifying receiver pays.
//!
//! `cargo bench -p tidings-core --bench signing`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidings_core::domain::Secret;
use tidings_core::signing::{DEFAULT_TOLERANCE_SECS, sign, verify};

const MSG_ID: &str = "evt_01jb8m3x5k2q7r9t4v6w8y0z1a";
const TIMESTAMP: i64 = 1_735_000_000;

/// A delivered payload of exactly 1 KiB: `{"eventId",…,"data":{…}}` padded with a note.
fn body_1k() -> Vec<u8> {
    let head = format!(
        r#"{{"eventId":"{MSG_ID}","eventType":"order.created","occurredAt":"2024-12-24T00:26:40.000Z","data":{{"orderId":"ord_1842","customer":"cus_77","items":[{{"sku":"A-1","qty":2}},{{"sku":"B-7","qty":1}}],"total":"129.90","currency":"EUR","note":""#
    );
    let tail = r#""}}"#;
    let pad = 1024 - head.len() - tail.len();
    let body = format!("{head}{}{tail}", "x".repeat(pad));
    assert_eq!(body.len(), 1024);
    body.into_bytes()
}

fn signing(c: &mut Criterion) {
    let secret = Secret::generate();
    let key = secret.key().to_vec();
    let body = body_1k();
    let header = sign(&key, MSG_ID, TIMESTAMP, &body);
    // The header a receiver sees during a secret rotation: the old key's entry first.
    let rotated = format!(
        "{} {header}",
        sign(Secret::generate().key(), MSG_ID, TIMESTAMP, &body)
    );
    let timestamp = TIMESTAMP.to_string();

    let mut group = c.benchmark_group("signing_1KiB");
    group
        .throughput(Throughput::Bytes(body.len() as u64))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("sign", |b| {
        b.iter(|| {
            sign(
                black_box(&key),
                black_box(MSG_ID),
                black_box(TIMESTAMP),
                black_box(&body),
            )
        });
    });
    group.bench_function("verify", |b| {
        b.iter(|| {
            verify(
                black_box(&key),
                black_box(MSG_ID),
                black_box(&timestamp),
                black_box(&header),
                black_box(&body),
                TIMESTAMP,
                DEFAULT_TOLERANCE_SECS,
            )
            .expect("valid signature")
        });
    });
    group.bench_function("verify_rotated_header", |b| {
        b.iter(|| {
            verify(
                black_box(&key),
                black_box(MSG_ID),
                black_box(&timestamp),
                black_box(&rotated),
                black_box(&body),
                TIMESTAMP,
                DEFAULT_TOLERANCE_SECS,
            )
            .expect("valid signature")
        });
    });
    group.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
