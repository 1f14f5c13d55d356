//! `Retry-After`: delta-seconds or an HTTP-date, from any receiver. Never a panic; garbage is
//! ignored; a date in the past is zero; and whatever it asks for, the wait it leads to is capped
//! at `MAX_RETRY_AFTER` (and jitter may add at most its ratio on top).

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use tidings_core::retry::{
    AttemptClass, DEFAULT_JITTER_RATIO, MAX_RETRY_AFTER, NextStep, RetrySchedule, next_step,
    parse_retry_after, with_jitter,
};

use crate::{config, text};

/// `now`: any second from 1970 to 2100 (HTTP-dates have no fraction), or with a fraction.
fn now() -> impl Strategy<Value = SystemTime> {
    (
        0u64..4_102_444_800,
        prop_oneof![Just(0u32), 0u32..1_000_000_000],
    )
        .prop_map(|(s, n)| SystemTime::UNIX_EPOCH + Duration::new(s, n))
}

/// Header values: numbers of any size, with signs, fractions and spaces; HTTP-dates in the three
/// formats RFC 9110 names, real and broken; and any text.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        "[ \t]{0,2}[+-]?[0-9]{1,40}(\\.[0-9]{1,3})?[ \t]{0,2}",
        (0u64..253_402_300_799)
            .prop_map(|s| httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(s))),
        "(Mon|Tue|Sun), [0-9]{2} (Jan|Nov|Foo) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} (GMT|UTC|)",
        "(Sunday|Monday), [0-9]{2}-(Nov|Jan)-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
        "(Sun|Mon) (Nov|Jan) [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} [0-9]{4}",
        text(40),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_value_is_a_wait_or_ignored_and_the_wait_is_capped(
        value in value(),
        now in now(),
        attempts in 0u32..6,
        unit in 0.0f64..1.0,
    ) {
        let parsed = parse_retry_after(&value, now);
        let trimmed = value.trim();
        if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
            // Delta-seconds, saturating rather than refused when past u64.
            let expected = trimmed.parse::<u128>().map_or(u64::MAX, |n| u64::try_from(n).unwrap_or(u64::MAX));
            prop_assert_eq!(parsed, Some(Duration::from_secs(expected)));
        } else if trimmed.starts_with(['+', '-']) || (trimmed.contains('.') && !trimmed.contains(' ')) {
            prop_assert_eq!(parsed, None, "{:?}", value);
        }
        // Whatever was asked, the schedule's next wait is at most the larger of its own delay
        // and the cap, and jitter adds at most its ratio.
        let schedule = RetrySchedule::default();
        let scheduled = schedule.delays().get(attempts as usize).copied();
        match (next_step(&schedule, attempts, AttemptClass::Retryable, parsed), scheduled) {
            (NextStep::RetryAfter(wait), Some(scheduled)) => {
                prop_assert!(wait >= scheduled);
                prop_assert!(wait <= scheduled.max(MAX_RETRY_AFTER), "{:?} for {:?}", wait, value);
                let floor = parsed.map(|d| d.min(MAX_RETRY_AFTER)).unwrap_or_default();
                let jittered = with_jitter(wait, DEFAULT_JITTER_RATIO, unit, floor);
                prop_assert!(jittered >= floor);
                prop_assert!(jittered <= wait.mul_f64(1.0 + DEFAULT_JITTER_RATIO) + Duration::from_millis(1));
            }
            (NextStep::GiveUp, None) => {}
            (step, scheduled) => prop_assert!(false, "{:?} with {:?} scheduled", step, scheduled),
        }
    }

    #[test]
    fn http_dates_are_the_time_until_them_or_zero(now in now(), offset in -10_000_000i64..10_000_000) {
        // HTTP-dates have whole seconds: the date is `offset` seconds from `now` rounded down.
        let whole = now.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(whole.saturating_add_signed(offset));
        let parsed = parse_retry_after(&httpdate::fmt_http_date(at), now);
        prop_assert_eq!(parsed, Some(at.duration_since(now).unwrap_or(Duration::ZERO)));
    }

    #[test]
    fn delta_seconds_are_exact(n in any::<u64>(), pad in "[ \t]{0,3}", now in now()) {
        prop_assert_eq!(parse_retry_after(&format!("{pad}{n}{pad}"), now), Some(Duration::from_secs(n)));
        prop_assert_eq!(parse_retry_after(&format!("-{n}"), now), None);
        prop_assert_eq!(parse_retry_after(&format!("+{n}"), now), None);
    }
}
