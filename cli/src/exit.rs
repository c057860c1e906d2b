//! The exit codes of `berth`, one table for every command (the README
//! lists them too): scripts in CI branch on them.

/// How a `berth` command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It did what was asked.
    Success,
    /// Any failure without a code of its own.
    Failure,
    /// Bad usage or an argument the coordinator refused as invalid.
    Usage,
    /// No host became ready within `--wait`.
    NoHost,
    /// The lease or host does not exist (for this tenant).
    NotFound,
    /// The coordinator (or, for `forward`, the lease check) is unreachable.
    Unreachable,
    /// The lease has already ended.
    LeaseEnded,
    /// Not authenticated, or not allowed.
    NotAllowed,
    /// Stopped by SIGINT or SIGTERM.
    Interrupted,
}

impl Exit {
    /// The process exit status.
    pub fn code(self) -> i32 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::NoHost => 3,
            Exit::NotFound => 4,
            Exit::Unreachable => 5,
            Exit::LeaseEnded => 6,
            Exit::NotAllowed => 7,
            Exit::Interrupted => 130,
        }
    }

    /// What a coordinator's gRPC status means for the caller.
    pub fn of_status(code: tonic::Code) -> Self {
        match code {
            tonic::Code::ResourceExhausted => Exit::NoHost,
            tonic::Code::NotFound => Exit::NotFound,
            tonic::Code::FailedPrecondition => Exit::LeaseEnded,
            tonic::Code::InvalidArgument => Exit::Usage,
            tonic::Code::Unavailable => Exit::Unreachable,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => Exit::NotAllowed,
            _ => Exit::Failure,
        }
    }
}
