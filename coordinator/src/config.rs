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
    /// Tenants file: one `NAME SHA256_OF_TOKEN [admin]` per line. CI calls
    /// need one of these tenants' tokens; the admin API an `admin` tenant's.
    #[arg(long, env = "BERTH_TENANTS")]
    pub tenants: Option<PathBuf>,
    /// File holding the sha256 (64 hex digits) of the pool join token that
    /// agents present.
    #[arg(long, env = "BERTH_JOIN_TOKEN_HASH_FILE")]
    pub join_token_hash_file: Option<PathBuf>,
    /// Pool CA certificate supplied by operators (with --ca-key); by default
    /// the coordinator creates its own CA under --state-dir on first start.
    #[arg(long, env = "BERTH_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Private key of --ca-cert.
    #[arg(long, env = "BERTH_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Extra name or address for the gRPC server certificate (repeatable or
    /// comma-separated); localhost, 127.0.0.1, ::1 and the --listen address
    /// are always in it.
    #[arg(long, env = "BERTH_TLS_SAN", value_delimiter = ',')]
    pub tls_san: Vec<String>,
}

impl CoordinatorConfig {
    /// The names the gRPC server certificate carries.
    pub fn server_names(&self) -> Vec<String> {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
        if !self.listen.ip().is_unspecified() {
            names.push(self.listen.ip().to_string());
        }
        for n in &self.tls_san {
            let n = n.trim();
            if !n.is_empty() && !names.iter().any(|x| x == n) {
                names.push(n.to_owned());
            }
        }
        names
    }

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
