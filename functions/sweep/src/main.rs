//! `tidings-sweep`: run by a schedule (any event is accepted); sweeps due deliveries in rounds
//! until the backlog is drained or the invocation's time is nearly up.

mod handler;

use lambda_runtime::{Error, LambdaEvent, service_fn};
use tidings_core::aws::{AwsSettings, build_app};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(false)
        .with_current_span(false)
        .init();
    let settings = AwsSettings::from_env()
        .inspect_err(|e| tracing::error!(error = %e, "invalid configuration"))?;
    let app = &build_app(&settings).await;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            handler::handle(app, event.context.deadline()).await
        },
    ))
    .await
}
