//! The coordinator's error type and its one mapping to gRPC status codes
//! ([`Error::code`]). Errors that code decides on are typed (why an agent
//! was refused, what made the coordinator unavailable, what an agent got
//! wrong about the stream protocol); their messages say what failed and with
//! what input, and are what callers see in the status.

use std::time::Duration;

use tonic::{Code, Status};

use crate::admission::ec2;
use crate::pool::NotDurable;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error(transparent)]
    Protocol(#[from] Protocol),
    #[error("no register message within {}", humantime::format_duration(*.0))]
    RegisterTimeout(Duration),
    #[error("lease {0} not found")]
    LeaseNotFound(String),
    #[error("host {0} not found")]
    HostNotFound(String),
    /// Find: the tenant has no lease of this build that has not ended.
    #[error("no lease of build {0} is waiting or active")]
    BuildNotFound(String),
    /// The server's limit on calls served at once is reached.
    #[error(
        "the coordinator is serving its limit of {max} calls at once (--max-requests); retry later"
    )]
    TooManyRequests { max: usize },
    /// No host became ready for the lease; the message says why (the
    /// lease's own message, as stored).
    #[error("{0}")]
    NoHost(String),
    #[error("lease {lease_id} has ended ({state}){detail}")]
    LeaseEnded {
        lease_id: String,
        state: &'static str,
        detail: String,
    },
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    #[error("agent refused: {}", .reason.describe(.host_id))]
    Refused { host_id: String, reason: Refusal },
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// The pool CA could not sign (a bad CSR is `InvalidArgument` instead).
    #[error("signing failed: {0}")]
    Signing(#[source] berth_tls::TlsError),
    /// A lease's certificates are bound to one key; this call brought
    /// another (`why` says which rule it broke).
    #[error("lease {lease_id} is bound to the key it was acquired with: {why}")]
    KeyPinned { lease_id: String, why: &'static str },
    /// Something the coordinator itself got wrong.
    #[error("{0}")]
    Internal(&'static str),
}

/// What an agent got wrong about the stream protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Protocol {
    #[error("the first message on an agent stream must be register")]
    FirstNotRegister,
    #[error("the agent stream ended before register")]
    EndedBeforeRegister,
    #[error("agent stream: register sent twice on one stream")]
    RegisterTwice,
}

/// Why an agent may not join the pool: a verdict, not to be retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// EC2 does not vouch for the instance the agent claims to be.
    Ec2(ec2::Refusal),
    /// The local provider's range does not hold the agent's address.
    Local(crate::admission::local::Refusal),
    /// The orphan sweeper is terminating its instance.
    Orphan,
    /// The host held a lease: in single-use mode it never serves again.
    Burned,
    /// The host id is bound to another key than the one this registration
    /// proves it holds.
    KeyMismatch,
}

impl Refusal {
    /// The refusal as the agent reads it; `host_id` is the id it registered.
    fn describe(&self, host_id: &str) -> String {
        match self {
            Self::Ec2(r) => r.to_string(),
            Self::Local(r) => r.to_string(),
            Self::Orphan => format!("host {host_id} is being terminated as an orphan"),
            Self::Burned => format!(
                "host {host_id} has held a lease; a used host is never offered again (terminate it)"
            ),
            Self::KeyMismatch => format!(
                "host {host_id} is bound to the key it first registered with, and this registration does not prove it holds that key"
            ),
        }
    }
}

/// Why the coordinator cannot answer now: to be retried.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// The lease store did not confirm the change the answer reports.
    #[error(transparent)]
    Store(#[from] NotDurable),
    /// The lease store fails to take commits: no host is offered.
    #[error(
        "no host is offered while the lease store fails ({0}); retry the acquire (the same build id is safe) once it works again"
    )]
    StoreFailing(String),
    /// EC2 did not answer whether the agent's instance belongs to the pool.
    #[error("cannot verify instance {host_id} now: {source}")]
    Ec2 {
        host_id: String,
        #[source]
        source: berth_aws::Ec2Error,
    },
}

impl From<NotDurable> for Error {
    fn from(e: NotDurable) -> Self {
        Self::Unavailable(e.into())
    }
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// The one mapping to gRPC status codes.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } | Self::Protocol(_) => Code::InvalidArgument,
            Self::RegisterTimeout(_) => Code::DeadlineExceeded,
            Self::LeaseNotFound(_) | Self::HostNotFound(_) | Self::BuildNotFound(_) => {
                Code::NotFound
            }
            Self::NoHost(_) | Self::TooManyRequests { .. } => Code::ResourceExhausted,
            Self::LeaseEnded { .. } => Code::FailedPrecondition,
            Self::ShuttingDown | Self::Unavailable(_) => Code::Unavailable,
            Self::Refused { .. } | Self::KeyPinned { .. } => Code::PermissionDenied,
            Self::Signing(_) | Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_read_as_before_and_are_permission_denied() {
        let orphan = Error::Refused {
            host_id: "i-0000000000000000a".into(),
            reason: Refusal::Orphan,
        };
        assert_eq!(orphan.code(), Code::PermissionDenied);
        assert_eq!(
            orphan.to_string(),
            "agent refused: host i-0000000000000000a is being terminated as an orphan"
        );
        let ec2 = Error::Refused {
            host_id: "local-1".into(),
            reason: Refusal::Ec2(ec2::Refusal::NotAnInstanceId("local-1".into())),
        };
        assert_eq!(
            ec2.to_string(),
            "agent refused: host id \"local-1\" is not an EC2 instance id"
        );
    }

    #[test]
    fn protocol_errors_keep_their_messages_and_codes() {
        let first: Status = Error::from(Protocol::FirstNotRegister).into();
        assert_eq!(first.code(), Code::InvalidArgument);
        assert_eq!(
            first.message(),
            "the first message on an agent stream must be register"
        );
        let twice = Error::from(Protocol::RegisterTwice);
        assert_eq!(
            twice.to_string(),
            "agent stream: register sent twice on one stream"
        );
        let late: Status = Error::RegisterTimeout(Duration::from_secs(10)).into();
        assert_eq!(late.code(), Code::DeadlineExceeded);
        assert_eq!(late.message(), "no register message within 10s");
    }

    #[test]
    fn a_store_that_does_not_confirm_is_unavailable() {
        let e = Error::from(NotDurable::Stopped);
        assert_eq!(e.code(), Code::Unavailable);
        assert_eq!(e.to_string(), "the lease store's committer has stopped");
    }
}
