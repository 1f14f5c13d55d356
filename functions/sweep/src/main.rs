//! `tidings-sweep`: run by a schedule (any event is accepted); sweeps due deliveries in rounds
//! until the backlog is drained or the invocation's time is nearly up.

// The whole use case (store, queue, HTTP) is one future type under `main`; in release builds its
// layout needs more than rustc's default query depth of 128.
#![recursion_limit = "256"]

mod handler;

use lambda_runtime::{Error, LambdaEvent, service_fn};
use tidings_core::aws::{build_app, init_lambda_logging, settings_from_env};

#[tokio::main]
async fn main() -> Result<(), Error> {
    init_lambda_logging();
    let settings = settings_from_env()?;
    let app = &build_app(&settings).await;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            handler::handle(app, event.context.deadline()).await
        },
    ))
    .await
}
