//! `berth-aws`: berth's AWS clients, in one crate so the large SDK is
//! compiled once for both the agent and the coordinator. Clients only: what
//! to do with an answer (admitting an agent, sweeping orphans) is the
//! coordinator's policy and lives there.
//!
//! - [`imds`]: the instance's own identity and Auto Scaling lifecycle from
//!   IMDSv2 (the [`Metadata`] trait, [`Imds`] over aws-config's client).
//! - [`ec2`]: the EC2 calls berth makes (describe, tag, terminate) behind the
//!   [`Ec2Api`] trait, [`Ec2`] over aws-sdk-ec2.
//! - [`asg`]: the Auto Scaling calls the coordinator makes (describe a
//!   group, set its desired capacity, terminate one instance with a
//!   decrement, scale-in protection) behind the [`AsgApi`] trait, [`Asg`]
//!   over aws-sdk-autoscaling.
//! - [`retry`]: the bounded, jittered retry every call above goes through.
//!
//! Endpoints and credentials follow the SDK's standard settings, so tests
//! point them at a fake IMDS and moto's server through the environment:
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT`, `AWS_ENDPOINT_URL_EC2` /
//! `AWS_ENDPOINT_URL_AUTO_SCALING` / `AWS_ENDPOINT_URL`, the default credential chain and region chain.

#![forbid(unsafe_code)]

pub mod asg;
pub mod ec2;
pub mod imds;
pub mod retry;

pub use asg::{Asg, AsgApi, AsgError, GroupInfo, GroupInstance};
pub use ec2::{Ec2, Ec2Api, Ec2Error, InstanceInfo};
pub use imds::{
    Imds, ImdsError, InstanceIdentity, Interruption, InterruptionKind, Metadata, TargetLifecycle,
};
pub use retry::{Outcome, RetryError, RetryPolicy};

/// Tag key every pool instance carries; its value is the pool's name (set
/// by the launch template, read by the coordinator).
pub const POOL_TAG: &str = "berth:pool";

/// Formats an AWS SDK error with every cause in its chain (the SDK's own
/// `Display` only says "service error").
pub fn error_context<E: std::error::Error>(e: &E) -> String {
    aws_smithy_types::error::display::DisplayErrorContext(e).to_string()
}

/// The HTTP(S) client for every AWS call: rustls with ring, the one crypto
/// provider of the whole tree (the SDK's default would bring aws-lc).
pub fn https_client() -> aws_sdk_ec2::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}
