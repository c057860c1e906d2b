//! `berth-coordinator` configuration: flags, each with a `BERTH_*` twin.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::pool::PoolConfig;
use crate::telemetry::LogFormat;

/// Default gRPC address; the `berth` CLI uses the same default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorConfig {
    /// Address for the gRPC API (CI, agents, operators). Port 0 picks a free port.
    #[arg(long, env = "BERTH_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Where the coordinator keeps what must outlive it (created if missing).
    #[arg(
        long,
        env = "BERTH_STATE_DIR",
        default_value = "/var/lib/berth-coordinator"
    )]
    pub state_dir: PathBuf,
    /// Write the address actually bound to this file (useful with port 0).
    #[arg(long, env = "BERTH_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// How often agents heartbeat.
    #[arg(long, env = "BERTH_HEARTBEAT_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// How long an agent has to accept an assigned lease.
    #[arg(long, env = "BERTH_ASSIGN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub assign_timeout: Duration,
    /// Lease time to live when Acquire gives none.
    #[arg(long, env = "BERTH_DEFAULT_TTL", default_value = "30m", value_parser = humantime::parse_duration)]
    pub default_ttl: Duration,
    /// Longest time to live one Acquire or Renew may ask for.
    #[arg(long, env = "BERTH_MAX_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_ttl: Duration,
    /// Longest a lease may live in total, renewals included.
    #[arg(long, env = "BERTH_MAX_LEASE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_lease: Duration,
    /// Longest an Acquire may wait for a host.
    #[arg(long, env = "BERTH_MAX_WAIT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
    /// How long a disconnected host keeps its lease before it counts as lost.
    #[arg(long, env = "BERTH_LOST_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lost_grace: Duration,
}

impl CoordinatorConfig {
    pub fn pool(&self) -> PoolConfig {
        PoolConfig {
            heartbeat_interval: self.heartbeat_interval,
            assign_timeout: self.assign_timeout,
            default_ttl: self.default_ttl,
            max_ttl: self.max_ttl,
            max_lease: self.max_lease,
            max_wait: self.max_wait,
            lost_grace: self.lost_grace,
            ..PoolConfig::default()
        }
    }
}

/// Logging flags shared by every berth binary in this crate.
#[derive(Debug, Clone, clap::Args)]
pub struct LogConfig {
    /// Log line format on stderr; the filter comes from RUST_LOG (default info).
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,
}
