//! `tidings-deliver`: handles the records of the deliveries and events queues (see
//! `tidings_core::aws::messages`) and reports the ones that must come back.

mod handler;

use lambda_runtime::{Error, LambdaEvent, service_fn};
use tidings_core::aws::{AwsSettings, build_app, build_sender};
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
    let (app, sender) = (&build_app(&settings).await, &build_sender(&settings)?);
    let concurrency = settings.deliver_concurrency;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<_>| async move {
        Ok::<_, Error>(handler::handle(app, sender, concurrency, event.payload).await)
    }))
    .await
}
