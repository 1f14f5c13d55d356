//! Deliveries as a consumer sees them: exact body, valid signature, retries, dead-lettering.

use std::time::Duration;

use serde_json::{Value, json};
use tidings_core::domain::Secret;
use tidings_tests::{Reply, TestReceiver, TestServer};

const WAIT: Duration = Duration::from_secs(15);

fn verify(
    secret: &str,
    r: &tidings_tests::Received,
) -> Result<(), tidings_core::signing::VerifyError> {
    r.verify(secret)
}

async fn only_delivery(api: &tidings_tests::ApiClient, sub: &Value) -> String {
    let list = api
        .deliveries(sub["subscriptionId"].as_str().unwrap())
        .await;
    assert_eq!(list.len(), 1, "{list:#?}");
    list[0]["deliveryId"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn delivers_exactly_the_published_event_signed() {
    let server = TestServer::start(|_| {}).await;
    let receiver = TestReceiver::start().await;
    let sub = server
        .api
        .subscribe(&receiver.url("/hooks"), &["order.shipped"])
        .await;
    let secret = sub["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"));

    // Sent as raw bytes: key order and inner spacing of `data` must reach the consumer unchanged.
    let body = r#"{"eventType":"order.shipped","occurredAt":"2026-11-25T10:00:00.250+01:00","data":{"orderId":42, "items":["a","b"],"total":9.5}}"#;
    let published = server
        .api
        .send(reqwest::Method::POST, "/events", Some(body.as_bytes()), &[])
        .await;
    assert_eq!(published.status, 202);
    let event_id = published.body["eventId"].as_str().unwrap();
    assert!(event_id.starts_with("evt_"));

    let got = receiver.wait_for("/hooks", 1, WAIT).await;
    let r = &got[0];
    let expected = format!(
        r#"{{"eventId":"{event_id}","eventType":"order.shipped","occurredAt":"2026-11-25T09:00:00.250Z","data":{{"orderId":42, "items":["a","b"],"total":9.5}}}}"#
    );
    assert_eq!(std::str::from_utf8(&r.body).unwrap(), expected);
    assert_eq!(r.header("content-type"), "application/json");
    assert!(
        r.header("user-agent").starts_with("Tidings/"),
        "{}",
        r.header("user-agent")
    );
    assert!(r.header("webhook-id").starts_with("dlv_"));
    verify(secret, r).expect("signature verifies with the subscription's secret");
    let other = Secret::generate();
    assert!(
        verify(other.expose(), r).is_err(),
        "another secret must not verify"
    );

    let delivery_id = only_delivery(&server.api, &sub).await;
    assert_eq!(r.header("webhook-id"), delivery_id);
    let d = server
        .api
        .wait_delivery(&delivery_id, WAIT, |d| d["status"] == "succeeded")
        .await;
    assert_eq!(d["eventId"], event_id);
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(d["attempts"][0]["statusCode"], 200);
    assert_eq!(d["attempts"][0]["outcome"], "delivered");

    let event = server.api.get(&format!("/events/{event_id}")).await;
    assert_eq!(event.status, 200);
    assert_eq!(event.body["data"]["orderId"], 42);
}

#[tokio::test]
async fn wildcards_match_and_others_do_not() {
    let server = TestServer::start(|_| {}).await;
    let receiver = TestReceiver::start().await;
    let orders = server
        .api
        .subscribe(&receiver.url("/orders"), &["order.*"])
        .await;
    let all = server.api.subscribe(&receiver.url("/all"), &["*"]).await;
    let invoices = server
        .api
        .subscribe(&receiver.url("/invoices"), &["invoice.paid"])
        .await;
    let exact = server
        .api
        .subscribe(&receiver.url("/exact"), &["order"])
        .await;

    server
        .api
        .publish("order.item.added", json!({"n": 1}))
        .await;
    receiver.wait_for("/orders", 1, WAIT).await;
    receiver.wait_for("/all", 1, WAIT).await;
    // Deliveries are decided at publish time: no record means nothing will ever be sent.
    for (sub, expected) in [(&orders, 1), (&all, 1), (&invoices, 0), (&exact, 0)] {
        let list = server
            .api
            .deliveries(sub["subscriptionId"].as_str().unwrap())
            .await;
        assert_eq!(list.len(), expected, "{sub}");
    }
    assert!(receiver.received_on("/invoices").is_empty());
    assert!(receiver.received_on("/exact").is_empty());
}

#[tokio::test]
async fn failing_twice_then_succeeding_logs_three_attempts() {
    let server = TestServer::start(|_| {}).await;
    let receiver = TestReceiver::start().await;
    receiver.script([
        Reply::status(500).body("boom"),
        Reply::status(503),
        Reply::status(200).body("thanks"),
    ]);
    let sub = server
        .api
        .subscribe(&receiver.url("/flaky"), &["a.b"])
        .await;
    server.api.publish("a.b", json!({})).await;

    let got = receiver.wait_for("/flaky", 3, WAIT).await;
    let delivery_id = only_delivery(&server.api, &sub).await;
    let d = server
        .api
        .wait_delivery(&delivery_id, WAIT, |d| d["status"] == "succeeded")
        .await;
    let attempts = d["attempts"].as_array().unwrap();
    let codes: Vec<_> = attempts.iter().map(|a| a["statusCode"].clone()).collect();
    assert_eq!(codes, [json!(500), json!(503), json!(200)]);
    let outcomes: Vec<_> = attempts.iter().map(|a| a["outcome"].clone()).collect();
    assert_eq!(
        outcomes,
        [json!("retryable"), json!("retryable"), json!("delivered")]
    );
    assert_eq!(attempts[0]["responseSnippet"], "boom");
    assert_eq!(attempts[2]["responseSnippet"], "thanks");
    // Same webhook-id on every attempt, so consumers can dedupe; each one freshly signed.
    for r in &got {
        assert_eq!(r.header("webhook-id"), delivery_id);
        verify(sub["secret"].as_str().unwrap(), r).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        receiver.received_on("/flaky").len(),
        3,
        "no attempt after success"
    );
}

#[tokio::test]
async fn exhausted_delivery_is_dead_and_an_operator_retry_resends_it() {
    let server = TestServer::start(|_| {}).await;
    let receiver = TestReceiver::start().await;
    receiver.always(Reply::status(500));
    let sub = server.api.subscribe(&receiver.url("/down"), &["a.b"]).await;
    server.api.publish("a.b", json!({"x": 1})).await;

    let delivery_id = only_delivery(&server.api, &sub).await;
    let d = server
        .api
        .wait_delivery(&delivery_id, WAIT, |d| d["status"] == "dead")
        .await;
    assert_eq!(
        d["attempts"].as_array().unwrap().len(),
        3,
        "the schedule has 3 attempts"
    );
    assert!(d.get("nextAttemptAt").is_none());
    assert_eq!(receiver.received_on("/down").len(), 3);

    receiver.always(Reply::status(204));
    let r = server
        .api
        .post(&format!("/deliveries/{delivery_id}/retry"), &Value::Null)
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let d = server
        .api
        .wait_delivery(&delivery_id, WAIT, |d| d["status"] == "succeeded")
        .await;
    assert_eq!(d["attempts"].as_array().unwrap().len(), 4);
    let got = receiver.received_on("/down");
    assert_eq!(got.len(), 4);
    assert_eq!(got[3].header("webhook-id"), delivery_id);

    let again = server
        .api
        .post(&format!("/deliveries/{delivery_id}/retry"), &Value::Null)
        .await;
    assert_eq!(
        again.status, 409,
        "a succeeded delivery is not re-sent: {:?}",
        again.body
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let server = TestServer::start(|c| c.schedule = "0s,100ms,100ms".parse().unwrap()).await;
    let receiver = TestReceiver::start().await;
    receiver.script([Reply::status(429).header("retry-after", "2")]);
    server.api.subscribe(&receiver.url("/slow"), &["a.b"]).await;
    server.api.publish("a.b", json!(null)).await;

    let got = receiver.wait_for("/slow", 2, WAIT).await;
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(1_950),
        "second attempt after {gap:?}, asked for 2s"
    );
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let server = TestServer::start(|_| {}).await;
    let receiver = TestReceiver::start().await;
    receiver.script([Reply::status(302).header("location", receiver.url("/elsewhere"))]);
    let sub = server
        .api
        .subscribe(&receiver.url("/moved"), &["a.b"])
        .await;
    server.api.publish("a.b", json!(1)).await;

    let delivery_id = only_delivery(&server.api, &sub).await;
    let d = server
        .api
        .wait_delivery(&delivery_id, WAIT, |d| d["status"] == "failed")
        .await;
    assert_eq!(d["attempts"][0]["statusCode"], 302);
    assert_eq!(d["attempts"][0]["outcome"], "permanent");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.received_on("/elsewhere").is_empty());
    assert_eq!(receiver.received_on("/moved").len(), 1);
}

#[tokio::test]
async fn gone_disables_the_subscription() {
    let server = TestServer::start(|_| {}).await;
    let receiver = TestReceiver::start().await;
    receiver.always(Reply::status(410));
    let sub = server.api.subscribe(&receiver.url("/gone"), &["a.b"]).await;
    let id = sub["subscriptionId"].as_str().unwrap();
    server.api.publish("a.b", json!(1)).await;
    let delivery_id = only_delivery(&server.api, &sub).await;
    server
        .api
        .wait_delivery(&delivery_id, WAIT, |d| d["status"] == "failed")
        .await;
    let s = server
        .api
        .get(&format!("/webhook-subscriptions/{id}"))
        .await;
    assert_eq!(s.body["status"], "disabled");
    server.api.publish("a.b", json!(2)).await;
    assert_eq!(
        server.api.deliveries(id).await.len(),
        1,
        "no deliveries to a disabled subscription"
    );
}

#[tokio::test]
async fn idempotent_publish_creates_one_event() {
    let server = TestServer::start(|_| {}).await;
    let receiver = TestReceiver::start().await;
    let sub = server.api.subscribe(&receiver.url("/once"), &["a.b"]).await;
    let body = json!({"eventType": "a.b", "data": {"n": 1}}).to_string();
    let headers = [("idempotency-key", "order-42-shipped")];
    let first = server
        .api
        .send(
            reqwest::Method::POST,
            "/events",
            Some(body.as_bytes()),
            &headers,
        )
        .await;
    let second = server
        .api
        .send(
            reqwest::Method::POST,
            "/events",
            Some(body.as_bytes()),
            &headers,
        )
        .await;
    assert_eq!(first.status, 202);
    assert_eq!(second.status, 202);
    assert_eq!(first.body["eventId"], second.body["eventId"]);
    assert_eq!(second.headers["idempotent-replayed"], "true");

    // A producer-supplied eventId works the same way.
    let with_id = json!({"eventType": "a.b", "data": 2, "eventId": "my-event-1"});
    let a = server.api.post("/events", &with_id).await;
    let b = server.api.post("/events", &with_id).await;
    assert_eq!(a.body["eventId"], "my-event-1");
    assert_eq!(b.body["eventId"], "my-event-1");

    receiver.wait_for("/once", 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received_on("/once").len(), 2);
    assert_eq!(
        server
            .api
            .deliveries(sub["subscriptionId"].as_str().unwrap())
            .await
            .len(),
        2
    );
}
