//! The coordinator's error type and its one mapping to gRPC status codes.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("lease {0} not found")]
    LeaseNotFound(String),
    #[error("host {0} not found")]
    HostNotFound(String),
    #[error("{0}")]
    NoHost(String),
    #[error("lease {lease_id} has ended ({state}){detail}")]
    LeaseEnded {
        lease_id: String,
        state: &'static str,
        detail: String,
    },
    #[error("agent stream: {0}")]
    Protocol(String),
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    #[error("agent refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } | Self::Protocol(_) => Code::InvalidArgument,
            Self::LeaseNotFound(_) | Self::HostNotFound(_) => Code::NotFound,
            Self::NoHost(_) => Code::ResourceExhausted,
            Self::LeaseEnded { .. } => Code::FailedPrecondition,
            Self::ShuttingDown | Self::Unavailable(_) => Code::Unavailable,
            Self::Refused(_) => Code::PermissionDenied,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
