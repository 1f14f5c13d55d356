//! An SQS event source mapping with `ReportBatchItemFailures`: long-polls a queue, invokes the
//! function with a batch, deletes what succeeded and leaves the rest to come back after the
//! visibility timeout (and to the queue's redrive policy, which moves it to the DLQ after
//! `maxReceiveCount` receives, in the emulator as in AWS).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, watch};

use super::runtime::Function;

/// The `Records` event Lambda builds from received messages.
pub fn sqs_event(messages: &[Message], queue_arn: &str, region: &str) -> Value {
    let records: Vec<Value> = messages
        .iter()
        .map(|m| {
            let attributes: Map<String, Value> = m
                .attributes()
                .into_iter()
                .flatten()
                .map(|(name, value)| (name.as_str().to_owned(), Value::String(value.clone())))
                .collect();
            let message_attributes: Map<String, Value> = m
                .message_attributes()
                .into_iter()
                .flatten()
                .map(|(name, v)| {
                    let mut a = Map::new();
                    if let Some(s) = v.string_value() {
                        a.insert("stringValue".into(), s.into());
                    }
                    if let Some(b) = v.binary_value() {
                        a.insert("binaryValue".into(), BASE64.encode(b.as_ref()).into());
                    }
                    a.insert("stringListValues".into(), json!(v.string_list_values()));
                    a.insert(
                        "binaryListValues".into(),
                        json!(
                            v.binary_list_values()
                                .iter()
                                .map(|b| BASE64.encode(b.as_ref()))
                                .collect::<Vec<_>>()
                        ),
                    );
                    a.insert("dataType".into(), v.data_type().into());
                    (name.clone(), Value::Object(a))
                })
                .collect();
            let mut record = json!({
                "messageId": m.message_id(),
                "receiptHandle": m.receipt_handle(),
                "body": m.body().unwrap_or_default(),
                "attributes": attributes,
                "messageAttributes": message_attributes,
                "md5OfBody": m.md5_of_body(),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": region,
            });
            if let Some(md5) = m.md5_of_message_attributes() {
                record["md5OfMessageAttributes"] = md5.into();
            }
            record
        })
        .collect();
    json!({ "Records": records })
}

/// The message ids a function's response reports as failed, by Lambda's rules for
/// `ReportBatchItemFailures`: `null`, `{}` or an empty or null `batchItemFailures` mean the whole
/// batch succeeded; an unparseable response or an `itemIdentifier` that is missing, empty or not
/// in the batch fails the whole batch (`Err`).
pub fn batch_item_failures(
    response: &[u8],
    batch: &HashSet<String>,
) -> Result<HashSet<String>, String> {
    if response.iter().all(u8::is_ascii_whitespace) {
        return Ok(HashSet::new());
    }
    let value: Value =
        serde_json::from_slice(response).map_err(|e| format!("response is not JSON: {e}"))?;
    let failures = match &value {
        Value::Null => return Ok(HashSet::new()),
        Value::Object(map) => match map.get("batchItemFailures") {
            None | Some(Value::Null) => return Ok(HashSet::new()),
            Some(Value::Array(items)) => items,
            Some(other) => return Err(format!("batchItemFailures is not a list: {other}")),
        },
        other => return Err(format!("response is not an object: {other}")),
    };
    failures
        .iter()
        .map(
            |item| match item.get("itemIdentifier").and_then(Value::as_str) {
                Some(id) if batch.contains(id) => Ok(id.to_owned()),
                Some("") | None => Err(format!("missing itemIdentifier in {item}")),
                Some(id) => Err(format!("itemIdentifier {id:?} is not in the batch")),
            },
        )
        .collect()
}

/// Counters shown by the admin endpoint.
#[derive(Debug, Default)]
pub struct MappingStats {
    pub batches: AtomicU64,
    pub received: AtomicU64,
    pub deleted: AtomicU64,
    /// Records left on the queue: reported failures, or whole batches whose invocation failed.
    pub returned: AtomicU64,
    pub invoke_errors: AtomicU64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MappingSnapshot {
    pub queue_url: String,
    pub queue_arn: String,
    pub function: String,
    pub batches: u64,
    pub received: u64,
    pub deleted: u64,
    pub returned: u64,
    pub invoke_errors: u64,
}

/// One queue → function mapping.
pub struct EventSourceMapping {
    pub client: aws_sdk_sqs::Client,
    pub queue_url: String,
    pub queue_arn: String,
    pub region: String,
    pub batch_size: i32,
    pub function: Arc<Function>,
    /// Shared by every mapping of the function: at most this many batches in flight.
    pub concurrency: Arc<Semaphore>,
    pub stats: Arc<MappingStats>,
}

impl EventSourceMapping {
    pub fn snapshot(&self) -> MappingSnapshot {
        let s = &self.stats;
        MappingSnapshot {
            queue_url: self.queue_url.clone(),
            queue_arn: self.queue_arn.clone(),
            function: self.function.name().to_owned(),
            batches: s.batches.load(Ordering::Relaxed),
            received: s.received.load(Ordering::Relaxed),
            deleted: s.deleted.load(Ordering::Relaxed),
            returned: s.returned.load(Ordering::Relaxed),
            invoke_errors: s.invoke_errors.load(Ordering::Relaxed),
        }
    }

    /// Polls until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut failing = false;
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&self.concurrency).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let received = tokio::select! {
                received = self
                    .client
                    .receive_message()
                    .queue_url(&self.queue_url)
                    .max_number_of_messages(self.batch_size)
                    .wait_time_seconds(1)
                    .message_system_attribute_names(MessageSystemAttributeName::All)
                    .message_attribute_names("All")
                    .send() => received,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let messages = match received {
                Ok(out) => {
                    if failing {
                        tracing::info!(queue = %self.queue_url, "receiving again");
                        failing = false;
                    }
                    out.messages.unwrap_or_default()
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(queue = %self.queue_url, error = %DisplayErrorContext(&error), "ReceiveMessage failed; retrying every second");
                        failing = true;
                    }
                    drop(permit);
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    continue;
                }
            };
            if messages.is_empty() {
                continue;
            }
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                this.process(messages).await;
                drop(permit);
            });
        }
    }

    /// Invokes the function with one batch and deletes the records that succeeded.
    async fn process(&self, messages: Vec<Message>) {
        let count = messages.len() as u64;
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.received.fetch_add(count, Ordering::Relaxed);
        let event = sqs_event(&messages, &self.queue_arn, &self.region);
        let ids: HashSet<String> = messages
            .iter()
            .filter_map(|m| m.message_id().map(str::to_owned))
            .collect();
        // Generous: the batch waits for a free environment, then runs up to the function timeout.
        let give_up_after = self.function.timeout() * 2 + Duration::from_secs(5);
        let failed = match self
            .function
            .invoke(
                serde_json::to_vec(&event).unwrap_or_default(),
                give_up_after,
            )
            .await
        {
            Ok(response) => match batch_item_failures(&response, &ids) {
                Ok(failed) => failed,
                Err(reason) => {
                    tracing::warn!(queue = %self.queue_url, %reason, "invalid batch response: the whole batch returns to the queue");
                    ids.clone()
                }
            },
            Err(error) => {
                tracing::warn!(queue = %self.queue_url, %error, records = count, "invocation failed: the whole batch returns to the queue");
                self.stats.invoke_errors.fetch_add(1, Ordering::Relaxed);
                ids.clone()
            }
        };
        let done: Vec<&Message> = messages
            .iter()
            .filter(|m| m.message_id().is_some_and(|id| !failed.contains(id)))
            .collect();
        self.stats
            .returned
            .fetch_add(count - done.len() as u64, Ordering::Relaxed);
        for chunk in done.chunks(10) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(m.receipt_handle().unwrap_or_default())
                        .build()
                        .ok()
                })
                .collect();
            match self
                .client
                .delete_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(out) => {
                    self.stats
                        .deleted
                        .fetch_add(out.successful().len() as u64, Ordering::Relaxed);
                    for failure in out.failed() {
                        tracing::warn!(queue = %self.queue_url, id = failure.id(), code = failure.code(), message = ?failure.message(), "DeleteMessageBatch entry failed");
                    }
                }
                Err(error) => {
                    tracing::warn!(queue = %self.queue_url, error = %DisplayErrorContext(&error), "DeleteMessageBatch failed: the records will be received again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::sqs::SqsEvent;
    use aws_sdk_sqs::primitives::Blob;
    use aws_sdk_sqs::types::MessageAttributeValue;

    fn message(id: &str, body: &str) -> Message {
        Message::builder()
            .message_id(id)
            .receipt_handle(format!("rh-{id}"))
            .body(body)
            .md5_of_body("0123456789abcdef0123456789abcdef")
            .attributes(MessageSystemAttributeName::ApproximateReceiveCount, "2")
            .attributes(MessageSystemAttributeName::SentTimestamp, "1764061200000")
            .attributes(MessageSystemAttributeName::SenderId, "AIDAEXAMPLE")
            .attributes(
                MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
                "1764061200100",
            )
            .build()
    }

    #[test]
    fn received_messages_become_the_records_event() {
        let mut with_attrs = message("m-2", r#"{"eventType":"order.shipped","data":{}}"#);
        with_attrs.message_attributes = Some(
            [
                (
                    "tenant".to_owned(),
                    MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value("acme")
                        .build()
                        .unwrap(),
                ),
                (
                    "blob".to_owned(),
                    MessageAttributeValue::builder()
                        .data_type("Binary")
                        .binary_value(Blob::new(vec![1, 2, 3]))
                        .build()
                        .unwrap(),
                ),
            ]
            .into(),
        );
        with_attrs.md5_of_message_attributes = Some("fedcba9876543210fedcba9876543210".into());
        let arn = "arn:aws:sqs:us-east-1:123456789012:tidings-local-x-events";
        let event = sqs_event(&[message("m-1", "hello"), with_attrs], arn, "us-east-1");

        let r = &event["Records"][0];
        assert_eq!(r["messageId"], "m-1");
        assert_eq!(r["receiptHandle"], "rh-m-1");
        assert_eq!(r["body"], "hello");
        assert_eq!(r["md5OfBody"], "0123456789abcdef0123456789abcdef");
        assert_eq!(r["eventSource"], "aws:sqs");
        assert_eq!(r["eventSourceARN"], arn);
        assert_eq!(r["awsRegion"], "us-east-1");
        assert_eq!(
            r["attributes"],
            json!({
                "ApproximateReceiveCount": "2",
                "SentTimestamp": "1764061200000",
                "SenderId": "AIDAEXAMPLE",
                "ApproximateFirstReceiveTimestamp": "1764061200100",
            })
        );
        assert_eq!(r["messageAttributes"], json!({}));
        assert!(r.get("md5OfMessageAttributes").is_none());

        let r = &event["Records"][1];
        assert_eq!(
            r["messageAttributes"]["tenant"],
            json!({"stringValue": "acme", "stringListValues": [], "binaryListValues": [], "dataType": "String"})
        );
        assert_eq!(r["messageAttributes"]["blob"]["binaryValue"], "AQID");
        assert_eq!(
            r["md5OfMessageAttributes"],
            "fedcba9876543210fedcba9876543210"
        );

        // What the deliver function deserializes.
        let parsed: SqsEvent = serde_json::from_value(event).unwrap();
        assert_eq!(parsed.records.len(), 2);
        let second = &parsed.records[1];
        assert_eq!(second.message_id.as_deref(), Some("m-2"));
        assert_eq!(second.event_source_arn.as_deref(), Some(arn));
        assert_eq!(
            second.message_attributes["tenant"].string_value.as_deref(),
            Some("acme")
        );
        assert_eq!(second.attributes["ApproximateReceiveCount"], "2");
    }

    fn batch(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn batch_item_failures_follow_lambdas_rules() {
        let b = batch(&["a", "b", "c"]);
        // Whole batch succeeded.
        for ok in [
            &b""[..],
            b"null",
            b"{}",
            br#"{"batchItemFailures":[]}"#,
            br#"{"batchItemFailures":null}"#,
        ] {
            assert_eq!(batch_item_failures(ok, &b), Ok(HashSet::new()), "{ok:?}");
        }
        // Some failed.
        assert_eq!(
            batch_item_failures(
                br#"{"batchItemFailures":[{"itemIdentifier":"a"},{"itemIdentifier":"c"}]}"#,
                &b
            ),
            Ok(batch(&["a", "c"]))
        );
        // Whole batch failed.
        for bad in [
            &b"not json"[..],
            b"[]",
            br#"{"batchItemFailures":[{"itemIdentifier":""}]}"#,
            br#"{"batchItemFailures":[{"itemIdentifier":null}]}"#,
            br#"{"batchItemFailures":[{"id":"a"}]}"#,
            br#"{"batchItemFailures":[{"itemIdentifier":"zzz"}]}"#,
            br#"{"batchItemFailures":"a"}"#,
        ] {
            assert!(batch_item_failures(bad, &b).is_err(), "{bad:?}");
        }
    }
}
