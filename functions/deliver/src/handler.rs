//! SQS event in, `batchItemFailures` out; the work itself is `aws::process_messages`.

use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use tidings_core::app::App;
use tidings_core::aws::{QueueMessage, process_messages};
use tidings_core::domain::Timestamp;
use tidings_core::ports::{Clock, DeliveryQueue, Store};
use tidings_core::sender::HttpSender;

/// Handles a batch. Never an error: a record that must come back is listed in the response.
/// `deadline`: when the invocation ends; fan-outs start no attempt they could not finish by then.
pub async fn handle<S: Store, Q: DeliveryQueue, C: Clock, H: HttpSender>(
    app: &App<S, Q, C>,
    sender: &H,
    concurrency: usize,
    deadline: Option<Timestamp>,
    event: SqsEvent,
) -> SqsBatchResponse {
    let total = event.records.len();
    let messages = event.records.into_iter().map(queue_message).collect();
    let failed = process_messages(app, sender, messages, concurrency, deadline).await;
    if !failed.is_empty() {
        tracing::warn!(
            failed = failed.len(),
            total,
            "records returned to the queue"
        );
    }
    let mut response = SqsBatchResponse::default();
    response.set_failures(failed);
    response
}

/// Whether the invocation's deadline is within `deliver_timeout` (`TIDINGS_DELIVER_TIMEOUT`, of
/// which the lease is derived); logs an error when it is not: the function's real timeout is
/// longer than the setting, so a slow invocation could outlive its lease.
pub fn check_deadline(deadline: SystemTime, now: SystemTime, deliver_timeout: Duration) -> bool {
    let left = deadline.duration_since(now).unwrap_or_default();
    // A second of slack for the runtime's rounding and the time since the invocation began.
    let fits = left <= deliver_timeout + Duration::from_secs(1);
    if !fits {
        tracing::error!(
            left_ms = left.as_millis() as u64,
            deliver_timeout_ms = deliver_timeout.as_millis() as u64,
            "this invocation may run longer than TIDINGS_DELIVER_TIMEOUT: set it to the function's timeout, or a slow invocation can outlive its lease"
        );
    }
    fits
}

/// The record's id, body and string-valued message attributes. A record without an id (SQS always
/// sends one) gets an empty one: reported as failed, it makes SQS retry the whole batch.
pub fn queue_message(record: SqsMessage) -> QueueMessage {
    QueueMessage {
        message_id: record.message_id.unwrap_or_default(),
        body: record.body.unwrap_or_default(),
        sent_at_ms: record
            .attributes
            .get("SentTimestamp")
            .and_then(|t| t.parse().ok())
            .unwrap_or_default(),
        attributes: record
            .message_attributes
            .into_iter()
            .filter_map(|(name, value)| value.string_value.map(|v| (name, v)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_map_to_queue_messages() {
        let event: SqsEvent = serde_json::from_value(serde_json::json!({
            "Records": [{
                "messageId": "059f36b4-87a3-44ab-83d2-661975830a7d",
                "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a",
                "body": "{\"eventType\":\"order.created\",\"data\":{}}",
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1545082649183"},
                "messageAttributes": {
                    "tenant": {"stringValue": "acme", "stringListValues": [], "binaryListValues": [], "dataType": "String"},
                    "blob": {"binaryValue": "AQID", "stringListValues": [], "binaryListValues": [], "dataType": "Binary"}
                },
                "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:tidings-events",
                "awsRegion": "us-east-1"
            }]
        }))
        .unwrap();
        let m = queue_message(event.records.into_iter().next().unwrap());
        assert_eq!(m.message_id, "059f36b4-87a3-44ab-83d2-661975830a7d");
        assert_eq!(m.body, r#"{"eventType":"order.created","data":{}}"#);
        assert_eq!(m.attributes.len(), 1, "binary attributes are dropped");
        assert_eq!(m.attributes["tenant"], "acme");
        assert_eq!(m.sent_at_ms, 1_545_082_649_183);
    }

    #[test]
    fn a_deadline_beyond_the_configured_timeout_is_flagged() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let timeout = Duration::from_secs(60);
        assert!(check_deadline(now + timeout, now, timeout));
        assert!(check_deadline(now + Duration::from_secs(10), now, timeout));
        assert!(check_deadline(now, now + Duration::from_secs(1), timeout));
        assert!(!check_deadline(now + Duration::from_secs(62), now, timeout));
        assert!(!check_deadline(
            now + Duration::from_secs(900),
            now,
            timeout
        ));
    }

    #[test]
    fn failures_serialize_as_batch_item_failures() {
        let mut response = SqsBatchResponse::default();
        response.set_failures(["m-1", "m-2"]);
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            serde_json::json!({"batchItemFailures": [{"itemIdentifier": "m-1"}, {"itemIdentifier": "m-2"}]})
        );
    }
}
