//! `tidings bench`: the end-to-end benchmark, as a user runs it.
//!
//! Starts `tidings serve` as a child process (this same executable) on 127.0.0.1:0 with a fresh
//! data directory, so its peak RSS and CPU time are the server's alone; starts a receiver in this
//! process that verifies every Standard Webhooks signature; subscribes it; publishes events through
//! the HTTP API and measures publish→arrival. The baseline is the same client POSTing the same
//! bodies straight to the same receiver at the same concurrency. One JSON line goes to stdout,
//! progress to stderr.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use tidings_core::domain::{Secret, Timestamp};
use tidings_core::signing;
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::Semaphore;

/// The burst's concurrency when `--concurrency` is not given.
const BURST_CONCURRENCY: usize = 32;
/// The fixed-rate mode's cap on requests in flight when `--concurrency` is not given: enough
/// that the client keeps the rate even when the server answers slowly.
const STEADY_CONCURRENCY: usize = 256;
/// How long a single request (publish or baseline POST) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may take to print its banner.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After the last arrival: how long to keep listening for late duplicates.
const SETTLE: Duration = Duration::from_millis(500);
/// Linux reports process CPU time in clock ticks of 1/100 s (USER_HZ) on every architecture.
const USER_HZ: f64 = 100.0;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Events to publish in a burst.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Requests in flight at once (default 32; with --rate, a cap, default 256).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Fixed-rate mode: publish this many events per second for --duration instead of a burst.
    #[arg(long, requires = "duration", conflicts_with = "events")]
    rate: Option<u32>,
    /// How long the fixed-rate mode publishes, e.g. `20s`.
    #[arg(long, requires = "rate", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// The server's delivery workers (`serve --workers`).
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// When the baseline runs: before Tidings, after it, or not at all.
    #[arg(long, value_enum, default_value_t = BaselineRun::First)]
    baseline: BaselineRun,
    /// How long to wait for deliveries after the last publish; later ones count as lost.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The server's log filter (`TIDINGS_LOG`; `info` as in production). The log goes to a file
    /// in the bench's temporary directory; its tail is shown when something went wrong.
    #[arg(long, default_value = "info")]
    server_log: String,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum BaselineRun {
    First,
    Last,
    Skipped,
}

/// How the events are sent: all at once with a fixed concurrency, or at a fixed rate.
#[derive(Clone, Copy)]
enum Load {
    Burst { concurrency: usize },
    Steady { rate: f64, max_in_flight: usize },
}

impl Load {
    fn concurrency(self) -> usize {
        match self {
            Self::Burst { concurrency } => concurrency,
            Self::Steady { max_in_flight, .. } => max_in_flight,
        }
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (load, events) = match (args.rate, args.duration) {
        (Some(rate), Some(duration)) => {
            anyhow::ensure!(rate > 0, "--rate must be positive");
            let events = (f64::from(rate) * duration.as_secs_f64()).round() as usize;
            let max_in_flight = args.concurrency.unwrap_or(STEADY_CONCURRENCY);
            (
                Load::Steady {
                    rate: f64::from(rate),
                    max_in_flight,
                },
                events,
            )
        }
        _ => {
            let concurrency = args.concurrency.unwrap_or(BURST_CONCURRENCY);
            (Load::Burst { concurrency }, args.events)
        }
    };
    anyhow::ensure!(
        events > 0,
        "nothing to publish: give --events or --rate and --duration"
    );
    anyhow::ensure!(load.concurrency() > 0, "--concurrency must be positive");

    let root = tempfile::Builder::new()
        .prefix("tidings-bench-")
        .tempdir()
        .context("creating the bench's temporary directory")?;
    let epoch = Instant::now();
    let secret = Secret::generate();
    let bodies: Arc<Vec<Bytes>> = Arc::new((0..events).map(event_body).collect());

    // The receiver: one server, one handler, a recorder per path.
    let tidings_rec = Arc::new(Recorder::new(epoch, secret.key().to_vec(), events));
    let baseline_rec = Arc::new(Recorder::new(epoch, secret.key().to_vec(), events));
    let router = Router::new()
        .route("/hooks", post(receive).with_state(Arc::clone(&tidings_rec)))
        .route(
            "/baseline",
            post(receive).with_state(Arc::clone(&baseline_rec)),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the receiver")?;
    let receiver_addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            eprintln!("bench: receiver stopped: {e}");
        }
    });

    tidings_core::sender::install_crypto_provider();
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")?;

    let api_key = format!("tdk_bench_{}", tidings_core::app::random_secret_text());
    let mut server = ServerChild::start(
        &root.path().join("data"),
        root.path().join("server.log"),
        &api_key,
        args.workers,
        &args.server_log,
    )
    .await?;
    let server_idle_rss_kb = server.status_kb("VmRSS");
    eprintln!(
        "bench: server pid {} at {} (workers {}), receiver at http://{receiver_addr}",
        server.pid, server.base, args.workers
    );

    let subscription = client
        .post(format!("{}/webhook-subscriptions", server.base))
        .bearer_auth(&api_key)
        .header("content-type", "application/json")
        .body(
            serde_json::json!({
                "eventTypes": ["bench.*"],
                "callbackUrl": format!("http://{receiver_addr}/hooks"),
                "secret": secret.expose(),
                "description": "tidings bench",
            })
            .to_string(),
        )
        .send()
        .await
        .context("subscribing the receiver")?;
    if subscription.status() != reqwest::StatusCode::CREATED {
        let status = subscription.status();
        let body = subscription.text().await.unwrap_or_default();
        bail!("subscribing the receiver: {status} {body}");
    }

    let baseline_phase = || {
        let signed = Arc::new(sign_all(&secret, &bodies));
        let bodies = Arc::clone(&bodies);
        let client = client.clone();
        let url = format!("http://{receiver_addr}/baseline");
        let make: MakeRequest = Arc::new(move |seq| {
            let (id, timestamp, signature) = &signed[seq];
            client
                .post(&url)
                .header("content-type", "application/json")
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp)
                .header("webhook-signature", signature)
                .body(bodies[seq].clone())
        });
        Phase::new(
            "baseline",
            epoch,
            make,
            reqwest::StatusCode::NO_CONTENT,
            events,
        )
    };

    let mut baseline = None;
    if args.baseline == BaselineRun::First {
        let phase = baseline_phase();
        baseline = Some(run_phase(&phase, &baseline_rec, load, args.timeout, None).await?);
    }

    let tidings_phase = {
        let bodies = Arc::clone(&bodies);
        let client = client.clone();
        let url = format!("{}/events", server.base);
        let key = api_key.clone();
        let make: MakeRequest = Arc::new(move |seq| {
            client
                .post(&url)
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(bodies[seq].clone())
        });
        Phase::new(
            "tidings",
            epoch,
            make,
            reqwest::StatusCode::ACCEPTED,
            events,
        )
    };
    let server_cpu_before = server.cpu_seconds();
    let tidings = run_phase(
        &tidings_phase,
        &tidings_rec,
        load,
        args.timeout,
        Some(&mut server),
    )
    .await?;
    let server_cpu_s = server.cpu_seconds() - server_cpu_before;

    if args.baseline == BaselineRun::Last {
        let phase = baseline_phase();
        baseline = Some(run_phase(&phase, &baseline_rec, load, args.timeout, None).await?);
    }

    let server_peak_rss_kb = server.status_kb("VmHWM");
    let server_alive = server.alive();
    server.stop().await;
    receiver.abort();
    if tidings.lost > 0 || tidings.publish_errors > 0 || !server_alive {
        server.show_log_tail(20);
    }

    let ratio = baseline
        .as_ref()
        .filter(|b| b.delivery_rate > 0.0)
        .map(|b| round(tidings.delivery_rate / b.delivery_rate, 3));
    let report = Report {
        mode: match load {
            Load::Burst { .. } => "burst",
            Load::Steady { .. } => "steady",
        },
        events,
        concurrency: load.concurrency(),
        target_rate: args.rate,
        duration_s: args.duration.map(|d| d.as_secs_f64()),
        workers: args.workers,
        accepted: tidings.accepted,
        publish_errors: tidings.publish_errors,
        publish_rate: round(tidings.publish_rate, 1),
        delivery_rate: round(tidings.delivery_rate, 1),
        latency_ms: tidings.latency_ms,
        duplicates: tidings.duplicates,
        invalid_signatures: tidings.invalid_signatures,
        lost: tidings.lost,
        max_send_lag_ms: tidings.max_send_lag_ms,
        peak_in_flight: tidings.peak_in_flight,
        server_peak_rss_mb: server_peak_rss_kb.map(|kb| round(kb as f64 / 1024.0, 1)),
        server_idle_rss_mb: server_idle_rss_kb.map(|kb| round(kb as f64 / 1024.0, 1)),
        server_cpu_s: round(server_cpu_s, 2),
        bench_cpu_s: round(tidings.bench_cpu_s, 2),
        baseline_run: args.baseline,
        baseline_rate: baseline.as_ref().map(|b| round(b.delivery_rate, 1)),
        baseline_latency_ms: baseline.as_ref().and_then(|b| b.latency_ms),
        baseline_lost: baseline.as_ref().map(|b| b.lost + b.publish_errors),
        baseline_bench_cpu_s: baseline.as_ref().map(|b| round(b.bench_cpu_s, 2)),
        ratio_to_baseline: ratio,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    mode: &'static str,
    events: usize,
    concurrency: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_rate: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_s: Option<f64>,
    workers: usize,
    accepted: usize,
    publish_errors: usize,
    /// Accepted events per second, first publish to last `202`.
    publish_rate: f64,
    /// Arrived events per second, first publish to last arrival.
    delivery_rate: f64,
    latency_ms: Option<Percentiles>,
    duplicates: usize,
    invalid_signatures: usize,
    lost: usize,
    /// Fixed-rate mode: the worst lag of a send behind its schedule (the client keeping up).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_send_lag_ms: Option<f64>,
    peak_in_flight: usize,
    server_peak_rss_mb: Option<f64>,
    server_idle_rss_mb: Option<f64>,
    /// The server's CPU time (user + system) during the Tidings phase.
    server_cpu_s: f64,
    /// This process's (client and receiver) CPU time during the Tidings phase.
    bench_cpu_s: f64,
    baseline_run: BaselineRun,
    baseline_rate: Option<f64>,
    baseline_latency_ms: Option<Percentiles>,
    baseline_lost: Option<usize>,
    baseline_bench_cpu_s: Option<f64>,
    ratio_to_baseline: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

/// A representative order event (about 250 bytes); `data.seq` tells the receiver which one it is.
fn event_body(seq: usize) -> Bytes {
    Bytes::from(format!(
        concat!(
            r#"{{"eventType":"bench.order.created","data":{{"seq":{seq},"orderId":"ord_{seq:08}","#,
            r#""amountCents":4200,"currency":"EUR","customer":{{"id":"cus_0001","email":"ada@example.com"}},"#,
            r#""lines":[{{"sku":"BK-1","qty":1,"priceCents":1200}},{{"sku":"PN-2","qty":3,"priceCents":1000}}]}}}}"#
        ),
        seq = seq
    ))
}

/// The baseline's webhook headers, signed before the clock starts: (id, timestamp, signature).
fn sign_all(secret: &Secret, bodies: &[Bytes]) -> Vec<(String, String, String)> {
    let now = Timestamp::now().unix_seconds();
    bodies
        .iter()
        .enumerate()
        .map(|(seq, body)| {
            let id = format!("bench_{seq}");
            let signature = signing::sign(secret.key(), &id, now, body);
            (id, now.to_string(), signature)
        })
        .collect()
}

/// Nanoseconds since `epoch`, plus one so that zero can mean "not yet".
fn stamp(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64 + 1
}

// ---------------------------------------------------------------------------------------------
// The receiver

/// What one receiver path saw.
struct Recorder {
    epoch: Instant,
    key: Vec<u8>,
    /// Per event (`data.seq`): first valid arrival, as a [`stamp`]; 0 until then.
    arrivals: Vec<AtomicU64>,
    arrived: AtomicUsize,
    last_arrival: AtomicU64,
    seen_ids: Mutex<HashSet<String>>,
    /// The same webhook-id, or the same event under another id, more than once.
    duplicates: AtomicUsize,
    invalid_signatures: AtomicUsize,
    /// Validly signed, but without a `data.seq` we published.
    unknown: AtomicUsize,
}

impl Recorder {
    fn new(epoch: Instant, key: Vec<u8>, events: usize) -> Self {
        Self {
            epoch,
            key,
            arrivals: (0..events).map(|_| AtomicU64::new(0)).collect(),
            arrived: AtomicUsize::new(0),
            last_arrival: AtomicU64::new(0),
            seen_ids: Mutex::new(HashSet::with_capacity(events)),
            duplicates: AtomicUsize::new(0),
            invalid_signatures: AtomicUsize::new(0),
            unknown: AtomicUsize::new(0),
        }
    }
}

#[derive(Deserialize)]
struct SeqBody {
    data: SeqData,
}

#[derive(Deserialize)]
struct SeqData {
    seq: usize,
}

async fn receive(State(rec): State<Arc<Recorder>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let at = stamp(rec.epoch);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let id = header("webhook-id");
    let verified = signing::verify(
        &rec.key,
        id,
        header("webhook-timestamp"),
        header("webhook-signature"),
        &body,
        Timestamp::now().unix_seconds(),
        signing::DEFAULT_TOLERANCE_SECS,
    );
    if verified.is_err() {
        rec.invalid_signatures.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    let first_time = rec
        .seen_ids
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(id.to_owned());
    if !first_time {
        rec.duplicates.fetch_add(1, Ordering::Relaxed);
        return StatusCode::NO_CONTENT;
    }
    let slot = serde_json::from_slice::<SeqBody>(&body)
        .ok()
        .and_then(|b| rec.arrivals.get(b.data.seq));
    match slot {
        None => {
            rec.unknown.fetch_add(1, Ordering::Relaxed);
        }
        Some(slot) => {
            if slot
                .compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                rec.last_arrival.fetch_max(at, Ordering::Relaxed);
                rec.arrived.fetch_add(1, Ordering::Release);
            } else {
                rec.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    StatusCode::NO_CONTENT
}

// ---------------------------------------------------------------------------------------------
// The client

/// Builds the request that sends event `seq`.
type MakeRequest = Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync>;

/// One side of the comparison: where the events go and what the client saw.
struct Phase {
    name: &'static str,
    epoch: Instant,
    make: MakeRequest,
    expect: reqwest::StatusCode,
    /// Per event: when its request started, as a [`stamp`]; 0 if never sent.
    sent: Vec<AtomicU64>,
    accepted: Vec<AtomicBool>,
    accepted_n: AtomicUsize,
    sent_n: AtomicUsize,
    errors: AtomicUsize,
    first_error: Mutex<Option<String>>,
    last_response: AtomicU64,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
}

impl Phase {
    fn new(
        name: &'static str,
        epoch: Instant,
        make: MakeRequest,
        expect: reqwest::StatusCode,
        events: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            epoch,
            make,
            expect,
            sent: (0..events).map(|_| AtomicU64::new(0)).collect(),
            accepted: (0..events).map(|_| AtomicBool::new(false)).collect(),
            accepted_n: AtomicUsize::new(0),
            sent_n: AtomicUsize::new(0),
            errors: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            last_response: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
        })
    }

    fn events(&self) -> usize {
        self.sent.len()
    }

    async fn send(&self, seq: usize) {
        let in_flight = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_in_flight.fetch_max(in_flight, Ordering::Relaxed);
        self.sent_n.fetch_add(1, Ordering::Relaxed);
        self.sent[seq].store(stamp(self.epoch), Ordering::Relaxed);
        let outcome = match (self.make)(seq).send().await {
            Ok(response) => {
                let status = response.status();
                // Read the body to the end so the connection goes back to the pool.
                let body = response.bytes().await;
                match body {
                    Ok(_) if status == self.expect => Ok(()),
                    Ok(body) => Err(format!(
                        "{status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(200)])
                    )),
                    Err(e) => Err(format!("{status}, reading the body: {e}")),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        self.last_response
            .fetch_max(stamp(self.epoch), Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                self.accepted[seq].store(true, Ordering::Relaxed);
                self.accepted_n.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let mut first = self
                    .first_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if first.is_none() {
                    eprintln!("bench: {}: event {seq} not accepted: {e}", self.name);
                    *first = Some(e);
                }
            }
        }
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends every event; returns when each request has been answered (or has timed out).
async fn drive(phase: &Arc<Phase>, load: Load) {
    match load {
        Load::Burst { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    let phase = Arc::clone(phase);
                    let next = Arc::clone(&next);
                    tokio::spawn(async move {
                        loop {
                            let seq = next.fetch_add(1, Ordering::Relaxed);
                            if seq >= phase.events() {
                                break;
                            }
                            phase.send(seq).await;
                        }
                    })
                })
                .collect();
            for task in tasks {
                let _ = task.await;
            }
        }
        Load::Steady {
            rate,
            max_in_flight,
        } => {
            let permits = Arc::new(Semaphore::new(max_in_flight));
            let start = tokio::time::Instant::now();
            let mut tasks = Vec::with_capacity(phase.events());
            for seq in 0..phase.events() {
                tokio::time::sleep_until(start + Duration::from_secs_f64(seq as f64 / rate)).await;
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    break;
                };
                let phase = Arc::clone(phase);
                tasks.push(tokio::spawn(async move {
                    let _permit = permit;
                    phase.send(seq).await;
                }));
            }
            for task in tasks {
                let _ = task.await;
            }
        }
    }
}

/// What one phase measured.
struct PhaseResult {
    accepted: usize,
    publish_errors: usize,
    publish_rate: f64,
    delivery_rate: f64,
    latency_ms: Option<Percentiles>,
    duplicates: usize,
    invalid_signatures: usize,
    lost: usize,
    max_send_lag_ms: Option<f64>,
    peak_in_flight: usize,
    bench_cpu_s: f64,
}

async fn run_phase(
    phase: &Arc<Phase>,
    rec: &Arc<Recorder>,
    load: Load,
    timeout: Duration,
    mut server: Option<&mut ServerChild>,
) -> anyhow::Result<PhaseResult> {
    let name = phase.name;
    let events = phase.events();
    eprintln!(
        "bench: {name}: {events} events, {} (concurrency {})",
        match load {
            Load::Burst { .. } => "burst".to_owned(),
            Load::Steady { rate, .. } => format!("{rate} events/s"),
        },
        load.concurrency()
    );
    let cpu_before = process_cpu_seconds("self");
    let progress = {
        let phase = Arc::clone(phase);
        let rec = Arc::clone(rec);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(2));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                eprintln!(
                    "bench: {}: {} sent, {} accepted, {} arrived",
                    phase.name,
                    phase.sent_n.load(Ordering::Relaxed),
                    phase.accepted_n.load(Ordering::Relaxed),
                    rec.arrived.load(Ordering::Relaxed)
                );
            }
        })
    };
    let started = Instant::now();
    drive(phase, load).await;
    let accepted = phase.accepted_n.load(Ordering::Relaxed);
    eprintln!(
        "bench: {name}: {accepted} of {events} accepted in {:.1} s; waiting for arrivals",
        started.elapsed().as_secs_f64()
    );

    let deadline = Instant::now() + timeout;
    while rec.arrived.load(Ordering::Acquire) < accepted && Instant::now() < deadline {
        if let Some(server) = server.as_deref_mut()
            && !server.alive()
        {
            progress.abort();
            server.show_log_tail(40);
            bail!("the server exited during the run");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(SETTLE).await;
    progress.abort();
    let bench_cpu_s = process_cpu_seconds("self") - cpu_before;

    let first_sent = phase
        .sent
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .filter(|&s| s != 0)
        .min()
        .unwrap_or(0);
    let mut latencies = Vec::with_capacity(accepted);
    let mut lost = 0;
    let mut max_lag = 0u64;
    for seq in 0..events {
        let sent = phase.sent[seq].load(Ordering::Relaxed);
        if let (Load::Steady { rate, .. }, true) = (load, sent != 0) {
            let scheduled = (seq as f64 / rate * 1e9) as u64;
            max_lag = max_lag.max(sent.saturating_sub(first_sent).saturating_sub(scheduled));
        }
        if !phase.accepted[seq].load(Ordering::Relaxed) {
            continue;
        }
        match rec.arrivals[seq].load(Ordering::Relaxed) {
            0 => lost += 1,
            arrived => latencies.push(arrived.saturating_sub(sent)),
        }
    }
    latencies.sort_unstable();
    let last_arrival = rec.last_arrival.load(Ordering::Relaxed);
    let last_response = phase.last_response.load(Ordering::Relaxed);
    let rate = |count: usize, end: u64| {
        let secs = end.saturating_sub(first_sent) as f64 / 1e9;
        if count == 0 || secs <= 0.0 {
            0.0
        } else {
            count as f64 / secs
        }
    };
    let result = PhaseResult {
        accepted,
        publish_errors: phase.errors.load(Ordering::Relaxed),
        publish_rate: rate(accepted, last_response),
        delivery_rate: rate(rec.arrived.load(Ordering::Relaxed), last_arrival),
        latency_ms: percentiles_ms(&latencies),
        duplicates: rec.duplicates.load(Ordering::Relaxed),
        invalid_signatures: rec.invalid_signatures.load(Ordering::Relaxed),
        lost,
        max_send_lag_ms: matches!(load, Load::Steady { .. })
            .then(|| round(max_lag as f64 / 1e6, 2)),
        peak_in_flight: phase.peak_in_flight.load(Ordering::Relaxed),
        bench_cpu_s,
    };
    let unknown = rec.unknown.load(Ordering::Relaxed);
    eprintln!(
        "bench: {name}: {:.0} events/s delivered, {lost} lost, {} duplicates, {} invalid signatures{}",
        result.delivery_rate,
        result.duplicates,
        result.invalid_signatures,
        if unknown > 0 {
            format!(", {unknown} unknown bodies")
        } else {
            String::new()
        }
    );
    Ok(result)
}

/// p50/p90/p99/max (nearest rank) of sorted nanosecond latencies, in milliseconds.
fn percentiles_ms(sorted: &[u64]) -> Option<Percentiles> {
    let last = *sorted.last()?;
    let at = |p: f64| {
        let rank = (p * sorted.len() as f64).ceil() as usize;
        round(sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e6, 2)
    };
    Some(Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: round(last as f64 / 1e6, 2),
    })
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

// ---------------------------------------------------------------------------------------------
// The server, as a child process

/// `tidings serve` on 127.0.0.1:0, this executable run as a child, so that its memory and CPU
/// figures are its own.
struct ServerChild {
    child: tokio::process::Child,
    pid: u32,
    base: String,
    log_path: PathBuf,
}

impl ServerChild {
    async fn start(
        data_dir: &Path,
        log_path: PathBuf,
        api_key: &str,
        workers: usize,
        log_filter: &str,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the tidings executable")?;
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = tokio::process::Command::new(exe);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(["--api-key", api_key, "--workers", &workers.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        // Production defaults: no setting from this shell's environment may leak in.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TIDINGS_") {
                command.env_remove(name);
            }
        }
        command.env("TIDINGS_LOG", log_filter);
        let mut child = command.spawn().context("starting `tidings serve`")?;
        let pid = child.id().context("the server exited at once")?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();

        let banner = async {
            let (mut base, mut key) = (None, None);
            while base.is_none() || key.is_none() {
                let Some(line) = lines.next_line().await? else {
                    bail!("the server exited before printing its address");
                };
                match parse_banner_line(&line) {
                    Some(BannerLine::Api(url)) => base = Some(url),
                    Some(BannerLine::ApiKey(k)) => key = Some(k),
                    None => {}
                }
            }
            Ok((base.unwrap_or_default(), key.unwrap_or_default()))
        };
        let mut server = Self {
            child,
            pid,
            base: String::new(),
            log_path,
        };
        let (base, key) = match tokio::time::timeout(START_TIMEOUT, banner).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                server.show_log_tail(40);
                return Err(e);
            }
            Err(_) => {
                server.show_log_tail(40);
                bail!("the server printed no address within {START_TIMEOUT:?}");
            }
        };
        anyhow::ensure!(
            key == api_key,
            "the server announced another API key than the one it was given"
        );
        server.base = base;
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(server)
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// A `kB` field of `/proc/<pid>/status` (`VmHWM`: peak resident set; `VmRSS`: current).
    fn status_kb(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status_field_kb(&status, field)
    }

    fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(&self.pid.to_string())
    }

    async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }

    fn show_log_tail(&self, lines: usize) {
        let Ok(log) = std::fs::read_to_string(&self.log_path) else {
            return;
        };
        let all: Vec<&str> = log.lines().collect();
        eprintln!("bench: the server's last log lines:");
        for line in &all[all.len().saturating_sub(lines)..] {
            eprintln!("  | {line}");
        }
    }
}

#[derive(Debug, PartialEq)]
enum BannerLine {
    Api(String),
    ApiKey(String),
}

/// Recognises `  API:      http://…` and `  API key:  tdk_…  (…)` in `serve`'s banner.
fn parse_banner_line(line: &str) -> Option<BannerLine> {
    let line = line.trim_start();
    if let Some(rest) = line.strip_prefix("API:") {
        return Some(BannerLine::Api(rest.trim().to_owned()));
    }
    let rest = line.strip_prefix("API key:")?;
    rest.split_whitespace()
        .next()
        .map(|key| BannerLine::ApiKey(key.to_owned()))
}

fn status_field_kb(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// User plus system CPU time of a process (`self` or a pid), including its exited threads.
fn process_cpu_seconds(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat_cpu_ticks(&stat))
        .map_or(0.0, |ticks| ticks as f64 / USER_HZ)
}

/// `utime + stime` from `/proc/<pid>/stat`; fields counted after the command name, which is in
/// parentheses and may itself contain spaces and parentheses.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name: state(3) ppid … utime is field 14, stime 15 (1-based, name is 2).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_lines_give_address_and_key() {
        assert_eq!(
            parse_banner_line("  API:      http://127.0.0.1:41234"),
            Some(BannerLine::Api("http://127.0.0.1:41234".into()))
        );
        assert_eq!(
            parse_banner_line("  API key:  tdk_abc  (tenant `default`)"),
            Some(BannerLine::ApiKey("tdk_abc".into()))
        );
        assert_eq!(
            parse_banner_line(
                "  API key:  tdk_abc (generated; saved in ./.tidings/api-key)  (tenant `default`)"
            ),
            Some(BannerLine::ApiKey("tdk_abc".into()))
        );
        assert_eq!(parse_banner_line("Tidings 0.1.0 — local mode"), None);
        assert_eq!(parse_banner_line("  Store:    /tmp/x/tidings.db"), None);
        assert_eq!(parse_banner_line("  API key:"), None);
    }

    #[test]
    fn status_fields_in_kb() {
        let status =
            "Name:\ttidings\nVmPeak:\t  900000 kB\nVmHWM:\t   23456 kB\nVmRSS:\t   20000 kB\n";
        assert_eq!(status_field_kb(status, "VmHWM"), Some(23456));
        assert_eq!(status_field_kb(status, "VmRSS"), Some(20000));
        assert_eq!(status_field_kb(status, "VmSwap"), None);
    }

    #[test]
    fn cpu_ticks_survive_odd_command_names() {
        let stat =
            "4242 (tid ings) (x)) S 1 4242 4242 0 -1 4194560 500 0 0 0 170 30 0 0 20 0 9 0 100 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(200));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        assert_eq!(percentiles_ms(&[]), None);
        let ms: Vec<u64> = (1..=100).map(|i| i * 1_000_000).collect();
        assert_eq!(
            percentiles_ms(&ms),
            Some(Percentiles {
                p50: 50.0,
                p90: 90.0,
                p99: 99.0,
                max: 100.0
            })
        );
        assert_eq!(
            percentiles_ms(&[3_500_000]),
            Some(Percentiles {
                p50: 3.5,
                p90: 3.5,
                p99: 3.5,
                max: 3.5
            })
        );
    }

    #[test]
    fn event_bodies_are_valid_and_carry_their_seq() {
        let body = event_body(1234);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["eventType"], "bench.order.created");
        assert_eq!(value["data"]["seq"], 1234);
        assert_eq!(
            serde_json::from_slice::<SeqBody>(&body).unwrap().data.seq,
            1234
        );
    }

    #[tokio::test]
    async fn the_receiver_counts_duplicates_and_bad_signatures() {
        let secret = Secret::generate();
        let rec = Arc::new(Recorder::new(Instant::now(), secret.key().to_vec(), 2));
        let body = event_body(1);
        let now = Timestamp::now().unix_seconds();
        let headers = |id: &str, signature: &str| {
            let mut h = HeaderMap::new();
            h.insert("webhook-id", id.parse().unwrap());
            h.insert("webhook-timestamp", now.to_string().parse().unwrap());
            h.insert("webhook-signature", signature.parse().unwrap());
            h
        };
        let good = signing::sign(secret.key(), "dlv_1", now, &body);
        let call = |h: HeaderMap, b: Bytes| receive(State(Arc::clone(&rec)), h, b);
        assert_eq!(
            call(headers("dlv_1", &good), body.clone()).await,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            call(headers("dlv_1", &good), body.clone()).await,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            call(headers("dlv_2", &good), body.clone()).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(rec.arrived.load(Ordering::Relaxed), 1);
        assert_ne!(rec.arrivals[1].load(Ordering::Relaxed), 0);
        assert_eq!(rec.arrivals[0].load(Ordering::Relaxed), 0);
        assert_eq!(rec.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(rec.invalid_signatures.load(Ordering::Relaxed), 1);
    }
}
