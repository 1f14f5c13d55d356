//! The stand-in itself, end to end, against the AWS emulator and a fake function process
//! (`fake_function.py`, a custom runtime speaking the runtime API): API Gateway round trip,
//! runtime API headers and environment, partial batch failures, redrive to the DLQ, a crash and a
//! timeout mid-batch (restart, redelivery), the schedule, the admin endpoints, and shutdown.
//! The real Tidings functions are exercised by the end-to-end tests in `it/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
