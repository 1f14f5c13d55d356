//! The end-to-end harness: a recording webhook receiver, the all-in-one server on port 0 (in
//! process or as the real `tidings` binary), and an API client. Everything listens on 127.0.0.1.
//! [`aws_local`] is the local Lambda / API Gateway / SQS-trigger stand-in (`tidings-aws-local`).

// A test harness: a failed set-up or assertion is a failed test, said at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod aws_local;

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub use tidings_core;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("delivered body is JSON")
    }

    /// Checks the Standard Webhooks signature as a consumer would, with the subscription's secret.
    pub fn verify(&self, secret: &str) -> Result<(), tidings_core::signing::VerifyError> {
        use tidings_core::signing;
        let secret = tidings_core::domain::Secret::parse(secret).expect("a whsec_ secret");
        signing::verify(
            secret.key(),
            self.header("webhook-id"),
            self.header("webhook-timestamp"),
            self.header("webhook-signature"),
            &self.body,
            tidings_core::domain::Timestamp::now().unix_seconds(),
            signing::DEFAULT_TOLERANCE_SECS,
        )
    }
}

/// What the receiver answers with, in order; after the script runs out, `default`.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    script: VecDeque<Reply>,
    default: Option<Reply>,
    first_attempt: Option<Reply>,
    seen_ids: HashSet<String>,
}

/// A real HTTP receiver on 127.0.0.1 that records every request.
#[derive(Clone)]
pub struct TestReceiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    _server: Arc<tokio::task::JoinHandle<()>>,
}

impl TestReceiver {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let router = Router::new()
            .fallback(record)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            addr,
            state,
            _server: Arc::new(server),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers the next requests with these replies, in order.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.lock().unwrap().script.extend(replies);
    }

    /// The answer once the script is used up (200 by default).
    pub fn always(&self, reply: Reply) {
        self.state.lock().unwrap().default = Some(reply);
    }

    /// Answers the first request of each message (by `webhook-id`) with `reply`, however the
    /// attempts of different messages interleave; later attempts get the script or the default.
    pub fn fail_first_attempts(&self, reply: Reply) {
        self.state.lock().unwrap().first_attempt = Some(reply);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn received_on(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Waits until at least `n` requests arrived on `path`, or panics after `timeout`.
    pub async fn wait_for(&self, path: &str, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received_on(path);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "receiver got {} of {n} expected requests on {path} within {timeout:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn record(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = {
        let mut s = state.lock().unwrap();
        let webhook_id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        s.received.push(Received {
            path: uri.path().to_owned(),
            headers,
            body,
            at: Instant::now(),
        });
        let first = s.seen_ids.insert(webhook_id);
        s.first_attempt
            .clone()
            .filter(|_| first)
            .or_else(|| s.script.pop_front())
            .or_else(|| s.default.clone())
            .unwrap_or_else(|| Reply::status(200))
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = (
        StatusCode::from_u16(reply.status).unwrap(),
        reply.body.clone(),
    )
        .into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).unwrap(),
        );
    }
    response
}

/// A JSON API client bound to one base URL and key.
#[derive(Clone)]
pub struct ApiClient {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

/// A status and its JSON body (or `Null`).
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl ApiClient {
    pub fn new(base: impl Into<String>, key: impl Into<String>) -> Self {
        tidings_core::sender::install_crypto_provider();
        Self {
            base: base.into(),
            key: key.into(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub fn with_key(&self, key: &str) -> Self {
        Self {
            key: key.to_owned(),
            ..self.clone()
        }
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> ApiResponse {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_vec());
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.expect("API request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("API body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        ApiResponse {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> ApiResponse {
        self.send(reqwest::Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> ApiResponse {
        self.send(
            reqwest::Method::POST,
            path,
            Some(body.to_string().as_bytes()),
            &[],
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> ApiResponse {
        self.send(reqwest::Method::DELETE, path, None, &[]).await
    }

    /// Subscribes `callback_url` to `event_types`; panics unless 201. Returns the subscription.
    pub async fn subscribe(&self, callback_url: &str, event_types: &[&str]) -> Value {
        let r = self
            .post(
                "/webhook-subscriptions",
                &json!({"eventTypes": event_types, "callbackUrl": callback_url}),
            )
            .await;
        assert_eq!(r.status, 201, "subscribe: {:?}", r.body);
        r.body
    }

    /// Publishes an event; panics unless 202. Returns the event id.
    pub async fn publish(&self, event_type: &str, data: Value) -> String {
        let r = self
            .post("/events", &json!({"eventType": event_type, "data": data}))
            .await;
        assert_eq!(r.status, 202, "publish: {:?}", r.body);
        r.body["eventId"].as_str().unwrap().to_owned()
    }

    /// The subscription's deliveries (newest first).
    pub async fn deliveries(&self, subscription_id: &str) -> Vec<Value> {
        let r = self
            .get(&format!(
                "/webhook-subscriptions/{subscription_id}/deliveries"
            ))
            .await;
        assert_eq!(r.status, 200, "deliveries: {:?}", r.body);
        r.body["data"].as_array().unwrap().clone()
    }

    /// The subscription's deliveries once at least `n` are listed (a delivery is written with its
    /// first attempt, a moment after the receiver saw it); panics after 10 s.
    pub async fn wait_deliveries(&self, subscription_id: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let list = self.deliveries(subscription_id).await;
            if list.len() >= n {
                return list;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} deliveries listed: {list:#?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the subscription has exactly `n` deliveries, all succeeded; panics after `timeout`.
    pub async fn wait_all_succeeded(&self, subscription_id: &str, n: usize, timeout: Duration) {
        let path = format!("/webhook-subscriptions/{subscription_id}/deliveries?limit=250");
        eventually(&format!("{n} succeeded deliveries"), timeout, || async {
            let r = self.get(&path).await;
            let list = r.body["data"].as_array().cloned().unwrap_or_default();
            list.len() == n && list.iter().all(|d| d["status"] == "succeeded")
        })
        .await;
    }

    /// Polls a delivery until `done` holds, or panics after `timeout`.
    pub async fn wait_delivery(
        &self,
        delivery_id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.get(&format!("/deliveries/{delivery_id}")).await;
            assert_eq!(r.status, 200, "delivery: {:?}", r.body);
            if done(&r.body) {
                return r.body;
            }
            assert!(
                Instant::now() < deadline,
                "delivery never reached the expected state: {:#}",
                r.body
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Waits for a condition, polling; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Where cargo put the workspace's binaries (next to this test executable's `deps/`).
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`; the README test command does)",
        path.display()
    );
    path
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDINGS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The all-in-one server, in this process, on 127.0.0.1:0 with a fresh data directory.
pub struct TestServer {
    pub server: tidings_core::local::LocalServer,
    pub api: ApiClient,
    pub data_dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts with a fast retry schedule and `configure` applied on top.
    pub async fn start(
        configure: impl FnOnce(&mut tidings_core::local::LocalServerConfig),
    ) -> Self {
        init_tracing();
        let data_dir = tempfile::tempdir().expect("tempdir");
        let mut config = tidings_core::local::LocalServerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            data_dir.path().to_owned(),
        );
        config.schedule = "0s,200ms,200ms".parse().unwrap();
        config.sweep_interval = Duration::from_millis(200);
        config.sweep_grace = Duration::from_secs(2);
        config.request_timeout = Duration::from_secs(3);
        // Kernel seatbelt: connections bound to 127.0.0.1 cannot reach any other address.
        config.sender_local_address = Some(std::net::Ipv4Addr::LOCALHOST.into());
        configure(&mut config);
        let server = tidings_core::local::LocalServer::start(config)
            .await
            .expect("server starts");
        let api = ApiClient::new(format!("http://{}", server.addr), server.api_key.clone());
        Self {
            server,
            api,
            data_dir,
        }
    }
}

/// The real `tidings serve` binary, started on 127.0.0.1:0.
pub struct TidingsProcess {
    pub child: tokio::process::Child,
    pub api: ApiClient,
}

impl TidingsProcess {
    /// Starts `tidings serve --listen 127.0.0.1:0 --data-dir DIR ARGS…` and waits for its banner.
    pub async fn serve(data_dir: &Path, args: &[&str]) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new(binary_path("tidings"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("TIDINGS_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tidings");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let (mut base, mut key) = (None, None);
        let started = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.trim().strip_prefix("API:") {
                    base = Some(url.trim().to_owned());
                }
                if let Some(rest) = line.trim().strip_prefix("API key:") {
                    key = rest.split_whitespace().next().map(str::to_owned);
                }
                if base.is_some() && key.is_some() {
                    return;
                }
            }
        })
        .await;
        assert!(
            started.is_ok(),
            "tidings serve printed no banner within 30 s"
        );
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let api = ApiClient::new(
            base.expect("API line in banner"),
            key.expect("API key line in banner"),
        );
        Self { child, api }
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }
}
