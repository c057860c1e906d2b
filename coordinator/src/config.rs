//! `berth-coordinator` configuration: flags, each with a `BERTH_*` twin.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::pool::PoolConfig;

/// Where the pool's hosts come from, as far as the coordinator cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    /// Hosts on this machine (`berth up`): every agent is admitted.
    Local,
    /// EC2 instances: agents are verified with DescribeInstances and an
    /// orphan sweeper ends instances whose agent never came or went away.
    Ec2,
}

/// Default gRPC address; the `berth` CLI uses the same default.
pub const DEFAULT_LISTEN: &str = berth_proto::ports::COORDINATOR_LOCAL;

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
    /// Address of the ops endpoint: plain HTTP with /metrics (Prometheus)
    /// and /healthz. Port 0 picks a free port.
    #[arg(long, env = "BERTH_OPS_LISTEN", default_value = crate::ops::DEFAULT_OPS_LISTEN)]
    pub ops_listen: SocketAddr,
    /// Write the ops endpoint's bound address to this file.
    #[arg(long, env = "BERTH_OPS_ADDR_FILE")]
    pub ops_addr_file: Option<PathBuf>,
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
    /// Most builds waiting for a host at once, all tenants together; a
    /// request beyond it is refused (RESOURCE_EXHAUSTED). Per-tenant limits
    /// are in the tenants file.
    #[arg(long, env = "BERTH_MAX_QUEUED", default_value_t = crate::pool::DEFAULT_MAX_QUEUED)]
    pub max_queued: usize,
    /// Most CI and operator calls served at once (an Acquire counts while
    /// it waits); a call beyond it is refused (RESOURCE_EXHAUSTED) rather
    /// than queued. Agents' streams are not counted. Default: --max-queued
    /// plus 1000.
    #[arg(long, env = "BERTH_MAX_REQUESTS")]
    pub max_requests: Option<usize>,
    /// How long a disconnected host keeps its lease before it counts as lost.
    #[arg(long, env = "BERTH_LOST_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lost_grace: Duration,
    /// Tenants file: one `NAME SHA256_OF_TOKEN [admin] [max-active=N]
    /// [max-queued=N] [weight=N] [cache-cap=SIZE]` per line (`cache-cap` is
    /// for `berth up`'s build cache retention). CI calls
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
    /// Where hosts come from: `local`, or `ec2` (agents verified with
    /// DescribeInstances, orphan sweeper). EC2 endpoint and credentials
    /// follow the AWS SDK's settings (`AWS_ENDPOINT_URL_EC2`, `AWS_REGION`, ...).
    #[arg(long, env = "BERTH_PROVIDER", value_enum, default_value_t = Provider::Local)]
    pub provider: Provider,
    /// How long an agent's server certificate is valid; a connected agent
    /// gets a fresh one at two thirds of that, without reconnecting.
    #[arg(long, env = "BERTH_HOST_CERT_VALIDITY", default_value = "30d", value_parser = humantime::parse_duration)]
    pub host_cert_validity: Duration,
    /// Local: the range a host's address must lie in to be admitted (and
    /// to get a server certificate for it); loopback never is.
    #[arg(long, env = "BERTH_LOCAL_RANGE", default_value = berth_proto::local::HOST_RANGE)]
    pub local_range: crate::admission::Cidr,
    /// EC2: the pool's name; its instances carry the tag `berth:pool=NAME`.
    #[arg(long, env = "BERTH_POOL_NAME", default_value = "")]
    pub pool_name: String,
    /// EC2: time between orphan sweeps; 0 turns the sweeper off.
    #[arg(long, env = "BERTH_SWEEP_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,
    /// EC2: a pool instance running this long without its agent registering
    /// is an orphan (counted from launch or coordinator start, whichever is later).
    #[arg(long, env = "BERTH_ORPHAN_UNREGISTERED_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    pub orphan_unregistered_after: Duration,
    /// EC2: a pool instance whose agent has been gone this long is an orphan.
    #[arg(long, env = "BERTH_ORPHAN_GONE_AFTER", default_value = "5m", value_parser = humantime::parse_duration)]
    pub orphan_gone_after: Duration,
    /// EC2: at most this many orphans terminated per sweep.
    #[arg(long, env = "BERTH_SWEEP_MAX_TERMINATIONS", default_value_t = 10)]
    pub sweep_max_terminations: usize,
    /// EC2: a burned instance (it served a lease) still running this long
    /// after its lease ended is terminated by the coordinator.
    #[arg(long, env = "BERTH_BURNED_GRACE", default_value = "2m", value_parser = humantime::parse_duration)]
    pub burned_grace: Duration,
    /// How long the id of a host that served a lease is remembered and
    /// refused.
    #[arg(long, env = "BERTH_BURNED_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub burned_retention: Duration,
    /// Hosts serve again after a verified wipe (the agents' --recycle);
    /// without it a host that served a lease is refused from then on. Local
    /// provider only, and single-tenant (docs/security.md).
    #[arg(long, env = "BERTH_RECYCLE")]
    pub recycle: bool,
    /// Elastic capacity: the most hosts the pool may have. Without it the
    /// pool's size is fixed by whatever starts hosts; with it the
    /// coordinator decides how many hosts there should be
    /// (AdminService.PoolStats `desired_hosts`) and retires idle ones.
    #[arg(long, env = "BERTH_MAX_HOSTS")]
    pub max_hosts: Option<u32>,
    /// Elastic capacity: the fewest hosts the pool keeps.
    #[arg(long, env = "BERTH_MIN_HOSTS", default_value_t = 0)]
    pub min_hosts: u32,
    /// Elastic capacity: ready hosts to keep beyond the builds holding or
    /// waiting for one.
    #[arg(long, env = "BERTH_IDLE_HOSTS", default_value_t = 1)]
    pub idle_hosts: u32,
    /// Elastic capacity: how long idle hosts must stay above the idle
    /// target before the excess is retired.
    #[arg(long, env = "BERTH_SCALE_IN_AFTER", default_value = "5m", value_parser = humantime::parse_duration)]
    pub scale_in_after: Duration,
    /// EC2, elastic (needs --max-hosts): the Auto Scaling group whose
    /// capacity the coordinator sets. It raises the group's desired
    /// capacity to the pool's, terminates chosen idle instances with a
    /// decrement, and protects leased instances from scale-in.
    #[arg(long, env = "BERTH_ASG_NAME")]
    pub asg_name: Option<String>,
    /// Time between the Auto Scaling actuator's passes.
    #[arg(long, env = "BERTH_ASG_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub asg_interval: Duration,
    /// The tenants' build cache registry (`HOST:PORT` as hosts reach it):
    /// Acquire then gives each lease its tenant's namespace there and a
    /// login the token endpoint accepts while the lease is active. Needs
    /// --cache-token-listen.
    #[arg(long, env = "BERTH_CACHE_REGISTRY", requires = "cache_token_listen")]
    pub cache_registry: Option<String>,
    /// Address of the build cache's token endpoint (HTTPS, the registry's
    /// `auth.token.realm` is `https://ADDR/token`); reachable from hosts.
    #[arg(long, env = "BERTH_CACHE_TOKEN_LISTEN", requires = "cache_registry")]
    pub cache_token_listen: Option<SocketAddr>,
    /// The pool's pull-through mirror (`HOST:PORT` as hosts reach it, TLS
    /// with a pool CA certificate): `berth status` and `/metrics` show
    /// whether it answers.
    #[arg(long, env = "BERTH_MIRROR_REGISTRY")]
    pub mirror_registry: Option<String>,
    /// The mirror's debug listener (distribution's `http.debug.addr`):
    /// its hit and byte counters are read there.
    #[arg(long, env = "BERTH_MIRROR_METRICS", requires = "mirror_registry")]
    pub mirror_metrics: Option<SocketAddr>,
    /// The build cache registry's debug listener (distribution's
    /// `http.debug.addr`, Prometheus enabled): its counters are read there.
    #[arg(long, env = "BERTH_CACHE_METRICS", requires = "cache_registry")]
    pub cache_metrics: Option<SocketAddr>,
    /// Where the pool's state lives: the embedded store under --state-dir
    /// (the default), or a PostgreSQL database (`postgres://USER@HOST/DB`,
    /// libpq's URL form) that several coordinators share: one leads, the
    /// others stand by and take over when it is gone
    /// (docs/high-availability.md).
    #[arg(long, env = "BERTH_STORE")]
    pub store: Option<String>,
    /// With --store postgres://: a file holding 64 hex digits (32 random
    /// bytes, e.g. `openssl rand -hex 32`), the key that seals the pool
    /// CA's private key in the database. Every coordinator of the pool
    /// needs the same file.
    #[arg(long, env = "BERTH_STORE_KEY_FILE")]
    pub store_key_file: Option<PathBuf>,
    /// With --store postgres://: how long a leader's claim lasts without
    /// renewal (it renews every fifth of it). A standby takes over at most
    /// about this long after the leader is gone.
    #[arg(long, env = "BERTH_LEADER_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub leader_ttl: Duration,
    /// With --store postgres://: the address standbys name as the leader's
    /// while this coordinator leads (default: the address it listens on).
    #[arg(long, env = "BERTH_ADVERTISE")]
    pub advertise: Option<String>,
}

/// What is wrong with a coordinator configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--provider ec2 needs --pool-name (BERTH_POOL_NAME)")]
    NoPoolName,
    #[error("pool name {0:?} must be 1..=128 characters of [A-Za-z0-9_.:/=+@-]")]
    BadPoolName(String),
    #[error(
        "--recycle is refused with --provider ec2: a host that served a lease is never trusted again (docs/security.md)"
    )]
    RecycleOnEc2,
    #[error("--host-cert-validity {0:?} is shorter than the minimum, {MIN_HOST_CERT_VALIDITY:?}")]
    HostCertValidity(Duration),
    #[error("--min-hosts {min} is above --max-hosts {max}")]
    MinAboveMax { min: u32, max: u32 },
    #[error("--max-requests must be at least 1")]
    NoRequests,
    #[error("--cache-registry {0:?} must be HOST:PORT")]
    BadCacheRegistry(String),
    #[error("--mirror-registry {0:?} must be HOST:PORT")]
    BadMirrorRegistry(String),
    #[error(
        "--store must be a postgres:// or postgresql:// URL (without it the embedded store is used)"
    )]
    BadStoreUrl,
    #[error(
        "--store postgres:// needs --store-key-file: the key that seals the pool CA's key in the database"
    )]
    NoStoreKey,
    #[error("--leader-ttl must be between 1s and 10m")]
    BadLeaderTtl,
    #[error("--asg-name needs --provider ec2 and --max-hosts (an elastic EC2 pool)")]
    AsgNotElastic,
    #[error("--asg-name {0:?} must be 1..=255 characters")]
    BadAsgName(String),
    #[error("--asg-interval must be at least 1s")]
    BadAsgInterval,
}

/// `HOST:PORT` with a DNS name or IPv4 address and a port above 0.
fn host_port(r: &str) -> bool {
    r.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            && port.parse::<u16>().is_ok_and(|p| p != 0)
    })
}

/// The shortest `--host-cert-validity`: certificates are re-issued at 2/3
/// of it, and a few seconds must stay for the agent to take the new one.
pub const MIN_HOST_CERT_VALIDITY: Duration = Duration::from_secs(15);

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

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.host_cert_validity < MIN_HOST_CERT_VALIDITY {
            return Err(ConfigError::HostCertValidity(self.host_cert_validity));
        }
        if self.max_requests == Some(0) {
            return Err(ConfigError::NoRequests);
        }
        if let Some(max) = self.max_hosts
            && self.min_hosts > max
        {
            return Err(ConfigError::MinAboveMax {
                min: self.min_hosts,
                max,
            });
        }
        if let Some(url) = &self.store {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError::BadStoreUrl);
            }
            if self.store_key_file.is_none() {
                return Err(ConfigError::NoStoreKey);
            }
            if self.leader_ttl < Duration::from_secs(1)
                || self.leader_ttl > Duration::from_secs(600)
            {
                return Err(ConfigError::BadLeaderTtl);
            }
        }
        if self.provider == Provider::Ec2 {
            if self.recycle {
                return Err(ConfigError::RecycleOnEc2);
            }
            if self.pool_name.is_empty() {
                return Err(ConfigError::NoPoolName);
            }
            // The characters EC2 allows in tag values, minus spaces.
            let ok = self.pool_name.len() <= 128
                && self
                    .pool_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.:/=+@-".contains(c));
            if !ok {
                return Err(ConfigError::BadPoolName(self.pool_name.clone()));
            }
        }
        if let Some(name) = &self.asg_name {
            if self.provider != Provider::Ec2 || self.max_hosts.is_none() {
                return Err(ConfigError::AsgNotElastic);
            }
            if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
                return Err(ConfigError::BadAsgName(name.clone()));
            }
            if self.asg_interval < Duration::from_secs(1) {
                return Err(ConfigError::BadAsgInterval);
            }
        }
        if let Some(r) = &self.cache_registry
            && !host_port(r)
        {
            return Err(ConfigError::BadCacheRegistry(r.clone()));
        }
        if let Some(r) = &self.mirror_registry
            && !host_port(r)
        {
            return Err(ConfigError::BadMirrorRegistry(r.clone()));
        }
        Ok(())
    }

    /// The pool's registries `berth status` and `/metrics` report on.
    pub fn registry_targets(&self) -> Vec<crate::ops::registries::Target> {
        use crate::ops::registries::{Kind, Target};
        let mut out = vec![];
        if let Some(addr) = &self.mirror_registry {
            out.push(Target {
                kind: Kind::Mirror,
                addr: addr.clone(),
                metrics: self.mirror_metrics,
            });
        }
        if let Some(addr) = &self.cache_registry {
            out.push(Target {
                kind: Kind::Cache,
                addr: addr.clone(),
                metrics: self.cache_metrics,
            });
        }
        out
    }

    /// The orphan sweeper's settings, when it runs.
    pub fn sweep(&self) -> Option<crate::sweeper::SweepConfig> {
        (self.provider == Provider::Ec2 && !self.sweep_interval.is_zero()).then(|| {
            crate::sweeper::SweepConfig {
                pool_name: self.pool_name.clone(),
                interval: self.sweep_interval,
                unregistered_after: self.orphan_unregistered_after,
                gone_after: self.orphan_gone_after,
                max_terminations: self.sweep_max_terminations,
                burned_grace: self.burned_grace,
            }
        })
    }

    /// The Auto Scaling actuator's settings, when it runs.
    pub fn group(&self) -> Option<crate::actuator::GroupConfig> {
        let name = self.asg_name.clone()?;
        (self.provider == Provider::Ec2 && self.max_hosts.is_some()).then_some(
            crate::actuator::GroupConfig {
                name,
                interval: self.asg_interval,
            },
        )
    }

    /// `--max-requests`, or its default.
    pub fn max_requests(&self) -> usize {
        self.max_requests.unwrap_or(
            self.max_queued
                .saturating_add(crate::api::limit::DEFAULT_HEADROOM),
        )
    }

    pub fn pool(&self) -> PoolConfig {
        PoolConfig {
            heartbeat_interval: self.heartbeat_interval,
            assign_timeout: self.assign_timeout,
            default_ttl: self.default_ttl,
            max_ttl: self.max_ttl,
            max_lease: self.max_lease,
            max_wait: self.max_wait,
            max_queued: self.max_queued,
            lost_grace: self.lost_grace,
            recycle: self.recycle,
            burned_retention: self.burned_retention,
            capacity: self.max_hosts.map(|max| crate::capacity::CapacityConfig {
                min: self.min_hosts,
                max,
                idle_target: self.idle_hosts,
                scale_in_after: self.scale_in_after,
            }),
            scale_in_by_group: self.group().is_some(),
            ..PoolConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        c: CoordinatorConfig,
    }

    fn try_parse(args: &[&str]) -> Result<CoordinatorConfig, clap::Error> {
        let mut argv = vec!["berth-coordinator"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| c.c)
    }

    fn parse(args: &[&str]) -> CoordinatorConfig {
        try_parse(args).unwrap()
    }

    #[test]
    fn settings_that_would_weaken_the_pool_are_refused() {
        assert_eq!(parse(&[]).validate(), Ok(()));
        let c = parse(&["--provider", "ec2", "--pool-name", "p", "--recycle"]);
        assert_eq!(c.validate(), Err(ConfigError::RecycleOnEc2));
        assert_eq!(parse(&["--recycle"]).validate(), Ok(()));
        let c = parse(&["--host-cert-validity", "5s"]);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::HostCertValidity(_))
        ));
        assert_eq!(
            parse(&[]).host_cert_validity,
            berth_tls::ca::HOST_CERT_VALIDITY
        );
        assert_eq!(
            parse(&[]).local_range.to_string(),
            berth_proto::local::HOST_RANGE
        );
        assert!(try_parse(&["--local-range", "127.0.0.0/8"]).is_err());
        assert_eq!(
            parse(&["--max-requests", "0"]).validate(),
            Err(ConfigError::NoRequests)
        );
    }

    #[test]
    fn the_call_limit_leaves_room_above_the_queue_cap_by_default() {
        assert_eq!(
            parse(&[]).max_requests(),
            crate::pool::DEFAULT_MAX_QUEUED + 1_000
        );
        assert_eq!(parse(&["--max-queued", "50"]).max_requests(), 1_050);
        let c = parse(&["--max-requests", "64"]);
        assert_eq!((c.validate(), c.max_requests()), (Ok(()), 64));
    }

    #[test]
    fn an_auto_scaling_group_is_driven_only_by_an_elastic_ec2_pool() {
        let ec2 = ["--provider", "ec2", "--pool-name", "p", "--asg-name", "g"];
        let c = parse(&ec2);
        assert_eq!(c.validate(), Err(ConfigError::AsgNotElastic));
        let c = parse(&[&ec2[..], &["--max-hosts", "4"]].concat());
        assert_eq!(c.validate(), Ok(()));
        let g = c.group().unwrap();
        assert_eq!((g.name.as_str(), g.interval), ("g", Duration::from_secs(5)));
        assert!(c.pool().scale_in_by_group);
        let local = parse(&["--asg-name", "g", "--max-hosts", "4"]);
        assert_eq!(local.validate(), Err(ConfigError::AsgNotElastic));
        assert!(local.group().is_none());
        assert!(!local.pool().scale_in_by_group);
        let c = parse(&[&ec2[..], &["--max-hosts", "4", "--asg-interval", "10ms"]].concat());
        assert_eq!(c.validate(), Err(ConfigError::BadAsgInterval));
        let long = "g".repeat(256);
        let c = parse(&[
            "--provider",
            "ec2",
            "--pool-name",
            "p",
            "--max-hosts",
            "4",
            "--asg-name",
            &long,
        ]);
        assert!(matches!(c.validate(), Err(ConfigError::BadAsgName(_))));
        // Without a group, an elastic EC2 pool drains retired hosts at once.
        let c = parse(&["--provider", "ec2", "--pool-name", "p", "--max-hosts", "4"]);
        assert!(!c.pool().scale_in_by_group);
    }

    #[test]
    fn registries_to_watch_are_host_and_port() {
        let c = parse(&[
            "--mirror-registry",
            "198.18.0.1:5000",
            "--mirror-metrics",
            "127.0.0.1:9000",
        ]);
        assert_eq!(c.validate(), Ok(()));
        let t = c.registry_targets();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, crate::ops::registries::Kind::Mirror);
        assert_eq!(t[0].metrics, Some("127.0.0.1:9000".parse().unwrap()));
        for bad in ["198.18.0.1", "https://m:5000", "m:0", ":5000"] {
            assert_eq!(
                parse(&["--mirror-registry", bad]).validate(),
                Err(ConfigError::BadMirrorRegistry(bad.into())),
            );
        }
        // Counters without the registry they belong to mean nothing.
        assert!(try_parse(&["--mirror-metrics", "127.0.0.1:9000"]).is_err());
        assert!(try_parse(&["--cache-metrics", "127.0.0.1:9000"]).is_err());
        assert!(parse(&[]).registry_targets().is_empty());
    }
}
