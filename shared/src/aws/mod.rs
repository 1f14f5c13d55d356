//! The AWS backends: DynamoDB store and SQS queue, and the wiring the Lambda functions share.

pub mod dynamo;
pub mod sqs;
