//! Property tests of every parser of untrusted input: the domain types, the API bodies, query
//! parameters and path ids, the stores' cursors, signature headers, `Retry-After`, SQS messages
//! and the egress allow-list.
//!
//! What each property promises: no input panics; every refusal is a clean error (for the API, a
//! problem naming the field at fault); every value accepted keeps its type's invariants and reads
//! back equal (`parse(display(x)) == x`, and through the SQLite store).
//!
//! 256 cases per property (fewer for the ones that go through a store); `PROPTEST_CASES=10000`
//! runs a longer search. `cargo test -p tidings-core --all-features --test properties`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed assertion is a failed test

#[cfg(feature = "sqlite")]
mod api;
mod bodies;
mod domain;
mod egress;
#[cfg(feature = "aws")]
mod messages;
mod retry_after;
mod signing;
#[cfg(feature = "sqlite")]
mod store;

use proptest::prelude::*;
use proptest::test_runner::Config;

/// `cases` cases, or `PROPTEST_CASES` when it is set (proptest reads it, but only into its
/// default config). No regression files: a case a property finds becomes a unit test.
pub fn config(cases: u32) -> Config {
    let mut config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

/// Any text, weighted towards the characters parsers care about: ASCII punctuation, dots, stars,
/// whitespace, control characters, non-ASCII letters and emoji.
pub fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter),
        proptest::collection::vec(
            prop::sample::select(vec![
                'a', 'Z', '0', '9', '_', '-', '.', ':', '*', '/', ' ', '\t', '\n', '\0', '%', '#',
                '?', '@', '"', '\\', 'é', 'ß', '日', '😀', '\u{202e}', '\u{feff}',
            ]),
            0..max,
        )
        .prop_map(String::from_iter),
    ]
}
