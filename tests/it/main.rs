//! End-to-end tests over real HTTP on 127.0.0.1: the all-in-one server (in process, and as the
//! real `tidings` binary), a real receiver, real signatures.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed assertion is a failed test

mod api;
mod aws;
mod aws_faults;
mod delivery;
mod durability;
mod egress;
mod faults;
