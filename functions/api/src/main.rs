//! `tidings-api`: the HTTP API on Lambda. `lambda_http` runs the very `api::router` that
//! `tidings serve` runs locally; settings come from the environment (see `AwsSettings`).

// The whole use case (store, queue, HTTP) is one future type under `main`; in release builds its
// layout needs more than rustc's default query depth of 128.
#![recursion_limit = "256"]

use std::sync::Arc;

use tidings_core::aws::{build_app, init_lambda_logging, settings_from_env};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    init_lambda_logging();
    let settings = settings_from_env()?;
    let app = Arc::new(build_app(&settings).await);
    lambda_http::run(tidings_core::api::router(app)).await
}
