//! DynamoDB store (being written).
