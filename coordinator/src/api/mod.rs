//! The coordinator's gRPC face. [`auth`] decides who is calling (tenant
//! token for CI and operators, join token for agents) before any handler
//! runs. Then one file per service, all on the shared handle [`Services`]:
//! [`lease`] (`LeaseService`, for CI), [`agent`] (`AgentService`, the
//! agents' streams) and [`admin`] (`AdminService`, for operators). Handlers
//! validate input, read the clock, call the pool and turn its errors into
//! status codes (`crate::error`); they hold no state. They also sign what
//! the pool CA signs: the agent's server certificate at registration, the
//! lease's client certificate at acquire and renew.

pub mod admin;
pub mod agent;
pub mod auth;
pub mod lease;
pub mod limit;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::admission::Verifier;
use crate::error::Error;
use crate::ops::metrics::Ec2Metrics;
use crate::pool::Pool;

/// What every handler works with; cheap to clone (one per service).
#[derive(Clone)]
pub struct Services {
    pub pool: Arc<Pool>,
    pub ca: Arc<berth_tls::Ca>,
    pub shutdown: CancellationToken,
    /// Admits or refuses each registering agent (EC2: DescribeInstances).
    pub verifier: Arc<dyn Verifier>,
    /// Counters of the EC2 verification and the orphan sweeper.
    pub ec2_metrics: Arc<Ec2Metrics>,
    /// Validity of agents' server certificates (re-issued at 2/3 of it).
    pub host_cert_validity: std::time::Duration,
    /// The tenants' build cache, when the pool runs one.
    pub cache: Option<Arc<crate::cache::BuildCache>>,
    /// The pool's registries (mirror, build cache) PoolStats reports on.
    pub registries: Option<Arc<crate::ops::registries::Watch>>,
    /// CI and operator calls served at once (`--max-requests`).
    pub requests: Arc<limit::RequestLimit>,
}

/// A CSR problem is the caller's; anything else in signing is ours.
fn signing_error(e: berth_tls::TlsError) -> Error {
    match e {
        berth_tls::TlsError::BadCsr(reason) => Error::invalid("csr_pem", reason),
        other => Error::Signing(other),
    }
}
