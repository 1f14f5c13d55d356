//! SQS queue (being written).
