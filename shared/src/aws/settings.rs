//! The Lambda functions' settings, read from the environment once at cold start. Nothing else in
//! the AWS code reads the environment; AWS endpoints, region and credentials come from the SDK's
//! own standard variables (`AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_SQS`, …).

use std::time::Duration;

use crate::app::{AppConfig, FanOutTrigger};
use crate::egress::{EgressPolicy, parse_cidr_list};
use crate::ports::BoxError;
use crate::retry::{self, RetrySchedule};
use crate::sender::SenderConfig;

/// Settings shared by the `api`, `deliver` and `sweep` functions.
///
/// | variable | required | default | meaning |
/// | --- | --- | --- | --- |
/// | `TIDINGS_TABLE` | yes | | DynamoDB table name |
/// | `TIDINGS_DELIVERIES_QUEUE_URL` | yes | | URL of the SQS "deliveries" queue jobs are sent to |
/// | `TIDINGS_RETRY_SCHEDULE` | no | `0s,5s,5m,30m,2h,5h,10h,10h` | delay before each attempt (humantime, comma-separated) |
/// | `TIDINGS_ALLOW_CALLBACK_CIDRS` | no | empty: public addresses only | comma-separated IPs / CIDRs callbacks may reach besides public addresses |
/// | `TIDINGS_REQUEST_TIMEOUT` | no | `15s` | total time for one delivery request (connect: at most 5 s of it) |
/// | `TIDINGS_DELIVER_TIMEOUT` | no | `60s` | the `deliver` function's Lambda timeout (the template sets both from one parameter); a delivery's lease outlives it |
/// | `TIDINGS_SWEEP_GRACE` | no | `60s` | how long a queued delivery may wait before the sweep sends it again |
/// | `TIDINGS_DELIVER_CONCURRENCY` | no | `16` | queue records the `deliver` function handles at once (≥ 1) |
/// | `TIDINGS_RETENTION` | no | `30d` | how long DynamoDB keeps events, deliveries and idempotency keys (TTL) |
/// | `TIDINGS_API_KEY_CACHE` | no | `30s` | how long a function remembers an API key it looked up (`0s`: never); a revoked key works this long in a warm function |
/// | `TIDINGS_FAN_OUT` | no | `queue` | what starts the fan-out of an event published through the API: `stream` (the table's DynamoDB stream triggers `deliver`; the template's choice) or `queue` (a fan-out job on the deliveries queue, the event kept owed in the table until it is done; for a table without a stream) |
///
/// An empty value counts as unset. Values that do not fit together are refused at start
/// ([`ConfigError::Inconsistent`]):
///
/// - one `deliver` invocation must have time for the attempts it may make one after another:
///   a batch of [`MAX_BATCH_RECORDS`] records, `TIDINGS_DELIVER_CONCURRENCY` at a time, each up
///   to `TIDINGS_REQUEST_TIMEOUT` plus [`ATTEMPT_OVERHEAD`] of store calls, within
///   `TIDINGS_DELIVER_TIMEOUT`. The lease is `TIDINGS_DELIVER_TIMEOUT` + [`LEASE_MARGIN`], so no
///   invocation outlives the lease it took (else the sweep could hand the delivery to a second
///   worker, both would send, and the first result would be dropped). A fan-out record may hold
///   many first attempts: it starts none it could not finish before the invocation's end and
///   hands the rest on as a recovery job, so it fits whatever its size;
/// - `TIDINGS_RETENTION` must outlast the whole `TIDINGS_RETRY_SCHEDULE` (its sum, plus the
///   jitter, plus [`RETENTION_MARGIN`]), or a delivery could expire between two retries.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    pub table: String,
    pub deliveries_queue_url: String,
    pub retry_schedule: RetrySchedule,
    pub egress: EgressPolicy,
    pub request_timeout: Duration,
    pub deliver_timeout: Duration,
    pub sweep_grace: Duration,
    pub deliver_concurrency: usize,
    pub retention: Duration,
    pub api_key_cache: Duration,
    pub fan_out: FanOutTrigger,
}

pub const TABLE_VAR: &str = "TIDINGS_TABLE";
pub const DELIVERIES_QUEUE_URL_VAR: &str = "TIDINGS_DELIVERIES_QUEUE_URL";
pub const RETRY_SCHEDULE_VAR: &str = "TIDINGS_RETRY_SCHEDULE";
pub const ALLOW_CALLBACK_CIDRS_VAR: &str = "TIDINGS_ALLOW_CALLBACK_CIDRS";
pub const REQUEST_TIMEOUT_VAR: &str = "TIDINGS_REQUEST_TIMEOUT";
pub const DELIVER_TIMEOUT_VAR: &str = "TIDINGS_DELIVER_TIMEOUT";
pub const SWEEP_GRACE_VAR: &str = "TIDINGS_SWEEP_GRACE";
pub const DELIVER_CONCURRENCY_VAR: &str = "TIDINGS_DELIVER_CONCURRENCY";
pub const RETENTION_VAR: &str = "TIDINGS_RETENTION";
pub const API_KEY_CACHE_VAR: &str = "TIDINGS_API_KEY_CACHE";
pub const FAN_OUT_VAR: &str = "TIDINGS_FAN_OUT";

pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The template's `DeliverTimeout` default.
pub const DEFAULT_DELIVER_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_SWEEP_GRACE: Duration = Duration::from_secs(60);
pub const DEFAULT_DELIVER_CONCURRENCY: usize = 16;
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Saves a read per API request in a warm function (see docs/cost.md).
pub const DEFAULT_API_KEY_CACHE: Duration = Duration::from_secs(30);
/// A worker's lease outlives the `deliver` invocation that took it by this much (clock skew
/// between the function and the sweep).
pub const LEASE_MARGIN: Duration = Duration::from_secs(15);
/// Records one `deliver` invocation gets at most: the template's `BatchSize`, and the most an SQS
/// event source sends without a batching window.
pub const MAX_BATCH_RECORDS: usize = 10;
/// Time allowed for the store calls around one attempt (read, lease, reads, record, enqueue).
pub const ATTEMPT_OVERHEAD: Duration = Duration::from_secs(2);
/// The retention outlasts the retry schedule (with jitter) by at least this: room for a
/// `Retry-After` of up to a day, sweep delays, and a manual look at a dead delivery.
pub const RETENTION_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// A setting that is missing or does not parse; names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is required but not set")]
    Missing { var: &'static str },
    #[error("{var} is invalid: {source}")]
    Invalid {
        var: &'static str,
        #[source]
        source: BoxError,
    },
    /// Each value parses, but together they are unsafe.
    #[error("{} do not fit together: {reason}", .vars.join(", "))]
    Inconsistent {
        vars: &'static [&'static str],
        reason: String,
    },
}

impl ConfigError {
    fn invalid(var: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Invalid {
            var,
            source: source.into(),
        }
    }

    /// The variable at fault (the first one, when several do not fit together).
    pub fn var(&self) -> &'static str {
        self.vars()[0]
    }

    /// Every variable at fault.
    pub fn vars(&self) -> &[&'static str] {
        match self {
            Self::Missing { var } | Self::Invalid { var, .. } => std::slice::from_ref(var),
            Self::Inconsistent { vars, .. } => vars,
        }
    }
}

impl AwsSettings {
    /// Reads the process environment (see the table on [`AwsSettings`]).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Reads settings through `lookup` (a variable's value, `None` when unset).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |var: &'static str| lookup(var).filter(|v| !v.trim().is_empty());
        let required = |var: &'static str| {
            get(var)
                .map(|v| v.trim().to_owned())
                .ok_or(ConfigError::Missing { var })
        };
        let duration = |var: &'static str, default: Duration| -> Result<Duration, ConfigError> {
            let Some(v) = get(var) else {
                return Ok(default);
            };
            let d =
                humantime::parse_duration(v.trim()).map_err(|e| ConfigError::invalid(var, e))?;
            if d.is_zero() {
                return Err(ConfigError::invalid(var, "must be longer than zero"));
            }
            Ok(d)
        };
        let api_key_cache = match get(API_KEY_CACHE_VAR) {
            None => DEFAULT_API_KEY_CACHE,
            Some(v) => humantime::parse_duration(v.trim())
                .map_err(|e| ConfigError::invalid(API_KEY_CACHE_VAR, e))?,
        };
        let retry_schedule = match get(RETRY_SCHEDULE_VAR) {
            None => RetrySchedule::default(),
            Some(v) => {
                RetrySchedule::parse(&v).map_err(|e| ConfigError::invalid(RETRY_SCHEDULE_VAR, e))?
            }
        };
        let egress = match get(ALLOW_CALLBACK_CIDRS_VAR) {
            None => EgressPolicy::strict(),
            Some(v) => EgressPolicy::new(
                parse_cidr_list(&v)
                    .map_err(|e| ConfigError::invalid(ALLOW_CALLBACK_CIDRS_VAR, e))?,
            ),
        };
        let deliver_concurrency = match get(DELIVER_CONCURRENCY_VAR) {
            None => DEFAULT_DELIVER_CONCURRENCY,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=1000).contains(&n) => n,
                Ok(_) => {
                    return Err(ConfigError::invalid(
                        DELIVER_CONCURRENCY_VAR,
                        "must be between 1 and 1000",
                    ));
                }
                Err(e) => return Err(ConfigError::invalid(DELIVER_CONCURRENCY_VAR, e)),
            },
        };
        let fan_out = match get(FAN_OUT_VAR).as_deref().map(str::trim) {
            None | Some("queue") => FanOutTrigger::Queue,
            Some("stream") => FanOutTrigger::StoreStream,
            Some(other) => {
                return Err(ConfigError::invalid(
                    FAN_OUT_VAR,
                    format!("must be `stream` or `queue`, not `{other}`"),
                ));
            }
        };
        let settings = Self {
            table: required(TABLE_VAR)?,
            deliveries_queue_url: required(DELIVERIES_QUEUE_URL_VAR)?,
            retry_schedule,
            egress,
            request_timeout: duration(REQUEST_TIMEOUT_VAR, DEFAULT_REQUEST_TIMEOUT)?,
            deliver_timeout: duration(DELIVER_TIMEOUT_VAR, DEFAULT_DELIVER_TIMEOUT)?,
            sweep_grace: duration(SWEEP_GRACE_VAR, DEFAULT_SWEEP_GRACE)?,
            deliver_concurrency,
            retention: duration(RETENTION_VAR, DEFAULT_RETENTION)?,
            api_key_cache,
            fan_out,
        };
        settings.check_invocation_fits()?;
        settings.check_retention_covers_retries()?;
        Ok(settings)
    }

    /// The attempts one `deliver` invocation may make one after another, and the time they may
    /// take in all (see [`AwsSettings`]).
    pub fn sequential_attempts(&self) -> (usize, Duration) {
        let waves = MAX_BATCH_RECORDS.div_ceil(self.deliver_concurrency.max(1));
        let each = self.request_timeout.saturating_add(ATTEMPT_OVERHEAD);
        (
            waves,
            each.saturating_mul(u32::try_from(waves).unwrap_or(u32::MAX)),
        )
    }

    fn check_invocation_fits(&self) -> Result<(), ConfigError> {
        let (waves, needed) = self.sequential_attempts();
        if needed <= self.deliver_timeout {
            return Ok(());
        }
        Err(ConfigError::Inconsistent {
            vars: &[
                DELIVER_TIMEOUT_VAR,
                REQUEST_TIMEOUT_VAR,
                DELIVER_CONCURRENCY_VAR,
            ],
            reason: format!(
                "a deliver invocation may make {waves} attempt(s) one after another ({MAX_BATCH_RECORDS} records, {} at a time), each up to {} plus {} of store calls: {} in all, more than the function timeout of {}; raise {DELIVER_TIMEOUT_VAR} (with the function's Timeout) or {DELIVER_CONCURRENCY_VAR}, or lower {REQUEST_TIMEOUT_VAR}",
                self.deliver_concurrency,
                humantime::format_duration(self.request_timeout),
                humantime::format_duration(ATTEMPT_OVERHEAD),
                humantime::format_duration(needed),
                humantime::format_duration(self.deliver_timeout),
            ),
        })
    }

    /// The shortest retention that outlasts every retry of the schedule: the sum of its delays,
    /// each stretched by the jitter, plus [`RETENTION_MARGIN`].
    pub fn minimum_retention(&self) -> Duration {
        let span: Duration = self.retry_schedule.delays().iter().sum();
        span.mul_f64(1.0 + retry::DEFAULT_JITTER_RATIO)
            .saturating_add(RETENTION_MARGIN)
    }

    fn check_retention_covers_retries(&self) -> Result<(), ConfigError> {
        let minimum = self.minimum_retention();
        if self.retention >= minimum {
            return Ok(());
        }
        // Whole seconds (rounded up) read better than the float product's nanoseconds.
        let minimum =
            Duration::from_secs(minimum.as_secs() + u64::from(minimum.subsec_nanos() > 0));
        Err(ConfigError::Inconsistent {
            vars: &[RETENTION_VAR, RETRY_SCHEDULE_VAR],
            reason: format!(
                "items are kept {} but the retry schedule spans up to {} with jitter: a delivery could expire between two retries; {RETENTION_VAR} must be at least {} (the span plus {} of margin)",
                humantime::format_duration(self.retention),
                humantime::format_duration(Duration::from_secs(
                    minimum.saturating_sub(RETENTION_MARGIN).as_secs()
                )),
                humantime::format_duration(minimum),
                humantime::format_duration(RETENTION_MARGIN),
            ),
        })
    }

    /// How long a `deliver` worker owns a delivery: longer than the whole invocation that took
    /// it, so a slow invocation never loses its lease to the sweep.
    pub fn lease_duration(&self) -> Duration {
        self.deliver_timeout.saturating_add(LEASE_MARGIN)
    }

    /// The use cases' configuration.
    pub fn app_config(&self) -> AppConfig {
        AppConfig {
            schedule: self.retry_schedule.clone(),
            jitter_ratio: retry::DEFAULT_JITTER_RATIO,
            sweep_grace: self.sweep_grace,
            lease_duration: self.lease_duration(),
            attempt_budget: self.request_timeout.saturating_add(ATTEMPT_OVERHEAD),
            // DynamoDB's TTL takes items `retention` after their creation: a delivery held
            // that long is ended a day before, visibly, instead (retention is at least the retry
            // span plus a day, checked at start).
            hold_limit: Some(
                self.retention
                    .saturating_sub(Duration::from_secs(24 * 3600)),
            ),
            fan_out_trigger: self.fan_out,
            ..AppConfig::default()
        }
    }

    /// The HTTP sender's configuration: the egress policy and the timeouts.
    pub fn sender_config(&self) -> SenderConfig {
        SenderConfig {
            connect_timeout: self.request_timeout.min(Duration::from_secs(5)),
            total_timeout: self.request_timeout,
            policy: self.egress.clone(),
            ..SenderConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::IpAddr;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<AwsSettings, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        AwsSettings::from_lookup(|name| vars.get(name).cloned())
    }

    const REQUIRED: [(&str, &str); 2] = [
        (TABLE_VAR, "tidings"),
        (
            DELIVERIES_QUEUE_URL_VAR,
            "http://127.0.0.1:5555/123/deliveries",
        ),
    ];

    fn with(extra: &[(&'static str, &'static str)]) -> Result<AwsSettings, ConfigError> {
        let mut vars = REQUIRED.to_vec();
        vars.extend_from_slice(extra);
        settings(&vars)
    }

    #[test]
    fn the_fan_out_trigger_is_stream_or_queue_and_queue_by_default() {
        assert_eq!(with(&[]).unwrap().fan_out, FanOutTrigger::Queue);
        let stream = with(&[(FAN_OUT_VAR, " stream ")]).unwrap();
        assert_eq!(stream.fan_out, FanOutTrigger::StoreStream);
        assert_eq!(
            stream.app_config().fan_out_trigger,
            FanOutTrigger::StoreStream
        );
        assert_eq!(
            with(&[(FAN_OUT_VAR, "queue")]).unwrap().fan_out,
            FanOutTrigger::Queue
        );
        let bad = with(&[(FAN_OUT_VAR, "Stream!")]).unwrap_err();
        assert_eq!(bad.var(), FAN_OUT_VAR);
        assert!(bad.to_string().contains("`stream` or `queue`"), "{bad}");
    }

    #[test]
    fn defaults_are_production_safe() {
        let s = with(&[]).unwrap();
        assert_eq!(s.table, "tidings");
        assert_eq!(
            s.deliveries_queue_url,
            "http://127.0.0.1:5555/123/deliveries"
        );
        assert_eq!(s.retry_schedule, RetrySchedule::default());
        assert_eq!(s.egress, EgressPolicy::strict());
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(s.egress.check(loopback).is_err());
        assert_eq!(s.request_timeout, Duration::from_secs(15));
        assert_eq!(s.sweep_grace, Duration::from_secs(60));
        assert_eq!(s.deliver_concurrency, 16);
        assert_eq!(s.retention, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(s.api_key_cache, Duration::from_secs(30));
        let app = s.app_config();
        assert_eq!(app.sweep_grace, Duration::from_secs(60));
        assert_eq!(s.deliver_timeout, Duration::from_secs(60));
        assert_eq!(app.lease_duration, Duration::from_secs(75));
        let sender = s.sender_config();
        assert_eq!(sender.total_timeout, Duration::from_secs(15));
        assert_eq!(sender.connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn values_are_parsed() {
        let s = with(&[
            (RETRY_SCHEDULE_VAR, "0s, 1s, 2m"),
            (ALLOW_CALLBACK_CIDRS_VAR, "127.0.0.0/8, ::1"),
            (REQUEST_TIMEOUT_VAR, "3s"),
            (SWEEP_GRACE_VAR, "2m"),
            (DELIVER_CONCURRENCY_VAR, "4"),
            (RETENTION_VAR, "7d"),
            (API_KEY_CACHE_VAR, "0s"),
        ])
        .unwrap();
        assert_eq!(s.retry_schedule.max_attempts(), 3);
        assert!(s.egress.check("127.0.0.1".parse().unwrap()).is_ok());
        assert_eq!(s.request_timeout, Duration::from_secs(3));
        assert_eq!(s.sender_config().connect_timeout, Duration::from_secs(3));
        assert_eq!(s.sweep_grace, Duration::from_secs(120));
        assert_eq!(s.deliver_concurrency, 4);
        assert_eq!(s.retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(s.api_key_cache, Duration::ZERO, "0s turns the cache off");
    }

    #[test]
    fn empty_values_count_as_unset() {
        let s = with(&[(ALLOW_CALLBACK_CIDRS_VAR, ""), (RETRY_SCHEDULE_VAR, " ")]).unwrap();
        assert_eq!(s.egress, EgressPolicy::strict());
        assert_eq!(s.retry_schedule, RetrySchedule::default());
        let e = settings(&[(TABLE_VAR, ""), REQUIRED[1]]).unwrap_err();
        assert!(matches!(e, ConfigError::Missing { var: TABLE_VAR }));
    }

    #[test]
    fn errors_name_the_variable() {
        let e = settings(&[REQUIRED[0]]).unwrap_err();
        assert_eq!(e.var(), DELIVERIES_QUEUE_URL_VAR);
        assert!(e.to_string().contains(DELIVERIES_QUEUE_URL_VAR), "{e}");
        for (var, value) in [
            (RETRY_SCHEDULE_VAR, "0s,soon"),
            (ALLOW_CALLBACK_CIDRS_VAR, "10.0.0.0/8,intranet"),
            (REQUEST_TIMEOUT_VAR, "fast"),
            (REQUEST_TIMEOUT_VAR, "0s"),
            (SWEEP_GRACE_VAR, "-1s"),
            (DELIVER_CONCURRENCY_VAR, "0"),
            (DELIVER_CONCURRENCY_VAR, "many"),
        ] {
            let e = with(&[(var, value)]).unwrap_err();
            assert_eq!(e.var(), var, "{var}={value}");
            assert!(e.to_string().starts_with(var), "{e}");
        }
    }

    #[test]
    fn the_lease_outlives_the_deliver_invocation() {
        for (timeout, lease) in [("20s", 35), ("60s", 75), ("5m", 315)] {
            let s = with(&[(DELIVER_TIMEOUT_VAR, timeout)]).unwrap();
            assert_eq!(s.lease_duration(), Duration::from_secs(lease), "{timeout}");
            assert_eq!(s.app_config().lease_duration, s.lease_duration());
            assert!(s.app_config().lease_duration > s.deliver_timeout);
            let (_, attempts) = s.sequential_attempts();
            assert!(attempts <= s.deliver_timeout);
        }
        let e = with(&[(DELIVER_TIMEOUT_VAR, "0s")]).unwrap_err();
        assert_eq!(e.var(), DELIVER_TIMEOUT_VAR);
    }

    #[test]
    fn an_invocation_too_short_for_its_attempts_is_refused() {
        // 10 records, 16 at a time: one wave of (15 s + 2 s).
        let s = with(&[(DELIVER_TIMEOUT_VAR, "17s")]).unwrap();
        assert_eq!(s.sequential_attempts(), (1, Duration::from_secs(17)));
        // 5 at a time: two waves, 34 s.
        let s = with(&[(DELIVER_CONCURRENCY_VAR, "5"), (DELIVER_TIMEOUT_VAR, "34s")]).unwrap();
        assert_eq!(s.sequential_attempts(), (2, Duration::from_secs(34)));
        for bad in [
            &[(DELIVER_TIMEOUT_VAR, "16s")][..],
            &[(REQUEST_TIMEOUT_VAR, "59s")][..],
            &[(DELIVER_CONCURRENCY_VAR, "5"), (DELIVER_TIMEOUT_VAR, "33s")][..],
            // One at a time: ten requests of 15 s in a row do not fit the default 60 s.
            &[(DELIVER_CONCURRENCY_VAR, "1")][..],
        ] {
            let e = with(bad).unwrap_err();
            assert!(
                matches!(e, ConfigError::Inconsistent { .. }),
                "{bad:?}: {e}"
            );
            assert_eq!(
                e.vars(),
                [
                    DELIVER_TIMEOUT_VAR,
                    REQUEST_TIMEOUT_VAR,
                    DELIVER_CONCURRENCY_VAR
                ]
            );
            let message = e.to_string();
            for var in e.vars() {
                assert!(message.contains(var), "{message}");
            }
        }
        assert!(
            with(&[
                (DELIVER_CONCURRENCY_VAR, "1"),
                (DELIVER_TIMEOUT_VAR, "170s")
            ])
            .is_ok()
        );
    }

    #[test]
    fn a_retention_shorter_than_the_retry_schedule_is_refused() {
        // The default schedule sums to 27 h 35 m 5 s; with 10 % jitter and a day of margin,
        // 2 days are too few and 3 are enough.
        let s = with(&[(RETENTION_VAR, "3d")]).unwrap();
        let minimum = s.minimum_retention();
        assert!(minimum > Duration::from_secs(54 * 3600), "{minimum:?}");
        assert!(minimum < Duration::from_secs(55 * 3600), "{minimum:?}");
        for (retention, schedule) in [
            ("1d", None),
            ("2d", None),
            ("54h", None),
            ("1d", Some("0s,1s")),
            ("10d", Some("0s,7d,2d")),
        ] {
            let mut vars = vec![(RETENTION_VAR, retention)];
            vars.extend(schedule.map(|v| (RETRY_SCHEDULE_VAR, v)));
            let e = with(&vars).unwrap_err();
            assert!(
                matches!(e, ConfigError::Inconsistent { .. }),
                "{vars:?}: {e}"
            );
            assert_eq!(e.vars(), [RETENTION_VAR, RETRY_SCHEDULE_VAR]);
            let message = e.to_string();
            assert!(message.contains(RETENTION_VAR) && message.contains(RETRY_SCHEDULE_VAR));
        }
        assert!(with(&[(RETENTION_VAR, "55h")]).is_ok());
        assert!(with(&[(RETENTION_VAR, "2d"), (RETRY_SCHEDULE_VAR, "0s,1s,1s")]).is_ok());
        assert!(with(&[(RETENTION_VAR, "11d"), (RETRY_SCHEDULE_VAR, "0s,7d,2d")]).is_ok());
    }

    /// The template passes values that fit together, at its parameters' extremes: the lease and
    /// the deliver timeout come from one parameter, the queues' visibility timeout is at least
    /// six times the longest deliver timeout allowed, and the shortest retention allowed
    /// outlasts the default retry schedule (and no shorter one would).
    #[test]
    fn the_template_is_consistent_with_these_rules() {
        let template = include_str!("../../../infra/template.yaml");
        let lines: Vec<&str> = template.lines().collect();
        // `  Name:` at two spaces' indent, then its `    Key: value` lines.
        let parameter = |name: &str, key: &str| -> String {
            let start = lines
                .iter()
                .position(|l| *l == format!("  {name}:"))
                .unwrap_or_else(|| panic!("parameter {name}"));
            lines[start + 1..]
                .iter()
                .take_while(|l| l.starts_with("    "))
                .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
                .unwrap_or_else(|| panic!("{name}.{key}"))
                .trim_matches('"')
                .to_owned()
        };
        let values = |key: &str| -> Vec<String> {
            lines
                .iter()
                .filter_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
                .map(|v| v.trim_matches('"').to_owned())
                .collect()
        };
        let number = |v: &str| -> u64 { v.parse().unwrap_or_else(|_| panic!("{v:?}")) };

        assert_eq!(values(DELIVER_TIMEOUT_VAR), ["!Sub \"${DeliverTimeout}s"]);
        assert!(
            template.contains("Timeout: !Ref DeliverTimeout"),
            "the deliver function's Timeout is the DeliverTimeout parameter"
        );
        let longest = number(&parameter("DeliverTimeout", "MaxValue"));
        let visibility = values("VisibilityTimeout");
        assert_eq!(visibility.len(), 2, "the events and deliveries queues");
        for v in visibility {
            assert!(
                number(&v) >= 6 * longest,
                "VisibilityTimeout {v} < 6 x {longest}"
            );
        }
        // The queues' batches must fit one invocation's attempts; the stream's (a parameter) need
        // not: a fan-out starts no attempt it could not finish and hands the rest on.
        let batch_sizes = values("BatchSize");
        assert_eq!(batch_sizes.len(), 3, "two queues and the stream");
        for b in batch_sizes.iter().filter(|b| !b.starts_with('!')) {
            assert!(number(b) as usize <= MAX_BATCH_RECORDS, "BatchSize {b}");
        }
        assert!(batch_sizes.contains(&"!Ref StreamBatchSize".to_owned()));
        // The stream starts the fan-out, and its mapping passes exactly the items marked for it.
        assert_eq!(values(FAN_OUT_VAR), ["stream"]);
        let filter = format!(
            r#"'{{"eventName":["INSERT"],"dynamodb":{{"NewImage":{{"{}":{{"S":["{}"]}}}}}}}}'"#,
            crate::aws::dynamo::FAN_OUT_ATTRIBUTE,
            crate::aws::dynamo::FAN_OUT_BY_STREAM
        );
        assert_eq!(values("- Pattern"), [filter]);

        let request = values(REQUEST_TIMEOUT_VAR);
        let concurrency = values(DELIVER_CONCURRENCY_VAR);
        let schedule = parameter("RetrySchedule", "Default");
        let settings_for = |deliver_timeout: String, retention_days: u64| {
            let (deliver_timeout, retention) = (deliver_timeout, format!("{retention_days}d"));
            let vars = [
                (REQUEST_TIMEOUT_VAR, request[0].as_str()),
                (DELIVER_CONCURRENCY_VAR, concurrency[0].as_str()),
                (RETRY_SCHEDULE_VAR, schedule.as_str()),
                (DELIVER_TIMEOUT_VAR, deliver_timeout.as_str()),
                (RETENTION_VAR, retention.as_str()),
            ];
            let mut all = REQUIRED.to_vec();
            all.extend_from_slice(&vars);
            settings(&all)
        };
        let shortest_retention = number(&parameter("RetentionDays", "MinValue"));
        for bound in ["MinValue", "Default", "MaxValue"] {
            let timeout = format!("{}s", parameter("DeliverTimeout", bound));
            settings_for(timeout.clone(), shortest_retention)
                .unwrap_or_else(|e| panic!("DeliverTimeout {bound} {timeout}: {e}"));
        }
        let e = settings_for("60s".into(), shortest_retention - 1).unwrap_err();
        assert_eq!(
            e.var(),
            RETENTION_VAR,
            "RetentionDays' MinValue is the safe one: {e}"
        );
    }
}
