//! The Lambda runtime API, served to real function processes.
//!
//! Each instance of a function is one execution environment: a process and a runtime API server of
//! its own on 127.0.0.1. The process takes one invocation at a time through
//! `GET /2018-06-01/runtime/invocation/next` and answers through `…/{id}/response` or
//! `…/{id}/error`. An invocation past its deadline kills the process; a process that exits, is
//! killed or reports an init error fails its in-flight invocation, and a fresh environment (new
//! process, new runtime API server) replaces it, as Lambda does.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};
use tokio::sync::{Mutex as AsyncMutex, Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Lambda's limit for a synchronous response payload.
const MAX_RESPONSE_BYTES: usize = 6 * 1024 * 1024;
/// Back-off bounds for environments that die before asking for their first invocation.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How one function is run.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// Function name, e.g. `tidings-deliver`; also the prefix of its log lines.
    pub name: String,
    pub binary: PathBuf,
    /// The process environment (the runtime variables are added per environment).
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    pub memory_mb: u32,
    /// Execution environments kept for this function (concurrent invocations).
    pub instances: usize,
    /// `arn:aws:lambda:{region}:{account}:function:{name}`.
    pub arn: String,
}

/// Why an invocation produced no response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvokeError {
    /// The function reported an error through `/error`.
    #[error("function error {error_type}: {message}")]
    Function { error_type: String, message: String },
    #[error("Sandbox.Timedout: task timed out after {0:?}")]
    Timeout(Duration),
    /// The process exited (or was killed) with the invocation in flight.
    #[error("Runtime.ExitError: {0}")]
    Exited(String),
    /// No execution environment took the invocation within the caller's wait.
    #[error("no execution environment answered within {0:?}")]
    Unavailable(Duration),
    #[error("shutting down")]
    ShuttingDown,
}

type InvokeResult = Result<Bytes, InvokeError>;

struct Invocation {
    event: Bytes,
    reply: oneshot::Sender<InvokeResult>,
}

/// What one execution environment looks like from outside: the admin endpoint's rows.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStats {
    pub name: String,
    pub instance: usize,
    /// The current process, if one runs.
    pub pid: Option<u32>,
    /// Spawn to first `next` request of the current process (`null` until it asks).
    pub cold_start_ms: Option<u64>,
    /// The same for every process this instance started, oldest first.
    pub cold_starts_ms: Vec<u64>,
    pub invocations: u64,
    /// Invocations that ended in a function error, a timeout or a crash, plus init errors.
    pub errors: u64,
    /// Processes started after the first.
    pub restarts: u64,
    /// Request id of the invocation in flight.
    pub in_flight: Option<String>,
    /// `127.0.0.1:PORT` of the current environment's runtime API.
    pub runtime_api: Option<String>,
}

struct Instance {
    label: String,
    stats: Mutex<InstanceStats>,
    kill: Notify,
}

impl Instance {
    fn update(&self, f: impl FnOnce(&mut InstanceStats)) {
        f(&mut self.stats.lock().unwrap());
    }
}

/// A function with its execution environments; cheap to share.
pub struct Function {
    spec: Arc<FunctionSpec>,
    queue: mpsc::UnboundedSender<Invocation>,
    instances: Vec<Arc<Instance>>,
}

impl Function {
    /// Starts `spec.instances` execution environments; they stop when `shutdown` turns true.
    pub fn start(
        spec: FunctionSpec,
        shutdown: &watch::Receiver<bool>,
    ) -> (Arc<Self>, Vec<JoinHandle<()>>) {
        let spec = Arc::new(spec);
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(AsyncMutex::new(rx));
        let instances: Vec<_> = (1..=spec.instances.max(1))
            .map(|index| {
                Arc::new(Instance {
                    label: format!("{}#{index}", spec.name),
                    stats: Mutex::new(InstanceStats {
                        name: spec.name.clone(),
                        instance: index,
                        ..InstanceStats::default()
                    }),
                    kill: Notify::new(),
                })
            })
            .collect();
        let tasks = instances
            .iter()
            .map(|instance| {
                let environment = Supervisor {
                    spec: Arc::clone(&spec),
                    instance: Arc::clone(instance),
                    queue: Arc::clone(&rx),
                    requeue: tx.clone(),
                    shutdown: shutdown.clone(),
                };
                tokio::spawn(environment.run())
            })
            .collect();
        let function = Arc::new(Self {
            spec,
            queue: tx,
            instances,
        });
        (function, tasks)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn timeout(&self) -> Duration {
        self.spec.timeout
    }

    /// `arn:aws:lambda:{region}:{account}:function:{name}`.
    pub fn arn(&self) -> &str {
        &self.spec.arn
    }

    /// Invokes the function with `event` and waits for its response, at most `give_up_after`
    /// (queueing for a free environment included).
    pub async fn invoke(&self, event: impl Into<Bytes>, give_up_after: Duration) -> InvokeResult {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Invocation {
                event: event.into(),
                reply,
            })
            .map_err(|_| InvokeError::ShuttingDown)?;
        match tokio::time::timeout(give_up_after, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(InvokeError::ShuttingDown),
            Err(_) => Err(InvokeError::Unavailable(give_up_after)),
        }
    }

    pub fn stats(&self) -> Vec<InstanceStats> {
        self.instances
            .iter()
            .map(|i| i.stats.lock().unwrap().clone())
            .collect()
    }

    /// SIGKILLs the process of instance `index` (1-based), or of every instance when `None`.
    /// Returns the pids signalled.
    pub fn kill(&self, index: Option<usize>) -> Vec<u32> {
        self.instances
            .iter()
            .filter(|i| index.is_none_or(|n| i.stats.lock().unwrap().instance == n))
            .filter_map(|i| {
                let pid = i.stats.lock().unwrap().pid;
                if pid.is_some() {
                    i.kill.notify_one();
                }
                pid
            })
            .collect()
    }
}

/// Keeps one instance's execution environment alive.
struct Supervisor {
    spec: Arc<FunctionSpec>,
    instance: Arc<Instance>,
    queue: Arc<AsyncMutex<mpsc::UnboundedReceiver<Invocation>>>,
    requeue: mpsc::UnboundedSender<Invocation>,
    shutdown: watch::Receiver<bool>,
}

enum End {
    Shutdown,
    /// The environment is gone; `ready` if its process had asked for work (no back-off then).
    Restart {
        ready: bool,
    },
}

impl Supervisor {
    async fn run(mut self) {
        let mut backoff = Duration::ZERO;
        let mut first = true;
        loop {
            if !first {
                self.instance.update(|s| {
                    s.restarts += 1;
                    s.pid = None;
                    s.cold_start_ms = None;
                    s.in_flight = None;
                    s.runtime_api = None;
                });
            }
            first = false;
            match self.environment().await {
                End::Shutdown => {
                    self.instance.update(|s| {
                        s.pid = None;
                        s.in_flight = None;
                    });
                    return;
                }
                End::Restart { ready: true } => backoff = Duration::ZERO,
                End::Restart { ready: false } => {
                    backoff = (backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
                    tracing::warn!(instance = %self.instance.label, ?backoff, "environment failed before its first `next`; restarting after a pause");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stopped(&mut self.shutdown) => return,
                    }
                }
            }
        }
    }

    /// One execution environment, from spawn to its end.
    async fn environment(&mut self) -> End {
        let label = self.instance.label.clone();
        let listener = match tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(instance = %label, %error, "cannot bind a runtime API port");
                return End::Restart { ready: false };
            }
        };
        let addr = listener.local_addr().expect("bound address");
        let (next_tx, mut next_rx) = mpsc::channel(1);
        let (report_tx, mut reports) = mpsc::unbounded_channel();
        let runtime = Arc::new(RuntimeState {
            next: next_tx,
            reports: report_tx,
            in_flight: Mutex::new(None),
        });
        let server = AbortOnDrop(tokio::spawn(serve_runtime_api(
            listener,
            Arc::clone(&runtime),
        )));

        // A kill asked for while no process ran must not hit the new one.
        let _ = tokio::time::timeout(Duration::ZERO, self.instance.kill.notified()).await;
        let spawned = Instant::now();
        let mut child = match self.spawn(addr) {
            Ok(child) => child,
            Err(error) => {
                tracing::error!(instance = %label, binary = %self.spec.binary.display(), %error, "cannot start the function process");
                return End::Restart { ready: false };
            }
        };
        let pid = child.id();
        tracing::info!(instance = %label, pid, runtime_api = %addr, "execution environment started");
        self.instance.update(|s| {
            s.pid = pid;
            s.runtime_api = Some(addr.to_string());
        });

        let mut ready = false;
        let end = loop {
            // 1. The process asks for work (or dies trying).
            let waiter = tokio::select! {
                waiter = next_rx.recv() => match waiter {
                    Some(waiter) => waiter,
                    None => break End::Restart { ready },
                },
                Some(report) = reports.recv() => {
                    if let Report::InitError { error_type, message } = report {
                        tracing::error!(instance = %label, %error_type, %message, "init error");
                        self.instance.update(|s| s.errors += 1);
                        let _ = child.kill().await;
                        break End::Restart { ready };
                    }
                    continue;
                }
                status = child.wait() => {
                    tracing::warn!(instance = %label, status = %exit_status(status), "function process exited");
                    break End::Restart { ready };
                }
                () = self.instance.kill.notified() => {
                    let _ = child.start_kill();
                    continue;
                }
                () = stopped(&mut self.shutdown) => break End::Shutdown,
            };
            if !ready {
                ready = true;
                let cold = u64::try_from(spawned.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::info!(instance = %label, cold_start_ms = cold, "first `next` request");
                self.instance.update(|s| {
                    s.cold_start_ms = Some(cold);
                    s.cold_starts_ms.push(cold);
                });
            }

            // 2. Take the next invocation that still has someone waiting for it.
            let invocation = loop {
                tokio::select! {
                    invocation = async { self.queue.lock().await.recv().await } => match invocation {
                        Some(invocation) if invocation.reply.is_closed() => continue,
                        Some(invocation) => break Some(invocation),
                        None => break None,
                    },
                    status = child.wait() => {
                        tracing::warn!(instance = %label, status = %exit_status(status), "function process exited while idle");
                        break None;
                    }
                    () = self.instance.kill.notified() => {
                        let _ = child.start_kill();
                    }
                    () = stopped(&mut self.shutdown) => break None,
                }
            };
            let Some(invocation) = invocation else {
                break if *self.shutdown.borrow() {
                    End::Shutdown
                } else {
                    End::Restart { ready }
                };
            };

            // 3. Hand it out.
            let request_id = uuid_v4();
            let deadline = SystemTime::now() + self.spec.timeout;
            *runtime.in_flight.lock().unwrap() = Some(request_id.clone());
            let handout = Handout {
                request_id: request_id.clone(),
                deadline_ms: deadline
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or_default(),
                function_arn: self.spec.arn.clone(),
                trace_id: trace_id(),
                event: invocation.event.clone(),
            };
            if waiter.send(handout).is_err() {
                // The `next` request went away before it got the event: give the event back.
                *runtime.in_flight.lock().unwrap() = None;
                let _ = self.requeue.send(invocation);
                continue;
            }
            self.instance.update(|s| {
                s.invocations += 1;
                s.in_flight = Some(request_id.clone());
            });
            tracing::debug!(instance = %label, %request_id, "invocation handed out");

            // 4. Wait for its outcome.
            let timeout_at = tokio::time::Instant::now() + self.spec.timeout;
            let (outcome, end) = loop {
                tokio::select! {
                    Some(report) = reports.recv() => match report {
                        Report::Response { id, body } if id == request_id => break (Ok(body), None),
                        Report::Error { id, error_type, message } if id == request_id => {
                            break (Err(InvokeError::Function { error_type, message }), None);
                        }
                        Report::InitError { error_type, message } => {
                            tracing::error!(instance = %label, %error_type, %message, "init error during an invocation");
                        }
                        _ => {}
                    },
                    () = tokio::time::sleep_until(timeout_at) => {
                        tracing::warn!(instance = %label, %request_id, timeout = ?self.spec.timeout, "invocation timed out: killing the process");
                        let _ = child.kill().await;
                        break (Err(InvokeError::Timeout(self.spec.timeout)), Some(End::Restart { ready }));
                    }
                    status = child.wait() => {
                        let status = exit_status(status);
                        tracing::warn!(instance = %label, %request_id, %status, "function process exited during an invocation");
                        break (Err(InvokeError::Exited(status)), Some(End::Restart { ready }));
                    }
                    () = self.instance.kill.notified() => {
                        let _ = child.start_kill();
                    }
                    () = stopped(&mut self.shutdown) => {
                        break (Err(InvokeError::ShuttingDown), Some(End::Shutdown));
                    }
                }
            };
            *runtime.in_flight.lock().unwrap() = None;
            self.instance.update(|s| {
                s.in_flight = None;
                if outcome.is_err() {
                    s.errors += 1;
                }
            });
            if let Err(error) = &outcome {
                tracing::info!(instance = %label, %request_id, %error, "invocation failed");
            }
            let _ = invocation.reply.send(outcome);
            if let Some(end) = end {
                break end;
            }
        };
        let _ = child.kill().await;
        drop(server);
        end
    }

    fn spawn(&self, runtime_api: SocketAddr) -> std::io::Result<Child> {
        let spec = &self.spec;
        let dir = spec
            .binary
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut command = Command::new(&spec.binary);
        command
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(runtime_variables(spec, runtime_api, &dir))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn()?;
        let label = self.instance.label.clone();
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(pass_through(label.clone(), stdout));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(pass_through(label, stderr));
        }
        Ok(child)
    }
}

/// The variables Lambda sets in a function's environment (`provided.al2023`).
fn runtime_variables(
    spec: &FunctionSpec,
    runtime_api: SocketAddr,
    dir: &std::path::Path,
) -> Vec<(String, String)> {
    let date = time::OffsetDateTime::now_utc();
    let stream = format!(
        "{:04}/{:02}/{:02}/[$LATEST]{:032x}",
        date.year(),
        u8::from(date.month()),
        date.day(),
        rand::random::<u128>()
    );
    [
        ("AWS_LAMBDA_RUNTIME_API", runtime_api.to_string()),
        ("AWS_LAMBDA_FUNCTION_NAME", spec.name.clone()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            spec.memory_mb.to_string(),
        ),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_owned()),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{}", spec.name),
        ),
        ("AWS_LAMBDA_LOG_STREAM_NAME", stream),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".to_owned()),
        ("AWS_EXECUTION_ENV", "AWS_Lambda_provided.al2023".to_owned()),
        ("_HANDLER", "bootstrap".to_owned()),
        ("LAMBDA_TASK_ROOT", dir.display().to_string()),
        ("TZ", ":UTC".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Copies a process's output to our stderr, one line at a time, prefixed with the instance.
async fn pass_through(label: String, pipe: impl tokio::io::AsyncRead + Unpin) {
    let mut lines = tokio::io::BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        // `eprintln!` (not a raw stderr handle) so a test harness capturing output captures this.
        eprintln!("[{label}] {line}");
    }
}

fn exit_status(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(error) => format!("unknown ({error})"),
    }
}

/// Resolves when `shutdown` turns true or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---- the runtime API server of one environment ----

/// An invocation as the process receives it from `next`.
struct Handout {
    request_id: String,
    deadline_ms: u128,
    function_arn: String,
    trace_id: String,
    event: Bytes,
}

enum Report {
    Response {
        id: String,
        body: Bytes,
    },
    Error {
        id: String,
        error_type: String,
        message: String,
    },
    InitError {
        error_type: String,
        message: String,
    },
}

struct RuntimeState {
    next: mpsc::Sender<oneshot::Sender<Handout>>,
    reports: mpsc::UnboundedSender<Report>,
    /// The request id a response or error is accepted for.
    in_flight: Mutex<Option<String>>,
}

impl RuntimeState {
    fn take_in_flight(&self, id: &str) -> bool {
        let mut in_flight = self.in_flight.lock().unwrap();
        if in_flight.as_deref() == Some(id) {
            *in_flight = None;
            true
        } else {
            false
        }
    }
}

const RUNTIME: &str = "/2018-06-01/runtime";

async fn serve_runtime_api(listener: tokio::net::TcpListener, state: Arc<RuntimeState>) {
    let router = Router::new()
        .route(&format!("{RUNTIME}/invocation/next"), get(next))
        .route(
            &format!("{RUNTIME}/invocation/{{id}}/response"),
            post(response),
        )
        .route(&format!("{RUNTIME}/invocation/{{id}}/error"), post(error))
        .route(&format!("{RUNTIME}/init/error"), post(init_error))
        .layer(DefaultBodyLimit::max(MAX_RESPONSE_BYTES))
        .with_state(state);
    if let Err(error) = axum::serve(listener, router).await {
        tracing::error!(%error, "runtime API server stopped");
    }
}

async fn next(State(state): State<Arc<RuntimeState>>) -> Response {
    let (tx, rx) = oneshot::channel();
    if state.next.send(tx).await.is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let Ok(handout) = rx.await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let mut response = (StatusCode::OK, handout.event).into_response();
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set("content-type", "application/json".to_owned());
    set("lambda-runtime-aws-request-id", handout.request_id);
    set(
        "lambda-runtime-deadline-ms",
        handout.deadline_ms.to_string(),
    );
    set("lambda-runtime-invoked-function-arn", handout.function_arn);
    set("lambda-runtime-trace-id", handout.trace_id);
    response
}

async fn response(
    State(state): State<Arc<RuntimeState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if !state.take_in_flight(&id) {
        return invalid_request_id();
    }
    let _ = state.reports.send(Report::Response { id, body });
    accepted()
}

async fn error(
    State(state): State<Arc<RuntimeState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !state.take_in_flight(&id) {
        return invalid_request_id();
    }
    let (error_type, message) = error_details(&headers, &body);
    let _ = state.reports.send(Report::Error {
        id,
        error_type,
        message,
    });
    accepted()
}

async fn init_error(
    State(state): State<Arc<RuntimeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (error_type, message) = error_details(&headers, &body);
    let _ = state.reports.send(Report::InitError {
        error_type,
        message,
    });
    accepted()
}

/// `errorType` and `errorMessage` from an error report (body first, then the header).
fn error_details(headers: &HeaderMap, body: &[u8]) -> (String, String) {
    let parsed: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let error_type = parsed["errorType"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| {
            headers
                .get("lambda-runtime-function-error-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "Unhandled".to_owned());
    let message = parsed["errorMessage"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    (error_type, message)
}

fn accepted() -> Response {
    (StatusCode::ACCEPTED, axum::Json(json!({"status": "OK"}))).into_response()
}

fn invalid_request_id() -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({
            "errorMessage": "Invalid request ID",
            "errorType": "InvalidRequestID",
        })),
    )
        .into_response()
}

/// A random request id in the UUID v4 form Lambda uses.
pub fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]),
        u16::from_be_bytes([b[8], b[9]]),
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]]),
    )
}

/// An X-Ray trace header: `Root=1-{epoch hex}-{96 random bits};Parent=…;Sampled=0`.
fn trace_id() -> String {
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let root: u128 = rand::random::<u128>() >> 32;
    format!(
        "Root=1-{epoch:08x}-{root:024x};Parent={:016x};Sampled=0",
        rand::random::<u64>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_look_like_uuid_v4() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        let parts: Vec<_> = id.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
        assert_eq!(&id[14..15], "4");
        assert_ne!(uuid_v4(), id);
    }

    #[test]
    fn trace_ids_have_the_x_ray_shape() {
        let t = trace_id();
        assert!(t.starts_with("Root=1-"), "{t}");
        let root = t.split(';').next().unwrap();
        assert_eq!(root.len(), "Root=1-".len() + 8 + 1 + 24, "{t}");
        assert!(t.ends_with(";Sampled=0"));
    }

    #[test]
    fn error_reports_take_type_and_message_from_the_body_or_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "lambda-runtime-function-error-type",
            HeaderValue::from_static("Runtime.Unknown"),
        );
        assert_eq!(
            error_details(&headers, br#"{"errorType":"Boom","errorMessage":"bad"}"#),
            ("Boom".to_owned(), "bad".to_owned())
        );
        assert_eq!(
            error_details(&headers, b"not json"),
            ("Runtime.Unknown".to_owned(), "not json".to_owned())
        );
        assert_eq!(error_details(&HeaderMap::new(), b"").0, "Unhandled");
    }
}
