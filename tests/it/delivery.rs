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
        .wait_deliveries(sub["subscriptionId"].as_str().unwrap(), 1)
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
    // Deliveries are decided by the event's fan-out: no record means nothing will be sent.
    for (sub, expected) in [(&orders, 1), (&all, 1), (&invoices, 0), (&exact, 0)] {
        let list = server
            .api
            .wait_deliveries(sub["subscriptionId"].as_str().unwrap(), expected)
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

    // A succeeded delivery can be resent too, under the same webhook-id.
    let again = server
        .api
        .post(&format!("/deliveries/{delivery_id}/retry"), &Value::Null)
        .await;
    assert_eq!(again.status, 202, "{:?}", again.body);
    let got = receiver.wait_for("/down", 5, WAIT).await;
    assert_eq!(got[4].header("webhook-id"), delivery_id);
    server
        .api
        .wait_delivery(&delivery_id, WAIT, |d| {
            d["status"] == "succeeded" && d["attemptCount"] == 5
        })
        .await;
}

#[tokio::test]
async fn resends_are_refused_while_a_delivery_is_unfinished_and_bounded_in_number() {
    // The first attempt fails and the next waits 30 s: the delivery is unfinished meanwhile.
    let server = TestServer::start(|c| c.schedule = "0s,30s".parse().unwrap()).await;
    let receiver = TestReceiver::start().await;
    receiver.script([Reply::status(503)]);
    let sub = server.api.subscribe(&receiver.url("/r"), &["a.b"]).await;
    server.api.publish("a.b", json!(1)).await;
    let id = only_delivery(&server.api, &sub).await;
    server
        .api
        .wait_delivery(&id, WAIT, |d| d["status"] == "retrying")
        .await;
    let early = server
        .api
        .post(&format!("/deliveries/{id}/retry"), &Value::Null)
        .await;
    assert_eq!(early.status, 409, "retrying: {:?}", early.body);
    assert_eq!(early.body["type"], "urn:tidings:problem:conflict");

    // Made to fail at once (the receiver refuses it with a 400), it can be resent 20 times;
    // 150 tries leave a bounded record.
    receiver.always(Reply::status(400).body("x".repeat(4_000)));
    let server2 = TestServer::start(|_| {}).await;
    let sub = server2.api.subscribe(&receiver.url("/no"), &["c.d"]).await;
    server2.api.publish("c.d", json!(1)).await;
    let id = only_delivery(&server2.api, &sub).await;
    server2
        .api
        .wait_delivery(&id, WAIT, |d| d["status"] == "failed")
        .await;
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..150 {
        let r = server2
            .api
            .post(&format!("/deliveries/{id}/retry"), &Value::Null)
            .await;
        match r.status {
            202 => {
                accepted += 1;
                server2
                    .api
                    .wait_delivery(&id, WAIT, |d| d["status"] == "failed")
                    .await;
            }
            409 => refused += 1,
            other => panic!("resend answered {other}: {:?}", r.body),
        }
    }
    assert_eq!((accepted, refused), (20, 130));
    let d = server2.api.get(&format!("/deliveries/{id}")).await.body;
    assert_eq!(d["attemptCount"], 21);
    assert_eq!(d["resendCount"], 20);
    assert_eq!(
        d["attempts"].as_array().unwrap().len(),
        10,
        "the last 10 kept"
    );
    assert!(
        d.to_string().len() < 16 * 1024,
        "{} bytes",
        d.to_string().len()
    );
}

#[tokio::test]
async fn a_paused_subscription_holds_deliveries_and_gets_them_when_resumed() {
    let server = TestServer::start(|_| {}).await;
    let receiver = TestReceiver::start().await;
    let sub = server.api.subscribe(&receiver.url("/p"), &["a.b"]).await;
    let id = sub["subscriptionId"].as_str().unwrap();
    let patch = |status: &'static str| {
        let api = server.api.clone();
        let path = format!("/webhook-subscriptions/{id}");
        async move {
            let body = json!({ "status": status }).to_string();
            let r = api
                .send(reqwest::Method::PATCH, &path, Some(body.as_bytes()), &[])
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
    };
    patch("paused").await;
    server.api.publish("a.b", json!({"n": 1})).await;
    server.api.publish("a.b", json!({"n": 2})).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        receiver.received_on("/p").is_empty(),
        "nothing sent while paused"
    );
    let held = server.api.wait_deliveries(id, 2).await;
    assert_eq!(held.len(), 2);
    for d in &held {
        assert_eq!(d["status"], "held", "{d:#}");
        assert_eq!(d["reason"], "subscription is paused");
    }

    patch("active").await;
    let got = receiver.wait_for("/p", 2, WAIT).await;
    let mut ns: Vec<_> = got.iter().map(|r| r.json()["data"]["n"].clone()).collect();
    ns.sort_by_key(|n| n.as_i64());
    assert_eq!(ns, [json!(1), json!(2)]);
    server.api.wait_all_succeeded(id, 2, WAIT).await;
}

#[tokio::test]
async fn a_reused_idempotency_key_with_another_body_is_refused_and_the_first_stays() {
    let server = TestServer::start(|_| {}).await;
    let publish = |data: i64| {
        let api = server.api.clone();
        async move {
            let body = json!({"eventType": "a.b", "data": data}).to_string();
            api.send(
                reqwest::Method::POST,
                "/events",
                Some(body.as_bytes()),
                &[("idempotency-key", "k-1")],
            )
            .await
        }
    };
    let first = publish(1).await;
    assert_eq!(first.status, 202);
    let same = publish(1).await;
    assert_eq!(
        (same.status, &same.body["eventId"]),
        (202, &first.body["eventId"])
    );
    let other = publish(2).await;
    assert_eq!(other.status, 422, "{:?}", other.body);
    assert_eq!(other.headers["content-type"], "application/problem+json");
    assert_eq!(
        other.body["type"],
        "urn:tidings:problem:idempotency-key-reused"
    );
    let event = server
        .api
        .get(&format!(
            "/events/{}",
            first.body["eventId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(event.body["data"], 1);
}

#[tokio::test]
async fn the_schedules_first_entry_delays_the_first_attempt() {
    let server = TestServer::start(|c| c.schedule = "1s,200ms".parse().unwrap()).await;
    let receiver = TestReceiver::start().await;
    server
        .api
        .subscribe(&receiver.url("/later"), &["a.b"])
        .await;
    let published = std::time::Instant::now();
    server.api.publish("a.b", json!(1)).await;
    receiver.wait_for("/later", 1, WAIT).await;
    let waited = published.elapsed();
    assert!(
        waited >= Duration::from_millis(950),
        "first attempt after {waited:?}"
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
    // A second subscription that takes the same event: once its delivery is listed, the
    // event's fan-out is done, and it made none for the disabled one.
    let witness = server.api.subscribe(&receiver.url("/w"), &["a.b"]).await;
    server.api.publish("a.b", json!(2)).await;
    server
        .api
        .wait_deliveries(witness["subscriptionId"].as_str().unwrap(), 1)
        .await;
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
            .wait_deliveries(sub["subscriptionId"].as_str().unwrap(), 2)
            .await
            .len(),
        2
    );
}

#[tokio::test]
async fn a_batch_publish_accepts_each_good_event_and_answers_each_bad_one_on_its_own() {
    let server = TestServer::start(|_| {}).await;
    let receiver = TestReceiver::start().await;
    let sub = server
        .api
        .subscribe(&receiver.url("/batch"), &["a.*"])
        .await;
    let id = sub["subscriptionId"].as_str().unwrap();
    let first = server
        .api
        .send(
            reqwest::Method::POST,
            "/events",
            Some(br#"{"eventType":"a.b","data":0}"#),
            &[("idempotency-key", "seen-before")],
        )
        .await;
    assert_eq!(first.status, 202);

    let body = json!({"events": [
        {"eventType": "a.b", "data": {"n": 1}},
        {"eventType": "a b", "data": 2},
        {"eventType": "a.c", "data": {"n": 3}, "eventId": "batch-3"},
        {"eventType": "a.b", "data": 0, "idempotencyKey": "seen-before"},
        {"eventType": "a.b", "data": 9, "idempotencyKey": "seen-before"},
        {"eventType": "a.d", "data": {"n": 5}, "colour": "red"},
    ]});
    let r = server.api.post("/events/batch", &body).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let results = r.body["results"].as_array().unwrap();
    let statuses: Vec<_> = results
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [202, 422, 202, 202, 422, 422]);
    assert!(results[0]["eventId"].as_str().unwrap().starts_with("evt_"));
    assert_eq!(results[1]["problem"]["field"], "events[1].eventType");
    assert_eq!(results[2]["eventId"], "batch-3");
    assert_eq!(results[3]["eventId"], first.body["eventId"]);
    assert_eq!(results[3]["idempotentReplayed"], true);
    assert_eq!(
        results[4]["problem"]["type"],
        "urn:tidings:problem:idempotency-key-reused"
    );
    assert_eq!(results[5]["problem"]["field"], "events[5].colour");

    // The first publish and the two new events of the batch: three deliveries, no more.
    let got = receiver.wait_for("/batch", 3, WAIT).await;
    let mut types: Vec<_> = got.iter().map(|r| r.json()["eventType"].clone()).collect();
    types.sort_by_key(|t| t.to_string());
    assert_eq!(types, [json!("a.b"), json!("a.b"), json!("a.c")]);
    server.api.wait_all_succeeded(id, 3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received_on("/batch").len(), 3);

    // The request as a whole is refused only for its shape or size.
    let too_many = json!({"events": vec![json!({"eventType": "a.b", "data": 1}); 101]});
    let r = server.api.post("/events/batch", &too_many).await;
    assert_eq!((r.status, &r.body["field"]), (422, &json!("events")));
    let r = server.api.post("/events/batch", &json!([1, 2])).await;
    assert_eq!(r.status, 400);
}
