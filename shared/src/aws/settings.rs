//! The Lambda functions' settings, read from the environment once at cold start. Nothing else in
//! the AWS code reads the environment; AWS endpoints, region and credentials come from the SDK's
//! own standard variables (`AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_SQS`, …).

use std::time::Duration;

use crate::app::AppConfig;
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
/// | `TIDINGS_SWEEP_GRACE` | no | `60s` | how long a queued delivery may wait before the sweep sends it again |
/// | `TIDINGS_DELIVER_CONCURRENCY` | no | `16` | queue records the `deliver` function handles at once (≥ 1) |
/// | `TIDINGS_RETENTION` | no | `30d` | how long DynamoDB keeps events, deliveries and idempotency keys (TTL) |
/// | `TIDINGS_API_KEY_CACHE` | no | `30s` | how long a function remembers an API key it looked up (`0s`: never); a revoked key works this long in a warm function |
///
/// An empty value counts as unset.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    pub table: String,
    pub deliveries_queue_url: String,
    pub retry_schedule: RetrySchedule,
    pub egress: EgressPolicy,
    pub request_timeout: Duration,
    pub sweep_grace: Duration,
    pub deliver_concurrency: usize,
    pub retention: Duration,
    pub api_key_cache: Duration,
}

pub const TABLE_VAR: &str = "TIDINGS_TABLE";
pub const DELIVERIES_QUEUE_URL_VAR: &str = "TIDINGS_DELIVERIES_QUEUE_URL";
pub const RETRY_SCHEDULE_VAR: &str = "TIDINGS_RETRY_SCHEDULE";
pub const ALLOW_CALLBACK_CIDRS_VAR: &str = "TIDINGS_ALLOW_CALLBACK_CIDRS";
pub const REQUEST_TIMEOUT_VAR: &str = "TIDINGS_REQUEST_TIMEOUT";
pub const SWEEP_GRACE_VAR: &str = "TIDINGS_SWEEP_GRACE";
pub const DELIVER_CONCURRENCY_VAR: &str = "TIDINGS_DELIVER_CONCURRENCY";
pub const RETENTION_VAR: &str = "TIDINGS_RETENTION";
pub const API_KEY_CACHE_VAR: &str = "TIDINGS_API_KEY_CACHE";

pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_SWEEP_GRACE: Duration = Duration::from_secs(60);
pub const DEFAULT_DELIVER_CONCURRENCY: usize = 16;
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Saves a read per API request in a warm function (see docs/cost.md).
pub const DEFAULT_API_KEY_CACHE: Duration = Duration::from_secs(30);
/// A worker's lease outlives its request by this much.
const LEASE_MARGIN: Duration = Duration::from_secs(15);

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
}

impl ConfigError {
    fn invalid(var: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Invalid {
            var,
            source: source.into(),
        }
    }

    /// The variable at fault.
    pub fn var(&self) -> &'static str {
        match self {
            Self::Missing { var } | Self::Invalid { var, .. } => var,
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
        Ok(Self {
            table: required(TABLE_VAR)?,
            deliveries_queue_url: required(DELIVERIES_QUEUE_URL_VAR)?,
            retry_schedule,
            egress,
            request_timeout: duration(REQUEST_TIMEOUT_VAR, DEFAULT_REQUEST_TIMEOUT)?,
            sweep_grace: duration(SWEEP_GRACE_VAR, DEFAULT_SWEEP_GRACE)?,
            deliver_concurrency,
            retention: duration(RETENTION_VAR, DEFAULT_RETENTION)?,
            api_key_cache,
        })
    }

    /// The use cases' configuration.
    pub fn app_config(&self) -> AppConfig {
        AppConfig {
            schedule: self.retry_schedule.clone(),
            jitter_ratio: retry::DEFAULT_JITTER_RATIO,
            sweep_grace: self.sweep_grace,
            lease_duration: self.request_timeout + LEASE_MARGIN,
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
        assert!(app.lease_duration > s.request_timeout);
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
}
