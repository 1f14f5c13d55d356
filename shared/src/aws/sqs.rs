//! [`SqsQueue`]: the [`DeliveryQueue`] over an SQS standard queue (the "deliveries" queue).
//!
//! Each job becomes one message: body `{"tenantId":"…","deliveryId":"…"}` (the [`DeliveryJob`]
//! JSON) with String attribute [`KIND_ATTRIBUTE`] = [`DELIVERY_JOB_KIND`], or
//! `{"tenantId":"…","eventId":"…","recovery":true?}` (the [`FanOutJob`] JSON) with
//! [`FAN_OUT_JOB_KIND`]; and `DelaySeconds` = the
//! job's delay rounded *up* to whole seconds, so a job never arrives before its delivery is due.
//! Jobs go out in `SendMessageBatch` calls of 10 (the SQS limit), several batches at once.

use std::time::Duration;

use aws_sdk_sqs::error::{DisplayErrorContext, SdkError};
use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};

use super::messages::{DELIVERY_JOB_KIND, FAN_OUT_JOB_KIND, KIND_ATTRIBUTE};
use crate::concurrency::join_bounded;
#[cfg(doc)]
use crate::ports::{DeliveryJob, FanOutJob};
use crate::ports::{DeliveryQueue, Job, QueueError};

/// SQS holds a message back for at most 15 minutes (`DelaySeconds` ≤ 900).
pub const SQS_MAX_DELAY: Duration = Duration::from_secs(900);
/// Entries in one `SendMessageBatch` call.
pub const SQS_BATCH_SIZE: usize = 10;
/// `SendMessageBatch` calls in flight at once for one `enqueue`.
const MAX_BATCHES_IN_FLIGHT: usize = 8;

/// Why an `enqueue` did not send every job. Boxed into [`QueueError`].
#[derive(Debug, thiserror::Error)]
pub enum SqsSendError {
    #[error("could not encode the message: {0}")]
    Encode(#[source] aws_sdk_sqs::error::BuildError),
    #[error("SendMessageBatch failed: {}", DisplayErrorContext(.0.as_ref()))]
    Request(#[source] Box<SdkError<SendMessageBatchError>>),
    /// The call went through but SQS refused some entries.
    #[error("SQS refused {failed} of {total} messages (first: {code}: {message})")]
    Rejected {
        failed: usize,
        total: usize,
        code: String,
        message: String,
    },
}

/// Whether the queue ARN `arn` (`arn:aws:sqs:REGION:ACCOUNT:NAME`, as an event source names its
/// queue) is the queue at `url` (`https://…/ACCOUNT/NAME`): same account, same name.
pub fn arn_is_queue_url(arn: &str, url: &str) -> bool {
    let mut from_arn = arn.rsplit(':');
    let mut from_url = url.trim_end_matches('/').rsplit('/');
    let (Some(name), Some(account)) = (from_arn.next(), from_arn.next()) else {
        return false;
    };
    !name.is_empty()
        && from_url.next() == Some(name)
        && from_url.next() == Some(account)
        && arn.starts_with("arn:")
}

/// An SQS standard queue of delivery jobs.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsQueue {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }

    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    async fn send_batch(
        &self,
        entries: Vec<SendMessageBatchRequestEntry>,
    ) -> Result<(), SqsSendError> {
        let total = entries.len();
        let output = self
            .client
            .send_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| SqsSendError::Request(Box::new(e)))?;
        match output.failed().first() {
            None => Ok(()),
            Some(first) => Err(SqsSendError::Rejected {
                failed: output.failed().len(),
                total,
                code: first.code().to_owned(),
                message: first.message().unwrap_or_default().to_owned(),
            }),
        }
    }
}

/// `DelaySeconds` for a delay: rounded up to whole seconds (never early), at most 900.
pub fn delay_seconds(delay: Duration) -> i32 {
    let secs = delay
        .as_secs()
        .saturating_add(u64::from(delay.subsec_nanos() > 0));
    // Clamped to 900 first, so the conversion cannot fail.
    i32::try_from(secs.min(SQS_MAX_DELAY.as_secs())).unwrap_or(i32::MAX)
}

/// Message body and [`KIND_ATTRIBUTE`] of a job: its camelCase JSON, and what it is.
pub fn job_body(job: &Job) -> (String, &'static str) {
    // Structs of strings and a bool: serialization cannot fail.
    match job {
        Job::Deliver(job) => (
            serde_json::to_string(job).unwrap_or_default(),
            DELIVERY_JOB_KIND,
        ),
        Job::FanOut(job) => (
            serde_json::to_string(job).unwrap_or_default(),
            FAN_OUT_JOB_KIND,
        ),
    }
}

/// The `SendMessageBatch` entries for `jobs`, [`SQS_BATCH_SIZE`] per batch, in order.
pub fn batch_entries(
    jobs: &[(Job, Duration)],
) -> Result<Vec<Vec<SendMessageBatchRequestEntry>>, SqsSendError> {
    jobs.chunks(SQS_BATCH_SIZE)
        .map(|chunk| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, (job, delay))| entry(i, job, *delay))
                .collect()
        })
        .collect()
}

fn entry(
    index: usize,
    job: &Job,
    delay: Duration,
) -> Result<SendMessageBatchRequestEntry, SqsSendError> {
    let (body, kind) = job_body(job);
    let kind = MessageAttributeValue::builder()
        .data_type("String")
        .string_value(kind)
        .build()
        .map_err(SqsSendError::Encode)?;
    SendMessageBatchRequestEntry::builder()
        // Unique within its batch is all SQS asks of an entry id.
        .id(index.to_string())
        .message_body(body)
        .delay_seconds(delay_seconds(delay))
        .message_attributes(KIND_ATTRIBUTE, kind)
        .build()
        .map_err(SqsSendError::Encode)
}

impl DeliveryQueue for SqsQueue {
    fn max_delay(&self) -> Duration {
        SQS_MAX_DELAY
    }

    /// Sends every job; an error if any batch call failed or any entry was refused. The jobs that
    /// did go out stay out: the store's due times make the sweep send the rest.
    async fn enqueue(&self, jobs: Vec<(Job, Duration)>) -> Result<(), QueueError> {
        let batches = batch_entries(&jobs).map_err(|e| QueueError(Box::new(e)))?;
        let results = join_bounded(
            batches.into_iter().map(|batch| self.send_batch(batch)),
            MAX_BATCHES_IN_FLIGHT,
        )
        .await;
        let mut errors = results.into_iter().filter_map(Result::err);
        match errors.next() {
            None => Ok(()),
            Some(first) => {
                let more = errors.count();
                if more > 0 {
                    tracing::warn!(
                        failed_batches = more + 1,
                        "several SendMessageBatch calls failed"
                    );
                }
                Err(QueueError(Box::new(first)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DeliveryId, EventId, TenantId};
    use crate::ports::{DeliveryJob, FanOutJob};

    #[test]
    fn a_queue_arn_is_matched_to_its_url_by_account_and_name() {
        let url = "https://sqs.eu-west-1.amazonaws.com/123456789012/tidings-deliveries";
        assert!(arn_is_queue_url(
            "arn:aws:sqs:eu-west-1:123456789012:tidings-deliveries",
            url
        ));
        assert!(arn_is_queue_url(
            "arn:aws:sqs:us-east-1:123456789012:q",
            "http://127.0.0.1:5000/123456789012/q/"
        ));
        for other in [
            "arn:aws:sqs:eu-west-1:123456789012:tidings-events",
            "arn:aws:sqs:eu-west-1:999999999999:tidings-deliveries",
            "tidings-deliveries",
            "",
            "arn:aws:sqs:eu-west-1:123456789012:",
        ] {
            assert!(!arn_is_queue_url(other, url), "{other}");
        }
    }

    #[test]
    fn delays_round_up_to_whole_seconds_and_clamp_at_900() {
        let ms = Duration::from_millis;
        assert_eq!(delay_seconds(Duration::ZERO), 0);
        assert_eq!(delay_seconds(Duration::from_nanos(1)), 1);
        assert_eq!(delay_seconds(ms(999)), 1);
        assert_eq!(delay_seconds(ms(1000)), 1);
        assert_eq!(delay_seconds(ms(1001)), 2);
        assert_eq!(delay_seconds(ms(4_500)), 5);
        assert_eq!(delay_seconds(Duration::from_secs(899)), 899);
        assert_eq!(delay_seconds(ms(899_001)), 900);
        assert_eq!(delay_seconds(Duration::from_secs(900)), 900);
        assert_eq!(delay_seconds(ms(900_001)), 900);
        assert_eq!(delay_seconds(Duration::from_secs(3600)), 900);
        assert_eq!(delay_seconds(Duration::MAX), 900);
    }

    fn delivery_job() -> DeliveryJob {
        DeliveryJob {
            tenant_id: TenantId::parse("acme").unwrap(),
            delivery_id: DeliveryId::generate(),
        }
    }

    fn job() -> Job {
        delivery_job().into()
    }

    #[test]
    fn entries_carry_the_job_json_the_kind_and_the_rounded_delay() {
        let j = delivery_job();
        let e = entry(7, &j.clone().into(), Duration::from_millis(1500)).unwrap();
        assert_eq!(e.id(), "7");
        assert_eq!(e.delay_seconds(), Some(2));
        let body: serde_json::Value = serde_json::from_str(e.message_body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"tenantId": "acme", "deliveryId": j.delivery_id.as_str()})
        );
        let back: DeliveryJob = serde_json::from_str(e.message_body()).unwrap();
        assert_eq!(back, j);
        let kind = &e.message_attributes().unwrap()[KIND_ATTRIBUTE];
        assert_eq!(kind.data_type(), "String");
        assert_eq!(kind.string_value(), Some(DELIVERY_JOB_KIND));
    }

    #[test]
    fn fan_out_entries_carry_their_own_kind() {
        let j = FanOutJob {
            tenant_id: TenantId::parse("acme").unwrap(),
            event_id: EventId::parse("order-1").unwrap(),
            recovery: true,
            untracked: false,
        };
        let e = entry(0, &j.clone().into(), Duration::ZERO).unwrap();
        let body: serde_json::Value = serde_json::from_str(e.message_body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"tenantId": "acme", "eventId": "order-1", "recovery": true})
        );
        let kind = &e.message_attributes().unwrap()[KIND_ATTRIBUTE];
        assert_eq!(kind.string_value(), Some(FAN_OUT_JOB_KIND));
    }

    #[test]
    fn jobs_are_batched_by_ten_in_order_with_unique_entry_ids() {
        let jobs: Vec<_> = (0..23u64)
            .map(|n| (job(), Duration::from_secs(n * 60)))
            .collect();
        let batches = batch_entries(&jobs).unwrap();
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [10, 10, 3]);
        for batch in &batches {
            let ids: std::collections::HashSet<_> = batch.iter().map(|e| e.id()).collect();
            assert_eq!(ids.len(), batch.len(), "entry ids are unique in a batch");
        }
        let sent: Vec<(DeliveryJob, Option<i32>)> = batches
            .iter()
            .flatten()
            .map(|e| {
                (
                    serde_json::from_str(e.message_body()).unwrap(),
                    e.delay_seconds(),
                )
            })
            .collect();
        let expected: Vec<(DeliveryJob, Option<i32>)> = jobs
            .iter()
            .map(|(j, d)| match j {
                Job::Deliver(j) => (j.clone(), Some(delay_seconds(*d))),
                Job::FanOut(_) => unreachable!(),
            })
            .collect();
        assert_eq!(sent, expected, "every job once, in order, with its delay");
        assert_eq!(sent[22].1, Some(900), "22 minutes clamps to 15");
        assert!(batch_entries(&[]).unwrap().is_empty());
    }
}
