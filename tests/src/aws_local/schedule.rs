//! An EventBridge schedule rule (`rate(…)`) targeting a function.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::format_description;
use tokio::sync::watch;

use super::runtime::{Function, InvokeError, uuid_v4};

/// The "Scheduled Event" EventBridge sends for a schedule rule.
pub fn scheduled_event(
    rule_arn: &str,
    account_id: &str,
    region: &str,
    now: OffsetDateTime,
) -> Value {
    json!({
        "version": "0",
        "id": uuid_v4(),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": account_id,
        "time": now
            .format(format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z"))
            .unwrap_or_default(),
        "region": region,
        "resources": [rule_arn],
        "detail": {},
    })
}

/// A rule firing every `interval` (the first time one interval after start).
pub struct Schedule {
    pub function: Arc<Function>,
    pub rule_arn: String,
    pub account_id: String,
    pub region: String,
    pub interval: Duration,
}

impl Schedule {
    /// Invokes the function once now and returns its response.
    pub async fn fire(&self) -> Result<axum::body::Bytes, InvokeError> {
        let event = scheduled_event(
            &self.rule_arn,
            &self.account_id,
            &self.region,
            OffsetDateTime::now_utc(),
        );
        self.function
            .invoke(
                event.to_string(),
                self.function.timeout() * 2 + Duration::from_secs(5),
            )
            .await
    }

    /// Fires every interval until `shutdown`. A run still going when the next is due delays it
    /// (no pile-up); the function must cope with overlapping runs in AWS, not here.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let fired = tokio::select! {
                fired = self.fire() => fired,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            if let Err(error) = fired {
                tracing::warn!(function = %self.function.name(), %error, "scheduled invocation failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::eventbridge::EventBridgeEvent;

    #[test]
    fn the_scheduled_event_is_what_eventbridge_sends() {
        let now = OffsetDateTime::from_unix_timestamp(1_764_061_200).unwrap();
        let rule = "arn:aws:events:us-east-1:123456789012:rule/tidings-local-x-sweep";
        let event = scheduled_event(rule, "123456789012", "us-east-1", now);
        assert_eq!(event["detail-type"], "Scheduled Event");
        assert_eq!(event["source"], "aws.events");
        assert_eq!(event["time"], "2025-11-25T09:00:00Z");
        assert_eq!(event["resources"], json!([rule]));
        assert_eq!(event["detail"], json!({}));

        let parsed: EventBridgeEvent = serde_json::from_value(event).unwrap();
        assert_eq!(parsed.detail_type, "Scheduled Event");
        assert_eq!(parsed.account.as_deref(), Some("123456789012"));
        assert_eq!(parsed.time.map(|t| t.timestamp()), Some(1_764_061_200));
    }
}
