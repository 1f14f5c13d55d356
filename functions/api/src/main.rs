//! `tidings-api`: the HTTP API on Lambda. `lambda_http` runs the very `api::router` that
//! `tidings serve` runs locally; settings come from the environment (see `AwsSettings`).

use std::sync::Arc;

use tidings_core::aws::{AwsSettings, build_app};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(false)
        .with_current_span(false)
        .init();
    let settings = AwsSettings::from_env()
        .inspect_err(|e| tracing::error!(error = %e, "invalid configuration"))?;
    let app = Arc::new(build_app(&settings).await);
    lambda_http::run(tidings_core::api::router(app)).await
}
