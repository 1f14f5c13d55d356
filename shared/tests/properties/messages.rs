//! SQS records: any body and attributes are a message or a clean `MessageError`, decided by the
//! `tidings-kind` attribute; jobs read back as they were written; a producer event is the
//! `POST /events` body for the tenant its attribute names; and an event's id does not change
//! however often its message is received or redriven.

use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::json;
use tidings_core::api::body::parse_publish;
use tidings_core::aws::QueueMessage;
use tidings_core::aws::messages::{
    DELIVERY_JOB_KIND, FAN_OUT_JOB_KIND, IDEMPOTENCY_KEY_ATTRIBUTE, KIND_ATTRIBUTE, Message,
    MessageError, ORIGINAL_MESSAGE_ID_ATTRIBUTE, ORIGINAL_SENT_AT_ATTRIBUTE, TENANT_ATTRIBUTE,
};
use tidings_core::domain::{DeliveryId, EventId, TenantId};
use tidings_core::ports::{DeliveryJob, FanOutJob};

use crate::bodies::json_value;
use crate::{config, text};

fn tenant_text() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-z0-9_-]{1,64}", 1 => text(20), 1 => Just("Acme".to_owned())]
}

fn delivery_job() -> impl Strategy<Value = DeliveryJob> {
    ("[a-z0-9_-]{1,64}", any::<u128>(), any::<u128>()).prop_map(|(tenant, sub, own)| DeliveryJob {
        tenant_id: TenantId::parse(&tenant).unwrap(),
        delivery_id: DeliveryId::parse(&format!(
            "dlv_{}{}",
            ulid::Ulid(sub).to_string().to_ascii_lowercase(),
            ulid::Ulid(own).to_string().to_ascii_lowercase()
        ))
        .unwrap(),
    })
}

fn fan_out_job() -> impl Strategy<Value = FanOutJob> {
    (
        "[a-z0-9_-]{1,64}",
        "[A-Za-z0-9._:-]{1,128}",
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(tenant, event, recovery, untracked)| FanOutJob {
            tenant_id: TenantId::parse(&tenant).unwrap(),
            event_id: EventId::parse(&event).unwrap(),
            recovery,
            untracked,
        })
}

/// Bodies of every kind, valid and not.
fn body() -> impl Strategy<Value = String> {
    prop_oneof![
        delivery_job().prop_map(|j| serde_json::to_string(&j).unwrap()),
        fan_out_job().prop_map(|j| serde_json::to_string(&j).unwrap()),
        (
            "[a-z]{1,5}(\\.[a-z]{1,5}){0,2}",
            json_value(),
            prop::option::of("[a-z0-9-]{1,20}")
        )
            .prop_map(|(t, data, id)| {
                let mut body = json!({"eventType": t, "data": data});
                if let Some(id) = id {
                    body["eventId"] = json!(id);
                }
                body.to_string()
            }),
        Just(r#"{"tenantId":"a","deliveryId":"dlv_nope"}"#.to_owned()),
        Just(r#"{"eventType":"a b","data":1}"#.to_owned()),
        text(100),
    ]
}

fn attributes() -> impl Strategy<Value = HashMap<String, String>> {
    let kind = prop_oneof![
        3 => Just(None),
        2 => Just(Some(DELIVERY_JOB_KIND.to_owned())),
        2 => Just(Some(FAN_OUT_JOB_KIND.to_owned())),
        1 => prop_oneof![Just("Delivery-Job".to_owned()), Just(String::new()), text(12)].prop_map(Some),
    ];
    let sent_at = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        Just(" 1764000000000 ".to_owned()),
        Just("-1".to_owned()),
        text(10),
    ];
    (
        kind,
        prop::option::weighted(0.8, tenant_text()),
        prop::option::weighted(0.3, text(30)),
        prop::option::weighted(0.3, text(30)),
        prop::option::weighted(0.3, sent_at),
        proptest::collection::hash_map(text(10), text(10), 0..3),
    )
        .prop_map(
            |(kind, tenant, key, original_id, original_sent_at, mut other)| {
                for (name, value) in [
                    (KIND_ATTRIBUTE, kind),
                    (TENANT_ATTRIBUTE, tenant),
                    (IDEMPOTENCY_KEY_ATTRIBUTE, key),
                    (ORIGINAL_MESSAGE_ID_ATTRIBUTE, original_id),
                    (ORIGINAL_SENT_AT_ATTRIBUTE, original_sent_at),
                ] {
                    match value {
                        Some(v) => {
                            other.insert(name.to_owned(), v);
                        }
                        None => {
                            other.remove(name);
                        }
                    }
                }
                other
            },
        )
}

fn queue_message() -> impl Strategy<Value = QueueMessage> {
    (text(40), body(), attributes(), any::<u64>(), any::<bool>()).prop_map(
        |(message_id, body, attributes, sent_at_ms, from_jobs_queue)| QueueMessage {
            message_id,
            body,
            attributes,
            sent_at_ms,
            from_jobs_queue,
        },
    )
}

/// The attributes an error may blame.
const BLAMED: &[&str] = &[KIND_ATTRIBUTE, TENANT_ATTRIBUTE, ORIGINAL_SENT_AT_ATTRIBUTE];

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_record_is_a_message_or_a_clean_error(m in queue_message()) {
        let attribute = |name: &str| m.attributes.get(name).map(String::as_str);
        let parsed = Message::parse(&m);
        match attribute(KIND_ATTRIBUTE) {
            // A job kind anywhere but on the deliveries queue (a producer's message) is refused.
            Some(other) if !m.from_jobs_queue => {
                prop_assert!(matches!(&parsed, Err(MessageError::JobOutsideJobsQueue(k)) if k == other), "{:?}", parsed);
            }
            Some(DELIVERY_JOB_KIND) => match (&parsed, serde_json::from_str::<DeliveryJob>(&m.body)) {
                (Ok(Message::Deliver(job)), Ok(expected)) => prop_assert_eq!(job, &expected),
                (Err(MessageError::BadJob(_)), Err(_)) => {}
                (other, _) => prop_assert!(false, "{:?}", other),
            },
            Some(FAN_OUT_JOB_KIND) => match (&parsed, serde_json::from_str::<FanOutJob>(&m.body)) {
                (Ok(Message::FanOut(job)), Ok(expected)) => prop_assert_eq!(job, &expected),
                (Err(MessageError::BadJob(_)), Err(_)) => {}
                (other, _) => prop_assert!(false, "{:?}", other),
            },
            Some(other) => {
                prop_assert!(matches!(&parsed, Err(MessageError::UnknownKind(k)) if k == other), "{:?}", parsed);
            }
            None => match &parsed {
                Ok(Message::Publish { tenant, request, idempotency_key }) => {
                    prop_assert_eq!(Some(tenant.as_str()), attribute(TENANT_ATTRIBUTE));
                    prop_assert_eq!(idempotency_key.as_deref(), attribute(IDEMPOTENCY_KEY_ATTRIBUTE));
                    let body = parse_publish(m.body.as_bytes()).unwrap();
                    prop_assert_eq!(&request.event_type, &body.event_type);
                    prop_assert_eq!(request.data.get(), body.data.get());
                    prop_assert_eq!(request.occurred_at, body.occurred_at);
                    match (&body.event_id, idempotency_key) {
                        (Some(given), _) => prop_assert_eq!(request.event_id.as_ref(), Some(given)),
                        (None, Some(_)) => prop_assert_eq!(request.event_id.as_ref(), None),
                        (None, None) => {
                            let (sent_at, id) = match attribute(ORIGINAL_MESSAGE_ID_ATTRIBUTE) {
                                Some(id) => (attribute(ORIGINAL_SENT_AT_ATTRIBUTE).unwrap().trim().parse().unwrap(), id),
                                None => (m.sent_at_ms, m.message_id.as_str()),
                            };
                            prop_assert_eq!(request.event_id.clone(), Some(EventId::for_message(sent_at, id)));
                        }
                    }
                }
                Ok(other) => prop_assert!(false, "{:?} without a kind", other),
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    // An event body's problem is the API's (the bodies module checks those).
                    if let Some(field) = e.field().filter(|_| !matches!(e, MessageError::BadEvent(_))) {
                        prop_assert!(BLAMED.contains(&field), "{:?} blames {}", e, field);
                    }
                    match e {
                        MessageError::MissingTenant => prop_assert!(attribute(TENANT_ATTRIBUTE).is_none()),
                        MessageError::BadTenant(_) => {
                            prop_assert!(TenantId::parse(attribute(TENANT_ATTRIBUTE).unwrap()).is_err());
                        }
                        MessageError::BadEvent(p) => prop_assert!(parse_publish(m.body.as_bytes()).err() == Some(p.clone())),
                        MessageError::BadOriginal => prop_assert!(attribute(ORIGINAL_MESSAGE_ID_ATTRIBUTE).is_some()),
                        other => prop_assert!(false, "{:?} without a kind", other),
                    }
                }
            },
        }
    }

    #[test]
    fn an_event_keeps_its_id_through_redelivery_and_redrive(
        message_id in text(40),
        other_id in text(40),
        sent_at in any::<u64>(),
        later in any::<u64>(),
        event_type in "[a-z]{1,8}",
        tenant in "[a-z0-9_-]{1,64}",
    ) {
        let first = QueueMessage {
            message_id: message_id.clone(),
            body: json!({"eventType": event_type, "data": {}}).to_string(),
            attributes: HashMap::from([(TENANT_ATTRIBUTE.to_owned(), tenant)]),
            sent_at_ms: sent_at,
            from_jobs_queue: false,
        };
        let event_id = |m: &QueueMessage| match Message::parse(m) {
            Ok(Message::Publish { request, .. }) => request.event_id,
            _ => None,
        };
        let id = event_id(&first).unwrap();
        prop_assert_eq!(EventId::parse(id.as_str()), Ok(id.clone()));
        // SQS's own redelivery: the same message again.
        prop_assert_eq!(event_id(&first.clone()), Some(id.clone()));
        // A redrive out of the DLQ: a new message carrying the first one's id and send time.
        let mut redriven = first.clone();
        redriven.message_id = other_id.clone();
        redriven.sent_at_ms = later;
        redriven.attributes.insert(ORIGINAL_MESSAGE_ID_ATTRIBUTE.to_owned(), message_id.clone());
        redriven.attributes.insert(ORIGINAL_SENT_AT_ATTRIBUTE.to_owned(), sent_at.to_string());
        prop_assert_eq!(event_id(&redriven), Some(id.clone()));
        // Another message is another event.
        if other_id != message_id {
            let mut other = first.clone();
            other.message_id = other_id;
            prop_assert_ne!(event_id(&other), Some(id));
        }
    }
}
