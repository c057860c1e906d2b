//! berth's end-to-end tests and benchmarks. The harness (a `berth up` pool
//! as a real process tree, the stock docker CLI pointed at a lease, guards
//! that sweep what a test started) is `berth-testkit`; this crate adds the
//! EC2 world of the EC2 tests ([`ec2`]: moto's server, a fake IMDSv2, a
//! namespace standing for an instance; [`asg`]: an Auto Scaling group in
//! moto whose instances the test boots), what the tests of a lease behaving
//! like any Docker host share ([`stock`]: an upstream server, the machine's
//! network settings, images with the static docker CLI), an upstream
//! registry in a namespace of its own ([`registry`]), and the benchmarks
//! ([`bench`], run by `berth-bench` and smoke-tested by
//! `tests/bench_smoke.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod asg;
pub mod bench;
pub mod ec2;
pub mod registry;
pub mod stock;
