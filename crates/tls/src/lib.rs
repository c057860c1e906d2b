//! berth's small PKI and its credentials, shared by the coordinator, the
//! agent, the CLI and the tests.
//!
//! - [`ca`]: the pool CA (created on first start or supplied by operators)
//!   and the certificates it signs: one server certificate per agent (SAN =
//!   the host's address), one client certificate per lease (SAN = the lease's
//!   DNS name, validity ending at the lease deadline plus a clock-skew
//!   margin), and the coordinator's own gRPC server certificate. Only the
//!   public key of a CSR is used: names, usages and validity always come from
//!   the CA, never from the requester.
//! - [`csr`]: key pairs and CSRs on the requester's side; the private key
//!   never leaves the machine that made it.
//! - [`lease`]: the rustls configuration of an agent's Docker front, which
//!   admits only client certificates that chain to the pool CA *and* name the
//!   agent's current lease, plus the matching client configuration.
//! - [`token`]: bearer tokens (tenant tokens, the pool join token): generated
//!   at random, stored as SHA-256 hashes, compared in constant time.
//! - [`server`]: the coordinator's own TLS: a server certificate that renews
//!   itself before it expires, optional client certificates from the pool CA.
//! - [`keyid`]: the fingerprint a lease's or a host's key is pinned by.
//! - [`files`]: private files and directories (0600 / 0700) written atomically.
//! - [`pool`]: a pool's credentials on disk (tenants, join token and its hash,
//!   the CLI's token), one layout for `berth up`, the tests and benchmarks.
//!
//! No hand-written crypto: rcgen signs, rustls and webpki verify, ring is the
//! one crypto provider of the whole tree.

#![forbid(unsafe_code)]

pub mod ca;
pub mod csr;
pub mod files;
pub mod keyid;
pub mod lease;
pub mod pool;
pub mod server;
pub mod token;

use std::path::PathBuf;

pub use ca::Ca;
pub use csr::KeyAndCsr;
pub use keyid::KeyId;
pub use lease::{
    Fix, PinnedKey, ServerIdentity, lease_client_config, lease_dns_name, lease_server_config,
};
pub use pool::PoolCredentials;
pub use token::{Tenant, TenantLimits, Tenants, TokenHash, cache_namespace};

/// What went wrong with a certificate, key, CSR, token or their files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {reason}")]
    Cert { what: &'static str, reason: String },
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("tenants file line {line}: {reason}")]
    Tenants { line: usize, reason: String },
}

impl TlsError {
    pub(crate) fn cert(what: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::Cert {
            what,
            reason: reason.to_string(),
        }
    }
}

/// The one crypto provider every rustls config in berth is built with.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
