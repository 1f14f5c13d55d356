//! Building the AWS-backed application once, at a function's cold start.

use super::dynamo::{DynamoStore, load_sdk_config};
use super::settings::{AwsSettings, ConfigError};
use super::sqs::SqsQueue;
use crate::app::App;
use crate::ports::SystemClock;
use crate::sender::{ReqwestSender, SenderBuildError};

/// The application as the Lambda functions run it.
pub type AwsApp = App<DynamoStore, SqsQueue, SystemClock>;

/// The DynamoDB store, the SQS deliveries queue and the system clock, with one SDK configuration
/// (region, credentials and endpoints from the SDK's standard environment variables).
pub async fn build_app(settings: &AwsSettings) -> AwsApp {
    let sdk = load_sdk_config().await;
    let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), settings.table.clone())
        .with_retention(settings.retention)
        .with_api_key_cache(settings.api_key_cache);
    let queue = SqsQueue::new(
        aws_sdk_sqs::Client::new(&sdk),
        settings.deliveries_queue_url.clone(),
    );
    App::new(store, queue, SystemClock, settings.app_config())
}

/// The HTTP sender with the configured egress policy and timeouts.
pub fn build_sender(settings: &AwsSettings) -> Result<ReqwestSender, SenderBuildError> {
    ReqwestSender::new(settings.sender_config())
}

/// JSON log lines for CloudWatch, filtered by `RUST_LOG` (default `info`); each function's
/// `main` calls this first.
pub fn init_lambda_logging() {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .with_current_span(false)
        .init();
}

/// The settings, or an error that is also logged (a Lambda's init error is otherwise easy to miss).
pub fn settings_from_env() -> Result<AwsSettings, ConfigError> {
    AwsSettings::from_env().inspect_err(|e| tracing::error!(error = %e, "invalid configuration"))
}
