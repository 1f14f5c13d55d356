//! `tidings-aws-local`: plays AWS's part for the real, built Lambda function binaries.
//!
//! - Lambda: one runtime API server per execution environment ([`runtime`]), deadlines, restarts.
//! - API Gateway HTTP API (payload 2.0) in front of `tidings-api` ([`apigw`], [`server`]).
//! - SQS event source mappings (events and deliveries queues → `tidings-deliver`) with partial
//!   batch failures ([`sqs`]); the emulator's redrive policy moves poison messages to the DLQs.
//! - A DynamoDB Streams event source mapping (the table's stream → `tidings-deliver`) with filter
//!   criteria, partial batch failures, retries and an on-failure queue ([`streams`]), when the
//!   fan-out is started by the stream (`--fan-out stream`).
//! - An EventBridge schedule invoking `tidings-sweep` ([`schedule`]).
//!
//! DynamoDB and SQS themselves come from an emulator (moto server) at `AWS_ENDPOINT_URL`; the
//! table and queues are created at start ([`resources`]). The binary prints [`Info`] as one JSON
//! line; tests can also run the whole thing in process with [`AwsLocal::start`].
//! See `docs/aws-local.md`.

pub mod apigw;
pub mod meter;
pub mod resources;
pub mod runtime;
pub mod schedule;
pub mod server;
pub mod sqs;
#[cfg(test)]
mod stand_in_tests;
pub mod streams;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use tidings_core::app::{App, AppConfig};
use tidings_core::aws::SqsQueue;
use tidings_core::aws::dynamo::DynamoStore;
use tidings_core::domain::TenantId;
use tidings_core::ports::SystemClock;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use self::meter::Meter;
use self::resources::Resources;
use self::runtime::{Function, FunctionSpec, InstanceStats};
use self::schedule::Schedule;
use self::sqs::{EventSourceMapping, MappingStats};
use self::streams::{StreamMapping, StreamStats};

pub const API: &str = "tidings-api";
pub const DELIVER: &str = "tidings-deliver";
pub const SWEEP: &str = "tidings-sweep";

/// What starts an event's fan-out on AWS (the functions learn it from `TIDINGS_FAN_OUT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FanOut {
    /// The table's change stream: a new event item reaches `tidings-deliver` through the
    /// DynamoDB Streams event source mapping.
    Stream,
    /// A fan-out job the API sends through the deliveries queue (no stream mapping).
    Queue,
}

impl FanOut {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stream => "stream",
            Self::Queue => "queue",
        }
    }
}

/// Command line (and in-process) configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "tidings-aws-local",
    version,
    about = "Runs the built Tidings Lambda functions locally: Lambda runtime API, API Gateway (HTTP API), \
             SQS and DynamoDB stream event source mappings and the sweep schedule, against an AWS emulator \
             at AWS_ENDPOINT_URL"
)]
pub struct Config {
    /// Address of the API Gateway side and the admin endpoints (`/_aws_local/…`); port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// Where the built functions are: `DIR/tidings-api` (cargo build) or
    /// `DIR/tidings-api/bootstrap` (cargo lambda build), likewise for deliver and sweep.
    #[arg(long, value_name = "DIR")]
    pub bin_dir: PathBuf,
    /// Prefix of the table and queue names (default: `tidings-local-` and a random suffix).
    #[arg(long, value_name = "NAME")]
    pub prefix: Option<String>,
    /// Most messages per SQS batch (1–10).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..=10))]
    pub batch_size: i32,
    /// Visibility timeout of the events and deliveries queues (whole seconds; at least the
    /// function timeout, as AWS requires for an SQS event source).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub visibility_timeout: Duration,
    /// Receives before the queue moves a message to its DLQ.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_receive_count: u32,
    /// What starts an event's fan-out: `stream` (the table's stream, through a DynamoDB Streams
    /// event source mapping) or `queue` (a job on the deliveries queue; no stream mapping).
    /// Passed to the functions as TIDINGS_FAN_OUT.
    #[arg(long, value_enum, default_value_t = FanOut::Stream)]
    pub fan_out: FanOut,
    /// Most records per DynamoDB stream batch (`BatchSize`, 1–10000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub stream_batch_size: u32,
    /// How long the stream mapping gathers records before invoking
    /// (`MaximumBatchingWindowInSeconds`; `0s`: as soon as there are any).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub stream_batching_window: Duration,
    /// Retries of a failed stream batch before it is given up to the fan-out DLQ
    /// (`MaximumRetryAttempts`, 0–10000; -1: never given up).
    #[arg(long, default_value_t = 10, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1..=10_000))]
    pub stream_max_retries: i32,
    /// How often `tidings-sweep` runs (`0s`: never on its own; `POST /_aws_local/sweep` still works).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub sweep_interval: Duration,
    /// Lambda timeout of every function: past it the process is killed and replaced.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub function_timeout: Duration,
    /// Concurrent `tidings-deliver` processes (SQS batches in flight across both queues).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub deliver_instances: u32,
    /// Concurrent `tidings-api` processes (HTTP requests in flight).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub api_instances: u32,
    /// AWS_LAMBDA_FUNCTION_MEMORY_SIZE given to the functions (informational).
    #[arg(long, default_value_t = 128)]
    pub memory_size: u32,
    /// Extra environment for the functions (repeatable), on top of the TIDINGS_* and AWS_*
    /// variables passed through from this process's environment.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// API key registered in the table at start for `--tenant` (generated when absent; printed
    /// in the JSON line as `apiKey`).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Tenant the API key belongs to.
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub tenant: String,
    /// Delete the table and queues on exit.
    #[arg(long)]
    pub cleanup: bool,
}

impl Config {
    /// The defaults, with `bin_dir` (for in-process use; tweak the fields after).
    pub fn new(bin_dir: impl Into<PathBuf>) -> Self {
        let bin_dir = bin_dir.into();
        let mut config =
            <Self as clap::Parser>::parse_from(["tidings-aws-local", "--bin-dir", "."]);
        config.bin_dir = bin_dir;
        config
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.function_timeout.is_zero() {
            bail!("--function-timeout must be more than 0");
        }
        if self.visibility_timeout < self.function_timeout {
            bail!(
                "--visibility-timeout ({}) is less than --function-timeout ({}): AWS refuses such an SQS event source, since a batch could reappear while still being processed",
                humantime::format_duration(self.visibility_timeout),
                humantime::format_duration(self.function_timeout)
            );
        }
        if resources::whole_seconds(self.visibility_timeout) > 43_200 {
            bail!("--visibility-timeout is at most 12h");
        }
        if self.stream_batching_window > Duration::from_secs(300) {
            bail!("--stream-batching-window is at most 5m (as MaximumBatchingWindowInSeconds)");
        }
        if let Some(prefix) = &self.prefix {
            validate_prefix(prefix)?;
        }
        TenantId::parse(&self.tenant).context("--tenant")?;
        if self.api_key.as_ref().is_some_and(|k| k.len() < 16) {
            bail!("--api-key must be at least 16 characters");
        }
        Ok(())
    }
}

/// `30s`, `500ms`, `2m` (humantime), or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 30s, 500ms, 2m)"))
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn validate_prefix(prefix: &str) -> anyhow::Result<()> {
    // Queue names: 1–80 of [A-Za-z0-9_-]; the longest suffix is `deliveries-dlq`.
    let max = 80 - "deliveries-dlq".len();
    if prefix.is_empty()
        || prefix.len() > max
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("--prefix must be 1–{max} of A–Z, a–z, 0–9, '-' and '_', got {prefix:?}");
    }
    Ok(())
}

fn random_prefix() -> String {
    use rand::Rng as _;
    let suffix: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(8)
        .map(|c| char::from(c).to_ascii_lowercase())
        .collect();
    format!("tidings-local-{suffix}-")
}

/// `DIR/NAME` if it is a file, else `DIR/NAME/bootstrap` (the cargo-lambda layout); absolute,
/// since a function runs in its own directory.
pub fn find_binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let plain = dir.join(name);
    let bootstrap = plain.join("bootstrap");
    for candidate in [&plain, &bootstrap] {
        if candidate.is_file() {
            return std::fs::canonicalize(candidate)
                .with_context(|| format!("resolving {}", candidate.display()));
        }
    }
    bail!(
        "{name} not found: looked for {} and {} (build with `cargo build --workspace --bins` or `cargo lambda build`)",
        plain.display(),
        bootstrap.display()
    )
}

/// Which of this process's variables a function inherits: `TIDINGS_*`, `AWS_*` (but not
/// `AWS_LAMBDA_*`, which are set per environment), and a few process basics.
fn inherited(name: &str) -> bool {
    (name.starts_with("TIDINGS_") || name.starts_with("AWS_")) && !name.starts_with("AWS_LAMBDA_")
        || matches!(
            name,
            "PATH" | "LANG" | "RUST_LOG" | "RUST_BACKTRACE" | "SSL_CERT_FILE" | "SSL_CERT_DIR"
        )
}

/// A function's environment: inherited variables, then `--env`, then what the stand-in owns.
pub fn function_env(
    own: impl IntoIterator<Item = (String, String)>,
    extra: &[(String, String)],
    resources: &Resources,
    region: &str,
    fan_out: FanOut,
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = own.into_iter().filter(|(k, _)| inherited(k)).collect();
    env.extend(extra.iter().cloned());
    env.insert("AWS_REGION".into(), region.into());
    env.insert("AWS_DEFAULT_REGION".into(), region.into());
    env.insert("TIDINGS_TABLE".into(), resources.table.clone());
    env.insert(
        "TIDINGS_DELIVERIES_QUEUE_URL".into(),
        resources.deliveries.url.clone(),
    );
    env.insert("TIDINGS_FAN_OUT".into(), fan_out.as_str().into());
    env.into_iter().collect()
}

/// `env` with `AWS_ENDPOINT_URL` set to `endpoint` (the caller's meter listener).
fn with_endpoint(env: &[(String, String)], endpoint: &str) -> Vec<(String, String)> {
    env.iter()
        .filter(|(k, _)| k != "AWS_ENDPOINT_URL")
        .cloned()
        .chain([("AWS_ENDPOINT_URL".to_owned(), endpoint.to_owned())])
        .collect()
}

/// The JSON line printed at start (and served at `GET /_aws_local`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Info {
    pub api_url: String,
    pub events_queue_url: String,
    pub deliveries_queue_url: String,
    pub table_name: String,
    pub events_dlq_url: String,
    pub deliveries_dlq_url: String,
    /// Where the stream mapping sends the failure records of batches it gave up.
    pub fan_out_dlq_url: String,
    /// The table's change stream.
    pub stream_arn: Option<String>,
    pub fan_out: FanOut,
    pub admin_url: String,
    pub prefix: String,
    pub region: String,
    /// A key of `tenant`, for `Authorization: Bearer …`.
    pub api_key: String,
    pub tenant: String,
}

/// A running stand-in. Dropping it stops everything (the function processes are killed);
/// [`AwsLocal::shutdown`] also waits for that and cleans up when configured to.
pub struct AwsLocal {
    pub info: Info,
    pub addr: SocketAddr,
    shared: Arc<server::Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    cleanup: Option<(Resources, aws_sdk_dynamodb::Client, aws_sdk_sqs::Client)>,
}

impl AwsLocal {
    /// Creates the table and queues, starts the functions, the pollers, the schedule and the
    /// HTTP server. Needs `AWS_ENDPOINT_URL` (the emulator) in this process's environment.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .ok()
            .filter(|v| !v.trim().is_empty());
        let Some(endpoint) = endpoint else {
            bail!(
                "AWS_ENDPOINT_URL is not set. tidings-aws-local runs against an AWS emulator, never AWS itself: \
                 start one (e.g. `moto_server -H 127.0.0.1 -p 5555`) and set AWS_ENDPOINT_URL=http://127.0.0.1:5555 \
                 AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test"
            );
        };
        let api_bin = find_binary(&config.bin_dir, API)?;
        let deliver_bin = find_binary(&config.bin_dir, DELIVER)?;
        let sweep_bin = find_binary(&config.bin_dir, SWEEP)?;
        let prefix = config.prefix.clone().unwrap_or_else(random_prefix);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "listening beyond loopback: anyone who can reach it can call the API and the admin endpoints");
        }

        let sdk = tidings_core::aws::dynamo::load_sdk_config().await;
        let region = sdk
            .region()
            .map(ToString::to_string)
            .context("no AWS region: set AWS_REGION (e.g. us-east-1)")?;
        let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
        let sqs_client = aws_sdk_sqs::Client::new(&sdk);
        let resources = Resources::create(
            &dynamo,
            &sqs_client,
            &prefix,
            config.visibility_timeout,
            config.max_receive_count,
        )
        .await
        .with_context(|| format!("creating the table and queues at {endpoint}"))?;
        let account_id = resources.account_id();
        tracing::info!(%endpoint, %prefix, table = %resources.table, "table and queues created");
        let api_key = register_api_key(&dynamo, &sqs_client, &resources, &config).await?;
        let allow_var = tidings_core::aws::settings::ALLOW_CALLBACK_CIDRS_VAR;
        if std::env::var_os(allow_var).is_none() && !config.env.iter().any(|(k, _)| k == allow_var)
        {
            tracing::info!(
                "{allow_var} is not set: the functions refuse callbacks to loopback and private addresses \
                 (for a receiver on this machine pass e.g. --env {allow_var}=127.0.0.0/8)"
            );
        }

        let (shutdown, stop) = watch::channel(false);
        let mut tasks = Vec::new();
        // Every caller reaches the emulator through the meter, on a listener of its own.
        let meter = Meter::new(&endpoint);
        let mut endpoints = BTreeMap::new();
        for caller in [API, DELIVER, SWEEP, meter::EVENT_SOURCE_MAPPING] {
            let (url, task) = meter.listen(caller, stop.clone()).await?;
            endpoints.insert(caller, url);
            tasks.push(task);
        }
        let own = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        let mut env = function_env(own, &config.env, &resources, &region, config.fan_out);
        // As the template does: the functions learn the deliver function's timeout (its lease
        // outlives it; see AwsSettings).
        env.push((
            "TIDINGS_DELIVER_TIMEOUT".to_owned(),
            humantime::format_duration(config.function_timeout).to_string(),
        ));
        let spec = |name: &str, binary: PathBuf, instances: u32| FunctionSpec {
            name: name.to_owned(),
            binary,
            env: with_endpoint(&env, &endpoints[name]),
            timeout: config.function_timeout,
            memory_mb: config.memory_size,
            instances: instances as usize,
            arn: format!("arn:aws:lambda:{region}:{account_id}:function:{name}"),
        };
        let (api, t) = Function::start(spec(API, api_bin, config.api_instances), &stop);
        tasks.extend(t);
        let (deliver, t) =
            Function::start(spec(DELIVER, deliver_bin, config.deliver_instances), &stop);
        tasks.extend(t);
        let (sweep, t) = Function::start(spec(SWEEP, sweep_bin, 1), &stop);
        tasks.extend(t);

        let mapping_sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::config::Builder::from(&sdk)
                .endpoint_url(&endpoints[meter::EVENT_SOURCE_MAPPING])
                .build(),
        );
        let concurrency = Arc::new(Semaphore::new(config.deliver_instances as usize));
        let mappings: Vec<Arc<EventSourceMapping>> = [&resources.events, &resources.deliveries]
            .into_iter()
            .map(|queue| {
                Arc::new(EventSourceMapping {
                    client: mapping_sqs.clone(),
                    queue_url: queue.url.clone(),
                    queue_arn: queue.arn.clone(),
                    region: region.clone(),
                    batch_size: config.batch_size,
                    function: Arc::clone(&deliver),
                    concurrency: Arc::clone(&concurrency),
                    stats: Arc::new(MappingStats::default()),
                })
            })
            .collect();
        for mapping in &mappings {
            tasks.push(tokio::spawn(Arc::clone(mapping).run(stop.clone())));
        }
        let stream_mappings: Vec<Arc<StreamMapping>> = match config.fan_out {
            FanOut::Queue => Vec::new(),
            FanOut::Stream => {
                let stream_arn = resources.stream_arn.clone().with_context(|| {
                    format!(
                        "table {} has no change stream, which --fan-out stream needs (use a new --prefix, or --fan-out queue)",
                        resources.table
                    )
                })?;
                vec![Arc::new(StreamMapping {
                    // Straight to the emulator: Lambda's stream polling is not billed.
                    client: aws_sdk_dynamodbstreams::Client::new(&sdk),
                    sqs: mapping_sqs.clone(),
                    stream_arn,
                    region: region.clone(),
                    on_failure_queue_url: resources.fan_out_dlq.url.clone(),
                    batch_size: config.stream_batch_size as usize,
                    batching_window: config.stream_batching_window,
                    max_retries: u32::try_from(config.stream_max_retries).ok(),
                    filters: vec![streams::fan_out_filter()],
                    function: Arc::clone(&deliver),
                    concurrency: Arc::clone(&concurrency),
                    stats: Arc::new(StreamStats::default()),
                })]
            }
        };
        for mapping in &stream_mappings {
            tasks.push(tokio::spawn(Arc::clone(mapping).run(stop.clone())));
        }

        let schedule = Arc::new(Schedule {
            function: Arc::clone(&sweep),
            rule_arn: format!("arn:aws:events:{region}:{account_id}:rule/{prefix}sweep"),
            account_id: account_id.clone(),
            region: region.clone(),
            interval: config.sweep_interval,
        });
        if !config.sweep_interval.is_zero() {
            tasks.push(tokio::spawn(Arc::clone(&schedule).run(stop.clone())));
        }

        let base = format!("http://{addr}");
        let info = Info {
            api_url: base.clone(),
            events_queue_url: resources.events.url.clone(),
            deliveries_queue_url: resources.deliveries.url.clone(),
            table_name: resources.table.clone(),
            events_dlq_url: resources.events_dlq.url.clone(),
            deliveries_dlq_url: resources.deliveries_dlq.url.clone(),
            fan_out_dlq_url: resources.fan_out_dlq.url.clone(),
            stream_arn: resources.stream_arn.clone(),
            fan_out: config.fan_out,
            admin_url: format!("{base}/_aws_local"),
            prefix: prefix.clone(),
            region: region.clone(),
            api_key,
            tenant: config.tenant.clone(),
        };
        let shared = Arc::new(server::Shared {
            info: info.clone(),
            account_id,
            api_id: prefix_api_id(),
            listen_port: addr.port(),
            functions: vec![Arc::clone(&api), deliver, sweep],
            api,
            mappings,
            stream_mappings,
            sweep: schedule,
            meter,
        });
        let router = server::router(Arc::clone(&shared));
        let mut server_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|s| *s).await;
            })
            .await;
            if let Err(error) = served {
                tracing::error!(%error, "HTTP server stopped");
            }
        }));

        Ok(Self {
            info,
            addr,
            shared,
            shutdown,
            tasks,
            cleanup: config.cleanup.then_some((resources, dynamo, sqs_client)),
        })
    }

    /// A function by name (`tidings-api`, `tidings-deliver`, `tidings-sweep`).
    pub fn function(&self, name: &str) -> Option<Arc<Function>> {
        self.shared
            .functions
            .iter()
            .find(|f| f.name() == name)
            .cloned()
    }

    /// The stream mappings' counters (what `GET /_aws_local/streams` serves).
    pub fn stream_stats(&self) -> Vec<streams::StreamSnapshot> {
        self.shared
            .stream_mappings
            .iter()
            .map(|m| m.snapshot())
            .collect()
    }

    /// The DynamoDB and SQS usage meter (what `GET /_aws_local/meter` serves).
    pub fn meter(&self) -> &Meter {
        &self.shared.meter
    }

    /// Every execution environment (what `GET /_aws_local/functions` serves).
    pub fn instances(&self) -> Vec<InstanceStats> {
        self.shared
            .functions
            .iter()
            .flat_map(|f| f.stats())
            .collect()
    }

    /// Stops everything, waits for the function processes to be killed, then deletes the table
    /// and queues if `--cleanup` was given.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        let tasks = std::mem::take(&mut self.tasks);
        let all = futures_join(tasks);
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 10 s");
        }
        if let Some((resources, dynamo, sqs)) = self.cleanup.take() {
            resources.delete(&dynamo, &sqs).await;
            tracing::info!(prefix = %self.info.prefix, "table and queues deleted");
        }
    }
}

impl Drop for AwsLocal {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// Registers `--api-key` (or a generated key) for `--tenant` in the table, as `tidings keys
/// create` does for the SQLite store.
async fn register_api_key(
    dynamo: &aws_sdk_dynamodb::Client,
    sqs: &aws_sdk_sqs::Client,
    resources: &Resources,
    config: &Config,
) -> anyhow::Result<String> {
    let tenant = TenantId::parse(&config.tenant).context("--tenant")?;
    let app = App::new(
        DynamoStore::new(dynamo.clone(), resources.table.clone()),
        SqsQueue::new(sqs.clone(), resources.deliveries.url.clone()),
        SystemClock,
        AppConfig::default(),
    );
    match &config.api_key {
        Some(key) => {
            app.add_api_key(&tenant, key)
                .await
                .context("registering --api-key")?;
            Ok(key.clone())
        }
        None => app
            .create_api_key(&tenant)
            .await
            .context("creating an API key"),
    }
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// An API Gateway-like id: 10 lower-case letters and digits.
fn prefix_api_id() -> String {
    use rand::Rng as _;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(10)
        .map(|c| char::from(c).to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use resources::Queue;

    fn queue(name: &str) -> Queue {
        Queue {
            name: name.into(),
            url: format!("http://127.0.0.1:5555/123456789012/{name}"),
            arn: format!("arn:aws:sqs:us-east-1:123456789012:{name}"),
        }
    }

    fn resources() -> Resources {
        Resources {
            table: "p-table".into(),
            events: queue("p-events"),
            events_dlq: queue("p-events-dlq"),
            deliveries: queue("p-deliveries"),
            deliveries_dlq: queue("p-deliveries-dlq"),
            fan_out_dlq: queue("p-fan-out-dlq"),
            stream_arn: None,
        }
    }

    #[test]
    fn functions_inherit_tidings_and_aws_variables_and_get_their_resources() {
        let own = [
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("TIDINGS_RETRY_SCHEDULE", "0s,1s"),
            ("TIDINGS_TABLE", "someone-elses"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:5555"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:1"),
            ("CARGO_HOME", "/x"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let extra = [
            ("TIDINGS_SWEEP_GRACE".to_owned(), "2s".to_owned()),
            // The stand-in decides the fan-out: --fan-out, not --env.
            ("TIDINGS_FAN_OUT".to_owned(), "queue".to_owned()),
        ];
        let env: BTreeMap<_, _> =
            function_env(own, &extra, &resources(), "eu-west-1", FanOut::Stream)
                .into_iter()
                .collect();
        assert_eq!(env["PATH"], "/usr/bin");
        assert_eq!(env["TIDINGS_RETRY_SCHEDULE"], "0s,1s");
        assert_eq!(env["TIDINGS_SWEEP_GRACE"], "2s");
        assert_eq!(env["TIDINGS_TABLE"], "p-table");
        assert_eq!(
            env["TIDINGS_DELIVERIES_QUEUE_URL"],
            "http://127.0.0.1:5555/123456789012/p-deliveries"
        );
        assert_eq!(env["AWS_ENDPOINT_URL"], "http://127.0.0.1:5555");
        assert_eq!(env["AWS_REGION"], "eu-west-1");
        assert_eq!(env["AWS_ACCESS_KEY_ID"], "test");
        assert_eq!(env["TIDINGS_FAN_OUT"], "stream");
        let queued = function_env([], &[], &resources(), "eu-west-1", FanOut::Queue);
        assert!(queued.contains(&("TIDINGS_FAN_OUT".to_owned(), "queue".to_owned())));
        for absent in ["HOME", "CARGO_HOME", "AWS_LAMBDA_RUNTIME_API"] {
            assert!(!env.contains_key(absent), "{absent}");
        }
    }

    #[test]
    fn binaries_are_found_in_both_layouts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(API), b"").unwrap();
        std::fs::create_dir(dir.path().join(DELIVER)).unwrap();
        std::fs::write(dir.path().join(DELIVER).join("bootstrap"), b"").unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(find_binary(dir.path(), API).unwrap(), root.join(API));
        assert_eq!(
            find_binary(dir.path(), DELIVER).unwrap(),
            root.join(DELIVER).join("bootstrap")
        );
        let missing = find_binary(dir.path(), SWEEP).unwrap_err().to_string();
        assert!(missing.contains("tidings-sweep not found"), "{missing}");
    }

    #[test]
    fn flags_parse_with_defaults_and_checks() {
        let config = Config::new("target/debug");
        assert_eq!(config.listen, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(config.batch_size, 10);
        assert_eq!(config.visibility_timeout, Duration::from_secs(30));
        assert_eq!(config.max_receive_count, 3);
        assert_eq!(config.sweep_interval, Duration::from_secs(60));
        assert_eq!(config.function_timeout, Duration::from_secs(30));
        assert_eq!(config.deliver_instances, 2);
        assert_eq!(config.fan_out, FanOut::Stream);
        assert_eq!(
            config.stream_batch_size, 50,
            "the template's StreamBatchSize"
        );
        assert_eq!(config.stream_batching_window, Duration::ZERO);
        assert_eq!(config.stream_max_retries, 10);
        config.validate().unwrap();

        let config = <Config as clap::Parser>::try_parse_from([
            "x",
            "--bin-dir",
            "d",
            "--listen",
            "127.0.0.1:0",
            "--sweep-interval",
            "1s",
            "--visibility-timeout",
            "5",
            "--function-timeout",
            "2500ms",
            "--env",
            "TIDINGS_RETRY_SCHEDULE=0s,1s",
            "--prefix",
            "t-1_",
            "--fan-out",
            "queue",
            "--stream-batch-size",
            "5",
            "--stream-batching-window",
            "500ms",
            "--stream-max-retries",
            "-1",
        ])
        .unwrap();
        assert_eq!(config.fan_out, FanOut::Queue);
        assert_eq!(config.stream_batch_size, 5);
        assert_eq!(config.stream_batching_window, Duration::from_millis(500));
        assert_eq!(config.stream_max_retries, -1);
        assert_eq!(config.visibility_timeout, Duration::from_secs(5));
        assert_eq!(config.function_timeout, Duration::from_millis(2500));
        assert_eq!(
            config.env,
            [("TIDINGS_RETRY_SCHEDULE".to_owned(), "0s,1s".to_owned())]
        );
        config.validate().unwrap();

        let mut bad = config.clone();
        bad.visibility_timeout = Duration::from_secs(1);
        assert!(bad.validate().is_err());
        let mut bad = config.clone();
        bad.prefix = Some("has space".into());
        assert!(bad.validate().is_err());
        assert!(
            <Config as clap::Parser>::try_parse_from(["x", "--bin-dir", "d", "--batch-size", "11"])
                .is_err()
        );
        assert!(
            <Config as clap::Parser>::try_parse_from(["x", "--bin-dir", "d", "--env", "NOVALUE"])
                .is_err()
        );
        for bad in [
            ["--fan-out", "kinesis"],
            ["--stream-batch-size", "0"],
            ["--stream-batch-size", "10001"],
            ["--stream-max-retries", "-2"],
        ] {
            let args = ["x", "--bin-dir", "d", bad[0], bad[1]];
            assert!(
                <Config as clap::Parser>::try_parse_from(args).is_err(),
                "{bad:?}"
            );
        }
        let mut bad = config.clone();
        bad.stream_batching_window = Duration::from_secs(301);
        assert!(bad.validate().is_err());
    }

    #[test]
    fn random_prefixes_make_valid_distinct_names() {
        let a = random_prefix();
        validate_prefix(&a).unwrap();
        assert!(a.starts_with("tidings-local-"));
        assert_ne!(a, random_prefix());
    }
}
