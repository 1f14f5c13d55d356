//! SQS event in, `batchItemFailures` out; the work itself is `aws::process_messages`.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use tidings_core::app::App;
use tidings_core::aws::{QueueMessage, process_messages};
use tidings_core::ports::{Clock, DeliveryQueue, Store};
use tidings_core::sender::HttpSender;

/// Handles a batch. Never an error: a record that must come back is listed in the response.
pub async fn handle<S: Store, Q: DeliveryQueue, C: Clock, H: HttpSender>(
    app: &App<S, Q, C>,
    sender: &H,
    concurrency: usize,
    event: SqsEvent,
) -> SqsBatchResponse {
    let total = event.records.len();
    let messages = event.records.into_iter().map(queue_message).collect();
    let failed = process_messages(app, sender, messages, concurrency).await;
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
    fn failures_serialize_as_batch_item_failures() {
        let mut response = SqsBatchResponse::default();
        response.set_failures(["m-1", "m-2"]);
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            serde_json::json!({"batchItemFailures": [{"itemIdentifier": "m-1"}, {"itemIdentifier": "m-2"}]})
        );
    }
}
