//! The local fault suite (issue #10): nothing accepted is lost by `tidings serve`, however its
//! receivers fail and however often it is killed.
//!
//! The real binary is SIGKILLed every few seconds and restarted on the same data directory and
//! port while events are published in batches (a publish that got no answer is sent again with
//! the same `idempotencyKey`, as a producer would) to four subscriptions whose real receivers on
//! 127.0.0.1 answer at random with 500, 503, 429 + `Retry-After`, an answer slower than the
//! request timeout, or a connection reset; one subscription's port is closed for the first part
//! of the run, and one receiver never answers anything but 503, so its deliveries go dead. Then
//! the receivers turn healthy and the server drains. Every request's signature is checked.
//!
//! The figure: accepted events × matching subscriptions = deliveries expected; each is either
//! acknowledged by its receiver (a quick 2xx, counted once per `webhook-id`) or visible in the API
//! as dead or failed. Anything else is lost, and the test fails naming it. One JSON line is
//! printed (and appended to `$TIDINGS_FAULT_REPORT` when set; `tests/run.sh` shows it).
//!
//! `TIDINGS_SOAK=1`: 100,000 events and a two-minute fault phase instead of 20,000 and 20 s.
//! `TIDINGS_FAULT_SEED=N` repeats a run's random choices (the receivers' faults, the kill times;
//! the server's own timing still varies).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};
use tidings_tests::{ApiClient, ClosedPort, FaultMix, Reply, TestReceiver, TidingsProcess};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Five attempts over about 8 s, so the drain is bounded and some deliveries run out of them.
const RETRY_SCHEDULE: &str = "0s,1s,2s,2s,3s";
/// The server's request timeout; the receivers' slow answers take longer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
const BATCH: usize = 100;
const PUBLISHERS: usize = 4;

/// How big and how long: CI size by default, the soak with `TIDINGS_SOAK=1`.
struct Plan {
    soak: bool,
    events: usize,
    /// Kills and receiver faults go on at least this long, and until everything is published.
    fault_phase: Duration,
    /// One subscription's port is closed this long from the start.
    closed_for: Duration,
    /// SIGKILL after a random wait in this range.
    kill_every: (Duration, Duration),
    /// From healthy receivers to every delivery accounted for, at most.
    drain_deadline: Duration,
    seed: u64,
}

impl Plan {
    fn from_env() -> Self {
        let soak = std::env::var("TIDINGS_SOAK").is_ok_and(|v| v == "1");
        let seed = match std::env::var("TIDINGS_FAULT_SEED") {
            Ok(v) => v.parse().expect("TIDINGS_FAULT_SEED is a number"),
            Err(_) => rand::random(),
        };
        let secs = Duration::from_secs;
        if soak {
            Self {
                soak,
                events: 100_000,
                fault_phase: secs(120),
                closed_for: secs(30),
                kill_every: (secs(2), secs(6)),
                drain_deadline: secs(600),
                seed,
            }
        } else {
            Self {
                soak,
                events: 20_000,
                fault_phase: secs(20),
                closed_for: secs(10),
                kill_every: (Duration::from_millis(1500), secs(4)),
                drain_deadline: secs(120),
                seed,
            }
        }
    }
}

/// The receivers' fault mix while the faults last: 40 % of requests fail in one of five ways.
fn fault_mix() -> FaultMix {
    FaultMix {
        healthy: 60,
        http500: 8,
        http503: 8,
        http429: 8,
        slow: 4,
        reset: 12,
        retry_after_secs: 2,
        slow_for: REQUEST_TIMEOUT + Duration::from_millis(500),
    }
}

/// The event type of the `i`-th event: 40 % order.created, 20 % order.shipped, 35 % invoice.paid,
/// 5 % audit.recorded.
fn event_type(i: usize) -> &'static str {
    match i % 20 {
        0..=7 => "order.created",
        8..=11 => "order.shipped",
        12..=18 => "invoice.paid",
        _ => "audit.recorded",
    }
}

/// Pattern matching written out here, independently of the server's: `*`, `prefix.*`, exact.
fn matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

struct Subscriber {
    name: &'static str,
    path: &'static str,
    patterns: &'static [&'static str],
    id: String,
    secret: String,
    /// `None` while its port is closed.
    receiver: Option<TestReceiver>,
}

impl Subscriber {
    fn matches(&self, event_type: &str) -> bool {
        self.patterns.iter().any(|p| matches(p, event_type))
    }
}

fn receiver_for(receiver: &TestReceiver, secret: &str) {
    receiver.keep_requests(false);
    receiver.verify_with(secret);
}

#[derive(Default)]
struct PublishStats {
    /// Batch requests sent again after no answer (the server was down) or a 5xx.
    retried_requests: AtomicU64,
    /// Items answered `idempotentReplayed`: their first try had been stored after all.
    replayed: AtomicU64,
}

/// Publishes events `[0, events)` in batches from a shared counter until each has its 202; a
/// batch with no answer is sent again, with the same idempotency keys. Returns (index, eventId).
async fn publish(
    api: ApiClient,
    events: usize,
    seed: u64,
    next: Arc<AtomicUsize>,
    stats: Arc<PublishStats>,
) -> Vec<(usize, String)> {
    let mut accepted = Vec::new();
    loop {
        let start = next.fetch_add(BATCH, Ordering::Relaxed);
        if start >= events {
            return accepted;
        }
        let mut pending: Vec<usize> = (start..(start + BATCH).min(events)).collect();
        let mut tries = 0;
        while !pending.is_empty() {
            tries += 1;
            assert!(tries < 500, "events {pending:?} never got a 202");
            let items: Vec<Value> = pending
                .iter()
                .map(|&i| {
                    json!({
                        "eventType": event_type(i),
                        "data": {"n": i},
                        "idempotencyKey": format!("fault-{seed}-{i}"),
                    })
                })
                .collect();
            let body = json!({ "events": items }).to_string();
            let answer = api
                .try_send(
                    reqwest::Method::POST,
                    "/events/batch",
                    Some(body.as_bytes()),
                    &[],
                )
                .await;
            match answer {
                Ok(r) if r.status == 202 => {
                    let results = r.body["results"].as_array().expect("batch results");
                    assert_eq!(results.len(), pending.len(), "one result per item");
                    let mut again = Vec::new();
                    for (&i, result) in pending.iter().zip(results) {
                        match result["status"].as_u64() {
                            Some(202) => {
                                let id = result["eventId"].as_str().expect("eventId");
                                accepted.push((i, id.to_owned()));
                                if result["idempotentReplayed"] == true {
                                    stats.replayed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Some(500..) => again.push(i),
                            _ => panic!("event {i} refused: {result}"),
                        }
                    }
                    pending = again;
                }
                Ok(r) if r.status >= 500 => {}
                Ok(r) => panic!("batch publish refused: {} {}", r.status, r.body),
                // Refused, reset or timed out: the server is down or was killed mid-request.
                Err(_) => {}
            }
            if !pending.is_empty() {
                stats.retried_requests.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Starts `tidings serve` on `listen`, trying again for a while should the port not be free yet.
async fn restart(listen: &str, dir: &Path, args: &[&str]) -> TidingsProcess {
    let mut last = String::new();
    for _ in 0..20 {
        match TidingsProcess::serve_on(listen, dir, args).await {
            Ok(server) => return server,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("tidings serve did not come back on {listen}: {last}");
}

/// Fails the test when the server ended on its own (a crash the next kill would hide).
fn still_running(server: &mut TidingsProcess, kills: u64) {
    if let Some(status) = server.child.try_wait().expect("the server's status") {
        panic!(
            "tidings serve exited on its own ({status}) after {kills} kills; its stderr is above"
        );
    }
}

/// A free port on 127.0.0.1 below the kernel's ephemeral range: while the server is down between
/// a kill and its restart, no outgoing connection can be given it as its local port.
fn api_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let below = ephemeral_low.saturating_sub(8192).max(1024)..ephemeral_low.max(1025);
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(below.clone());
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {below:?}");
}

/// One delivery as the API lists it.
struct Listed {
    subscriber: usize,
    event_id: String,
    delivery_id: String,
    status: String,
    updated_at: OffsetDateTime,
    attempts: u64,
    connect_errors: u64,
    /// The logged attempts' results: the status code, or the error up to its first `:`.
    seen: Vec<String>,
}

/// Every delivery of every subscriber, from the API.
async fn scan(api: &ApiClient, subscribers: &[Subscriber]) -> Vec<Listed> {
    let mut all = Vec::new();
    for (s, sub) in subscribers.iter().enumerate() {
        for d in api.all_deliveries(&sub.id).await {
            let text = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
            let attempts = d["attempts"].as_array().cloned().unwrap_or_default();
            all.push(Listed {
                subscriber: s,
                event_id: text("eventId"),
                delivery_id: text("deliveryId"),
                status: text("status"),
                updated_at: OffsetDateTime::parse(&text("updatedAt"), &Rfc3339)
                    .expect("updatedAt is RFC 3339"),
                attempts: d["attemptCount"].as_u64().unwrap_or_default(),
                seen: attempts
                    .iter()
                    .map(|a| match a["statusCode"].as_u64() {
                        Some(code) => code.to_string(),
                        None => {
                            let error = a["error"].as_str().unwrap_or("no error");
                            error.split(':').next().unwrap_or(error).to_owned()
                        }
                    })
                    .collect(),
                connect_errors: attempts
                    .iter()
                    .filter(|a| {
                        a["error"]
                            .as_str()
                            .is_some_and(|e| e.starts_with("could not connect"))
                    })
                    .count() as u64,
            });
        }
    }
    all
}

/// The books: what was expected, acknowledged, dead, and what is neither.
struct Books {
    expected: usize,
    /// Expected (subscriber, event) pairs a receiver acknowledged.
    delivered: usize,
    /// Expected pairs the API shows dead or failed.
    dead: usize,
    failed: usize,
    /// Of the dead or failed, those a receiver had acknowledged all the same (its answer was
    /// lost with a killed server, and the later attempts failed).
    dead_after_delivered: usize,
    /// Expected pairs neither acknowledged nor dead or failed, with their API status.
    lost: Vec<(String, String, String)>,
    /// Acknowledged pairs no accepted event explains (a publish stored twice, or a stranger).
    unexpected: Vec<(String, String)>,
    /// Pairs acknowledged under more than one `webhook-id`.
    identity_changes: usize,
    /// Acknowledged `webhook-id`s that are not the API's delivery id for that pair.
    id_mismatches: usize,
    /// Deliveries the API still shows unfinished (pending, retrying, held).
    unfinished: usize,
}

fn books(
    subscribers: &[Subscriber],
    expected: &HashSet<(usize, String)>,
    listed: &[Listed],
) -> Books {
    let mut acknowledged: HashMap<(usize, String), HashSet<String>> = HashMap::new();
    for (s, sub) in subscribers.iter().enumerate() {
        let Some(receiver) = &sub.receiver else {
            continue;
        };
        for (webhook_id, ack) in receiver.tally().acknowledged {
            assert_eq!(
                ack.path, sub.path,
                "{}: a request on another path",
                sub.name
            );
            acknowledged
                .entry((s, ack.event_id))
                .or_default()
                .insert(webhook_id);
        }
    }
    let by_pair: HashMap<(usize, &str), &Listed> = listed
        .iter()
        .map(|l| ((l.subscriber, l.event_id.as_str()), l))
        .collect();
    let status = |pair: &(usize, String)| {
        by_pair
            .get(&(pair.0, pair.1.as_str()))
            .map_or("not listed", |l| l.status.as_str())
            .to_owned()
    };
    let mut b = Books {
        expected: expected.len(),
        delivered: 0,
        dead: 0,
        failed: 0,
        dead_after_delivered: 0,
        lost: Vec::new(),
        unexpected: Vec::new(),
        identity_changes: 0,
        id_mismatches: 0,
        unfinished: listed
            .iter()
            .filter(|l| !matches!(l.status.as_str(), "succeeded" | "dead" | "failed"))
            .count(),
    };
    for pair in expected {
        let delivered = acknowledged.contains_key(pair);
        let status = status(pair);
        b.delivered += usize::from(delivered);
        b.dead += usize::from(status == "dead");
        b.failed += usize::from(status == "failed");
        let ended = status == "dead" || status == "failed";
        b.dead_after_delivered += usize::from(delivered && ended);
        if !delivered && !ended {
            b.lost
                .push((subscribers[pair.0].name.to_owned(), pair.1.clone(), status));
        }
    }
    for (pair, ids) in &acknowledged {
        if !expected.contains(pair) {
            b.unexpected
                .push((subscribers[pair.0].name.to_owned(), pair.1.clone()));
        }
        b.identity_changes += usize::from(ids.len() > 1);
        if let Some(l) = by_pair.get(&(pair.0, pair.1.as_str())) {
            b.id_mismatches += ids.iter().filter(|id| **id != l.delivery_id).count();
        }
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_faults_and_sigkills_nothing_accepted_is_lost() {
    let plan = Plan::from_env();
    let run_started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let dir = tempfile::tempdir().unwrap();
    let timeout = format!("{}ms", REQUEST_TIMEOUT.as_millis());
    let args = [
        "--retry-schedule",
        RETRY_SCHEDULE,
        "--request-timeout",
        &timeout,
        "--allow-callback-cidrs",
        "127.0.0.0/8",
    ];
    let listen = format!("127.0.0.1:{}", api_port());
    let mut server = restart(&listen, dir.path(), &args).await;
    let api = server.api.clone();

    // Four subscriptions, one receiver each (the third's port is closed for now).
    let closed_port = ClosedPort::new();
    let mut subscribers = Vec::new();
    for (name, path, patterns) in [
        ("orders", "/orders", &["order.*"][..]),
        ("everything", "/everything", &["*"][..]),
        ("invoices", "/invoices", &["invoice.*"][..]),
        ("audit-down", "/audit", &["audit.*"][..]),
    ] {
        let receiver = match name {
            "invoices" => None,
            _ => Some(TestReceiver::start().await),
        };
        let url = match &receiver {
            Some(r) => r.url(path),
            None => closed_port.url(path),
        };
        let sub = api.subscribe(&url, patterns).await;
        let secret = sub["secret"].as_str().unwrap().to_owned();
        if let Some(r) = &receiver {
            receiver_for(r, &secret);
        }
        subscribers.push(Subscriber {
            name,
            path,
            patterns,
            id: sub["subscriptionId"].as_str().unwrap().to_owned(),
            secret,
            receiver,
        });
    }
    let receiver = |name: &str| {
        subscribers
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.receiver.clone())
            .unwrap()
    };
    receiver("orders").inject_faults(Some(fault_mix()), plan.seed ^ 1);
    receiver("everything").inject_faults(Some(fault_mix()), plan.seed ^ 2);
    receiver("audit-down").always(Reply::status(503));

    // The fault phase: publishers, the closed port opening later, and SIGKILLs meanwhile.
    let faults_started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let stats = Arc::new(PublishStats::default());
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            tokio::spawn(publish(
                api.clone(),
                plan.events,
                plan.seed,
                Arc::clone(&next),
                Arc::clone(&stats),
            ))
        })
        .collect();
    let invoices_secret = subscribers[2].secret.clone();
    let (closed_for, seed) = (plan.closed_for, plan.seed);
    let opener = tokio::spawn(async move {
        tokio::time::sleep(closed_for).await;
        let r = closed_port.open();
        receiver_for(&r, &invoices_secret);
        r.inject_faults(Some(fault_mix()), seed ^ 3);
        r
    });
    let mut kills = 0u64;
    let mut restart_ms = Vec::new();
    while !(publishers.iter().all(|p| p.is_finished())
        && faults_started.elapsed() >= plan.fault_phase)
    {
        let (low, high) = plan.kill_every;
        tokio::time::sleep(rng.random_range(low..=high)).await;
        still_running(&mut server, kills);
        server.kill().await;
        kills += 1;
        let t = Instant::now();
        server = restart(&listen, dir.path(), &args).await;
        restart_ms.push(t.elapsed().as_millis() as u64);
    }
    let mut accepted: HashMap<usize, String> = HashMap::new();
    for p in publishers {
        for (i, id) in p.await.unwrap() {
            let first = accepted.insert(i, id);
            assert!(
                first.is_none(),
                "event {i} accepted twice by the publishers"
            );
        }
    }
    subscribers[2].receiver = Some(opener.await.unwrap());
    let fault_phase = faults_started.elapsed();
    for s in &subscribers[..3] {
        s.receiver.as_ref().unwrap().inject_faults(None, 0);
    }
    let healthy_at = OffsetDateTime::now_utc();
    let drain_started = Instant::now();

    let mut expected = HashSet::new();
    for (&i, id) in &accepted {
        for (s, sub) in subscribers.iter().enumerate() {
            if sub.matches(event_type(i)) {
                expected.insert((s, id.clone()));
            }
        }
    }

    // The drain: once the receivers have been quiet a moment, compare the books; again until
    // everything is accounted for and nothing is unfinished, or the deadline.
    let deadline = drain_started + plan.drain_deadline;
    let requests = || {
        subscribers
            .iter()
            .filter_map(|s| s.receiver.as_ref())
            .map(TestReceiver::request_count)
            .sum::<u64>()
    };
    let (mut last_count, mut quiet_since) = (requests(), Instant::now());
    let mut scans = 0;
    let (listed, books) = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let count = requests();
        let now = Instant::now();
        if count != last_count {
            (last_count, quiet_since) = (count, now);
        }
        if now < deadline && now.duration_since(quiet_since) < Duration::from_millis(1500) {
            continue;
        }
        let listed = scan(&server.api, &subscribers).await;
        scans += 1;
        let b = books(&subscribers, &expected, &listed);
        // Once every delivery is final nothing changes any more: what is missing now stays lost.
        if b.unfinished == 0 || Instant::now() >= deadline {
            break (listed, b);
        }
        quiet_since = Instant::now();
    };
    let checked_after = drain_started.elapsed();
    still_running(&mut server, kills);
    // Time to drain: from healthy receivers to the last delivery's final state.
    let last_update = listed.iter().map(|l| l.updated_at).max().unwrap();
    let drain_secs = (last_update - healthy_at).as_seconds_f64().max(0.0);

    let tallies: Vec<_> = subscribers
        .iter()
        .map(|s| s.receiver.as_ref().unwrap().tally())
        .collect();
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    for t in &tallies {
        for (fault, n) in &t.faults {
            *faults.entry(fault.as_str().to_owned()).or_default() += n;
        }
    }
    faults.insert("sigkill".into(), kills);
    faults.insert(
        "alwaysUnavailable".into(),
        tallies[3].requests, // every request to audit-down was answered 503
    );
    faults.insert(
        "connectionRefused".into(),
        listed
            .iter()
            .filter(|l| l.subscriber == 2)
            .map(|l| l.connect_errors)
            .sum(),
    );
    let dead_by_subscription: BTreeMap<&str, usize> = subscribers
        .iter()
        .enumerate()
        .map(|(s, sub)| {
            let n = listed
                .iter()
                .filter(|l| l.subscriber == s && matches!(l.status.as_str(), "dead" | "failed"))
                .count();
            (sub.name, n)
        })
        .collect();
    let mut seen_by_server: BTreeMap<&str, u64> = BTreeMap::new();
    for seen in listed.iter().flat_map(|l| &l.seen) {
        *seen_by_server.entry(seen).or_default() += 1;
    }
    let report = json!({
        "suite": "local-faults",
        "soak": plan.soak,
        "seed": plan.seed,
        "events": plan.events,
        "subscriptions": subscribers.len(),
        "accepted": accepted.len(),
        "expectedDeliveries": books.expected,
        "delivered": books.delivered,
        "dead": books.dead + books.failed,
        "deadBySubscription": dead_by_subscription,
        "deadAfterDelivered": books.dead_after_delivered,
        "lost": books.lost.len(),
        "unaccountedInApi": books.unfinished,
        "duplicateRequests": tallies.iter().map(|t| t.duplicates).sum::<u64>(),
        "invalidSignatures": tallies.iter().map(|t| t.invalid_signatures).sum::<u64>(),
        "unexplainedDeliveries": books.unexpected.len(),
        "webhookIdChanges": books.identity_changes + books.id_mismatches,
        "httpRequests": tallies.iter().map(|t| t.requests).sum::<u64>(),
        "attemptsLogged": listed.iter().map(|l| l.attempts).sum::<u64>(),
        "publishRetries": stats.retried_requests.load(Ordering::Relaxed),
        "publishReplayed": stats.replayed.load(Ordering::Relaxed),
        "faultPhaseSeconds": round(fault_phase.as_secs_f64()),
        "drainSeconds": round(drain_secs),
        "drainCheckedAfterSeconds": round(checked_after.as_secs_f64()),
        "apiScans": scans,
        "restartMsMax": restart_ms.iter().max(),
        "totalSeconds": round(run_started.elapsed().as_secs_f64()),
        "faults": faults,
        "attemptsSeenByServer": seen_by_server,
    });
    println!("{report}");
    if let Some(path) = std::env::var_os("TIDINGS_FAULT_REPORT") {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open $TIDINGS_FAULT_REPORT");
        writeln!(file, "{report}").expect("write $TIDINGS_FAULT_REPORT");
    }

    assert_eq!(accepted.len(), plan.events, "every event got its 202");
    assert!(
        books.lost.is_empty(),
        "{} accepted deliveries are neither delivered nor dead (seed {}), e.g. {:?}",
        books.lost.len(),
        plan.seed,
        &books.lost[..books.lost.len().min(20)]
    );
    assert_eq!(
        books.unfinished, 0,
        "deliveries still unfinished {:?} after the drain",
        plan.drain_deadline
    );
    assert_eq!(
        report["invalidSignatures"], 0,
        "every request verifies with its subscription's secret"
    );
    assert!(
        books.unexpected.is_empty(),
        "deliveries of events nobody accepted (a publish stored twice?): {:?}",
        &books.unexpected[..books.unexpected.len().min(20)]
    );
    assert_eq!(books.identity_changes, 0, "a delivery's webhook-id changed");
    assert_eq!(books.id_mismatches, 0, "webhook-id is the delivery id");
    // The run proves something only if each fault happened and each outcome was reached.
    assert!(kills >= 3, "only {kills} SIGKILLs");
    for kind in [
        "http500",
        "http503",
        "http429RetryAfter",
        "slowPastTimeout",
        "connectionReset",
        "connectionRefused",
    ] {
        assert!(faults.get(kind) > Some(&0), "no {kind} fault was injected");
    }
    assert!(
        dead_by_subscription["audit-down"] == expected.iter().filter(|p| p.0 == 3).count(),
        "every delivery to the always-failing receiver ends dead"
    );
    assert!(books.delivered > books.expected / 2, "most were delivered");
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The receivers' faults are what the figure calls them, seen from a plain HTTP client: a reset is
/// a transport error, a slow answer a timeout, 429 carries `Retry-After`, a bad signature is 401
/// and counted, and only a quick 2xx of a signed request counts as acknowledged.
#[tokio::test]
async fn the_fault_receiver_injects_and_counts_what_it_says() {
    use tidings_core::domain::{Secret, Timestamp};
    use tidings_tests::Fault;
    tidings_core::sender::install_crypto_provider();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(600))
        .build()
        .unwrap();
    let none = FaultMix {
        healthy: 0,
        http500: 0,
        http503: 0,
        http429: 0,
        slow: 0,
        reset: 0,
        retry_after_secs: 2,
        slow_for: Duration::from_secs(2),
    };
    let secret = Secret::generate();
    let receiver = TestReceiver::start().await;
    receiver.verify_with(secret.expose());
    let body =
        r#"{"eventId":"evt_1","eventType":"t.x","occurredAt":"2026-01-01T00:00:00Z","data":{}}"#;
    let post = |signature: String| {
        let now = Timestamp::now().unix_seconds();
        client
            .post(receiver.url("/hook"))
            .header("webhook-id", "dlv_1")
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
    };
    let signed = || {
        let now = Timestamp::now().unix_seconds();
        tidings_core::signing::sign(secret.key(), "dlv_1", now, body.as_bytes())
    };

    receiver.inject_faults(
        Some(FaultMix {
            reset: 1,
            ..none.clone()
        }),
        1,
    );
    let cut = post(signed()).await.unwrap_err();
    assert!(!cut.is_timeout() && cut.status().is_none(), "{cut:?}");
    receiver.inject_faults(
        Some(FaultMix {
            slow: 1,
            ..none.clone()
        }),
        1,
    );
    assert!(post(signed()).await.unwrap_err().is_timeout());
    receiver.inject_faults(
        Some(FaultMix {
            http429: 1,
            ..none.clone()
        }),
        1,
    );
    let busy = post(signed()).await.unwrap();
    assert_eq!(busy.status(), 429);
    assert_eq!(busy.headers()["retry-after"], "2");
    receiver.inject_faults(None, 0);
    let other = Secret::generate();
    let forged = tidings_core::signing::sign(
        other.key(),
        "dlv_1",
        Timestamp::now().unix_seconds(),
        body.as_bytes(),
    );
    assert_eq!(post(forged).await.unwrap().status(), 401);
    assert_eq!(post(signed()).await.unwrap().status(), 200);
    assert_eq!(post(signed()).await.unwrap().status(), 200);

    let tally = receiver.tally();
    assert_eq!(tally.requests, 6);
    assert_eq!(tally.invalid_signatures, 1);
    assert_eq!(
        tally.faults.into_iter().collect::<Vec<_>>(),
        [(Fault::Http429, 1), (Fault::Slow, 1), (Fault::Reset, 1)]
    );
    let ack = &tally.acknowledged["dlv_1"];
    assert_eq!(
        (ack.path.as_str(), ack.event_id.as_str()),
        ("/hook", "evt_1")
    );
    assert_eq!(ack.times, 2);
    assert_eq!(tally.duplicates, 1, "the second 200 was a duplicate");
}
