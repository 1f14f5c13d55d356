//! New events from the table's change stream, as a use case: what the `deliver` function does
//! with a batch of DynamoDB stream records (the handler only maps the Lambda event to
//! [`NewEventRecord`]s and the returned sequence numbers to `batchItemFailures`).
//!
//! An event published through the API with `TIDINGS_FAN_OUT=stream` is written with
//! [`FAN_OUT_ATTRIBUTE`](super::dynamo::FAN_OUT_ATTRIBUTE) set, and the stream's event source
//! mapping lets only such new items through. The stream is the durable record of the work: the
//! mapping hands the record over again until it is reported done, then gives it to the on-failure
//! destination (a DLQ) after its last retry. So a record is reported done only once its fan-out
//! finished, or was handed on to the deliveries queue as a recovery job.

use std::collections::BTreeSet;
use std::time::Duration;

use tracing::Instrument as _;

use crate::app::App;
use crate::concurrency::join_bounded;
use crate::domain::{TenantId, Timestamp};
use crate::ports::{Clock, DeliveryQueue, FanOutJob, Store};
use crate::sender::HttpSender;

use super::dynamo::event_from_stream_image;
use super::messages::read_subscriptions;

/// How long after its event was received a stream record is taken to be handed over for the
/// first time (DynamoDB Streams and the mapping take well under a second when they keep up).
const FRESH_RECORD: Duration = Duration::from_secs(5);

/// One stream record, as the event source mapping delivers it.
#[derive(Debug, Clone)]
pub struct NewEventRecord {
    /// The record's `SequenceNumber`: what `batchItemFailures` names.
    pub sequence_number: String,
    /// The item as written (`NEW_IMAGE` view).
    pub new_image: serde_dynamo::Item,
}

/// Fans out the event of every record, at most `concurrency` at a time; returns the sequence
/// numbers of the records that must come back (the mapping retries from the lowest one). A fan-out
/// that fails is handed to the deliveries queue as a recovery job (which leaves the deliveries it
/// made alone) rather than reported, so that the records after it are not handed over again; only
/// when that send fails too does the record come back.
pub async fn process_stream_records<S, Q, C, H>(
    app: &App<S, Q, C>,
    sender: &H,
    records: Vec<NewEventRecord>,
    concurrency: usize,
    deadline: Option<Timestamp>,
) -> Vec<String>
where
    S: Store,
    Q: DeliveryQueue,
    C: Clock,
    H: HttpSender,
{
    let decoded: Vec<_> = records
        .into_iter()
        .map(|r| (event_from_stream_image(r.new_image), r.sequence_number))
        .collect();
    // The tenants' subscriptions, read once for the batch.
    let tenants: BTreeSet<TenantId> = decoded
        .iter()
        .filter_map(|(e, _)| e.as_ref().ok()?.as_ref().map(|e| e.tenant_id.clone()))
        .collect();
    let subscriptions = read_subscriptions(app, tenants).await;
    let subscriptions = &subscriptions;
    let fan_outs = decoded.into_iter().map(|(event, sequence_number)| {
        let span = tracing::info_span!("stream record", sequence = %sequence_number);
        async move {
            let event = match event {
                Ok(Some(event)) => event,
                Ok(None) => {
                    tracing::warn!("stream record of an item that is not an event: skipped (check the event source mapping's filter)");
                    return None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "stream record without a readable event; it comes back, and goes to the on-failure destination after the last retry");
                    return Some(sequence_number);
                }
            };
            // A record handed over again (its batch retried after a failure, or a function
            // error) may find deliveries made by the first try: one that comes well after its
            // event was received is fanned out as a recovery, which looks each delivery up first
            // (a read per subscription; a fresh record, the usual case, needs none).
            let age = event.received_at.until(app.clock.now());
            let job = FanOutJob {
                tenant_id: event.tenant_id.clone(),
                event_id: event.id.clone(),
                recovery: age > FRESH_RECORD,
                untracked: true,
            };
            let subs = subscriptions.get(&event.tenant_id).map(Vec::as_slice);
            let Err(e) = app.fan_out_event(sender, &event, &job, subs, deadline).await else {
                return None;
            };
            let recovery = FanOutJob {
                recovery: true,
                ..job
            };
            match app.queue.enqueue(vec![(recovery.into(), Duration::ZERO)]).await {
                Ok(()) => {
                    tracing::warn!(error = %e, "fan-out failed; handed on to the deliveries queue as a recovery");
                    None
                }
                Err(queue) => {
                    tracing::warn!(error = %e, %queue, "fan-out failed and could not be handed on; the record comes back");
                    Some(sequence_number)
                }
            }
        }
        .instrument(span)
    });
    join_bounded(fan_outs, concurrency)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::app::AppConfig;
    use crate::aws::dynamo::DynamoStore;
    use crate::conformance::{event, subscription, tenant, ts};
    use crate::domain::{DeliveryId, DeliveryStatus};
    use crate::local::LocalQueue;
    use crate::ports::{FakeClock, FanOutDuty, NewEvent};
    use crate::sender::{OutboundRequest, SendOutcome};
    use crate::sqlite::SqliteStore;

    #[derive(Default)]
    struct Answers200(AtomicUsize);

    impl HttpSender for Answers200 {
        async fn send(&self, _request: OutboundRequest) -> SendOutcome {
            self.0.fetch_add(1, Ordering::SeqCst);
            SendOutcome::Response {
                status: 200,
                retry_after: None,
                body_snippet: String::new(),
                latency: Duration::from_millis(1),
            }
        }
    }

    fn image(json: serde_json::Value) -> serde_dynamo::Item {
        serde_json::from_value(json).unwrap()
    }

    #[tokio::test]
    async fn new_events_are_fanned_out_and_a_record_that_cannot_be_read_comes_back() {
        let (queue, _jobs) = LocalQueue::new();
        let app = App::new(
            SqliteStore::open_in_memory().unwrap(),
            queue,
            FakeClock::at(ts(1_000)),
            AppConfig::default(),
        );
        let a = tenant("acme");
        let sub = subscription(&a, ts(0));
        app.store.insert_subscription(&sub).await.unwrap();
        let e = event(&a, ts(1_000), "{}");
        let new = NewEvent {
            event: e.clone(),
            idempotency_key: None,
            fan_out: FanOutDuty::Stream,
        };
        app.store.insert_event(&new).await.unwrap();
        let records = vec![
            NewEventRecord {
                sequence_number: "100".into(),
                new_image: DynamoStore::stream_image_for_tests(&new),
            },
            NewEventRecord {
                sequence_number: "200".into(),
                new_image: image(serde_json::json!({
                    "pk": {"S": "T#acme#EVT#broken"}, "sk": {"S": "-"}, "event": {"S": "not a map"}
                })),
            },
            NewEventRecord {
                sequence_number: "300".into(),
                new_image: image(serde_json::json!({"pk": {"S": "KEY#abc"}, "sk": {"S": "-"}})),
            },
        ];
        let sender = Answers200::default();
        let failed = process_stream_records(&app, &sender, records, 4, None).await;
        assert_eq!(
            failed,
            ["200"],
            "the unreadable record comes back; an item that is not an event is skipped"
        );
        assert_eq!(sender.0.load(Ordering::SeqCst), 1, "one POST for the event");
        let id = DeliveryId::derive(&a, &e.id, &sub.id, e.received_at);
        let made = app.store.get_delivery(&a, &id).await.unwrap().unwrap();
        assert_eq!(made.status(), DeliveryStatus::Succeeded);

        // Handed over again well after its event was received (its batch retried): a recovery,
        // which leaves the delivery made alone.
        app.clock.advance(FRESH_RECORD + Duration::from_secs(1));
        let again = vec![NewEventRecord {
            sequence_number: "100".into(),
            new_image: DynamoStore::stream_image_for_tests(&new),
        }];
        assert!(
            process_stream_records(&app, &sender, again, 4, None)
                .await
                .is_empty()
        );
        assert_eq!(sender.0.load(Ordering::SeqCst), 1, "not sent again");
    }
}
