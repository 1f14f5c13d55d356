//! Untrusted input, parsed: request bodies field by field, and the RFC 9457 problem every
//! refusal becomes. Below both the HTTP API and the SQS message path, which read the same JSON
//! (the `POST /events` body is also the events queue's message body).

pub mod body;
pub mod problem;

pub use problem::Problem;
