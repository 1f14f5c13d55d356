//! End-to-end tests over real HTTP on 127.0.0.1: the all-in-one server (in process, and as the
//! real `tidings` binary), a real receiver, real signatures.

mod api;
mod aws;
mod aws_faults;
mod delivery;
mod durability;
mod egress;
