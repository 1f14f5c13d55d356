//! The HTTP sender seam ([`HttpSender`]) and its reqwest backend ([`ReqwestSender`]).
//!
//! The backend enforces safe egress (see DESIGN.md): IP-literal hosts are checked before any
//! connection, and domain hosts are resolved by a hook inside reqwest's connector that hands it only
//! vetted addresses, so the address that was checked is the one dialled (no DNS rebinding).
//! Redirects are returned, not followed; bodies are read up to a cap; timeouts are bounded.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use url::{Host, Url};

use crate::egress::{EgressPolicy, EgressRefusal};

/// One delivery attempt: always a POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRequest {
    pub url: Url,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// Why no HTTP response came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportFailure {
    /// TCP or TLS connection failed (refused, unreachable, handshake error, name not found).
    Connect,
    /// The connect or total timeout elapsed.
    Timeout,
    /// The egress guard refused every address of the callback host.
    Refused,
    /// The URL cannot be sent to (unsupported scheme, no host).
    InvalidUrl,
    /// Anything else, e.g. a malformed response or an invalid header.
    Other,
}

impl fmt::Display for TransportFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Refused => "refused",
            Self::InvalidUrl => "invalid_url",
            Self::Other => "other",
        })
    }
}

/// The result of one attempt, as a value: a non-2xx status is an answer, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The receiver answered (any status).
    Response {
        status: u16,
        retry_after: Option<String>,
        body_snippet: String,
        latency: Duration,
    },
    /// No HTTP response: the failure kind and a human message (for the attempt log).
    Failed {
        failure: TransportFailure,
        message: String,
        latency: Duration,
    },
}

pub trait HttpSender: Send + Sync + 'static {
    fn send(&self, request: OutboundRequest) -> impl Future<Output = SendOutcome> + Send;
}

/// Resolves a host name to addresses; injectable so tests can map a name to any IP without DNS.
pub trait HostResolver: Send + Sync + 'static {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>>;
}

/// The operating system's resolver, through `tokio::net::lookup_host`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl HostResolver for SystemResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>> {
        // The future may only borrow `self`, so it owns its copy of the name.
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub connect_timeout: Duration,
    pub total_timeout: Duration,
    /// How much of the response body is kept for the snippet; the rest is never read.
    pub max_response_bytes: usize,
    pub user_agent: String,
    pub policy: EgressPolicy,
    /// Binds outgoing connections to this address. Tests set 127.0.0.1: the kernel then refuses
    /// (EINVAL) any connection to a non-loopback address, so even a broken guard sends no packet.
    pub local_address: Option<IpAddr>,
}

impl Default for SenderConfig {
    /// Production-safe: strict egress policy.
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(15),
            max_response_bytes: 4096,
            user_agent: concat!("Tidings/", env!("CARGO_PKG_VERSION")).to_owned(),
            policy: EgressPolicy::strict(),
            local_address: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SenderBuildError {
    #[error("could not build the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// [`HttpSender`] over one pooled reqwest client. Cheap to clone.
#[derive(Clone)]
pub struct ReqwestSender {
    client: reqwest::Client,
    guard: Arc<GuardedResolver>,
    max_response_bytes: usize,
    timeouts: Timeouts,
}

/// Kept to say which limit a timeout hit.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    connect: Duration,
    total: Duration,
}

impl fmt::Debug for ReqwestSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReqwestSender")
            .field("policy", &self.guard.policy)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl ReqwestSender {
    pub fn new(config: SenderConfig) -> Result<Self, SenderBuildError> {
        Self::with_resolver(config, Arc::new(SystemResolver))
    }

    pub fn with_resolver(
        config: SenderConfig,
        resolver: Arc<dyn HostResolver>,
    ) -> Result<Self, SenderBuildError> {
        install_crypto_provider();
        let guard = Arc::new(GuardedResolver {
            resolver,
            policy: Arc::new(config.policy),
        });
        let client = reqwest::Client::builder()
            // Env proxies would connect somewhere other than the vetted address.
            .no_proxy()
            .local_address(config.local_address)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .timeout(config.total_timeout)
            .user_agent(config.user_agent)
            .tls_backend_rustls()
            .dns_resolver(Arc::clone(&guard))
            .build()
            .map_err(SenderBuildError::Client)?;
        Ok(Self {
            client,
            guard,
            max_response_bytes: config.max_response_bytes,
            timeouts: Timeouts {
                connect: config.connect_timeout,
                total: config.total_timeout,
            },
        })
    }

    /// Refuses what can be refused without a connection: bad schemes and IP-literal hosts, which
    /// reqwest connects to without consulting the resolver hook. An IPv4-mapped IPv6 literal
    /// (`[::ffff:a.b.c.d]`) is rewritten to the IPv4 address it names: that is the address the
    /// guard vetted, and the one dialled.
    fn precheck(&self, url: &mut Url) -> Result<(), (TransportFailure, String)> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err((
                TransportFailure::InvalidUrl,
                format!("scheme `{}` is not supported", url.scheme()),
            ));
        }
        let ip = match url.host() {
            None => {
                return Err((TransportFailure::InvalidUrl, "URL has no host".to_owned()));
            }
            Some(Host::Domain(_)) => return Ok(()),
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        };
        self.guard
            .policy
            .check(ip)
            .map_err(|refusal| (TransportFailure::Refused, refusal.to_string()))?;
        if let IpAddr::V6(v6) = ip
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            url.set_ip_host(IpAddr::V4(v4)).map_err(|()| {
                (
                    TransportFailure::InvalidUrl,
                    "cannot rewrite mapped address".to_owned(),
                )
            })?;
        }
        Ok(())
    }

    /// Reads at most `max_response_bytes` of the body and stops; a body error keeps what arrived.
    async fn read_snippet(&self, response: &mut reqwest::Response) -> String {
        let max = self.max_response_bytes;
        let mut buf = Vec::with_capacity(max.min(64 * 1024));
        while buf.len() < max {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let take = chunk.len().min(max - buf.len());
                    buf.extend_from_slice(&chunk[..take]);
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::debug!(error = %error_chain(&err), "response body read stopped early");
                    break;
                }
            }
        }
        // Stopping at the cap may have cut a character.
        snippet(&buf, buf.len() == max)
    }
}

impl HttpSender for ReqwestSender {
    #[tracing::instrument(skip_all, fields(host = request.url.host_str()))]
    async fn send(&self, mut request: OutboundRequest) -> SendOutcome {
        let started = Instant::now();
        let failed = |(failure, message): (TransportFailure, String)| SendOutcome::Failed {
            failure,
            message,
            latency: started.elapsed(),
        };
        if let Err(refused) = self.precheck(&mut request.url) {
            return failed(refused);
        }
        let headers = match header_map(&request.headers) {
            Ok(headers) => headers,
            Err(message) => return failed((TransportFailure::Other, message)),
        };
        let result = self
            .client
            .post(request.url)
            .headers(headers)
            .body(request.body)
            .send()
            .await;
        match result {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
                let body_snippet = self.read_snippet(&mut response).await;
                SendOutcome::Response {
                    status,
                    retry_after,
                    body_snippet,
                    latency: started.elapsed(),
                }
            }
            Err(err) => failed(describe(&err, self.timeouts)),
        }
    }
}

fn header_map(headers: &[(String, String)]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let name = HeaderName::try_from(name.as_str())
            .map_err(|_| format!("invalid header name `{name}`"))?;
        let value = HeaderValue::try_from(value.as_str())
            .map_err(|_| format!("invalid value for header `{name}`"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Lossy UTF-8; when the cap cut a character in two, the fragment is dropped rather than shown as
/// U+FFFD.
fn snippet(bytes: &[u8], truncated: bool) -> String {
    let end = match std::str::from_utf8(bytes) {
        Err(err) if truncated && err.error_len().is_none() => err.valid_up_to(),
        _ => bytes.len(),
    };
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Maps a reqwest error to a failure kind and a short message without the URL (reqwest's own
/// top-level message repeats it).
fn describe(err: &reqwest::Error, timeouts: Timeouts) -> (TransportFailure, String) {
    if let Some(refused) = find_source::<ResolvedRefusal>(err) {
        return (TransportFailure::Refused, refused.to_string());
    }
    let (failure, what) = if err.is_timeout() && err.is_connect() {
        let what = format!("connect timed out after {:?}", timeouts.connect);
        (TransportFailure::Timeout, what)
    } else if err.is_timeout() {
        let what = format!("timed out after {:?}", timeouts.total);
        (TransportFailure::Timeout, what)
    } else if err.is_connect() {
        (TransportFailure::Connect, "could not connect".to_owned())
    } else if err.is_builder() {
        (TransportFailure::InvalidUrl, "invalid request".to_owned())
    } else {
        (TransportFailure::Other, "request failed".to_owned())
    };
    let causes: Vec<String> = causes(err)
        .into_iter()
        // hyper's "client error (Connect)" wrapper and "operation timed out" add nothing here.
        .filter(|cause| !cause.starts_with("client error (") && !cause.contains("timed out"))
        .collect();
    let message = if causes.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {}", causes.join(": "))
    };
    (failure, message)
}

fn find_source<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The causes below the top-level error, skipping repeats.
fn causes(err: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut parts: Vec<String> = Vec::new();
    let mut current = err.source();
    while let Some(e) = current {
        let text = e.to_string();
        // Wrappers often end with their cause's text; keep only the new information.
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    std::iter::once(err.to_string())
        .chain(causes(err))
        .collect::<Vec<_>>()
        .join(": ")
}

/// Every address of a resolved host was refused; found in reqwest's error source chain to report
/// [`TransportFailure::Refused`]. What it says goes into the attempt log a tenant reads: the kind
/// of address, never the address (the service must not tell what an internal name resolves to);
/// the address is in the service's own log.
#[derive(Debug, thiserror::Error)]
#[error(
    "callback host {host} resolves to an address that is {} and not in the allow-list",
    refusal.class
)]
struct ResolvedRefusal {
    host: String,
    refusal: EgressRefusal,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// reqwest's resolver hook: resolves with the injected [`HostResolver`] and returns only the
/// addresses the policy allows, so the connector can dial nothing else.
#[derive(Clone)]
struct GuardedResolver {
    resolver: Arc<dyn HostResolver>,
    policy: Arc<EgressPolicy>,
}

impl GuardedResolver {
    async fn vetted(&self, host: &str) -> Result<Vec<SocketAddr>, BoxError> {
        // Port 0: the connector substitutes the URL's port.
        let resolved = self.resolver.resolve(host, 0).await?;
        let mut vetted = Vec::with_capacity(resolved.len());
        let mut first_refusal = None;
        for mut addr in resolved {
            match self.policy.check(addr.ip()) {
                Ok(()) => {
                    // A resolver must not pick the port either.
                    addr.set_port(0);
                    vetted.push(addr);
                }
                Err(refusal) => {
                    tracing::debug!(host, %refusal, "dropping refused address");
                    first_refusal.get_or_insert(refusal);
                }
            }
        }
        match (vetted.is_empty(), first_refusal) {
            (false, _) => Ok(vetted),
            (true, Some(refusal)) => {
                tracing::warn!(host, %refusal, "callback host refused by the egress guard");
                Err(Box::new(ResolvedRefusal {
                    host: host.to_owned(),
                    refusal,
                }))
            }
            (true, None) => Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host} has no addresses"),
            ))),
        }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        // The future must be 'static, so it owns its handles.
        let guard = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = guard.vetted(&host).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// reqwest's `rustls-no-provider` needs a process-wide default; ring is the one we link.
pub fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err means another part of the process installed one first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    //! Every socket here is on 127.0.0.1 or [::1]. Names that resolve elsewhere are checked
    //! against the guard before a request is made, so a broken guard fails the test instead of
    //! dialling out.

    use super::*;
    use std::collections::HashMap;
    use std::net::Ipv4Addr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// How the receiver answers one request path.
    #[derive(Clone)]
    struct Reply {
        head: String,
        body: Vec<u8>,
        delay: Duration,
    }

    fn reply(status: &str, extra_headers: &str, body: impl Into<Vec<u8>>) -> Reply {
        let body = body.into();
        Reply {
            head: format!(
                "HTTP/1.1 {status}\r\n{extra_headers}content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            ),
            body,
            delay: Duration::ZERO,
        }
    }

    #[derive(Debug, Clone)]
    struct Received {
        method: String,
        path: String,
        headers: HashMap<String, String>,
        body: Vec<u8>,
    }

    /// A hand-written HTTP/1.1 receiver that counts connections and records requests.
    struct Receiver {
        addr: SocketAddr,
        accepts: Arc<AtomicUsize>,
        requests: Arc<Mutex<Vec<Received>>>,
    }

    impl Receiver {
        async fn start(routes: Vec<(&str, Reply)>) -> Self {
            Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), routes)
        }

        fn start_on(listener: TcpListener, routes: Vec<(&str, Reply)>) -> Self {
            let addr = listener.local_addr().unwrap();
            let routes: Arc<HashMap<String, Reply>> = Arc::new(
                routes
                    .into_iter()
                    .map(|(path, reply)| (path.to_owned(), reply))
                    .collect(),
            );
            let accepts = Arc::new(AtomicUsize::new(0));
            let requests = Arc::new(Mutex::new(Vec::new()));
            let (accepts_, requests_) = (Arc::clone(&accepts), Arc::clone(&requests));
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    accepts_.fetch_add(1, Ordering::SeqCst);
                    let (routes, requests) = (Arc::clone(&routes), Arc::clone(&requests_));
                    tokio::spawn(async move {
                        let Some(received) = read_request(&mut stream).await else {
                            return;
                        };
                        let reply = routes
                            .get(&received.path)
                            .cloned()
                            .unwrap_or_else(|| reply("404 Not Found", "", ""));
                        requests.lock().unwrap().push(received);
                        tokio::time::sleep(reply.delay).await;
                        // The sender may hang up after its snippet; write errors are expected.
                        let _ = stream.write_all(reply.head.as_bytes()).await;
                        let _ = stream.write_all(&reply.body).await;
                        let _ = stream.shutdown().await;
                    });
                }
            });
            Self {
                addr,
                accepts,
                requests,
            }
        }

        fn port(&self) -> u16 {
            self.addr.port()
        }

        fn accepts(&self) -> usize {
            self.accepts.load(Ordering::SeqCst)
        }

        fn hits(&self, path: &str) -> usize {
            let requests = self.requests.lock().unwrap();
            requests.iter().filter(|r| r.path == path).count()
        }

        fn requests(&self) -> Vec<Received> {
            self.requests.lock().unwrap().clone()
        }
    }

    async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Received> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next()?.split(' ');
        let method = request_line.next()?.to_owned();
        let path = request_line.next()?.to_owned();
        let headers: HashMap<String, String> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end..].to_vec();
        while body.len() < length {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Some(Received {
            method,
            path,
            headers,
            body,
        })
    }

    /// Maps names to fixed addresses and counts lookups; no DNS.
    struct StaticResolver {
        names: HashMap<String, Vec<IpAddr>>,
        lookups: AtomicUsize,
    }

    impl StaticResolver {
        fn new(names: &[(&str, &[IpAddr])]) -> Arc<Self> {
            Arc::new(Self {
                names: names
                    .iter()
                    .map(|(name, ips)| (name.to_string(), ips.to_vec()))
                    .collect(),
                lookups: AtomicUsize::new(0),
            })
        }
    }

    impl HostResolver for StaticResolver {
        fn resolve(
            &self,
            host: &str,
            port: u16,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            let found = self.names.get(host).map(|ips| {
                ips.iter()
                    .map(|ip| SocketAddr::new(*ip, port))
                    .collect::<Vec<_>>()
            });
            Box::pin(async move {
                found.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "unknown"))
            })
        }
    }

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const METADATA: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));

    fn config(policy: EgressPolicy) -> SenderConfig {
        SenderConfig {
            connect_timeout: Duration::from_secs(2),
            total_timeout: Duration::from_secs(5),
            max_response_bytes: 4096,
            user_agent: "Tidings-test/1".to_owned(),
            policy,
            // Kernel seatbelt: a socket bound to 127.0.0.1 cannot reach any other address.
            local_address: Some(LOOPBACK),
        }
    }

    fn sender(policy: EgressPolicy) -> ReqwestSender {
        ReqwestSender::new(config(policy)).unwrap()
    }

    fn post(url: &str) -> OutboundRequest {
        OutboundRequest {
            url: Url::parse(url).unwrap(),
            headers: vec![
                ("content-type".to_owned(), "application/json".to_owned()),
                ("webhook-id".to_owned(), "msg_1".to_owned()),
            ],
            body: Bytes::from_static(br#"{"hello":"world"}"#),
        }
    }

    #[track_caller]
    fn expect_response(outcome: SendOutcome) -> (u16, Option<String>, String) {
        match outcome {
            SendOutcome::Response {
                status,
                retry_after,
                body_snippet,
                ..
            } => (status, retry_after, body_snippet),
            other => panic!("expected a response, got {other:?}"),
        }
    }

    #[track_caller]
    fn expect_failure(outcome: SendOutcome, want: TransportFailure) -> String {
        match outcome {
            SendOutcome::Failed {
                failure, message, ..
            } if failure == want => message,
            other => panic!("expected {want:?}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn posts_body_and_headers_and_returns_the_answer() {
        let receiver = Receiver::start(vec![("/hook", reply("200 OK", "", "thanks"))]).await;
        let sender = sender(EgressPolicy::local_development());
        let url = format!("http://127.0.0.1:{}/hook", receiver.port());

        let (status, retry_after, snippet) = expect_response(sender.send(post(&url)).await);

        assert_eq!(
            (status, retry_after, snippet.as_str()),
            (200, None, "thanks")
        );
        let requests = receiver.requests();
        assert_eq!(requests.len(), 1);
        let got = &requests[0];
        assert_eq!(got.method, "POST");
        assert_eq!(got.body, br#"{"hello":"world"}"#);
        assert_eq!(got.headers["content-type"], "application/json");
        assert_eq!(got.headers["webhook-id"], "msg_1");
        assert_eq!(got.headers["user-agent"], "Tidings-test/1");
    }

    #[tokio::test]
    async fn body_snippet_is_capped() {
        let big = "x".repeat(2 * 1024 * 1024);
        let receiver = Receiver::start(vec![("/big", reply("200 OK", "", big))]).await;
        let sender = ReqwestSender::new(SenderConfig {
            max_response_bytes: 100,
            ..config(EgressPolicy::local_development())
        })
        .unwrap();
        let url = format!("http://127.0.0.1:{}/big", receiver.port());

        let (status, _, snippet) = expect_response(sender.send(post(&url)).await);

        assert_eq!(status, 200);
        assert_eq!(snippet, "x".repeat(100));
    }

    #[tokio::test]
    async fn captures_status_and_raw_retry_after() {
        let receiver = Receiver::start(vec![(
            "/busy",
            reply("503 Service Unavailable", "retry-after: 120\r\n", "later"),
        )])
        .await;
        let sender = sender(EgressPolicy::local_development());
        let url = format!("http://127.0.0.1:{}/busy", receiver.port());

        let (status, retry_after, snippet) = expect_response(sender.send(post(&url)).await);

        assert_eq!(status, 503);
        assert_eq!(retry_after.as_deref(), Some("120"));
        assert_eq!(snippet, "later");
    }

    #[tokio::test]
    async fn redirects_are_returned_not_followed() {
        let receiver = Receiver::start(vec![
            ("/moved", reply("302 Found", "location: /target\r\n", "")),
            ("/target", reply("200 OK", "", "followed")),
        ])
        .await;
        let sender = sender(EgressPolicy::local_development());
        let url = format!("http://127.0.0.1:{}/moved", receiver.port());

        let (status, _, _) = expect_response(sender.send(post(&url)).await);

        assert_eq!(status, 302);
        assert_eq!(receiver.hits("/moved"), 1);
        assert_eq!(receiver.hits("/target"), 0);
    }

    #[tokio::test]
    async fn loopback_is_refused_under_strict_policy_before_connecting() {
        let receiver = Receiver::start(vec![("/", reply("200 OK", "", "reached"))]).await;
        // A listener on [::1] when the host has IPv6, so a broken guard would show as an accept.
        let v6 = match TcpListener::bind("[::1]:0").await {
            Ok(listener) => Some(Receiver::start_on(listener, vec![])),
            Err(_) => None,
        };
        let v6_port = v6.as_ref().map_or(receiver.port(), Receiver::port);
        let sender = sender(EgressPolicy::strict());
        let port = receiver.port();

        for url in [
            format!("http://127.0.0.1:{port}/"),
            format!("http://127.1:{port}/"),
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            format!("http://localhost:{port}/"),
            format!("http://[::1]:{v6_port}/"),
        ] {
            let message = expect_failure(sender.send(post(&url)).await, TransportFailure::Refused);
            assert!(
                message.contains("is loopback and not in the allow-list"),
                "{url}: {message}"
            );
        }

        assert_eq!(receiver.accepts(), 0);
        assert_eq!(v6.map_or(0, |r| r.accepts()), 0);
    }

    #[tokio::test]
    async fn loopback_is_allowed_under_local_development() {
        let receiver = Receiver::start(vec![("/", reply("204 No Content", "", ""))]).await;
        let sender = sender(EgressPolicy::local_development());
        let port = receiver.port();

        for url in [
            format!("http://127.0.0.1:{port}/"),
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            format!("http://localhost:{port}/"),
        ] {
            let (status, _, _) = expect_response(sender.send(post(&url)).await);
            assert_eq!(status, 204, "{url}");
        }
        assert_eq!(receiver.hits("/"), 3);
    }

    #[tokio::test]
    async fn a_name_is_connected_to_the_vetted_address_only() {
        let receiver = Receiver::start(vec![("/", reply("200 OK", "", "ok"))]).await;
        let resolver = StaticResolver::new(&[("receiver.test", &[LOOPBACK])]);
        let strict =
            ReqwestSender::with_resolver(config(EgressPolicy::strict()), resolver.clone()).unwrap();
        let local = ReqwestSender::with_resolver(
            config(EgressPolicy::local_development()),
            resolver.clone(),
        )
        .unwrap();
        let url = format!("http://receiver.test:{}/", receiver.port());

        let message = expect_failure(strict.send(post(&url)).await, TransportFailure::Refused);
        assert_eq!(
            message,
            "callback host receiver.test resolves to an address that is loopback and not in the \
             allow-list"
        );
        assert!(
            !message.contains("127.0.0.1"),
            "no resolved address for the tenant"
        );
        assert_eq!(receiver.accepts(), 0);

        let (status, _, _) = expect_response(local.send(post(&url)).await);
        assert_eq!(status, 200);
        assert_eq!(receiver.accepts(), 1);
        assert_eq!(resolver.lookups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_name_resolving_to_metadata_is_refused() {
        assert!(EgressPolicy::strict().check(METADATA).is_err());
        let resolver = StaticResolver::new(&[("metadata.test", &[METADATA])]);
        let sender =
            ReqwestSender::with_resolver(config(EgressPolicy::strict()), resolver.clone()).unwrap();
        // The sender's own hook must refuse before reqwest is allowed anywhere near the address.
        assert!(sender.guard.vetted("metadata.test").await.is_err());

        let outcome = sender.send(post("http://metadata.test:9/latest")).await;

        let message = expect_failure(outcome, TransportFailure::Refused);
        assert!(
            message.contains("is a cloud metadata endpoint"),
            "{message}"
        );
        assert!(
            !message.contains("169.254"),
            "no resolved address for the tenant"
        );
        assert_eq!(resolver.lookups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_guard_drops_refused_addresses_and_the_resolvers_port() {
        let resolver =
            StaticResolver::new(&[("mixed.test", &[METADATA, LOOPBACK]), ("nothing.test", &[])]);
        let guard = GuardedResolver {
            resolver,
            policy: Arc::new(EgressPolicy::local_development()),
        };

        assert_eq!(
            guard.vetted("mixed.test").await.unwrap(),
            vec![SocketAddr::new(LOOPBACK, 0)]
        );
        let err = guard.vetted("nothing.test").await.unwrap_err();
        assert!(err.to_string().contains("no addresses"), "{err}");
        assert!(guard.vetted("unknown.test").await.is_err());
    }

    #[tokio::test]
    async fn a_slow_receiver_times_out() {
        let mut slow = reply("200 OK", "", "too late");
        slow.delay = Duration::from_secs(3);
        let receiver = Receiver::start(vec![("/slow", slow)]).await;
        let sender = ReqwestSender::new(SenderConfig {
            total_timeout: Duration::from_millis(300),
            ..config(EgressPolicy::local_development())
        })
        .unwrap();
        let url = format!("http://127.0.0.1:{}/slow", receiver.port());

        let outcome = sender.send(post(&url)).await;

        let SendOutcome::Failed { latency, .. } = &outcome else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert!(*latency < Duration::from_secs(2), "{latency:?}");
        let message = expect_failure(outcome, TransportFailure::Timeout);
        assert_eq!(message, "timed out after 300ms");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_failure() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap().port()
        };
        let sender = sender(EgressPolicy::local_development());

        let outcome = sender
            .send(post(&format!("http://127.0.0.1:{port}/")))
            .await;

        let message = expect_failure(outcome, TransportFailure::Connect);
        assert!(message.starts_with("could not connect"), "{message}");
    }

    #[tokio::test]
    async fn unusable_requests_fail_without_a_connection() {
        let sender = sender(EgressPolicy::local_development());

        let message = expect_failure(
            sender.send(post("ftp://127.0.0.1/")).await,
            TransportFailure::InvalidUrl,
        );
        assert_eq!(message, "scheme `ftp` is not supported");

        let mut bad_header = post("http://127.0.0.1:9/");
        bad_header
            .headers
            .push(("bad header".to_owned(), "x".to_owned()));
        let message = expect_failure(sender.send(bad_header).await, TransportFailure::Other);
        assert_eq!(message, "invalid header name `bad header`");
    }

    #[test]
    fn snippet_drops_a_character_cut_by_the_cap() {
        let text = "héllo".as_bytes();
        assert_eq!(snippet(&text[..2], true), "h");
        assert_eq!(snippet(&text[..2], false), "h\u{fffd}");
        assert_eq!(snippet(text, true), "héllo");
        assert_eq!(snippet(b"\xff ok", true), "\u{fffd} ok");
    }
}
