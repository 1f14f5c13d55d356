//! `tidings-aws-local`: runs the built Tidings Lambda functions on this machine as AWS would
//! (Lambda runtime API, API Gateway, SQS and DynamoDB stream event source mappings, the sweep
//! schedule) against an AWS emulator at `AWS_ENDPOINT_URL`. Prints one JSON line with the
//! addresses, runs until SIGINT or SIGTERM. See docs/aws-local.md.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use tidings_tests::aws_local::{AwsLocal, Config};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDINGS_AWS_LOCAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config::parse();
    let local = match AwsLocal::start(config).await {
        Ok(local) => local,
        Err(error) => {
            eprintln!("tidings-aws-local: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let line = match serde_json::to_string(&local.info) {
        Ok(line) => line,
        Err(error) => {
            eprintln!("tidings-aws-local: the start line: {error}");
            return ExitCode::FAILURE;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            tracing::warn!("stdout is closed; the addresses are also at GET /_aws_local");
        }
    }
    tracing::info!(api = %local.info.api_url, admin = %local.info.admin_url, "ready");
    wait_for_signal().await;
    tracing::info!("stopping: killing the function processes");
    local.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "no SIGTERM handler; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
