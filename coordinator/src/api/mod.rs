//! The coordinator's gRPC face: [`auth`] decides who is calling (tenant
//! token for CI and operators, join token for agents) before any handler
//! runs; [`service`] holds the handlers of `LeaseService`, `AgentService`
//! and `AdminService`, which validate input, call the pool and map its
//! errors to status codes.

pub mod auth;
pub mod service;

pub use service::Services;
