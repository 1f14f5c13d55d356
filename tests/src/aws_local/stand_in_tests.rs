//! The stand-in itself, end to end, against the AWS emulator and a fake function process
//! (`fake_function.py`, a custom runtime speaking the runtime API): API Gateway round trip,
//! runtime API headers and environment, partial batch failures, redrive to the DLQ, a crash and a
//! timeout mid-batch (restart, redelivery), the schedule, the admin endpoints, and shutdown; and
//! the DynamoDB stream mapping: filter, batches, partial failures, crashes, the on-failure queue.
//! The real Tidings functions are exercised by the end-to-end tests in `it/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, Put, PutRequest, TransactWriteItem, WriteRequest};
use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use serde_json::{Value, json};

use super::{API, AwsLocal, Config, DELIVER, SWEEP};

const FAKE: &str = include_str!("fake_function.py");

fn require_emulator() {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    assert!(
        !endpoint.is_empty(),
        "AWS_ENDPOINT_URL is not set. This test needs the AWS emulator: run `tests/run.sh`, or start \
         `moto_server -H 127.0.0.1 -p 5555` and export AWS_ENDPOINT_URL=http://127.0.0.1:5555 \
         AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test"
    );
}

/// The interpreter behind `python3`, by absolute path (the functions get a minimal environment).
fn python() -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 runs (the fake function is a Python script)");
    assert!(out.status.success(), "python3 failed: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The fake as all three functions, in both layouts `--bin-dir` accepts.
fn install_fakes(dir: &Path) {
    let script = format!("#!{}\n{FAKE}", python());
    write_executable(&dir.join(API), &script);
    std::fs::create_dir(dir.join(DELIVER)).unwrap();
    write_executable(&dir.join(DELIVER).join("bootstrap"), &script);
    write_executable(&dir.join(SWEEP), &script);
}

fn read_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

async fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn json_of(response: reqwest::Response) -> Value {
    serde_json::from_slice(&response.bytes().await.unwrap()).expect("JSON body")
}

async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    json_of(http.get(url).send().await.unwrap()).await
}

async fn queue_is_empty(sqs: &aws_sdk_sqs::Client, url: &str) -> bool {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    let attrs = attrs.attributes().cloned().unwrap_or_default();
    attrs.values().all(|v| v == "0")
}

fn records<'a>(log: &'a [Value], body: &str) -> Vec<&'a Value> {
    log.iter()
        .filter(|l| l["kind"] == "record" && l["value"]["body"] == body)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stand_in_plays_lambda_api_gateway_sqs_and_the_schedule() {
    require_emulator();
    crate::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    install_fakes(dir.path());
    let log_path: PathBuf = dir.path().join("log.jsonl");

    let mut config = Config::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.function_timeout = Duration::from_secs(3);
    config.visibility_timeout = Duration::from_secs(3);
    config.max_receive_count = 2;
    config.sweep_interval = Duration::from_millis(300);
    config.cleanup = true;
    config.env = vec![
        ("FAKE_LOG".into(), log_path.display().to_string()),
        ("TIDINGS_EXTRA".into(), "passed".into()),
    ];
    let local = AwsLocal::start(config).await.expect("stand-in starts");
    let info = local.info.clone();
    assert!(info.table_name.starts_with("tidings-local-"), "{info:?}");
    assert!(
        info.api_key.starts_with("tdk_"),
        "a key is registered: {info:?}"
    );
    tidings_core::sender::install_crypto_provider();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let sqs = aws_sdk_sqs::Client::new(&tidings_core::aws::dynamo::load_sdk_config().await);

    // ---- API Gateway → tidings-api ----
    let response = http
        .post(format!("{}/hello/world?x=1&x=2", info.api_url))
        .header("x-test", "yes")
        .header("cookie", "k=v")
        .body(r#"{"a":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["x-fn"], API);
    assert_eq!(headers["set-cookie"], "c=1; Path=/");
    let many: Vec<_> = headers.get_all("x-many").iter().collect();
    assert_eq!(many, ["1", "2"]);
    assert!(headers.contains_key("apigw-requestid"));
    let echoed = json_of(response).await;
    let event = &echoed["event"];
    assert_eq!(event["version"], "2.0");
    assert_eq!(event["rawPath"], "/hello/world");
    assert_eq!(event["rawQueryString"], "x=1&x=2");
    assert_eq!(event["queryStringParameters"]["x"], "1,2");
    assert_eq!(event["headers"]["x-test"], "yes");
    assert_eq!(event["cookies"], json!(["k=v"]));
    assert_eq!(event["body"], r#"{"a":1}"#);
    assert_eq!(event["requestContext"]["http"]["method"], "POST");
    assert_eq!(event["requestContext"]["http"]["sourceIp"], "127.0.0.1");
    let meta = &echoed["meta"];
    assert!(
        meta["arn"]
            .as_str()
            .unwrap()
            .ends_with(":function:tidings-api"),
        "{meta}"
    );
    let left = meta["deadlineMs"].as_i64().unwrap() - meta["nowMs"].as_i64().unwrap();
    assert!((0..=3_000).contains(&left), "deadline {left} ms ahead");
    assert_eq!(meta["requestId"].as_str().unwrap().len(), 36);
    assert!(meta["traceId"].as_str().unwrap().starts_with("Root=1-"));

    let error = http
        .get(format!("{}/error", info.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(error.status(), 502);
    assert_eq!(
        json_of(error).await,
        json!({"message": "Internal Server Error"})
    );
    let crash = http
        .get(format!("{}/crash", info.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(crash.status(), 502, "a crashed api process is a 502 too");
    let again = http
        .get(format!("{}/again", info.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        200,
        "a fresh environment serves the next request"
    );

    // ---- the functions' environment ----
    // The processes start concurrently; under load deliver's first line can come late.
    let started_by = Instant::now() + Duration::from_secs(20);
    let start = loop {
        let log = read_log(&log_path);
        if let Some(line) = log
            .into_iter()
            .find(|l| l["kind"] == "start" && l["fn"] == DELIVER)
        {
            break line;
        }
        assert!(Instant::now() < started_by, "deliver started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let env = &start["value"];
    assert_eq!(env["TIDINGS_TABLE"], info.table_name.as_str());
    assert_eq!(
        env["TIDINGS_DELIVERIES_QUEUE_URL"],
        info.deliveries_queue_url.as_str()
    );
    assert_eq!(env["TIDINGS_EXTRA"], "passed");
    assert_eq!(env["AWS_LAMBDA_FUNCTION_NAME"], DELIVER);
    assert_eq!(env["AWS_LAMBDA_FUNCTION_VERSION"], "$LATEST");
    assert_eq!(env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"], "128");
    assert_eq!(env["_HANDLER"], "bootstrap");
    assert!(
        env["AWS_LAMBDA_RUNTIME_API"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    // The function reaches the emulator through the meter: a listener of its own on 127.0.0.1.
    let endpoint = env["AWS_ENDPOINT_URL"].as_str().unwrap();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    assert_ne!(endpoint, std::env::var("AWS_ENDPOINT_URL").unwrap());

    // ---- SQS → tidings-deliver ----
    let entries = ["ok-a", "fail-b", "ok-c"]
        .iter()
        .enumerate()
        .map(|(i, body)| {
            SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(*body)
                .build()
                .unwrap()
        })
        .collect::<Vec<_>>();
    sqs.send_message_batch()
        .queue_url(&info.events_queue_url)
        .set_entries(Some(entries))
        .send()
        .await
        .unwrap();
    // One at a time: received in one batch, the crash would end the process before the hang
    // ran, and there would be one restart where the test wants two.
    for body in ["crash", "hang"] {
        sqs.send_message()
            .queue_url(&info.deliveries_queue_url)
            .message_body(body)
            .send()
            .await
            .unwrap();
        eventually(&format!("{body} received"), Duration::from_secs(20), || {
            (!records(&read_log(&log_path), body).is_empty()).then_some(())
        })
        .await;
    }
    let log = eventually(
        "crash and hang redelivered after their process died",
        Duration::from_secs(40),
        || {
            let log = read_log(&log_path);
            let redelivered = |body| {
                records(&log, body)
                    .iter()
                    .any(|r| r["value"]["receiveCount"] == "2")
            };
            (redelivered("crash") && redelivered("hang")).then_some(log)
        },
    )
    .await;
    let crash = records(&log, "crash");
    assert_ne!(
        crash[0]["pid"],
        crash.last().unwrap()["pid"],
        "a new process took the redelivered message"
    );
    let record = &records(&log, "ok-a")[0]["value"]["record"];
    assert_eq!(record["eventSource"], "aws:sqs");
    assert!(
        record["eventSourceARN"]
            .as_str()
            .unwrap()
            .ends_with("events")
    );
    assert_eq!(record["awsRegion"], info.region.as_str());
    assert!(record["md5OfBody"].is_string());
    assert!(record["receiptHandle"].is_string());
    assert!(record["attributes"]["SentTimestamp"].is_string());

    // The event source mappings' own SQS calls went through the meter too.
    let usage = local.meter().snapshot();
    let mapping = &usage[super::meter::EVENT_SOURCE_MAPPING];
    assert!(mapping["sqs.ReceiveMessage"].messages >= 5, "{mapping:?}");
    assert!(
        mapping["sqs.DeleteMessageBatch"].messages >= 2,
        "{mapping:?}"
    );

    // fail-b: reported failed on each of its 2 receives, then moved to the DLQ by the redrive policy.
    let dead = eventually_async_dlq(&sqs, &info.events_dlq_url).await;
    assert_eq!(dead, ["fail-b"]);
    let log = read_log(&log_path);
    assert_eq!(
        records(&log, "fail-b").len(),
        2,
        "seen on each receive up to maxReceiveCount"
    );
    assert_eq!(
        records(&log, "ok-a").len(),
        1,
        "a successful record of a partly failed batch is deleted"
    );
    assert_eq!(records(&log, "ok-c").len(), 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(queue_is_empty(&sqs, &info.events_queue_url).await
        && queue_is_empty(&sqs, &info.deliveries_queue_url).await)
    {
        assert!(Instant::now() < deadline, "queues never drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // ---- the schedule ----
    let scheduled = eventually("two scheduled sweeps", Duration::from_secs(10), || {
        let log = read_log(&log_path);
        let n = log.iter().filter(|l| l["kind"] == "scheduled").count();
        (n >= 2).then_some(log)
    })
    .await;
    let event = &scheduled.iter().find(|l| l["kind"] == "scheduled").unwrap()["value"];
    assert_eq!(event["detail-type"], "Scheduled Event");
    assert_eq!(event["source"], "aws.events");

    // ---- admin ----
    let admin = &info.admin_url;
    assert_eq!(
        get_json(&http, admin).await["tableName"],
        info.table_name.as_str()
    );
    let rows = get_json(&http, &format!("{admin}/functions")).await;
    let rows = rows.as_array().unwrap();
    assert_eq!(
        rows.len(),
        2 + 2 + 1,
        "api×2, deliver×2, sweep×1: {rows:#?}"
    );
    let deliver_restarts: u64 = rows
        .iter()
        .filter(|r| r["name"] == DELIVER)
        .map(|r| r["restarts"].as_u64().unwrap())
        .sum();
    assert!(
        deliver_restarts >= 2,
        "crash and timeout restart deliver: {rows:#?}"
    );
    let api_errors: u64 = rows
        .iter()
        .filter(|r| r["name"] == API)
        .map(|r| r["errors"].as_u64().unwrap())
        .sum();
    assert!(api_errors >= 2, "{rows:#?}");
    for row in rows {
        assert!(
            row["coldStartsMs"]
                .as_array()
                .is_some_and(|c| !c.is_empty()),
            "every environment asked for work: {row}"
        );
    }
    let queues = get_json(&http, &format!("{admin}/queues")).await;
    assert_eq!(queues.as_array().unwrap().len(), 2, "{queues}");

    let sweep = http.post(format!("{admin}/sweep")).send().await.unwrap();
    assert_eq!(sweep.status(), 200);

    let sweep_pid = rows.iter().find(|r| r["name"] == SWEEP).unwrap()["pid"].clone();
    let killed = json_of(
        http.post(format!("{admin}/functions/{SWEEP}/kill"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(killed["killed"], json!([sweep_pid]));
    let mut new_pid = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(10);
    while new_pid.is_null() || new_pid == sweep_pid {
        assert!(Instant::now() < deadline, "sweep never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rows = get_json(&http, &format!("{admin}/functions")).await;
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == SWEEP)
            .unwrap()
            .clone();
        if row["coldStartMs"].is_number() {
            new_pid = row["pid"].clone();
        }
    }
    let missing = http
        .post(format!("{admin}/functions/nope/kill"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // ---- shutdown kills every function process ----
    let pids: Vec<u64> = local
        .instances()
        .iter()
        .filter_map(|i| i.pid.map(u64::from))
        .collect();
    assert_eq!(pids.len(), 5);
    local.shutdown().await;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(
            status.is_empty() || status.contains("State:\tZ"),
            "process {pid} still runs after shutdown"
        );
    }
    // --cleanup deleted the queues.
    assert!(
        sqs.get_queue_url()
            .queue_name(format!("{}events", info.prefix))
            .send()
            .await
            .is_err()
    );
}

/// Bodies that reach the DLQ within 30 s (waits for at least one).
async fn eventually_async_dlq(sqs: &aws_sdk_sqs::Client, url: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        let bodies: Vec<String> = out
            .messages()
            .iter()
            .filter_map(|m| m.body().map(str::to_owned))
            .collect();
        if !bodies.is_empty() {
            return bodies;
        }
        assert!(Instant::now() < deadline, "nothing reached the DLQ {url}");
    }
}

#[tokio::test]
async fn start_fails_clearly_without_the_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let error = match AwsLocal::start(config).await {
        Ok(_) => panic!("started without binaries"),
        Err(error) => format!("{error:#}"),
    };
    // Whichever check comes first names what is missing.
    assert!(
        error.contains("AWS_ENDPOINT_URL") || error.contains("tidings-api not found"),
        "{error}"
    );
}

// ---- the DynamoDB stream mapping ----

/// A stand-in with the fake as every function, `configure`d, and its log.
async fn start_with_fake(
    dir: &Path,
    configure: impl FnOnce(&mut Config),
) -> (
    AwsLocal,
    PathBuf,
    aws_sdk_dynamodb::Client,
    aws_sdk_sqs::Client,
) {
    require_emulator();
    crate::init_tracing();
    install_fakes(dir);
    let log_path = dir.join("log.jsonl");
    let mut config = Config::new(dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.function_timeout = Duration::from_secs(3);
    config.visibility_timeout = Duration::from_secs(3);
    config.sweep_interval = Duration::ZERO;
    config.cleanup = true;
    config.env = vec![("FAKE_LOG".into(), log_path.display().to_string())];
    configure(&mut config);
    let local = AwsLocal::start(config).await.expect("stand-in starts");
    let sdk = tidings_core::aws::dynamo::load_sdk_config().await;
    (
        local,
        log_path,
        aws_sdk_dynamodb::Client::new(&sdk),
        aws_sdk_sqs::Client::new(&sdk),
    )
}

/// An event-like item `T#t#EVT#{name}` with string attributes.
fn item(name: &str, attributes: &[(&str, &str)]) -> HashMap<String, AttributeValue> {
    let mut item: HashMap<_, _> = attributes
        .iter()
        .map(|(k, v)| ((*k).to_owned(), AttributeValue::S((*v).to_owned())))
        .collect();
    item.insert("pk".into(), AttributeValue::S(format!("T#t#EVT#{name}")));
    item.insert("sk".into(), AttributeValue::S("-".into()));
    item
}

const BY_STREAM: (&str, &str) = ("fan_out", "stream");

async fn put(
    dynamo: &aws_sdk_dynamodb::Client,
    table: &str,
    item: HashMap<String, AttributeValue>,
) {
    dynamo
        .put_item()
        .table_name(table)
        .set_item(Some(item))
        .send()
        .await
        .unwrap();
}

/// Writes the items in one TransactWriteItems: they reach the stream together.
async fn put_together(
    dynamo: &aws_sdk_dynamodb::Client,
    table: &str,
    items: Vec<HashMap<String, AttributeValue>>,
) {
    let puts = items.into_iter().map(|item| {
        TransactWriteItem::builder()
            .put(
                Put::builder()
                    .table_name(table)
                    .set_item(Some(item))
                    .build()
                    .unwrap(),
            )
            .build()
    });
    dynamo
        .transact_write_items()
        .set_transact_items(Some(puts.collect()))
        .send()
        .await
        .unwrap();
}

/// The stream records the fake got for item `name`, in order.
fn stream_records(log: &[Value], name: &str) -> Vec<Value> {
    let pk = format!("T#t#EVT#{name}");
    log.iter()
        .filter(|l| l["kind"] == "stream-record" && l["value"]["pk"] == pk.as_str())
        .map(|l| l["value"].clone())
        .collect()
}

fn seen(log: &[Value], name: &str) -> usize {
    stream_records(log, name).len()
}

/// Waits until `check` holds on the fake's log (polling), and returns the log.
async fn log_until(
    path: &Path,
    what: &str,
    timeout: Duration,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    eventually(what, timeout, || {
        let log = read_log(path);
        check(&log).then_some(log)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_brings_each_new_fanned_out_item_once_and_filters_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (local, log_path, dynamo, _) = start_with_fake(dir.path(), |_| {}).await;
    let info = local.info.clone();
    let table = info.table_name.as_str();
    let stream_arn = info.stream_arn.clone().expect("the table has a stream");

    put(&dynamo, table, item("put", &[BY_STREAM])).await;
    put(&dynamo, table, item("no-attribute", &[])).await;
    put(&dynamo, table, item("by-queue", &[("fan_out", "queue")])).await;
    // As Tidings writes an event with an idempotency key: event and key in one transaction.
    let mut key = item("idem", &[]);
    key.insert("pk".into(), AttributeValue::S("T#t#IDEM#k1".into()));
    put_together(&dynamo, table, vec![item("transact", &[BY_STREAM]), key]).await;
    dynamo
        .batch_write_item()
        .request_items(
            table,
            vec![
                WriteRequest::builder()
                    .put_request(
                        PutRequest::builder()
                            .set_item(Some(item("batch-write", &[BY_STREAM])))
                            .build()
                            .unwrap(),
                    )
                    .build(),
            ],
        )
        .send()
        .await
        .unwrap();
    // A MODIFY of an item with the attribute is not an INSERT.
    dynamo
        .update_item()
        .table_name(table)
        .key("pk", AttributeValue::S("T#t#EVT#put".into()))
        .key("sk", AttributeValue::S("-".into()))
        .update_expression("SET touched = :t")
        .expression_attribute_values(":t", AttributeValue::S("yes".into()))
        .send()
        .await
        .unwrap();
    // A cancelled transaction writes nothing, so the stream has nothing of it (the emulator
    // leaves a record of it in the stream copy it discards: see streams.rs).
    let mut duplicate = item("put", &[BY_STREAM]);
    duplicate.insert("again".into(), AttributeValue::S("yes".into()));
    let cancelled = dynamo
        .transact_write_items()
        .transact_items(
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(table)
                        .set_item(Some(item("cancelled", &[BY_STREAM])))
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .transact_items(
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(table)
                        .set_item(Some(duplicate))
                        .condition_expression("attribute_not_exists(pk)")
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await;
    assert!(cancelled.is_err(), "the condition fails the transaction");
    put(&dynamo, table, item("after-cancelled", &[BY_STREAM])).await;

    let log = log_until(
        &log_path,
        "the item written last",
        Duration::from_secs(15),
        |log| seen(log, "after-cancelled") > 0,
    )
    .await;
    // Long enough for a duplicate or a late filtered record to show.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let log = {
        let later = read_log(&log_path);
        assert!(later.len() >= log.len());
        later
    };
    for name in ["put", "transact", "batch-write", "after-cancelled"] {
        assert_eq!(seen(&log, name), 1, "{name} once: {log:#?}");
    }
    for name in ["no-attribute", "by-queue", "idem", "cancelled"] {
        assert_eq!(seen(&log, name), 0, "{name} filtered out");
    }
    let idem = log
        .iter()
        .filter(|l| l["kind"] == "stream-record" && l["value"]["pk"] == "T#t#IDEM#k1")
        .count();
    assert_eq!(idem, 0);

    // The record as Lambda sends it, and what the functions were told.
    let record = &stream_records(&log, "transact")[0]["record"];
    assert_eq!(record["eventName"], "INSERT");
    assert_eq!(record["eventSource"], "aws:dynamodb");
    assert_eq!(record["eventVersion"], "1.1");
    assert_eq!(record["eventSourceARN"], stream_arn.as_str());
    assert_eq!(record["awsRegion"], info.region.as_str());
    let change = &record["dynamodb"];
    assert_eq!(
        change["Keys"],
        json!({"pk": {"S": "T#t#EVT#transact"}, "sk": {"S": "-"}})
    );
    assert_eq!(
        change["NewImage"],
        json!({"pk": {"S": "T#t#EVT#transact"}, "sk": {"S": "-"}, "fan_out": {"S": "stream"}})
    );
    assert_eq!(change["StreamViewType"], "NEW_IMAGE");
    assert!(change["ApproximateCreationDateTime"].is_i64(), "{change}");
    assert!(change["SizeBytes"].is_i64(), "{change}");
    let order: Vec<String> = ["put", "transact", "batch-write", "after-cancelled"]
        .iter()
        .map(|n| {
            stream_records(&log, n)[0]["seq"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut sorted = order.clone();
    sorted.sort_by(|a, b| super::streams::compare_sequence_numbers(a, b));
    assert_eq!(order, sorted, "in stream order");
    let start = log
        .iter()
        .find(|l| l["kind"] == "start" && l["fn"] == DELIVER)
        .unwrap();
    assert_eq!(start["value"]["TIDINGS_FAN_OUT"], "stream");

    let stats = &local.stream_stats()[0];
    assert_eq!(stats.stream_arn, stream_arn);
    assert_eq!(stats.shards, 1);
    assert!(stats.filtered >= 4, "{stats:?}");
    assert_eq!(stats.records, 4, "{stats:?}");
    assert_eq!(
        (stats.retried, stats.gave_up, stats.invoke_errors),
        (0, 0, 0)
    );
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let rows = get_json(&http, &format!("{}/streams", info.admin_url)).await;
    assert_eq!(rows[0]["streamArn"], stream_arn.as_str());
    assert_eq!(rows[0]["onFailureQueueUrl"], info.fan_out_dlq_url.as_str());
    for counter in [
        "batches",
        "records",
        "filtered",
        "retried",
        "gaveUp",
        "invokeErrors",
        "discardedReads",
    ] {
        assert!(rows[0][counter].is_u64(), "{counter}: {rows}");
    }
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_queue_fan_out_no_stream_mapping_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (local, log_path, dynamo, _) =
        start_with_fake(dir.path(), |c| c.fan_out = super::FanOut::Queue).await;
    assert!(local.stream_stats().is_empty());
    put(&dynamo, &local.info.table_name, item("put", &[BY_STREAM])).await;
    let log = log_until(
        &log_path,
        "deliver started",
        Duration::from_secs(15),
        |log| {
            log.iter()
                .any(|l| l["kind"] == "start" && l["fn"] == DELIVER)
        },
    )
    .await;
    let start = log
        .iter()
        .find(|l| l["kind"] == "start" && l["fn"] == DELIVER)
        .unwrap();
    assert_eq!(start["value"]["TIDINGS_FAN_OUT"], "queue");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(seen(&read_log(&log_path), "put"), 0);
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_failure_is_retried_from_that_record_on() {
    let dir = tempfile::tempdir().unwrap();
    let (local, log_path, dynamo, _) = start_with_fake(dir.path(), |c| {
        // One batch for the three items, however the reads fall.
        c.stream_batching_window = Duration::from_millis(300);
    })
    .await;
    let table = local.info.table_name.clone();
    put_together(
        &dynamo,
        &table,
        vec![
            item("first", &[BY_STREAM]),
            item("fails-once", &[BY_STREAM, ("behaviour", "fail-once")]),
            item("last", &[BY_STREAM]),
        ],
    )
    .await;
    let log = log_until(&log_path, "the retry", Duration::from_secs(15), |log| {
        seen(log, "last") >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let log = {
        let later = read_log(&log_path);
        assert!(later.len() >= log.len());
        later
    };
    assert_eq!(
        seen(&log, "first"),
        1,
        "before the failed record: not again"
    );
    assert_eq!(seen(&log, "fails-once"), 2);
    assert_eq!(seen(&log, "last"), 2, "after the failed record: again");
    let batch = |name: &str, i: usize| stream_records(&log, name)[i]["meta"]["requestId"].clone();
    assert_eq!(
        batch("first", 0),
        batch("fails-once", 0),
        "one batch at first"
    );
    assert_eq!(batch("first", 0), batch("last", 0));
    assert_eq!(
        batch("fails-once", 1),
        batch("last", 1),
        "the retry starts at the failure"
    );
    let stats = &local.stream_stats()[0];
    assert_eq!(
        (stats.batches, stats.records, stats.retried),
        (2, 5, 1),
        "{stats:?}"
    );
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_batch_retries_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (local, log_path, dynamo, _) = start_with_fake(dir.path(), |c| {
        c.stream_batching_window = Duration::from_millis(300);
    })
    .await;
    put_together(
        &dynamo,
        &local.info.table_name,
        vec![
            item("before", &[BY_STREAM]),
            item("crashes", &[BY_STREAM, ("behaviour", "crash")]),
            item("after", &[BY_STREAM]),
        ],
    )
    .await;
    let log = log_until(
        &log_path,
        "the retried batch",
        Duration::from_secs(15),
        |log| seen(log, "after") >= 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let log = {
        let later = read_log(&log_path);
        assert!(later.len() >= log.len());
        later
    };
    assert_eq!(seen(&log, "before"), 2, "the whole batch again");
    assert_eq!(seen(&log, "crashes"), 2);
    assert_eq!(seen(&log, "after"), 1, "never reached before the crash");
    let crashes = stream_records(&log, "crashes");
    assert_ne!(
        crashes[0]["meta"]["requestId"],
        crashes[1]["meta"]["requestId"]
    );
    let pids: Vec<_> = log
        .iter()
        .filter(|l| l["kind"] == "stream-record" && l["value"]["pk"] == "T#t#EVT#crashes")
        .map(|l| l["pid"].clone())
        .collect();
    assert_ne!(pids[0], pids[1], "a new process took the retry");
    let stats = &local.stream_stats()[0];
    assert_eq!(
        (stats.invoke_errors, stats.retried, stats.gave_up),
        (1, 1, 0),
        "{stats:?}"
    );
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_failing_every_time_goes_to_the_fan_out_dlq_and_later_records_still_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let (local, log_path, dynamo, sqs) = start_with_fake(dir.path(), |c| {
        c.stream_batching_window = Duration::from_millis(300);
        c.stream_max_retries = 2;
    })
    .await;
    let info = local.info.clone();
    put_together(
        &dynamo,
        &info.table_name,
        vec![
            item("ok", &[BY_STREAM]),
            item("poison", &[BY_STREAM, ("behaviour", "fail")]),
            item("behind", &[BY_STREAM]),
        ],
    )
    .await;
    let dead = eventually_async_dlq(&sqs, &info.fan_out_dlq_url).await;
    put(&dynamo, &info.table_name, item("later", &[BY_STREAM])).await;
    let log = log_until(
        &log_path,
        "the later record",
        Duration::from_secs(15),
        |log| seen(log, "later") >= 1,
    )
    .await;

    assert_eq!(dead.len(), 1, "one failure record: {dead:?}");
    let record: Value = serde_json::from_str(&dead[0]).unwrap();
    let poison = &stream_records(&log, "poison");
    let behind = &stream_records(&log, "behind");
    assert_eq!(
        poison.len(),
        3,
        "first try and MaximumRetryAttempts = 2 retries"
    );
    assert_eq!(
        behind.len(),
        3,
        "sent again with the failed record each time"
    );
    assert_eq!(seen(&log, "ok"), 1);
    assert_eq!(seen(&log, "later"), 1);

    let context = &record["requestContext"];
    assert_eq!(context["condition"], "RetryAttemptsExhausted");
    assert_eq!(context["approximateInvokeCount"], 3);
    assert!(
        context["functionArn"]
            .as_str()
            .unwrap()
            .ends_with(":function:tidings-deliver"),
        "{record}"
    );
    assert_eq!(context["requestId"].as_str().unwrap().len(), 36);
    assert_eq!(
        record["responseContext"],
        json!({"statusCode": 200, "executedVersion": "$LATEST"})
    );
    assert_eq!(record["version"], "1.0");
    assert!(record["timestamp"].as_str().unwrap().ends_with('Z'));
    let batch = &record["DDBStreamBatchInfo"];
    assert_eq!(batch["startSequenceNumber"], poison[0]["seq"]);
    assert_eq!(batch["endSequenceNumber"], behind[0]["seq"]);
    assert_eq!(batch["batchSize"], 2);
    assert_eq!(
        batch["streamArn"],
        info.stream_arn.clone().unwrap().as_str()
    );
    assert!(batch["shardId"].as_str().unwrap().starts_with("shardId-"));
    for arrival in [
        "approximateArrivalOfFirstRecord",
        "approximateArrivalOfLastRecord",
    ] {
        assert!(batch[arrival].as_str().unwrap().ends_with('Z'), "{record}");
    }
    let stats = &local.stream_stats()[0];
    assert_eq!((stats.gave_up, stats.retried), (1, 2), "{stats:?}");
    local.shutdown().await;
}

/// moto rolls a cancelled transaction back by swapping in a copy of the table: for a moment its
/// items are in the stream, and they stay in the copy it discards (see streams.rs). Back-to-back
/// cancelled transactions, with real writes between them: only the real ones arrive, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_transactions_never_reach_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let (local, log_path, dynamo, _) = start_with_fake(dir.path(), |_| {}).await;
    let table = local.info.table_name.clone();
    let mut key = item("idem", &[]);
    key.insert("pk".into(), AttributeValue::S("T#t#IDEM#k1".into()));
    put(&dynamo, &table, key.clone()).await;
    let started = Instant::now();
    for i in 0..40 {
        if i % 8 == 0 {
            put(&dynamo, &table, item(&format!("real-{i}"), &[BY_STREAM])).await;
        }
        // As a repeated publish with a known idempotency key: the event, then the key's condition.
        let cancelled = dynamo
            .transact_write_items()
            .transact_items(
                TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(&table)
                            .set_item(Some(item(&format!("cancelled-{i}"), &[BY_STREAM])))
                            .build()
                            .unwrap(),
                    )
                    .build(),
            )
            .transact_items(
                TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(&table)
                            .set_item(Some(key.clone()))
                            .condition_expression("attribute_not_exists(pk)")
                            .build()
                            .unwrap(),
                    )
                    .build(),
            )
            .send()
            .await;
        assert!(cancelled.is_err());
    }
    put(&dynamo, &table, item("real-last", &[BY_STREAM])).await;
    let written_in = started.elapsed();
    let log = log_until(
        &log_path,
        "the last real write",
        Duration::from_secs(15),
        |log| seen(log, "real-last") > 0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = {
        let later = read_log(&log_path);
        assert!(later.len() >= log.len());
        later
    };
    let phantoms: Vec<_> = (0..40)
        .map(|i| format!("cancelled-{i}"))
        .filter(|name| seen(&log, name) > 0)
        .collect();
    assert!(
        phantoms.is_empty(),
        "records of cancelled transactions reached the function: {phantoms:?} (writes took {written_in:?})"
    );
    for name in [
        "real-0",
        "real-8",
        "real-16",
        "real-24",
        "real-32",
        "real-last",
    ] {
        assert_eq!(seen(&log, name), 1, "{name}");
    }
    local.shutdown().await;
}
