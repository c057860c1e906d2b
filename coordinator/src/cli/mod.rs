//! The `berth` command line: what CI runs (`acquire`, `renew`, `release`),
//! what operators run (`hosts`, `leases`, `drain`), and `up`, which runs a
//! whole local pool on this machine.
//!
//! Exit codes: 0 success, 1 any other failure, 2 bad usage, 3 no host within
//! the wait, 4 lease or host not found, 5 coordinator unreachable, 6 the lease
//! has already ended.

pub mod up;

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_client::AdminServiceClient;
use berth_proto::v1::lease_service_client::LeaseServiceClient;
use berth_proto::{from_duration, to_system_time};
use clap::{Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};

use crate::config::{DEFAULT_LISTEN, LogConfig};

/// How long to wait for the coordinator's TCP/HTTP2 handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for calls that do not wait for hosts.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// berth: single-use remote Docker hosts for CI.
#[derive(Debug, Parser)]
#[command(name = "berth", version)]
pub struct Cli {
    /// Coordinator address (host:port or http://host:port).
    #[arg(long, env = "BERTH_COORDINATOR", default_value = DEFAULT_LISTEN, global = true)]
    pub coordinator: String,
    #[command(flatten)]
    pub log: LogConfig,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a coordinator and a pool of local hosts on this machine (needs root).
    Up(up::UpArgs),
    /// Get a Docker host for a build; prints `export` lines for `eval`.
    Acquire {
        /// The build's id; a retry with the same id gets the same lease.
        #[arg(long, env = "BERTH_BUILD_ID")]
        build: String,
        /// How long the lease lasts unless renewed.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How long to wait for a host when none is ready.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Extend a lease.
    Renew {
        #[arg(long, env = "BERTH_LEASE_ID")]
        lease: String,
        /// New time to live, counted from now.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Give a host back: it is cut off, wiped and destroyed.
    Release {
        #[arg(long, env = "BERTH_LEASE_ID")]
        lease: String,
    },
    /// Show one lease.
    Get {
        #[arg(long, env = "BERTH_LEASE_ID")]
        lease: String,
    },
    /// List the pool's hosts.
    Hosts,
    /// List leases.
    Leases {
        /// Include ended leases.
        #[arg(long)]
        all: bool,
    },
    /// Stop giving out a host; it terminates after its current lease.
    Drain {
        host: String,
        #[arg(long, default_value = "drained by operator")]
        reason: String,
    },
}

/// A CLI failure with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "cannot reach the coordinator at {addr}: {reason}\n  is `berth up` running? set --coordinator or BERTH_COORDINATOR"
    )]
    Unreachable { addr: String, reason: String },
    #[error("{0}")]
    Status(tonic::Status),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Unreachable { .. } => 5,
            Self::Status(s) => match s.code() {
                tonic::Code::ResourceExhausted => 3,
                tonic::Code::NotFound => 4,
                tonic::Code::FailedPrecondition => 6,
                tonic::Code::InvalidArgument => 2,
                tonic::Code::Unavailable => 5,
                _ => 1,
            },
            Self::Other(_) => 1,
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        Self::Status(s)
    }
}

/// Adds `http://` when the address has no scheme.
pub fn coordinator_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

pub async fn channel(addr: &str) -> Result<Channel, CliError> {
    let url = coordinator_url(addr);
    let unreachable = |reason: String| CliError::Unreachable {
        addr: url.clone(),
        reason,
    };
    Endpoint::from_shared(url.clone())
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|e| unreachable(error_chain(&e)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let _ = write!(s, ": {c}");
        cur = c.source();
    }
    s
}

fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    req
}

/// Runs one non-`up` subcommand, printing its result to stdout.
pub async fn run_client(cli: &Cli) -> Result<(), CliError> {
    let out = client_output(cli).await?;
    print!("{out}");
    Ok(())
}

/// Runs one non-`up` subcommand and returns what it prints.
pub async fn client_output(cli: &Cli) -> Result<String, CliError> {
    let ch = channel(&cli.coordinator).await?;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let mut admin = AdminServiceClient::new(ch);
    match &cli.command {
        Command::Up(_) => Err(CliError::Other("`up` is not a client command".into())),
        Command::Acquire { build, ttl, wait } => {
            let req = pb::AcquireRequest {
                build_id: build.clone(),
                ttl: Some(from_duration(*ttl)),
                wait: Some(from_duration(*wait)),
            };
            let resp = leases
                .acquire(with_timeout(req, *wait + CALL_TIMEOUT))
                .await?
                .into_inner();
            let lease = resp.lease.ok_or_else(|| {
                CliError::Other("the coordinator answered without a lease".into())
            })?;
            Ok(export_lines(&lease))
        }
        Command::Renew { lease, ttl } => {
            let req = pb::RenewRequest {
                lease_id: lease.clone(),
                ttl: Some(from_duration(*ttl)),
            };
            let resp = leases.renew(with_timeout(req, CALL_TIMEOUT)).await?;
            Ok(describe_lease(resp.into_inner().lease.as_ref()))
        }
        Command::Release { lease } => {
            let before = leases
                .get(with_timeout(
                    pb::GetRequest {
                        lease_id: lease.clone(),
                    },
                    CALL_TIMEOUT,
                ))
                .await?
                .into_inner()
                .lease;
            let resp = leases
                .release(with_timeout(
                    pb::ReleaseRequest {
                        lease_id: lease.clone(),
                    },
                    CALL_TIMEOUT,
                ))
                .await?
                .into_inner();
            let already = before.as_ref().is_some_and(|l| is_ended(l.state));
            if already {
                eprintln!("berth: lease {lease} had already ended; nothing to release");
            }
            Ok(describe_lease(resp.lease.as_ref()))
        }
        Command::Get { lease } => {
            let resp = leases
                .get(with_timeout(
                    pb::GetRequest {
                        lease_id: lease.clone(),
                    },
                    CALL_TIMEOUT,
                ))
                .await?;
            Ok(describe_lease(resp.into_inner().lease.as_ref()))
        }
        Command::Hosts => {
            let resp = admin
                .list_hosts(with_timeout(pb::ListHostsRequest {}, CALL_TIMEOUT))
                .await?
                .into_inner();
            let mut s = format!(
                "{:<16} {:<16} {:<12} {:<9} {:<36}\n",
                "HOST", "ADDRESS", "STATE", "CONNECTED", "LEASE"
            );
            for h in resp.hosts {
                let _ = writeln!(
                    s,
                    "{:<16} {:<16} {:<12} {:<9} {:<36}",
                    h.host_id,
                    h.host_addr,
                    host_state_name(h.state),
                    if h.connected { "yes" } else { "no" },
                    h.lease_id
                );
            }
            Ok(s)
        }
        Command::Leases { all } => {
            let resp = admin
                .list_leases(with_timeout(
                    pb::ListLeasesRequest {
                        include_ended: *all,
                    },
                    CALL_TIMEOUT,
                ))
                .await?
                .into_inner();
            let mut s = format!(
                "{:<36} {:<20} {:<10} {:<16} {}\n",
                "LEASE", "BUILD", "STATE", "HOST", "DEADLINE"
            );
            for l in resp.leases {
                let _ = writeln!(
                    s,
                    "{:<36} {:<20} {:<10} {:<16} {}",
                    l.lease_id,
                    l.build_id,
                    lease_state_name(l.state),
                    l.host_id,
                    format_time(l.deadline.as_ref())
                );
            }
            Ok(s)
        }
        Command::Drain { host, reason } => {
            let resp = admin
                .drain_host(with_timeout(
                    pb::DrainHostRequest {
                        host_id: host.clone(),
                        reason: reason.clone(),
                    },
                    CALL_TIMEOUT,
                ))
                .await?
                .into_inner();
            let h = resp.host.unwrap_or_default();
            Ok(format!(
                "host {} draining (state {})\n",
                h.host_id,
                host_state_name(h.state)
            ))
        }
    }
}

fn is_ended(state: i32) -> bool {
    matches!(
        pb::LeaseState::try_from(state),
        Ok(pb::LeaseState::Released
            | pb::LeaseState::Expired
            | pb::LeaseState::HostLost
            | pb::LeaseState::Failed)
    )
}

/// Single-quotes a value for a POSIX shell.
fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

/// The `eval`-able lines `berth acquire` prints.
pub fn export_lines(l: &pb::Lease) -> String {
    let mut s = String::new();
    for (k, v) in [
        ("DOCKER_HOST", l.docker_host.as_str()),
        ("BERTH_LEASE_ID", l.lease_id.as_str()),
        ("BERTH_HOST_ADDR", l.host_addr.as_str()),
        ("BERTH_HOST_ID", l.host_id.as_str()),
    ] {
        let _ = writeln!(s, "export {k}={}", shell_quote(v));
    }
    let _ = writeln!(
        s,
        "export BERTH_LEASE_DEADLINE={}",
        shell_quote(&format_time(l.deadline.as_ref()))
    );
    s
}

fn describe_lease(l: Option<&pb::Lease>) -> String {
    let Some(l) = l else {
        return "no lease in the answer\n".into();
    };
    let mut s = format!(
        "lease {}\n  build     {}\n  state     {}\n  host      {} {}\n  docker    {}\n  deadline  {}\n",
        l.lease_id,
        l.build_id,
        lease_state_name(l.state),
        l.host_id,
        l.host_addr,
        l.docker_host,
        format_time(l.deadline.as_ref()),
    );
    if !l.message.is_empty() {
        let _ = writeln!(s, "  note      {}", l.message);
    }
    if let Some(w) = &l.wipe {
        let _ = writeln!(
            s,
            "  wipe      {} in {} ms: removed {} containers, {} images, {} volumes, {} networks, {} bytes of build cache; left {}/{}/{}/{}/{} (containers/images/volumes/networks/cache){}",
            if w.verified {
                "verified"
            } else {
                "NOT verified"
            },
            w.duration_ms,
            w.containers_removed,
            w.images_removed,
            w.volumes_removed,
            w.networks_removed,
            w.build_cache_reclaimed_bytes,
            w.containers_left,
            w.images_left,
            w.volumes_left,
            w.networks_left,
            w.build_cache_left,
            if w.error.is_empty() {
                String::new()
            } else {
                format!("; error: {}", w.error)
            }
        );
    }
    s
}

fn format_time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(to_system_time)
        .map(|t: SystemTime| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn lease_state_name(s: i32) -> String {
    pb::LeaseState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("LEASE_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| format!("unknown({s})"))
}

pub fn host_state_name(s: i32) -> String {
    pb::HostState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("HOST_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| format!("unknown({s})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_are_quoted_for_eval() {
        let l = pb::Lease {
            lease_id: "abc".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            host_addr: "198.18.0.2".into(),
            host_id: "it's".into(),
            ..Default::default()
        };
        let out = export_lines(&l);
        assert!(out.contains("export DOCKER_HOST='tcp://198.18.0.2:2376'\n"));
        assert!(out.contains("export BERTH_HOST_ADDR='198.18.0.2'\n"));
        assert!(out.contains(r"export BERTH_HOST_ID='it'\''s'"));
    }

    #[test]
    fn urls_get_a_scheme() {
        assert_eq!(coordinator_url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(coordinator_url("https://c:1"), "https://c:1");
    }

    #[test]
    fn exit_codes_follow_status() {
        let code = |c| CliError::Status(tonic::Status::new(c, "x")).exit_code();
        assert_eq!(code(tonic::Code::ResourceExhausted), 3);
        assert_eq!(code(tonic::Code::NotFound), 4);
        assert_eq!(code(tonic::Code::FailedPrecondition), 6);
        assert_eq!(code(tonic::Code::Internal), 1);
    }
}
