//! SQS or DynamoDB stream event in, `batchItemFailures` out; the work itself is
//! `aws::process_messages` (queue records) or `aws::process_stream_records` (new events).

use std::time::{Duration, SystemTime};

use aws_lambda_events::event::dynamodb::{Event as StreamEvent, EventRecord};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde_json::Value;
use tidings_core::app::App;
use tidings_core::aws::sqs::arn_is_queue_url;
use tidings_core::aws::{NewEventRecord, QueueMessage, process_messages, process_stream_records};
use tidings_core::domain::Timestamp;
use tidings_core::ports::{Clock, DeliveryQueue, Store};
use tidings_core::sender::HttpSender;

/// Where a batch comes from: its records' `eventSource`.
fn is_stream_event(payload: &Value) -> bool {
    payload
        .pointer("/Records/0/eventSource")
        .and_then(Value::as_str)
        == Some("aws:dynamodb")
}

/// Handles a batch from either trigger: the queues (SQS) or the table's stream (DynamoDB).
/// `Err`: the payload is neither (the invocation fails, and the event source retries it).
/// `jobs_queue_url`: the deliveries queue, the only one whose records may be jobs.
pub async fn handle_any<S: Store, Q: DeliveryQueue, C: Clock, H: HttpSender>(
    app: &App<S, Q, C>,
    sender: &H,
    concurrency: usize,
    deadline: Option<Timestamp>,
    jobs_queue_url: &str,
    payload: Value,
) -> Result<Value, serde_json::Error> {
    if is_stream_event(&payload) {
        let event: StreamEvent = serde_json::from_value(payload)?;
        let response = handle_stream(app, sender, concurrency, deadline, event).await;
        serde_json::to_value(response)
    } else {
        let event: SqsEvent = serde_json::from_value(payload)?;
        let response = handle(app, sender, concurrency, deadline, jobs_queue_url, event).await;
        serde_json::to_value(response)
    }
}

/// Handles a batch of new events from the table's stream. Never an error: a record that must
/// come back is named by its sequence number (the mapping retries from the lowest one).
pub async fn handle_stream<S: Store, Q: DeliveryQueue, C: Clock, H: HttpSender>(
    app: &App<S, Q, C>,
    sender: &H,
    concurrency: usize,
    deadline: Option<Timestamp>,
    event: StreamEvent,
) -> DynamoDbEventResponse {
    let total = event.records.len();
    let records = event.records.into_iter().map(new_event_record).collect();
    let failed = process_stream_records(app, sender, records, concurrency, deadline).await;
    if !failed.is_empty() {
        tracing::warn!(
            failed = failed.len(),
            total,
            "stream records returned to the event source mapping"
        );
    }
    let mut response = DynamoDbEventResponse::default();
    response.batch_item_failures = failed
        .into_iter()
        .map(|sequence_number| {
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = Some(sequence_number);
            failure
        })
        .collect();
    response
}

/// A stream record's sequence number and new image. A record without a sequence number (the
/// stream always sends one) gets an empty one: reported as failed, it makes the mapping retry the
/// whole batch.
pub fn new_event_record(record: EventRecord) -> NewEventRecord {
    NewEventRecord {
        sequence_number: record.change.sequence_number.unwrap_or_default(),
        new_image: record.change.new_image,
    }
}

/// Handles a batch. Never an error: a record that must come back is listed in the response.
/// `deadline`: when the invocation ends; fan-outs start no attempt they could not finish by then.
pub async fn handle<S: Store, Q: DeliveryQueue, C: Clock, H: HttpSender>(
    app: &App<S, Q, C>,
    sender: &H,
    concurrency: usize,
    deadline: Option<Timestamp>,
    jobs_queue_url: &str,
    event: SqsEvent,
) -> SqsBatchResponse {
    let total = event.records.len();
    let messages = event
        .records
        .into_iter()
        .map(|record| queue_message(record, jobs_queue_url))
        .collect();
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

/// The record's id, body and string-valued message attributes, and whether it came from the
/// deliveries queue at `jobs_queue_url` (its event source ARN names it). A record without an id
/// (SQS always sends one) gets an empty one: reported as failed, it makes SQS retry the whole
/// batch.
pub fn queue_message(record: SqsMessage, jobs_queue_url: &str) -> QueueMessage {
    let from_jobs_queue = record
        .event_source_arn
        .as_deref()
        .is_some_and(|arn| arn_is_queue_url(arn, jobs_queue_url));
    QueueMessage {
        from_jobs_queue,
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
        let m = queue_message(
            event.records.into_iter().next().unwrap(),
            "https://sqs.us-east-1.amazonaws.com/123456789012/tidings-deliveries",
        );
        assert_eq!(m.message_id, "059f36b4-87a3-44ab-83d2-661975830a7d");
        assert_eq!(m.body, r#"{"eventType":"order.created","data":{}}"#);
        assert_eq!(m.attributes.len(), 1, "binary attributes are dropped");
        assert_eq!(m.attributes["tenant"], "acme");
        assert_eq!(m.sent_at_ms, 1_545_082_649_183);
        assert!(!m.from_jobs_queue, "from the events queue");
        let mut job: SqsMessage = SqsMessage::default();
        job.event_source_arn = Some("arn:aws:sqs:us-east-1:123456789012:tidings-deliveries".into());
        let job = queue_message(
            job,
            "https://sqs.us-east-1.amazonaws.com/123456789012/tidings-deliveries",
        );
        assert!(job.from_jobs_queue);
    }

    #[test]
    fn stream_records_map_to_new_event_records() {
        let payload = serde_json::json!({
            "Records": [{
                "eventID": "c4ca4238a0b923820dcc509a6f75849b",
                "eventName": "INSERT",
                "eventVersion": "1.1",
                "eventSource": "aws:dynamodb",
                "awsRegion": "us-east-1",
                "dynamodb": {
                    "ApproximateCreationDateTime": 1_764_000_000,
                    "Keys": {"pk": {"S": "T#acme#EVT#evt_1"}},
                    "NewImage": {"pk": {"S": "T#acme#EVT#evt_1"}, "fan_out": {"S": "stream"}, "expires_at": {"N": "1766592000"}},
                    "SequenceNumber": "4421584500000000017450439091",
                    "SizeBytes": 26,
                    "StreamViewType": "NEW_IMAGE"
                },
                "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/tidings/stream/2026-11-29T00:00:00.000"
            }]
        });
        assert!(is_stream_event(&payload));
        let event: StreamEvent = serde_json::from_value(payload).unwrap();
        let record = new_event_record(event.records.into_iter().next().unwrap());
        assert_eq!(record.sequence_number, "4421584500000000017450439091");
        assert_eq!(
            serde_json::to_value(&record.new_image).unwrap()["fan_out"],
            serde_json::json!({"S": "stream"})
        );
        let sqs = serde_json::json!({"Records": [{"messageId": "m", "eventSource": "aws:sqs"}]});
        assert!(!is_stream_event(&sqs));
        assert!(!is_stream_event(&serde_json::json!({"Records": []})));
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
