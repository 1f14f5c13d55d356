//! `SqsQueue` against the AWS emulator (moto server): real SDK client, real SQS wire protocol.
//!
//! Needs `AWS_ENDPOINT_URL` (e.g. `http://127.0.0.1:5555`), `AWS_REGION` and credentials, as
//! `tests/run.sh` exports them. Without a reachable emulator these tests fail; they never skip.
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed assertion is a failed test

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use tidings_core::aws::dynamo::load_sdk_config;
use tidings_core::aws::messages::{DELIVERY_JOB_KIND, KIND_ATTRIBUTE};
use tidings_core::aws::sqs::{SQS_MAX_DELAY, SqsQueue};
use tidings_core::domain::{DeliveryId, TenantId};
use tidings_core::ports::{DeliveryJob, DeliveryQueue};
use tokio::time::Instant;

/// An SQS client for the emulator, or a panic that says what is missing.
async fn emulator() -> aws_sdk_sqs::Client {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    assert!(
        !endpoint.is_empty(),
        "AWS_ENDPOINT_URL is not set. These tests need the AWS emulator: run `tests/run.sh`, or \
         start `moto_server -H 127.0.0.1 -p 5555` and export AWS_ENDPOINT_URL=http://127.0.0.1:5555 \
         AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test"
    );
    let client = aws_sdk_sqs::Client::new(&load_sdk_config().await);
    let probe = tokio::time::timeout(Duration::from_secs(10), client.list_queues().send()).await;
    match probe {
        Ok(Ok(_)) => client,
        Ok(Err(e)) => panic!(
            "the AWS emulator at {endpoint} (AWS_ENDPOINT_URL) did not answer ListQueues: {}",
            aws_sdk_sqs::error::DisplayErrorContext(&e)
        ),
        Err(_) => {
            panic!("the AWS emulator at {endpoint} (AWS_ENDPOINT_URL) did not answer in 10 s")
        }
    }
}

async fn fresh_queue(client: &aws_sdk_sqs::Client) -> String {
    let name = format!(
        "tidings-test-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    client
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .expect("CreateQueue")
        .queue_url()
        .expect("a queue URL")
        .to_owned()
}

fn job() -> DeliveryJob {
    DeliveryJob {
        tenant_id: TenantId::parse("acme").unwrap(),
        delivery_id: DeliveryId::generate(),
    }
}

#[tokio::test]
async fn jobs_arrive_with_their_kind_and_never_before_their_delay() {
    let client = emulator().await;
    let url = fresh_queue(&client).await;
    let queue = SqsQueue::new(client.clone(), url.clone());
    assert_eq!(queue.max_delay(), SQS_MAX_DELAY);

    // 23 jobs: three batches. 8 now, 8 in 1.5 s (sent as 2 s), 6 in 3 s, and one in an hour,
    // which SQS holds for its 15-minute maximum (the sweep covers the rest of such waits).
    let delay_of = |i: usize| match i {
        22 => Duration::from_secs(3600),
        i if i % 3 == 0 => Duration::ZERO,
        i if i % 3 == 1 => Duration::from_millis(1500),
        _ => Duration::from_secs(3),
    };
    let jobs: Vec<(DeliveryJob, Duration)> = (0..23).map(|i| (job(), delay_of(i))).collect();
    let expected: HashMap<DeliveryId, Duration> = jobs
        .iter()
        .map(|(j, d)| (j.delivery_id.clone(), *d))
        .collect();
    let started = Instant::now();
    queue
        .enqueue(jobs.into_iter().map(|(j, d)| (j.into(), d)).collect())
        .await
        .expect("enqueue");

    let mut received: HashMap<DeliveryId, Duration> = HashMap::new();
    let mut order: Vec<Duration> = Vec::new();
    let deadline = started + Duration::from_secs(20);
    while received.len() < 22 && Instant::now() < deadline {
        let out = client
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .expect("ReceiveMessage");
        let at = started.elapsed();
        for m in out.messages() {
            let kind = m
                .message_attributes()
                .and_then(|a| a.get(KIND_ATTRIBUTE))
                .expect("the kind attribute");
            assert_eq!(kind.data_type(), "String");
            assert_eq!(kind.string_value(), Some(DELIVERY_JOB_KIND));
            let body = m.body().expect("a body");
            let got: DeliveryJob = serde_json::from_str(body).expect("a DeliveryJob body");
            let raw: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(
                raw.as_object().map(|o| o.len()),
                Some(2),
                "body is exactly {{tenantId, deliveryId}}: {body}"
            );
            assert_eq!(got.tenant_id.as_str(), "acme");
            let delay = *expected.get(&got.delivery_id).expect("a job that was sent");
            assert!(
                at >= delay,
                "a job delayed {delay:?} arrived after {at:?}: before its delivery was due"
            );
            assert!(
                received.insert(got.delivery_id, at).is_none(),
                "no job arrives twice"
            );
            order.push(delay);
            client
                .delete_message()
                .queue_url(&url)
                .receipt_handle(m.receipt_handle().expect("a receipt handle"))
                .send()
                .await
                .expect("DeleteMessage");
        }
    }
    assert_eq!(
        received.len(),
        22,
        "every job but the hour-long one arrives"
    );
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "jobs arrive in order of their delays");

    let attrs = client
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .expect("GetQueueAttributes");
    let delayed = attrs
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessagesDelayed))
        .map(String::as_str);
    assert_eq!(
        delayed,
        Some("1"),
        "the hour-long job is held at the 15-minute cap"
    );

    client
        .delete_queue()
        .queue_url(&url)
        .send()
        .await
        .expect("DeleteQueue");
}

#[tokio::test]
async fn a_send_that_fails_is_a_queue_error() {
    let client = emulator().await;
    let url = fresh_queue(&client).await;
    client
        .delete_queue()
        .queue_url(&url)
        .send()
        .await
        .expect("DeleteQueue");
    let queue = SqsQueue::new(client, url);
    let err = queue
        .enqueue(vec![(job().into(), Duration::ZERO)])
        .await
        .expect_err("sending to a deleted queue fails");
    assert!(err.to_string().contains("SendMessageBatch"), "{err}");
    // Nothing to send is not an error and makes no call.
    queue.enqueue(Vec::new()).await.expect("an empty enqueue");
}
