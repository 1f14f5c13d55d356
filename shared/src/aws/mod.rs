//! The AWS backends: DynamoDB store and SQS queue, and the wiring the Lambda functions share:
//! settings from the environment, the queue-message and stream-record use cases, and building
//! the app.

pub mod dynamo;
pub mod messages;
pub mod settings;
pub mod sqs;
pub mod stream;
pub mod wiring;

pub use messages::{QueueMessage, process_messages};
pub use settings::{AwsSettings, ConfigError};
pub use sqs::SqsQueue;
pub use stream::{NewEventRecord, process_stream_records};
pub use wiring::{AwsApp, build_app, build_sender, init_lambda_logging, settings_from_env};
