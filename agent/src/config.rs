//! The agent's configuration: one clap-derived struct, every flag with a
//! `BERTH_*` environment twin, and defaults that work for `berth up` on one
//! machine. Validation that clap cannot express (prefix charset, URL shape)
//! lives in [`Config::validate`] so a bad value fails before anything is
//! created on the machine.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

pub use crate::ops::status::{DEFAULT_STATUS_PORT, StatusListen};

/// Coordinator URL used when neither `--coordinator` nor `BERTH_COORDINATOR` is set.
pub const DEFAULT_COORDINATOR: &str = "https://127.0.0.1:7070";
/// Where hosts keep their state (dockerd's data root lives in `STATE_DIR/HOST_ID`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth/hosts";
/// Where hosts keep short-lived, short paths (exec root, socket, pidfile).
pub const DEFAULT_RUN_DIR: &str = "/run/berth";
/// Prefix of host ids, network namespaces and cgroups.
pub const DEFAULT_PREFIX: &str = "berth-";
/// TCP port of the Docker front (the conventional Docker TLS port).
pub const DEFAULT_FRONT_PORT: u16 = berth_proto::ports::DOCKER_FRONT;
/// How long bootstrapping (netns, dockerd start, `/_ping`, `info`) may take.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle host may be cut off from the coordinator before it
/// terminates itself.
pub const DEFAULT_ISOLATION_LIMIT: Duration = Duration::from_secs(300);
/// Longest prefix accepted. Host ids end up in netns names, cgroup names and
/// unix socket paths (108 bytes at most), so they are kept short.
pub const MAX_PREFIX_LEN: usize = 24;

/// How often the EC2 provider reads the Auto Scaling target lifecycle.
pub const DEFAULT_LIFECYCLE_POLL: Duration = Duration::from_secs(5);

/// Where the host comes from and how it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProviderKind {
    /// A host on this machine: a network namespace (or, with `--no-netns`,
    /// the agent's own) and a dockerd the agent starts.
    Local,
    /// The EC2 instance the agent runs on: identity from IMDSv2, dockerd in
    /// the instance's namespace, TerminateInstances at the end.
    Ec2,
}

pub use berth_runtime::telemetry::LogFormat;

/// The command line: the agent by default, or a maintenance subcommand.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "berth-agent",
    version,
    about = "Turns this machine into a single-use remote Docker host for CI"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

/// What the binary does besides being an agent.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Remove what killed agents left behind (processes, mounts, cgroups,
    /// network namespaces, directories) for `--prefix` under `--state-dir`
    /// and `--run-dir`, then exit.
    Sweep,
}

/// Everything the agent needs to know at start. The flags `sweep` also uses
/// are global, so they may follow the subcommand.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Where the host comes from: `local` (development, tests) or `ec2`.
    /// Endpoints and credentials for `ec2` follow the AWS SDK's settings
    /// (`AWS_EC2_METADATA_SERVICE_ENDPOINT`, `AWS_ENDPOINT_URL_EC2`, ...).
    #[arg(long, env = "BERTH_PROVIDER", value_enum, default_value_t = ProviderKind::Local)]
    pub provider: ProviderKind,

    /// EC2: command that powers the instance off when TerminateInstances
    /// keeps failing (split on whitespace; the launch template's shutdown
    /// behaviour `terminate` makes a power-off end the instance).
    #[arg(long, env = "BERTH_POWEROFF_COMMAND", default_value = crate::provider::ec2::DEFAULT_POWEROFF_COMMAND)]
    pub poweroff_command: String,

    /// EC2: how often to read the Auto Scaling target lifecycle (a warm
    /// instance registers once it reads `InService`).
    #[arg(long, env = "BERTH_LIFECYCLE_POLL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub lifecycle_poll: Duration,

    /// gRPC URL of the coordinator (TLS: https:// only), or several
    /// separated by commas (a leader and its standbys on a shared store:
    /// the agent moves on to the next one when a session fails). Given
    /// twice, the last one counts.
    #[arg(long, env = "BERTH_COORDINATOR", default_value = DEFAULT_COORDINATOR, overrides_with = "coordinator")]
    pub coordinator: String,

    /// CA certificate the coordinator's TLS certificate must chain to.
    #[arg(long, env = "BERTH_CA")]
    pub ca: Option<PathBuf>,

    /// File holding the pool join token the coordinator admits agents with.
    #[arg(long, env = "BERTH_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,

    /// Directory holding one sub-directory per host (dockerd's data root inside).
    #[arg(long, global = true, env = "BERTH_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// Directory for short paths: dockerd's exec root, socket and pidfile.
    #[arg(long, global = true, env = "BERTH_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,

    /// Prefix of host ids, network namespaces and cgroups; `sweep` only
    /// touches things carrying it.
    #[arg(long, global = true, env = "BERTH_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,

    /// TCP port of the Docker front on the host address.
    #[arg(long, env = "BERTH_FRONT_PORT", default_value_t = DEFAULT_FRONT_PORT)]
    pub front_port: u16,

    /// After a verified wipe, offer the host again instead of destroying it.
    /// Local provider only, and single-tenant: a lease holder is root on the
    /// host, so the next lease trusts what the wipe could check
    /// (docs/security.md). Refused with `--provider ec2`.
    #[arg(long, env = "BERTH_RECYCLE", value_parser = BoolishValueParser::new())]
    pub recycle: bool,

    /// dockerd binary to start.
    #[arg(long, env = "BERTH_DOCKERD", default_value = "dockerd")]
    pub dockerd: PathBuf,

    /// Run dockerd in the agent's own network namespace and use `--host-addr`
    /// (the EC2 shape) instead of creating a namespace per host.
    #[arg(long, env = "BERTH_NO_NETNS", value_parser = BoolishValueParser::new())]
    pub no_netns: bool,

    /// Host address with `--no-netns`.
    #[arg(long, env = "BERTH_HOST_ADDR", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host_addr: IpAddr,

    /// How long bootstrapping may take (e.g. `30s`).
    #[arg(long, env = "BERTH_BOOT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub boot_timeout: Duration,

    /// Log format on stderr; the filter comes from `RUST_LOG` (default `info`).
    #[arg(long, global = true, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    /// Take over this host, left behind by an agent that died (its state
    /// file says what it was doing), instead of creating a fresh one.
    #[arg(long, env = "BERTH_RESUME_HOST")]
    pub resume_host: Option<String>,

    /// An idle host cut off from the coordinator this long terminates itself.
    #[arg(long, env = "BERTH_ISOLATION_LIMIT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub isolation_limit: Duration,

    /// Reach the coordinator through the host's own network namespace (as
    /// on EC2, where the link leaves through the instance's NIC), so cutting
    /// the host's network cuts the link too.
    #[arg(long, env = "BERTH_LINK_VIA_HOST_NET", value_parser = BoolishValueParser::new())]
    pub link_via_host_net: bool,

    /// Where the status endpoint (/healthz /readyz /status /metrics) listens:
    /// `:PORT` on the host address (inside the host's network namespace),
    /// `ADDR:PORT`, or `off`.
    #[arg(long, env = "BERTH_STATUS_LISTEN", default_value_t = StatusListen::HostAddr(DEFAULT_STATUS_PORT))]
    pub status_listen: StatusListen,

    /// Pull-through mirror for Docker Hub (`https://HOST[:PORT]`), written to
    /// the host's dockerd configuration as `registry-mirrors`; `berth up`
    /// passes its own mirror (repeatable).
    #[arg(
        long = "registry-mirror",
        env = "BERTH_REGISTRY_MIRROR",
        value_delimiter = ','
    )]
    pub registry_mirrors: Vec<String>,

    /// A pool registry (`HOST:PORT`, e.g. the tenants' build cache) whose
    /// certificate dockerd checks against `--registry-ca` (repeatable; the
    /// mirrors are trusted that way too).
    #[arg(
        long = "pool-registry",
        env = "BERTH_POOL_REGISTRY",
        value_delimiter = ','
    )]
    pub pool_registries: Vec<String>,

    /// CA certificate (PEM) the pool's registries' TLS certificates chain to;
    /// given to the host's dockerd for the mirrors and `--pool-registry`.
    #[arg(long, env = "BERTH_REGISTRY_CA")]
    pub registry_ca: Option<PathBuf>,

    /// TOML file of settings; its keys are these long flag names. A flag or
    /// its BERTH_* twin overrides the file.
    #[arg(long, env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
}

impl Default for Config {
    /// The same values as the flag defaults, without reading the environment
    /// (tests and `berth up` build configs in code).
    fn default() -> Self {
        Config {
            provider: ProviderKind::Local,
            poweroff_command: crate::provider::ec2::DEFAULT_POWEROFF_COMMAND.to_owned(),
            lifecycle_poll: DEFAULT_LIFECYCLE_POLL,
            coordinator: DEFAULT_COORDINATOR.to_owned(),
            ca: None,
            join_token_file: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            prefix: DEFAULT_PREFIX.to_owned(),
            front_port: DEFAULT_FRONT_PORT,
            recycle: false,
            dockerd: PathBuf::from("dockerd"),
            no_netns: false,
            host_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            log_format: LogFormat::Plain,
            resume_host: None,
            isolation_limit: DEFAULT_ISOLATION_LIMIT,
            link_via_host_net: false,
            status_listen: StatusListen::HostAddr(DEFAULT_STATUS_PORT),
            registry_mirrors: vec![],
            pool_registries: vec![],
            registry_ca: None,
            config: None,
        }
    }
}

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("prefix {0:?} must be 1..={MAX_PREFIX_LEN} characters of [A-Za-z0-9_-]")]
    BadPrefix(String),
    #[error("coordinator URL {0:?} must start with https:// (the coordinator speaks TLS only)")]
    BadCoordinator(String),
    #[error("{name} {path:?} must be an absolute path")]
    RelativePath { name: &'static str, path: PathBuf },
    #[error("front port must not be 0")]
    ZeroPort,
    #[error("boot timeout must be more than zero")]
    ZeroBootTimeout,
    #[error("isolation limit must be more than zero")]
    ZeroIsolationLimit,
    #[error("--resume-host {0:?} is not a host id of the configured prefix")]
    BadResumeHost(String),
    #[error(
        "--resume-host takes over local hosts only (an EC2 instance's agent restarts on its own instance)"
    )]
    ResumeNeedsLocal,
    #[error("the ec2 provider needs a power-off command")]
    NoPoweroffCommand,
    #[error("lifecycle poll interval must be more than zero")]
    ZeroLifecyclePoll,
    #[error(
        "--recycle is refused with the ec2 provider: a host that held a lease is never trusted again (docs/security.md)"
    )]
    RecycleOnEc2,
    #[error(transparent)]
    Registry(#[from] crate::docker::registries::RegistryError),
}

impl Config {
    /// Checks what clap cannot: a prefix that is safe in interface, cgroup and
    /// path names, absolute directories (sweep matches them textually), and a
    /// URL tonic can dial.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_prefix(&self.prefix)?;
        let urls = crate::link::coordinator_urls(&self.coordinator);
        if urls.is_empty() || urls.iter().any(|u| !u.starts_with("https://")) {
            return Err(ConfigError::BadCoordinator(self.coordinator.clone()));
        }
        for (name, path) in [("state dir", &self.state_dir), ("run dir", &self.run_dir)] {
            if !path.is_absolute() {
                return Err(ConfigError::RelativePath {
                    name,
                    path: path.clone(),
                });
            }
        }
        if self.front_port == 0 {
            return Err(ConfigError::ZeroPort);
        }
        if self.boot_timeout.is_zero() {
            return Err(ConfigError::ZeroBootTimeout);
        }
        if self.isolation_limit.is_zero() {
            return Err(ConfigError::ZeroIsolationLimit);
        }
        if let Some(h) = &self.resume_host {
            // It names directories and a namespace to take over: only a
            // well-formed id of our own prefix.
            let ok = h.strip_prefix(&self.prefix).is_some_and(|rest| {
                !rest.is_empty() && rest.len() <= 8 && rest.bytes().all(|b| b.is_ascii_hexdigit())
            });
            if !ok {
                return Err(ConfigError::BadResumeHost(h.clone()));
            }
        }
        // The CA's file is read at boot; its shape is checked here.
        let ca = self.registry_ca.as_ref().map(|_| String::new());
        crate::docker::registries::Registries::new(
            &self.registry_mirrors,
            &self.pool_registries,
            ca,
        )?;
        if self.provider == ProviderKind::Ec2 {
            if self.resume_host.is_some() {
                return Err(ConfigError::ResumeNeedsLocal);
            }
            if self.recycle {
                return Err(ConfigError::RecycleOnEc2);
            }
            if self.poweroff_command.split_whitespace().next().is_none() {
                return Err(ConfigError::NoPoweroffCommand);
            }
            if self.lifecycle_poll.is_zero() {
                return Err(ConfigError::ZeroLifecyclePoll);
            }
        }
        Ok(())
    }
}

/// A prefix is safe when it is short and made of characters that mean nothing
/// to `ip`, cgroupfs or a shell.
pub fn validate_prefix(prefix: &str) -> Result<(), ConfigError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadPrefix(prefix.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_defaults_match_default_impl() {
        // Parse with no flags; env twins could leak in from the test runner's
        // environment, so only compare when none is set.
        if std::env::vars().any(|(k, _)| k.starts_with("BERTH_")) {
            return;
        }
        let cli = Cli::parse_from(["berth-agent"]);
        assert_eq!(cli.command, None);
        let parsed = cli.config;
        let default = Config::default();
        assert_eq!(parsed.coordinator, default.coordinator);
        assert_eq!(parsed.state_dir, default.state_dir);
        assert_eq!(parsed.run_dir, default.run_dir);
        assert_eq!(parsed.prefix, default.prefix);
        assert_eq!(parsed.front_port, default.front_port);
        assert_eq!(parsed.recycle, default.recycle);
        assert_eq!(parsed.dockerd, default.dockerd);
        assert_eq!(parsed.no_netns, default.no_netns);
        assert_eq!(parsed.host_addr, default.host_addr);
        assert_eq!(parsed.boot_timeout, default.boot_timeout);
        assert_eq!(parsed.log_format, default.log_format);
        assert_eq!(parsed.provider, default.provider);
        assert_eq!(parsed.poweroff_command, default.poweroff_command);
        assert_eq!(parsed.lifecycle_poll, default.lifecycle_poll);
        assert_eq!(parsed.status_listen, default.status_listen);
    }

    #[test]
    fn ec2_flags_parse_and_validate() {
        let c = Cli::parse_from([
            "berth-agent",
            "--provider",
            "ec2",
            "--poweroff-command",
            "/usr/local/bin/off now",
            "--lifecycle-poll",
            "250ms",
        ])
        .config;
        assert_eq!(c.provider, ProviderKind::Ec2);
        assert_eq!(c.poweroff_command, "/usr/local/bin/off now");
        assert_eq!(c.lifecycle_poll, Duration::from_millis(250));
        assert_eq!(c.validate(), Ok(()));
        let c = Config {
            poweroff_command: "  ".into(),
            ..c
        };
        assert_eq!(c.validate(), Err(ConfigError::NoPoweroffCommand));
        assert!(Cli::try_parse_from(["berth-agent", "--provider", "gcp"]).is_err());
        // Taking over a host left behind is a local thing: an EC2 agent
        // restarts on its own instance.
        let c = Config {
            poweroff_command: "/usr/local/bin/off now".into(),
            resume_host: Some(format!("{}0", c.prefix)),
            ..c
        };
        assert_eq!(c.validate(), Err(ConfigError::ResumeNeedsLocal));
        // A host that held a lease is never offered again on EC2.
        let c = Config {
            resume_host: None,
            recycle: true,
            ..c
        };
        assert_eq!(c.validate(), Err(ConfigError::RecycleOnEc2));
    }

    #[test]
    fn flags_parse() {
        let c = Cli::parse_from([
            "berth-agent",
            "--coordinator",
            "https://127.0.0.1:9",
            "--prefix",
            "bta-",
            "--front-port",
            "12376",
            "--recycle",
            "--no-netns",
            "--host-addr",
            "10.1.2.3",
            "--boot-timeout",
            "1500ms",
            "--log-format",
            "json",
        ])
        .config;
        assert_eq!(c.coordinator, "https://127.0.0.1:9");
        assert_eq!(c.prefix, "bta-");
        assert_eq!(c.front_port, 12376);
        assert!(c.recycle && c.no_netns);
        assert_eq!(c.host_addr, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(c.boot_timeout, Duration::from_millis(1500));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn sweep_subcommand_takes_the_dirs_after_it() {
        let cli = Cli::parse_from([
            "berth-agent",
            "sweep",
            "--state-dir",
            "/s",
            "--run-dir",
            "/r",
            "--prefix",
            "bt-",
        ]);
        assert_eq!(cli.command, Some(Command::Sweep));
        assert_eq!(cli.config.state_dir, PathBuf::from("/s"));
        assert_eq!(cli.config.run_dir, PathBuf::from("/r"));
        assert_eq!(cli.config.prefix, "bt-");
        assert!(Cli::try_parse_from(["berth-agent", "sweep", "--bogus"]).is_err());
    }

    #[test]
    fn validation_rejects_unsafe_values() {
        let bad_prefixes = [
            "",
            "a b",
            "x/y",
            "semi;colon",
            &"p".repeat(MAX_PREFIX_LEN + 1),
        ];
        for p in bad_prefixes {
            let c = Config {
                prefix: p.to_owned(),
                ..Config::default()
            };
            assert_eq!(
                c.validate(),
                Err(ConfigError::BadPrefix(p.to_owned())),
                "{p:?}"
            );
        }
        for url in ["127.0.0.1:7070", "http://127.0.0.1:7070"] {
            let c = Config {
                coordinator: url.into(),
                ..Config::default()
            };
            assert!(
                matches!(c.validate(), Err(ConfigError::BadCoordinator(_))),
                "{url}"
            );
        }
        let c = Config {
            state_dir: "rel/dir".into(),
            ..Config::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::RelativePath { .. })
        ));
        let c = Config {
            front_port: 0,
            ..Config::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::ZeroPort));
        assert_eq!(Config::default().validate(), Ok(()));
    }
}
