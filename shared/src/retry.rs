//! The retry policy as pure code: schedule, status classification, Retry-After, jitter.
//!
//! No clock and no randomness here: callers pass `now` and a random unit value,
//! so every decision is reproducible in tests.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

/// Most entries a schedule may have, so a typo can't schedule thousands of attempts.
pub const MAX_SCHEDULE_ENTRIES: usize = 50;

/// Longest single scheduled delay; past this a retry is unlikely to help anyone.
pub const MAX_SCHEDULED_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Upper bound on a honoured Retry-After, so a receiver can't park a delivery for a year.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Default spread of jitter: ±10% of the delay.
pub const DEFAULT_JITTER_RATIO: f64 = 0.1;

/// Why a retry schedule was rejected. Positions are 1-based, as a person counts entries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("retry schedule is empty")]
    Empty,
    #[error("retry schedule has {count} entries; at most {MAX_SCHEDULE_ENTRIES} are allowed")]
    TooManyEntries { count: usize },
    #[error("retry schedule entry {position} ({entry:?}) is not a duration: {reason}")]
    InvalidEntry {
        position: usize,
        entry: String,
        reason: String,
    },
    #[error("retry schedule entry {position} ({entry:?}) is longer than the 7-day maximum")]
    DelayTooLong { position: usize, entry: String },
}

/// Delays before each attempt; element 0 is the delay before the first attempt (normally 0).
/// Default: 0s, 5s, 5m, 30m, 2h, 5h, 10h, 10h (8 attempts, ~28h).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
}

impl RetrySchedule {
    /// Non-empty, at most [`MAX_SCHEDULE_ENTRIES`] entries, each at most [`MAX_SCHEDULED_DELAY`].
    pub fn new(delays: Vec<Duration>) -> Result<Self, ScheduleError> {
        if delays.is_empty() {
            return Err(ScheduleError::Empty);
        }
        if delays.len() > MAX_SCHEDULE_ENTRIES {
            return Err(ScheduleError::TooManyEntries {
                count: delays.len(),
            });
        }
        if let Some(index) = delays.iter().position(|d| *d > MAX_SCHEDULED_DELAY) {
            return Err(ScheduleError::DelayTooLong {
                position: index + 1,
                entry: humantime::format_duration(delays[index]).to_string(),
            });
        }
        Ok(Self { delays })
    }

    /// Parses comma-separated humantime durations, e.g. "0s,5s,5m,30m" or "0s, 1h30m".
    /// Whitespace around entries is ignored; errors name the offending entry.
    pub fn parse(s: &str) -> Result<Self, ScheduleError> {
        if s.trim().is_empty() {
            return Err(ScheduleError::Empty);
        }
        let entries: Vec<&str> = s.split(',').map(str::trim).collect();
        // Checked before parsing so a huge input fails fast with the useful error.
        if entries.len() > MAX_SCHEDULE_ENTRIES {
            return Err(ScheduleError::TooManyEntries {
                count: entries.len(),
            });
        }
        let delays = entries
            .iter()
            .enumerate()
            .map(|(index, entry)| parse_entry(index + 1, entry))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(delays)
    }

    /// Total attempts this schedule allows, the first one included.
    pub fn max_attempts(&self) -> u32 {
        // Length is capped at MAX_SCHEDULE_ENTRIES, so this never saturates in practice.
        u32::try_from(self.delays.len()).unwrap_or(u32::MAX)
    }

    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }
}

/// Parses one schedule entry, keeping the original text for error messages.
fn parse_entry(position: usize, entry: &str) -> Result<Duration, ScheduleError> {
    if entry.is_empty() {
        return Err(ScheduleError::InvalidEntry {
            position,
            entry: String::new(),
            reason: "empty entry".to_owned(),
        });
    }
    let delay = humantime::parse_duration(entry).map_err(|err| ScheduleError::InvalidEntry {
        position,
        entry: entry.to_owned(),
        reason: err.to_string(),
    })?;
    if delay > MAX_SCHEDULED_DELAY {
        return Err(ScheduleError::DelayTooLong {
            position,
            entry: entry.to_owned(),
        });
    }
    Ok(delay)
}

impl Default for RetrySchedule {
    fn default() -> Self {
        const MINUTE: u64 = 60;
        const HOUR: u64 = 3600;
        Self {
            delays: [
                0,
                5,
                5 * MINUTE,
                30 * MINUTE,
                2 * HOUR,
                5 * HOUR,
                10 * HOUR,
                10 * HOUR,
            ]
            .into_iter()
            .map(Duration::from_secs)
            .collect(),
        }
    }
}

/// Comma-separated humantime durations, e.g. "0s,5s,5m,1h 30m"; round-trips through `parse`.
impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, delay) in self.delays.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", humantime::format_duration(*delay))?;
        }
        Ok(())
    }
}

impl FromStr for RetrySchedule {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What one attempt's result means for the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttemptClass {
    Delivered,
    Retryable,
    Permanent,
}

/// 2xx => Delivered; 408, 429, 500..=599 => Retryable; everything else => Permanent.
///
/// 1xx and 3xx are permanent because redirects are not followed: retrying
/// would get the same redirect. Other 4xx mean the receiver rejected the request itself.
pub fn classify_status(status: u16) -> AttemptClass {
    match status {
        200..=299 => AttemptClass::Delivered,
        408 | 429 | 500..=599 => AttemptClass::Retryable,
        _ => AttemptClass::Permanent,
    }
}

/// Parses a Retry-After header value: delta-seconds ("120") or an HTTP-date, relative to `now`.
///
/// Past dates give `Duration::ZERO`; garbage gives `None`. Delta-seconds too large for a
/// `u64` saturate rather than fail, since they are valid syntax; `next_step` applies
/// [`MAX_RETRY_AFTER`], so no cap is applied here.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    // Only bare digits: u64's parser would also accept a leading '+'.
    if value.bytes().all(|b| b.is_ascii_digit()) {
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What to do after an attempt that did not deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    RetryAfter(Duration),
    GiveUp,
}

/// Decides whether and when to try again.
///
/// `attempts_made` counts attempts already made, including the one just finished (normally >= 1;
/// 0 yields the delay before the first attempt). Anything but `Retryable` gives `GiveUp`,
/// `Delivered` included: callers handle success before asking. Once `attempts_made` reaches
/// `max_attempts`, `GiveUp`. Otherwise the scheduled delay `delays[attempts_made]`, raised to
/// `retry_after` (itself capped at [`MAX_RETRY_AFTER`]) when that is longer. No jitter here.
pub fn next_step(
    schedule: &RetrySchedule,
    attempts_made: u32,
    class: AttemptClass,
    retry_after: Option<Duration>,
) -> NextStep {
    if class != AttemptClass::Retryable {
        return NextStep::GiveUp;
    }
    // `get` covers exhaustion and any attempts_made (even u32::MAX) without arithmetic.
    let scheduled = usize::try_from(attempts_made)
        .ok()
        .and_then(|index| schedule.delays().get(index));
    let Some(&scheduled) = scheduled else {
        return NextStep::GiveUp;
    };
    let requested = retry_after.map_or(Duration::ZERO, |d| d.min(MAX_RETRY_AFTER));
    NextStep::RetryAfter(scheduled.max(requested))
}

/// Scales `delay` by a factor in [1 - ratio, 1 + ratio] chosen by `unit` in [0, 1)
/// (the caller passes a random f64; tests pass fixed values). Zero stays zero.
///
/// The result is never below `floor`, so jitter cannot undercut a Retry-After the
/// receiver asked for. Out-of-range inputs are clamped (`ratio` to [0, 1], `unit` to
/// [0, 1], NaN means no jitter) and overflow saturates at `Duration::MAX`.
pub fn with_jitter(delay: Duration, ratio: f64, unit: f64, floor: Duration) -> Duration {
    let ratio = if ratio.is_nan() {
        0.0
    } else {
        ratio.clamp(0.0, 1.0)
    };
    let unit = if unit.is_nan() {
        0.5
    } else {
        unit.clamp(0.0, 1.0)
    };
    // Written around 1.0 so unit = 0.5 gives exactly 1.0 and the delay comes back unchanged.
    let factor = 1.0 + ratio * (2.0 * unit - 1.0);
    let jittered = if factor == 1.0 {
        delay
    } else {
        // Errors only on overflow, as factor is finite and non-negative.
        Duration::try_from_secs_f64(delay.as_secs_f64() * factor).unwrap_or(Duration::MAX)
    };
    jittered.max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn schedule(text: &str) -> RetrySchedule {
        RetrySchedule::parse(text).unwrap()
    }

    // --- RetrySchedule ---

    #[test]
    fn default_schedule_values() {
        let schedule = RetrySchedule::default();
        assert_eq!(
            schedule.delays(),
            &[
                secs(0),
                secs(5),
                secs(5 * 60),
                secs(30 * 60),
                secs(2 * 3600),
                secs(5 * 3600),
                secs(10 * 3600),
                secs(10 * 3600),
            ]
        );
        assert_eq!(schedule.max_attempts(), 8);
        let total: Duration = schedule.delays().iter().sum();
        assert!(
            total > secs(27 * 3600) && total < secs(28 * 3600),
            "{total:?}"
        );
    }

    #[test]
    fn default_schedule_passes_validation() {
        let defaults = RetrySchedule::default();
        assert_eq!(RetrySchedule::new(defaults.delays().to_vec()), Ok(defaults));
    }

    #[test]
    fn parse_simple_list() {
        assert_eq!(
            schedule("0s,5s,5m").delays(),
            &[secs(0), secs(5), secs(300)]
        );
    }

    #[test]
    fn parse_trims_spaces() {
        assert_eq!(schedule(" 1s , 2s ").delays(), &[secs(1), secs(2)]);
    }

    #[test]
    fn parse_compound_and_spelled_out_durations() {
        assert_eq!(
            schedule("1h30m, 1h 30m, 2 hours, 500ms, 0").delays(),
            &[
                secs(5400),
                secs(5400),
                secs(7200),
                Duration::from_millis(500),
                secs(0)
            ]
        );
    }

    #[test]
    fn parse_accepts_exactly_seven_days_and_fifty_entries() {
        assert_eq!(schedule("7d").delays(), &[MAX_SCHEDULED_DELAY]);
        let fifty = vec!["1s"; MAX_SCHEDULE_ENTRIES].join(",");
        assert_eq!(schedule(&fifty).max_attempts(), 50);
    }

    #[test]
    fn from_str_matches_parse() {
        let parsed: RetrySchedule = "0s,5s".parse().unwrap();
        assert_eq!(parsed, schedule("0s,5s"));
        assert!("nope".parse::<RetrySchedule>().is_err());
    }

    #[test]
    fn parse_rejects_empty() {
        assert_eq!(RetrySchedule::parse(""), Err(ScheduleError::Empty));
        assert_eq!(RetrySchedule::parse("   "), Err(ScheduleError::Empty));
    }

    #[test]
    fn parse_rejects_garbage_naming_the_entry() {
        let err = RetrySchedule::parse("5s,abc").unwrap_err();
        assert!(
            matches!(&err, ScheduleError::InvalidEntry { position: 2, entry, .. } if entry == "abc"),
            "{err:?}"
        );
        assert!(err.to_string().contains("\"abc\""), "{err}");
        assert!(err.to_string().contains("entry 2"), "{err}");
    }

    #[test]
    fn parse_rejects_empty_entry() {
        let err = RetrySchedule::parse("5s,,1s").unwrap_err();
        assert_eq!(
            err,
            ScheduleError::InvalidEntry {
                position: 2,
                entry: String::new(),
                reason: "empty entry".to_owned(),
            }
        );
        assert!(matches!(
            RetrySchedule::parse("5s,"),
            Err(ScheduleError::InvalidEntry { position: 2, .. })
        ));
    }

    #[test]
    fn parse_rejects_negative() {
        let err = RetrySchedule::parse("0s, -5s").unwrap_err();
        assert!(
            matches!(&err, ScheduleError::InvalidEntry { position: 2, entry, .. } if entry == "-5s"),
            "{err:?}"
        );
    }

    #[test]
    fn parse_rejects_over_seven_days_naming_the_entry() {
        let err = RetrySchedule::parse("0s, 8d").unwrap_err();
        assert_eq!(
            err,
            ScheduleError::DelayTooLong {
                position: 2,
                entry: "8d".to_owned()
            }
        );
        assert!(err.to_string().contains("\"8d\""), "{err}");
        assert!(RetrySchedule::parse("7d 1s").is_err());
    }

    #[test]
    fn parse_rejects_too_many_entries() {
        let fifty_one = vec!["1s"; MAX_SCHEDULE_ENTRIES + 1].join(",");
        assert_eq!(
            RetrySchedule::parse(&fifty_one),
            Err(ScheduleError::TooManyEntries { count: 51 })
        );
    }

    #[test]
    fn new_validates() {
        assert_eq!(RetrySchedule::new(vec![]), Err(ScheduleError::Empty));
        assert_eq!(
            RetrySchedule::new(vec![secs(1); 51]),
            Err(ScheduleError::TooManyEntries { count: 51 })
        );
        assert_eq!(
            RetrySchedule::new(vec![secs(0), MAX_SCHEDULED_DELAY + secs(1)]),
            Err(ScheduleError::DelayTooLong {
                position: 2,
                entry: "7days 1s".to_owned()
            })
        );
    }

    #[test]
    fn display_default() {
        assert_eq!(
            RetrySchedule::default().to_string(),
            "0s,5s,5m,30m,2h,5h,10h,10h"
        );
    }

    #[test]
    fn display_round_trips() {
        for text in ["0s,5s,5m", "1h30m,7d", "1s 500ms,0s", "3s"] {
            let original = schedule(text);
            let shown = original.to_string();
            assert_eq!(schedule(&shown), original, "{text} -> {shown}");
        }
        let defaults = RetrySchedule::default();
        assert_eq!(schedule(&defaults.to_string()), defaults);
    }

    // --- classify_status ---

    #[test]
    fn classify_status_table() {
        use AttemptClass::*;
        let table = [
            (100, Permanent),
            (199, Permanent),
            (200, Delivered),
            (204, Delivered),
            (299, Delivered),
            (300, Permanent),
            (301, Permanent),
            (302, Permanent),
            (304, Permanent),
            (400, Permanent),
            (401, Permanent),
            (404, Permanent),
            (408, Retryable),
            (409, Permanent),
            (410, Permanent),
            (429, Retryable),
            (499, Permanent),
            (500, Retryable),
            (503, Retryable),
            (599, Retryable),
            (0, Permanent),
            (600, Permanent),
        ];
        for (status, expected) in table {
            assert_eq!(classify_status(status), expected, "status {status}");
        }
    }

    // --- next_step ---

    #[test]
    fn next_step_follows_schedule_until_exhausted() {
        let schedule = RetrySchedule::default();
        let max = schedule.max_attempts();
        for attempts_made in 1..max {
            assert_eq!(
                next_step(&schedule, attempts_made, AttemptClass::Retryable, None),
                NextStep::RetryAfter(schedule.delays()[attempts_made as usize]),
                "after attempt {attempts_made}"
            );
        }
        assert_eq!(
            next_step(&schedule, max, AttemptClass::Retryable, None),
            NextStep::GiveUp
        );
    }

    #[test]
    fn next_step_specific_defaults() {
        let schedule = RetrySchedule::default();
        let step = |n| next_step(&schedule, n, AttemptClass::Retryable, None);
        assert_eq!(step(1), NextStep::RetryAfter(secs(5)));
        assert_eq!(step(2), NextStep::RetryAfter(secs(300)));
        assert_eq!(step(7), NextStep::RetryAfter(secs(10 * 3600)));
        assert_eq!(step(8), NextStep::GiveUp);
    }

    #[test]
    fn next_step_zero_attempts_gives_first_delay() {
        let schedule = schedule("2s,5s");
        assert_eq!(
            next_step(&schedule, 0, AttemptClass::Retryable, None),
            NextStep::RetryAfter(secs(2))
        );
    }

    #[test]
    fn next_step_single_entry_schedule_never_retries() {
        assert_eq!(
            next_step(&schedule("0s"), 1, AttemptClass::Retryable, None),
            NextStep::GiveUp
        );
    }

    #[test]
    fn next_step_gives_up_on_permanent_and_delivered() {
        let schedule = RetrySchedule::default();
        for class in [AttemptClass::Permanent, AttemptClass::Delivered] {
            assert_eq!(next_step(&schedule, 1, class, None), NextStep::GiveUp);
            assert_eq!(
                next_step(&schedule, 1, class, Some(secs(10))),
                NextStep::GiveUp
            );
        }
    }

    #[test]
    fn next_step_retry_after_larger_than_schedule_wins() {
        let schedule = RetrySchedule::default();
        assert_eq!(
            next_step(&schedule, 1, AttemptClass::Retryable, Some(secs(60))),
            NextStep::RetryAfter(secs(60))
        );
    }

    #[test]
    fn next_step_retry_after_smaller_than_schedule_is_ignored() {
        let schedule = RetrySchedule::default();
        assert_eq!(
            next_step(&schedule, 2, AttemptClass::Retryable, Some(secs(60))),
            NextStep::RetryAfter(secs(300))
        );
        assert_eq!(
            next_step(&schedule, 2, AttemptClass::Retryable, Some(Duration::ZERO)),
            NextStep::RetryAfter(secs(300))
        );
    }

    #[test]
    fn next_step_retry_after_is_capped() {
        let schedule = RetrySchedule::default();
        assert_eq!(
            next_step(
                &schedule,
                1,
                AttemptClass::Retryable,
                Some(secs(365 * 86400))
            ),
            NextStep::RetryAfter(MAX_RETRY_AFTER)
        );
        assert_eq!(
            next_step(&schedule, 1, AttemptClass::Retryable, Some(Duration::MAX)),
            NextStep::RetryAfter(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn next_step_cap_does_not_shorten_a_longer_scheduled_delay() {
        let schedule = schedule("0s,3d");
        assert_eq!(
            next_step(&schedule, 1, AttemptClass::Retryable, Some(Duration::MAX)),
            NextStep::RetryAfter(secs(3 * 86400))
        );
    }

    #[test]
    fn next_step_beyond_max_does_not_panic() {
        let schedule = RetrySchedule::default();
        for attempts_made in [9, 50, 1000, u32::MAX - 1, u32::MAX] {
            assert_eq!(
                next_step(
                    &schedule,
                    attempts_made,
                    AttemptClass::Retryable,
                    Some(secs(1))
                ),
                NextStep::GiveUp,
                "{attempts_made}"
            );
        }
    }

    // --- parse_retry_after ---

    fn now() -> SystemTime {
        // A whole second, as HTTP-dates have no sub-second part.
        SystemTime::UNIX_EPOCH + secs(1_700_000_000)
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(parse_retry_after("120", now()), Some(secs(120)));
        assert_eq!(parse_retry_after(" 7 ", now()), Some(secs(7)));
    }

    #[test]
    fn retry_after_zero() {
        assert_eq!(parse_retry_after("0", now()), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_huge_number_saturates() {
        assert_eq!(
            parse_retry_after("18446744073709551615", now()),
            Some(secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999999", now()),
            Some(secs(u64::MAX))
        );
    }

    #[test]
    fn retry_after_http_date_in_future() {
        let date = httpdate::fmt_http_date(now() + secs(90));
        assert_eq!(parse_retry_after(&date, now()), Some(secs(90)));
    }

    #[test]
    fn retry_after_literal_http_date() {
        // 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT.
        assert_eq!(
            parse_retry_after("Tue, 14 Nov 2023 22:15:20 GMT", now()),
            Some(secs(120))
        );
    }

    #[test]
    fn retry_after_http_date_in_past_is_zero() {
        let date = httpdate::fmt_http_date(now() - secs(90));
        assert_eq!(parse_retry_after(&date, now()), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_garbage_is_none() {
        for garbage in [
            "",
            "   ",
            "soon",
            "-5",
            "+5",
            "1.5",
            "12s",
            "0x10",
            "Tue, 14 Nov 2023",
        ] {
            assert_eq!(parse_retry_after(garbage, now()), None, "{garbage:?}");
        }
    }

    // --- with_jitter ---

    #[test]
    fn jitter_bounds() {
        let delay = secs(100);
        let ratio = DEFAULT_JITTER_RATIO;
        let low = with_jitter(delay, ratio, 0.0, Duration::ZERO);
        let middle = with_jitter(delay, ratio, 0.5, Duration::ZERO);
        let high = with_jitter(delay, ratio, 0.9999, Duration::ZERO);
        assert_eq!(low, secs(90));
        assert_eq!(middle, delay);
        assert!(high > secs(109) && high < secs(110), "{high:?}");
    }

    #[test]
    fn jitter_stays_within_ratio_across_units() {
        let delay = secs(3600);
        for step in 0..100 {
            let unit = f64::from(step) / 100.0;
            let jittered = with_jitter(delay, DEFAULT_JITTER_RATIO, unit, Duration::ZERO);
            assert!(
                jittered >= secs(3240) && jittered <= secs(3960),
                "{unit}: {jittered:?}"
            );
        }
    }

    #[test]
    fn jitter_zero_delay_stays_zero() {
        for unit in [0.0, 0.5, 0.9999] {
            assert_eq!(
                with_jitter(Duration::ZERO, DEFAULT_JITTER_RATIO, unit, Duration::ZERO),
                Duration::ZERO
            );
        }
    }

    #[test]
    fn jitter_never_undercuts_floor() {
        let floor = secs(100);
        assert_eq!(
            with_jitter(secs(100), DEFAULT_JITTER_RATIO, 0.0, floor),
            floor
        );
        assert_eq!(
            with_jitter(Duration::ZERO, DEFAULT_JITTER_RATIO, 0.0, floor),
            floor
        );
        let raised = with_jitter(secs(100), DEFAULT_JITTER_RATIO, 0.9999, floor);
        assert!(raised > floor);
    }

    #[test]
    fn jitter_huge_delay_saturates() {
        assert_eq!(
            with_jitter(Duration::MAX, DEFAULT_JITTER_RATIO, 0.9999, Duration::ZERO),
            Duration::MAX
        );
        assert_eq!(
            with_jitter(Duration::MAX, DEFAULT_JITTER_RATIO, 0.5, Duration::ZERO),
            Duration::MAX
        );
        let lowered = with_jitter(Duration::MAX, DEFAULT_JITTER_RATIO, 0.0, Duration::ZERO);
        assert!(lowered < Duration::MAX);
    }

    #[test]
    fn jitter_out_of_range_inputs_are_clamped() {
        let delay = secs(100);
        assert_eq!(with_jitter(delay, 0.0, 0.0, Duration::ZERO), delay);
        assert_eq!(with_jitter(delay, -1.0, 0.0, Duration::ZERO), delay);
        assert_eq!(with_jitter(delay, f64::NAN, 0.0, Duration::ZERO), delay);
        assert_eq!(with_jitter(delay, 0.1, f64::NAN, Duration::ZERO), delay);
        assert_eq!(with_jitter(delay, 5.0, 0.0, Duration::ZERO), Duration::ZERO);
        assert_eq!(with_jitter(delay, 0.1, -3.0, Duration::ZERO), secs(90));
        assert_eq!(
            with_jitter(delay, 0.1, f64::INFINITY, Duration::ZERO),
            secs(110)
        );
    }
}
