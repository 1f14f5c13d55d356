//! The real `tidings` binary: crash recovery and the CLI.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use tidings_tests::{ApiClient, Reply, TestReceiver, TidingsProcess, binary_path};

#[tokio::test]
async fn sigkill_mid_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = TestReceiver::start().await;
    // Slow and failing at first: when the kill comes, some deliveries are in flight, some are
    // waiting for a retry, and most have not been tried yet.
    let mut script = vec![Reply::status(500); 6];
    script
        .iter_mut()
        .for_each(|r| r.delay = Duration::from_millis(50));
    receiver.script(script);
    receiver.always(Reply {
        delay: Duration::from_millis(50),
        ..Reply::status(200)
    });
    let args = [
        "--workers",
        "2",
        "--retry-schedule",
        "0s,1s,1s,1s,1s,1s,1s,1s",
    ];
    let first = TidingsProcess::serve(dir.path(), &args).await;
    let api = first.api.clone();
    let sub = api.subscribe(&receiver.url("/crash"), &["job.*"]).await;
    let mut published = HashSet::new();
    for i in 0..40 {
        published.insert(api.publish("job.done", json!({"n": i})).await);
    }
    receiver
        .wait_for("/crash", 8, Duration::from_secs(20))
        .await;
    first.kill().await;
    let before_restart = receiver.received_on("/crash").len();
    assert!(
        before_restart < 40,
        "the kill came too late to prove anything"
    );

    let second = TidingsProcess::serve(dir.path(), &args).await;
    assert_eq!(
        second.api.key, api.key,
        "the generated key survives restarts"
    );
    let api = second.api.clone();
    let sub_id = sub["subscriptionId"].as_str().unwrap().to_owned();
    api.wait_all_succeeded(&sub_id, 40, Duration::from_secs(60))
        .await;
    let arrived: HashSet<String> = receiver
        .received_on("/crash")
        .iter()
        .map(|r| r.json()["eventId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        arrived, published,
        "every accepted event reached the receiver"
    );
    second.kill().await;
}

/// An operator's own key: at least 32 characters.
const OPERATOR_KEY: &str = "tdk_operator-chosen-key-0123456789abcdef";

#[tokio::test]
async fn keys_create_adds_a_tenant_while_serve_runs() {
    let dir = tempfile::tempdir().unwrap();
    let server = TidingsProcess::serve(dir.path(), &["--api-key", OPERATOR_KEY]).await;
    assert_eq!(server.api.key, OPERATOR_KEY);
    // The database holds secrets: its files are for their owner alone.
    {
        use std::os::unix::fs::PermissionsExt as _;
        for file in ["tidings.db", "tidings.db-wal", "tidings.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}: {mode:o}");
        }
    }
    let out = tokio::process::Command::new(binary_path("tidings"))
        .args(["keys", "create", "--tenant", "acme", "--data-dir"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("tdk_"));
    let acme = ApiClient::new(server.api.base.clone(), key);
    assert_eq!(acme.get("/webhook-subscriptions").await.status, 200);
    let bad = tokio::process::Command::new(binary_path("tidings"))
        .args(["keys", "create", "--tenant", "Not Valid", "--data-dir"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());

    // A second server on the same data directory is refused, not allowed to corrupt it.
    let second = tokio::process::Command::new(binary_path("tidings"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use"));
    server.kill().await;
}

#[tokio::test]
async fn listen_prints_and_verifies_deliveries() {
    use tokio::io::AsyncBufReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let server = TidingsProcess::serve(dir.path(), &[]).await;
    // Reserve a free port for the listener, then hand it over.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sub = server
        .api
        .subscribe(&format!("http://127.0.0.1:{port}/hooks"), &["demo.*"])
        .await;
    let mut listen = tokio::process::Command::new(binary_path("tidings"))
        .args([
            "listen",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--secret",
        ])
        .arg(sub["secret"].as_str().unwrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut ready = tokio::io::BufReader::new(listen.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), ready.next_line())
        .await
        .expect("listen starts")
        .unwrap()
        .unwrap();
    assert!(line.contains("listening on"), "{line}");
    let event_id = server.api.publish("demo.hello", json!({"hi": true})).await;
    let mut out = tokio::io::BufReader::new(listen.stdout.take().unwrap()).lines();
    let printed = tokio::time::timeout(Duration::from_secs(15), out.next_line())
        .await
        .expect("a delivery is printed")
        .unwrap()
        .unwrap();
    let printed: serde_json::Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(printed["verified"], true, "{printed}");
    assert_eq!(printed["body"]["eventId"], event_id);
    assert_eq!(printed["body"]["data"], json!({"hi": true}));
    listen.kill().await.unwrap();
    server.kill().await;
}
