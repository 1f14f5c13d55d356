//! The end-to-end harness: a recording webhook receiver, the all-in-one server on port 0 (in
//! process or as the real `tidings` binary), and an API client. Everything listens on 127.0.0.1.
//! [`aws_local`] is the local Lambda / API Gateway / SQS-trigger stand-in (`tidings-aws-local`).

// A test harness: a failed set-up or assertion is a failed test, said at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod aws_local;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::connect_info::{ConnectInfo, Connected};
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

/// Random faults a receiver answers with, by weight: each request draws one kind (or `healthy`,
/// which falls through to the script and the default).
#[derive(Debug, Clone)]
pub struct FaultMix {
    pub healthy: u32,
    /// `500 Internal Server Error`.
    pub http500: u32,
    /// `503 Service Unavailable`.
    pub http503: u32,
    /// `429 Too Many Requests` with `Retry-After: retry_after_secs`.
    pub http429: u32,
    /// Sleeps `slow_for` (set it past the sender's timeout), then answers 200 to no one.
    pub slow: u32,
    /// Reads the request, then resets the connection (SO_LINGER 0): no answer at all.
    pub reset: u32,
    pub retry_after_secs: u64,
    pub slow_for: Duration,
}

/// One kind of fault a receiver injected; `as_str` names it in figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    Http500,
    Http503,
    Http429,
    Slow,
    Reset,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http500 => "http500",
            Self::Http503 => "http503",
            Self::Http429 => "http429RetryAfter",
            Self::Slow => "slowPastTimeout",
            Self::Reset => "connectionReset",
        }
    }
}

impl FaultMix {
    fn draw(&self, rng: &mut impl rand::Rng) -> Option<Fault> {
        let weights = [
            (None, self.healthy),
            (Some(Fault::Http500), self.http500),
            (Some(Fault::Http503), self.http503),
            (Some(Fault::Http429), self.http429),
            (Some(Fault::Slow), self.slow),
            (Some(Fault::Reset), self.reset),
        ];
        let total: u32 = weights.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return None;
        }
        let mut pick = rng.random_range(0..total);
        for (fault, weight) in weights {
            if pick < weight {
                return fault;
            }
            pick -= weight;
        }
        None
    }

    fn reply(&self, fault: Fault) -> Reply {
        match fault {
            Fault::Http500 => Reply::status(500),
            Fault::Http503 => Reply::status(503),
            Fault::Http429 => {
                Reply::status(429).header("retry-after", self.retry_after_secs.to_string())
            }
            Fault::Slow => Reply {
                delay: self.slow_for,
                ..Reply::status(200)
            },
            Fault::Reset => Reply::status(200),
        }
    }
}

/// A message the receiver answered with a quick 2xx (a fault's late or cut answer does not count).
#[derive(Debug, Clone)]
pub struct Acknowledged {
    pub path: String,
    /// The delivered body's `eventId`.
    pub event_id: String,
    /// How many requests for this `webhook-id` got a quick 2xx.
    pub times: u32,
}

/// What a receiver counted, kept even when it does not keep the requests themselves.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub requests: u64,
    /// Requests whose signature did not verify with the secret given to `verify_with`
    /// (answered 401).
    pub invalid_signatures: u64,
    /// Requests for a `webhook-id` that had already been acknowledged: what a consumer dedupes.
    pub duplicates: u64,
    pub faults: BTreeMap<Fault, u64>,
    /// By `webhook-id`.
    pub acknowledged: HashMap<String, Acknowledged>,
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    /// Whether `received` grows; a long fault run keeps only the tally.
    keep: bool,
    script: VecDeque<Reply>,
    default: Option<Reply>,
    first_attempt: Option<Reply>,
    seen_ids: HashSet<String>,
    faults: Option<(FaultMix, rand::rngs::StdRng)>,
    /// The key of the subscription's `whsec_` secret, to check every request as a consumer would.
    secret_key: Option<Vec<u8>>,
    tally: Tally,
}

/// A connection the receiver can cut: once `reset` is set, its next read or write fails and the
/// socket is closed with SO_LINGER 0, so the client sees a TCP reset instead of an answer.
struct CuttableStream {
    inner: tokio::net::TcpStream,
    reset: Arc<AtomicBool>,
}

impl CuttableStream {
    fn cut(&self) -> Option<std::io::Error> {
        if !self.reset.load(Ordering::Relaxed) {
            return None;
        }
        let _ = self.inner.set_zero_linger();
        Some(std::io::ErrorKind::ConnectionReset.into())
    }
}

impl tokio::io::AsyncRead for CuttableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.cut() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CuttableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.cut() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.cut() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.cut() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.cut() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The receiver's listener: hands each connection a switch its handler can use to cut it.
struct CuttableListener(tokio::net::TcpListener);

/// A handler's way to cut the connection its request came on.
#[derive(Clone, Debug)]
struct ConnectionSwitch(Arc<AtomicBool>);

impl axum::serve::Listener for CuttableListener {
    type Io = CuttableStream;
    type Addr = ConnectionSwitch;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((inner, _)) => {
                    let reset = Arc::new(AtomicBool::new(false));
                    let switch = ConnectionSwitch(Arc::clone(&reset));
                    return (CuttableStream { inner, reset }, switch);
                }
                // Out of descriptors and the like: wait, as axum's own listener does.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(ConnectionSwitch(Arc::new(AtomicBool::new(false))))
    }
}

impl Connected<axum::serve::IncomingStream<'_, CuttableListener>> for ConnectionSwitch {
    fn connect_info(stream: axum::serve::IncomingStream<'_, CuttableListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// The Standard Webhooks check written out independently of `tidings_core::signing`: HMAC-SHA256
/// over `{id}.{timestamp}.{body}` with the secret's key, compared with every `v1,` signature in
/// the header, and a timestamp within five minutes of now.
fn signature_valid(key: &[u8], headers: &HeaderMap, body: &[u8]) -> bool {
    use base64::Engine as _;
    use hmac::Mac as _;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(timestamp), Some(signatures)) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    ) else {
        return false;
    };
    let Ok(sent_at) = timestamp.parse::<i64>() else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if (now - sent_at).abs() > 300 {
        return false;
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    signatures
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|s| s == expected)
}

#[derive(serde::Deserialize)]
struct DeliveredEventId {
    #[serde(rename = "eventId")]
    event_id: String,
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        Self::serve(listener)
    }

    fn serve(listener: tokio::net::TcpListener) -> Self {
        let state = Arc::new(Mutex::new(ReceiverState {
            keep: true,
            ..ReceiverState::default()
        }));
        let router = Router::new()
            .fallback(record)
            .with_state(Arc::clone(&state));
        let addr = listener.local_addr().expect("receiver addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(
                CuttableListener(listener),
                router.into_make_service_with_connect_info::<ConnectionSwitch>(),
            )
            .await;
        });
        Self {
            addr,
            state,
            _server: Arc::new(server),
        }
    }

    /// Stops keeping every request (the tally still counts): for runs of many thousands.
    pub fn keep_requests(&self, keep: bool) {
        self.state.lock().unwrap().keep = keep;
    }

    /// Checks every request's signature with this `whsec_` secret; a bad one is answered 401
    /// and counted in [`Tally::invalid_signatures`].
    pub fn verify_with(&self, secret: &str) {
        let secret = tidings_core::domain::Secret::parse(secret).expect("a whsec_ secret");
        self.state.lock().unwrap().secret_key = Some(secret.key().to_vec());
    }

    /// Answers with random faults drawn from `mix` (seeded, so a run can be repeated), or, with
    /// `None`, healthily again.
    pub fn inject_faults(&self, mix: Option<FaultMix>, seed: u64) {
        use rand::SeedableRng as _;
        self.state.lock().unwrap().faults =
            mix.map(|mix| (mix, rand::rngs::StdRng::seed_from_u64(seed)));
    }

    /// What the receiver counted so far.
    pub fn tally(&self) -> Tally {
        self.state.lock().unwrap().tally.clone()
    }

    /// Requests so far, cheaply (no copy of the tally).
    pub fn request_count(&self) -> u64 {
        self.state.lock().unwrap().tally.requests
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

/// A port on 127.0.0.1 where nothing listens yet (connections to it are refused), held so that no
/// other socket can take it meanwhile; [`ClosedPort::open`] starts a receiver on it.
pub struct ClosedPort {
    socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

impl ClosedPort {
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind("127.0.0.1:0".parse().unwrap())
            .expect("bind a closed port");
        let addr = socket.local_addr().expect("closed port addr");
        Self { socket, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts listening: a receiver as [`TestReceiver::start`] makes, on this port.
    pub fn open(self) -> TestReceiver {
        TestReceiver::serve(self.socket.listen(1024).expect("listen"))
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        Self::new()
    }
}

async fn record(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    ConnectInfo(connection): ConnectInfo<ConnectionSwitch>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (reply, fault) = {
        let mut guard = state.lock().unwrap();
        let s = &mut *guard;
        let webhook_id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        s.tally.requests += 1;
        let signed = s
            .secret_key
            .as_deref()
            .is_none_or(|key| signature_valid(key, &headers, &body));
        let first = s.seen_ids.insert(webhook_id.clone());
        let acknowledged_before = s.tally.acknowledged.contains_key(&webhook_id);
        if acknowledged_before {
            s.tally.duplicates += 1;
        }
        let fault = match &mut s.faults {
            Some((mix, rng)) if signed => mix.draw(rng).map(|f| (f, mix.reply(f))),
            _ => None,
        };
        let reply = if !signed {
            s.tally.invalid_signatures += 1;
            Reply::status(401).body("invalid signature")
        } else if let Some((kind, reply)) = &fault {
            *s.tally.faults.entry(*kind).or_default() += 1;
            reply.clone()
        } else {
            s.first_attempt
                .clone()
                .filter(|_| first)
                .or_else(|| s.script.pop_front())
                .or_else(|| s.default.clone())
                .unwrap_or_else(|| Reply::status(200))
        };
        let quick_success = signed
            && fault.is_none()
            && reply.delay.is_zero()
            && (200..300).contains(&reply.status);
        if quick_success && !webhook_id.is_empty() {
            let event_id = serde_json::from_slice::<DeliveredEventId>(&body)
                .map(|b| b.event_id)
                .unwrap_or_default();
            let path = uri.path().to_owned();
            s.tally
                .acknowledged
                .entry(webhook_id)
                .or_insert(Acknowledged {
                    path,
                    event_id,
                    times: 0,
                })
                .times += 1;
        }
        if s.keep {
            s.received.push(Received {
                path: uri.path().to_owned(),
                headers,
                body,
                at: Instant::now(),
            });
        }
        (reply, fault.map(|(f, _)| f))
    };
    if fault == Some(Fault::Reset) {
        // Whatever is answered now is never written: the connection is cut instead.
        connection.0.store(true, Ordering::Relaxed);
    }
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
        self.try_send(method, path, body, headers)
            .await
            .expect("API request")
    }

    /// As [`ApiClient::send`], but a request that got no complete answer (refused, reset,
    /// timed out: the server may have died) is an `Err` rather than a panic.
    pub async fn try_send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<ApiResponse, reqwest::Error> {
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
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(ApiResponse {
            status,
            headers,
            body,
        })
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

    /// Every delivery of the subscription, page by page (250 a page).
    pub async fn all_deliveries(&self, subscription_id: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/webhook-subscriptions/{subscription_id}/deliveries?limit=250");
            if let Some(cursor) = &cursor {
                path.push_str("&cursor=");
                path.push_str(cursor);
            }
            let r = self.get(&path).await;
            assert_eq!(r.status, 200, "deliveries: {:?}", r.body);
            all.extend(r.body["data"].as_array().cloned().unwrap_or_default());
            match r.body["nextCursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return all,
            }
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
        Self::serve_on("127.0.0.1:0", data_dir, args)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `tidings serve --listen LISTEN --data-dir DIR ARGS…` and waits for its banner; an
    /// `Err` says why it did not start (e.g. the port was taken).
    pub async fn serve_on(listen: &str, data_dir: &Path, args: &[&str]) -> Result<Self, String> {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new(binary_path("tidings"))
            .arg("serve")
            .args(["--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(args)
            // `TIDINGS_SERVE_LOG=info cargo test …` shows what the server did; it logs to stderr.
            .env(
                "TIDINGS_LOG",
                std::env::var("TIDINGS_SERVE_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
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
        let (Ok(()), Some(base), Some(key)) = (started, base, key) else {
            let _ = child.kill().await;
            return Err(format!(
                "tidings serve --listen {listen} printed no banner within 30 s (its stderr says why)"
            ));
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let api = ApiClient::new(base, key);
        Ok(Self { child, api })
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }
}
