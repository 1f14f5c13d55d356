//! Faults of the AWS runtime (issue #9), end to end: the real Lambda binaries under
//! `tidings-aws-local` against moto, delivering to a real receiver on 127.0.0.1. They need the
//! emulator (`tests/run.sh` starts it) and fail loudly without it.

use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use serde_json::{Value, json};
use tidings_core::aws::messages::{
    DELIVERY_JOB_KIND, KIND_ATTRIBUTE, ORIGINAL_MESSAGE_ID_ATTRIBUTE, ORIGINAL_SENT_AT_ATTRIBUTE,
    TENANT_ATTRIBUTE,
};
use tidings_core::domain::EventId;
use tidings_tests::{Reply, TestReceiver, eventually};

use crate::aws::{AwsLocal, attr};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const WAIT: Duration = Duration::from_secs(60);

/// One `tidings-aws-local` (the stand-in of `aws.rs`) with the sweep off (it never runs on its
/// own), so nothing here is the sweep's doing.
async fn stack(retry_schedule: &str) -> AwsLocal {
    AwsLocal::start_with_env(
        &["--sweep-interval", "0s"],
        &[("TIDINGS_RETRY_SCHEDULE", retry_schedule)],
    )
    .await
}

/// Messages in a queue, per SQS's approximate counters: visible, in flight, delayed.
async fn queue_counts(aws: &AwsLocal, url: &str) -> [usize; 3] {
    let attrs = aws
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .unwrap();
    [
        QueueAttributeName::ApproximateNumberOfMessages,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        QueueAttributeName::ApproximateNumberOfMessagesDelayed,
    ]
    .map(|name| {
        attrs
            .attributes()
            .and_then(|a| a.get(&name))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
    })
}

/// Every message in a queue: visible, in flight and delayed.
async fn queue_total(aws: &AwsLocal, url: &str) -> usize {
    queue_counts(aws, url).await.iter().sum()
}

fn timestamp(v: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(v.as_str().expect("a timestamp"), &Rfc3339).expect("RFC 3339")
}

/// A delivery job that arrives before its delivery is due is sent back for the time left and
/// delivered then, not dropped until the sweep finds it (the sweep is off here).
#[tokio::test]
async fn an_early_job_is_delivered_at_its_due_time_without_the_sweep() {
    let aws = stack("0s,8s").await;
    let receiver = TestReceiver::start().await;
    receiver.script([Reply::status(500)]);
    let sub = aws.api.subscribe(&receiver.url("/early"), &["*"]).await;
    aws.api.publish("order.early", json!({})).await;
    receiver.wait_for("/early", 1, WAIT).await;

    // The first attempt failed; the retry is due in about 8 s and its job is on the queue.
    let list = aws
        .api
        .wait_deliveries(sub["subscriptionId"].as_str().unwrap(), 1)
        .await;
    let id = list[0]["deliveryId"].as_str().unwrap().to_owned();
    let retrying = aws
        .api
        .wait_delivery(&id, WAIT, |d| d["status"] == "retrying")
        .await;
    let due = timestamp(&retrying["nextAttemptAt"]);
    let deliveries = aws.url("deliveriesQueueUrl");
    // Only the retry's delayed job: the first job is done (deleted), the retry's is sent.
    eventually("the retry's delayed job alone", WAIT, || async {
        queue_counts(&aws, &deliveries).await == [0, 0, 1]
    })
    .await;
    // That job is lost; in its place one arrives now, seconds early.
    aws.sqs
        .purge_queue()
        .queue_url(&deliveries)
        .send()
        .await
        .unwrap();
    assert_eq!(queue_total(&aws, &deliveries).await, 0);
    let early = json!({"tenantId": "t1", "deliveryId": id}).to_string();
    aws.sqs
        .send_message()
        .queue_url(&deliveries)
        .message_body(early)
        .message_attributes(KIND_ATTRIBUTE, attr(DELIVERY_JOB_KIND))
        .send()
        .await
        .unwrap();
    let (sent_at, sent_wall) = (Instant::now(), OffsetDateTime::now_utc());
    assert!(
        due - sent_wall > time::Duration::seconds(3),
        "the job is early: due {due}, sent {sent_wall}"
    );

    // Delivered at its due time: not before (the job went back with the time left), and within
    // a few seconds after (a whole-second delay, the poll, an invocation), with no sweep.
    let wait = Duration::try_from(due - sent_wall).unwrap() + Duration::from_secs(6);
    let got = receiver.wait_for("/early", 2, wait).await;
    let arrived = sent_wall + (got[1].at - sent_at);
    assert!(
        arrived >= due,
        "attempt 2 arrived at {arrived}, before its due time {due}"
    );
    let done = aws
        .api
        .wait_delivery(&id, WAIT, |d| d["status"] == "succeeded")
        .await;
    assert_eq!(done["attempts"].as_array().unwrap().len(), 2);
}

/// A producer message without eventId that was dead-lettered and is redriven as docs/producers.md
/// shows names the event its first message named, so however many copies the redrive sends, it
/// is published once.
#[tokio::test]
async fn a_redriven_producer_message_publishes_once_under_its_first_id() {
    let aws = stack("0s,1s,1s").await;
    let receiver = TestReceiver::start().await;
    aws.api
        .subscribe(&receiver.url("/redrive"), &["order.*"])
        .await;
    // A message in the events DLQ: a move into the DLQ keeps its id and send time, so one sent
    // there directly stands for it.
    let dlq = aws.url("eventsDlqUrl");
    aws.sqs
        .send_message()
        .queue_url(&dlq)
        .message_body(r#"{"eventType":"order.redriven","data":{"n":1}}"#)
        .message_attributes(TENANT_ATTRIBUTE, attr("t1"))
        .send()
        .await
        .unwrap();
    let received = aws
        .sqs
        .receive_message()
        .queue_url(&dlq)
        .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
        .message_attribute_names("All")
        .send()
        .await
        .unwrap();
    let first = &received.messages()[0];
    let (first_id, first_sent) = (
        first.message_id().unwrap().to_owned(),
        first.attributes().unwrap()[&MessageSystemAttributeName::SentTimestamp].clone(),
    );
    let expected = EventId::for_message(first_sent.parse().unwrap(), &first_id);

    // The redrive sends it back with its first id and send time as attributes; twice, as when
    // the redrive stopped between its send and its delete and was run again.
    let events = aws.url("eventsQueueUrl");
    for _ in 0..2 {
        let mut copy = aws
            .sqs
            .send_message()
            .queue_url(&events)
            .message_body(first.body().unwrap());
        for (name, value) in first.message_attributes().unwrap() {
            copy = copy.message_attributes(name, value.clone());
        }
        copy.message_attributes(ORIGINAL_MESSAGE_ID_ATTRIBUTE, attr(&first_id))
            .message_attributes(ORIGINAL_SENT_AT_ATTRIBUTE, attr(&first_sent))
            .send()
            .await
            .unwrap();
    }
    aws.sqs
        .delete_message()
        .queue_url(&dlq)
        .receipt_handle(first.receipt_handle().unwrap())
        .send()
        .await
        .unwrap();

    let got = receiver.wait_for("/redrive", 1, WAIT).await;
    assert_eq!(got[0].json()["eventId"], expected.as_str());
    // Both copies are handled (the events queue drains), and a second event would have been
    // delivered by then.
    eventually("the events queue to drain", WAIT, || async {
        queue_total(&aws, &events).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        receiver.received_on("/redrive").len(),
        1,
        "one event, one delivery"
    );
    let event = aws.api.get(&format!("/events/{expected}")).await;
    assert_eq!(event.status, 200, "{:?}", event.body);
}
