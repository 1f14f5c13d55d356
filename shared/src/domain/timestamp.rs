//! Instants in UTC, serialized as RFC 3339 with millisecond precision.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TimestampError(String);

/// 0000-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z, in milliseconds: the instants RFC 3339
/// can write in UTC.
const FIRST_MILLIS: i64 = -62_167_219_200_000;
const LAST_MILLIS: i64 = 253_402_300_799_999;

/// Milliseconds since the Unix epoch. Millisecond precision is what every store keeps, so a value
/// reads back exactly as it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_unix_millis(ms: i64) -> Self {
        Self(ms)
    }

    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    pub const fn unix_seconds(self) -> i64 {
        self.0.div_euclid(1000)
    }

    pub fn now() -> Self {
        Self::from_offset(OffsetDateTime::now_utc())
    }

    /// Rounded down to the millisecond, before 1970 too (`/` would round those up).
    fn from_offset(t: OffsetDateTime) -> Self {
        Self(t.unix_timestamp_nanos().div_euclid(1_000_000) as i64)
    }

    /// Accepts any RFC 3339 offset (`+02:00`) and normalizes to UTC. The instant must fall in
    /// the years 0000 to 9999 in UTC (`0000-01-01T00:00:00+01:00` does not): the UTC form is
    /// what is displayed and stored, and RFC 3339 has four digits for the year.
    pub fn parse(s: &str) -> Result<Self, TimestampError> {
        let t = OffsetDateTime::parse(s, &Rfc3339)
            .map(Self::from_offset)
            .map_err(|_| TimestampError(format!("`{s}` is not an RFC 3339 timestamp")))?;
        if !(FIRST_MILLIS..=LAST_MILLIS).contains(&t.0) {
            return Err(TimestampError(format!(
                "`{s}` is outside the years 0000 to 9999 in UTC"
            )));
        }
        Ok(t)
    }

    pub fn saturating_add(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// How long from `self` until `later`; zero when `later` is not later.
    pub fn until(self, later: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(later.0.saturating_sub(self.0)).unwrap_or(0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        // Fixed three fraction digits: equal-length strings sort like the instants they name.
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_normalizes_offsets() {
        let t = Timestamp::parse("2026-11-25T01:02:03.456+02:00").unwrap();
        assert_eq!(t.to_string(), "2026-11-24T23:02:03.456Z");
        assert_eq!(Timestamp::parse(&t.to_string()).unwrap(), t);
        assert_eq!(
            Timestamp::parse("2021-02-26T15:42:10Z")
                .unwrap()
                .unix_seconds(),
            1_614_354_130
        );
    }

    #[test]
    fn only_the_years_0000_to_9999_in_utc() {
        // Found by the property tests: an offset moved these out of range in UTC, where they
        // were stored unreadable (`-001-12-31…`) or as 1970 (year 10000 is past `time`'s range).
        for bad in [
            "0000-01-01T00:00:00+00:01",
            "9999-12-31T23:59:59-00:01",
            "9999-12-31T23:30:00-23:59",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad}");
        }
        let first = Timestamp::parse("0000-01-01T00:00:00Z").unwrap();
        let last = Timestamp::parse("9999-12-31T23:59:59.999999Z").unwrap();
        assert_eq!(first.unix_millis(), FIRST_MILLIS);
        assert_eq!(last.unix_millis(), LAST_MILLIS);
        assert_eq!(first.to_string(), "0000-01-01T00:00:00.000Z");
        assert_eq!(last.to_string(), "9999-12-31T23:59:59.999Z");
        assert_eq!(
            Timestamp::parse("0000-01-01T00:59:00+00:59")
                .unwrap()
                .unix_millis(),
            FIRST_MILLIS
        );
    }

    #[test]
    fn sub_millisecond_digits_round_down_before_1970_too() {
        // Found by the property tests: before 1970 the division rounded towards zero, so this
        // was kept as `…00.001Z`, later than the instant given.
        let t = Timestamp::parse("0000-01-02T00:00:00.0001Z").unwrap();
        assert_eq!(t.to_string(), "0000-01-02T00:00:00.000Z");
        let t = Timestamp::parse("1969-12-31T23:59:59.9999Z").unwrap();
        assert_eq!(t.unix_millis(), -1);
        let t = Timestamp::parse("1970-01-01T00:00:00.0009Z").unwrap();
        assert_eq!(t.unix_millis(), 0);
    }

    #[test]
    fn rejects_non_rfc3339() {
        for bad in [
            "",
            "yesterday",
            "2026-11-25",
            "2026-11-25 01:02:03",
            "1614265330",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_unix_millis(1_000);
        assert_eq!(
            t.saturating_add(Duration::from_millis(500)).unix_millis(),
            1_500
        );
        assert_eq!(
            Timestamp::from_unix_millis(i64::MAX - 1).saturating_add(Duration::MAX),
            Timestamp::from_unix_millis(i64::MAX)
        );
        assert_eq!(
            t.until(Timestamp::from_unix_millis(3_000)),
            Duration::from_secs(2)
        );
        assert_eq!(t.until(Timestamp::from_unix_millis(0)), Duration::ZERO);
    }
}
