//! Who may join the pool: every agent stream is put to a [`Verifier`]
//! before its registration reaches the pool, and a refused agent gets
//! PERMISSION_DENIED, no certificate, and is never offered to builds.
//! [`local::LocalRange`] is the local provider's; [`ec2::Ec2Verifier`]
//! asks EC2.

pub mod ec2;
pub mod local;

use std::net::SocketAddr;

use crate::error::Error;
use crate::pool::Registration;

pub use ec2::Ec2Verifier;
pub use local::{Cidr, LocalRange};

/// Decides whether a registering agent may join the pool.
#[tonic::async_trait]
pub trait Verifier: Send + Sync + 'static {
    /// `Ok(())` admits; `Err(Error::Refused { .. })` refuses for good;
    /// `Err(Error::Unavailable(_))` means "could not tell, try again".
    async fn verify(&self, reg: &Registration, peer: Option<SocketAddr>) -> Result<(), Error>;
}
