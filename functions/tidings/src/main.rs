//! `tidings`: the whole service on a laptop (`serve`), API keys (`keys create`) and a receiver
//! that prints and verifies deliveries (`listen`).

mod bench;
mod listen;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tidings_core::app::{App, AppConfig};
use tidings_core::domain::TenantId;
use tidings_core::egress::{EgressPolicy, parse_cidr_list};
use tidings_core::local::{LocalQueue, LocalServer, LocalServerConfig, prepare_data_dir};
use tidings_core::ports::SystemClock;
use tidings_core::retry::RetrySchedule;
use tidings_core::sqlite::SqliteStore;

#[derive(Parser)]
#[command(
    name = "tidings",
    version,
    about = "Signed webhook delivery, with retries and an attempt log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole service in one process: HTTP API, delivery workers, retry sweep, SQLite store.
    Serve(ServeArgs),
    /// Manage API keys (works while `serve` runs on the same data directory).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// A webhook receiver for trying Tidings out: prints each delivery and verifies its signature.
    Listen(listen::ListenArgs),
    /// The end-to-end benchmark: a `serve` child on a fresh data directory, a verifying receiver,
    /// N events through the API, and the same load straight to the receiver as a baseline. Prints
    /// one JSON line.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address for the HTTP API.
    #[arg(long, env = "TIDINGS_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where the SQLite database, the lock and the generated API key live.
    #[arg(long, env = "TIDINGS_DATA_DIR", default_value = "./.tidings")]
    data_dir: PathBuf,
    /// API key of the `default` tenant. Generated and saved in the data directory when absent.
    #[arg(long, env = "TIDINGS_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Delays before each attempt, e.g. `0s,5s,5m,30m,2h,5h,10h,10h` (the default).
    #[arg(long, env = "TIDINGS_RETRY_SCHEDULE", default_value_t = RetrySchedule::default())]
    retry_schedule: RetrySchedule,
    /// Callback address ranges the egress guard lets through besides public addresses, e.g.
    /// `127.0.0.0/8,192.168.0.0/16`. The default (unset) allows loopback, for local development;
    /// an empty value allows public addresses only. Link-local addresses need an explicit entry,
    /// metadata addresses one that names them exactly.
    #[arg(long, env = "TIDINGS_ALLOW_CALLBACK_CIDRS")]
    allow_callback_cidrs: Option<String>,
    /// Deliveries attempted at once.
    #[arg(long, env = "TIDINGS_WORKERS", default_value_t = 64)]
    workers: usize,
    /// Total time allowed for one delivery request.
    #[arg(long, env = "TIDINGS_REQUEST_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// How often the sweep looks for due deliveries.
    #[arg(long, env = "TIDINGS_SWEEP_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    sweep_interval: Duration,
    /// How long a queued delivery may wait before the sweep sends it again.
    #[arg(long, env = "TIDINGS_SWEEP_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    sweep_grace: Duration,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an API key for a tenant and print it (only its hash is stored).
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, env = "TIDINGS_DATA_DIR", default_value = "./.tidings")]
        data_dir: PathBuf,
    },
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TIDINGS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("TIDINGS_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Keys {
            command: KeysCommand::Create { tenant, data_dir },
        } => create_key(&tenant, data_dir).await,
        Command::Listen(args) => listen::run(args).await,
        Command::Bench(args) => bench::run(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (egress, egress_note) = match args.allow_callback_cidrs.as_deref() {
        None => (
            EgressPolicy::local_development(),
            "local development: loopback allowed (--allow-callback-cidrs adds ranges such as 192.168.0.0/16; an empty value refuses loopback too)".to_owned(),
        ),
        Some(list) => {
            let nets = parse_cidr_list(list).context("--allow-callback-cidrs")?;
            let note = if nets.is_empty() {
                "strict: public addresses only".to_owned()
            } else {
                format!("public addresses and {list}")
            };
            (EgressPolicy::new(nets), note)
        }
    };
    tracing::info!(policy = %egress_note, "egress guard");
    let mut config = LocalServerConfig::new(args.listen, args.data_dir.clone());
    config.api_key = args.api_key;
    config.schedule = args.retry_schedule.clone();
    config.egress = egress;
    config.workers = args.workers;
    config.request_timeout = args.request_timeout;
    config.sweep_interval = args.sweep_interval;
    config.sweep_grace = args.sweep_grace;
    let server = LocalServer::start(config).await?;

    let key_note = if server.api_key_generated {
        format!(
            " (generated; saved in {})",
            args.data_dir.join("api-key").display()
        )
    } else {
        String::new()
    };
    println!("Tidings {} — local mode", env!("CARGO_PKG_VERSION"));
    println!("  API:      http://{}", server.addr);
    println!(
        "  API key:  {}{key_note}  (tenant `default`)",
        server.api_key
    );
    println!("  Store:    {}", server.db_path.display());
    println!("  Retries:  {}", args.retry_schedule);
    println!("  Egress:   {egress_note}");
    tokio::select! {
        () = server.wait() => anyhow::bail!("the server stopped unexpectedly"),
        r = tokio::signal::ctrl_c() => { r?; tracing::info!("shutting down"); Ok(()) }
    }
}

async fn create_key(tenant: &str, data_dir: PathBuf) -> anyhow::Result<()> {
    let tenant = TenantId::parse(tenant).context("--tenant")?;
    let db =
        prepare_data_dir(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let store = SqliteStore::open(&db)?;
    let (queue, _jobs) = LocalQueue::new();
    let app = App::new(store, queue, SystemClock, AppConfig::default());
    let key = app.create_api_key(&tenant).await?;
    println!("{key}");
    eprintln!("API key for tenant `{tenant}` created; it is shown only once.");
    Ok(())
}
