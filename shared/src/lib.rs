//! Tidings core: the domain, the use cases and the seams they run over.
//!
//! Binaries (the local runner and the Lambda functions) pick concrete backends for each seam and
//! call into [`app::App`]; they hold no logic of their own.

pub mod api;
pub mod app;
#[cfg(feature = "aws")]
pub mod aws;
mod concurrency;
#[cfg(any(test, feature = "testing"))]
pub mod conformance;
pub mod domain;
pub mod egress;
pub mod input;
pub mod local;
pub mod ports;
pub mod retry;
pub mod sender;
pub mod signing;
#[cfg(feature = "sqlite")]
pub mod sqlite;
