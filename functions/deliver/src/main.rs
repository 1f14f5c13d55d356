//! `tidings-deliver`: handles the records of the deliveries and events queues (see
//! `tidings_core::aws::messages`) and the new events on the table's stream (see
//! `tidings_core::aws::stream`), and reports the ones that must come back.

// The whole use case (store, queue, HTTP) is one future type under `main`; in release builds its
// layout needs more than rustc's default query depth of 128.
#![recursion_limit = "256"]

mod handler;

use std::time::SystemTime;

use lambda_runtime::{Error, LambdaEvent, service_fn};
use tidings_core::aws::{build_app, build_sender, init_lambda_logging, settings_from_env};
use tidings_core::domain::Timestamp;

#[tokio::main]
async fn main() -> Result<(), Error> {
    init_lambda_logging();
    let settings = settings_from_env()?;
    let (app, sender) = (&build_app(&settings).await, &build_sender(&settings)?);
    let (concurrency, timeout) = (settings.deliver_concurrency, settings.deliver_timeout);
    let jobs_queue_url = settings.deliveries_queue_url.as_str();
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            let deadline = event.context.deadline();
            handler::check_deadline(deadline, SystemTime::now(), timeout);
            let deadline = deadline
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .and_then(|d| i64::try_from(d.as_millis()).ok())
                .map(Timestamp::from_unix_millis);
            let response = handler::handle_any(
                app,
                sender,
                concurrency,
                deadline,
                jobs_queue_url,
                event.payload,
            )
            .await?;
            Ok::<_, Error>(response)
        },
    ))
    .await
}
