//! The `berth` command line: what CI runs (`acquire`, `renew`, `release`),
//! what operators run (`hosts`, `leases`, `drain`), and `up`, which runs a
//! whole local pool on this machine.
//!
//! Exit codes: 0 success, 1 any other failure, 2 bad usage, 3 no host within
//! the wait, 4 lease or host not found, 5 coordinator unreachable, 6 the lease
//! has already ended, 7 not authenticated or not allowed.
//!
//! Credentials: the coordinator's CA (`--ca`) to verify its TLS certificate,
//! and a tenant token (`--token-file`, or `BERTH_TOKEN`) sent as bearer
//! metadata. `acquire` makes the lease's key pair here, sends only a CSR, and
//! writes `ca.pem`, `cert.pem`, `key.pem` into a private directory (0700,
//! files 0600) for `DOCKER_CERT_PATH`; `renew` re-issues `cert.pem` for the
//! same key; `release` deletes the directory.
//!
//! `sync` and `forward` make the leased host feel local: a directory into a
//! named volume and back (through the Docker API the lease grants), and
//! published ports on 127.0.0.1.

pub mod exit;
pub mod forward;
pub mod lease_docker;
pub mod status;
pub mod sync;
pub mod timeline;
pub mod up;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_client::AdminServiceClient;
use berth_proto::v1::lease_service_client::LeaseServiceClient;
use berth_proto::{from_duration, to_system_time};
use clap::{Parser, Subcommand};
pub use exit::Exit;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use berth_proto::ports::COORDINATOR_LOCAL as DEFAULT_LISTEN;
use berth_runtime::telemetry::LogConfig;

/// How long to wait for the coordinator's TCP/HTTP2 handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for calls that do not wait for hosts.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Where `berth up` (default state dir) leaves the CLI's credentials.
pub const DEFAULT_CLI_DIR: &str = "/var/lib/berth/cli";
pub const DEFAULT_CA: &str = "/var/lib/berth/cli/ca.pem";
pub const DEFAULT_TOKEN_FILE: &str = "/var/lib/berth/cli/token";
/// The file in a lease's certificate directory naming the lease, so that
/// `release` only ever deletes a directory `acquire` made for that lease.
pub const LEASE_MARKER: &str = "berth-lease";

/// berth: single-use remote Docker hosts for CI.
#[derive(Debug, Parser)]
#[command(name = "berth", version)]
pub struct Cli {
    /// Coordinator address (host:port or https://host:port), or several
    /// separated by commas (a leader and its standbys on a shared store:
    /// the one that leads is used).
    #[arg(long, env = "BERTH_COORDINATOR", default_value = DEFAULT_LISTEN, global = true)]
    pub coordinator: String,
    /// CA certificate the coordinator's TLS certificate must chain to.
    #[arg(long, env = "BERTH_CA", default_value = DEFAULT_CA, global = true)]
    pub ca: PathBuf,
    /// File holding the tenant token. Without it, BERTH_TOKEN holds the token
    /// itself, else /var/lib/berth/cli/token (what `berth up` writes).
    #[arg(long, env = "BERTH_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
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
        /// Where to write ca.pem, cert.pem and key.pem (default
        /// $HOME/.berth/leases/LEASE_ID); printed as DOCKER_CERT_PATH.
        #[arg(long)]
        cert_dir: Option<PathBuf>,
        /// What to print: `env` (export lines for eval), `json`, or
        /// `docker-context` (creates the docker context berth-LEASE_ID and
        /// prints its name).
        #[arg(long, env = "BERTH_FORMAT", value_enum, default_value_t = status::Format::Env)]
        format: status::Format,
        /// How often to print a progress line on stderr while waiting (the
        /// build's place in its tenant's queue).
        #[arg(long, env = "BERTH_PROGRESS_EVERY", default_value = "5s", value_parser = status::parse_progress_every)]
        progress_every: Duration,
    },
    /// Extend a lease; re-issues its client certificate for the same key.
    Renew {
        #[arg(long, env = "BERTH_LEASE_ID")]
        lease: String,
        /// New time to live, counted from now.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The lease's certificate directory (default: DOCKER_CERT_PATH, else
        /// $HOME/.berth/leases/LEASE_ID).
        #[arg(long, env = "DOCKER_CERT_PATH")]
        cert_dir: Option<PathBuf>,
    },
    /// Give a host back: it is cut off, wiped and destroyed; the lease's
    /// certificate directory is deleted.
    Release {
        #[arg(long, env = "BERTH_LEASE_ID")]
        lease: String,
        /// The lease's certificate directory (default: DOCKER_CERT_PATH, else
        /// $HOME/.berth/leases/LEASE_ID).
        #[arg(long, env = "DOCKER_CERT_PATH")]
        cert_dir: Option<PathBuf>,
    },
    /// Show one lease (while it waits, its place in the queue).
    Get {
        #[arg(long, env = "BERTH_LEASE_ID", required_unless_present = "build")]
        lease: Option<String>,
        /// Show the lease of this build that has not ended (one still
        /// waiting for a host has no lease id printed yet); takes the place
        /// of --lease.
        #[arg(long)]
        build: Option<String>,
    },
    /// List the pool's hosts.
    Hosts,
    /// List leases, or show one with its timeline.
    Leases {
        /// Include ended leases.
        #[arg(long)]
        all: bool,
        /// Show this lease (ended or not) with every step of its life and
        /// the time between steps.
        #[arg(long, value_name = "LEASE_ID")]
        show: Option<String>,
    },
    /// Whether the coordinator answers, and the pool at a glance.
    Status,
    /// Stop giving out a host; it terminates after its current lease.
    Drain {
        host: String,
        #[arg(long, default_value = "drained by operator")]
        reason: String,
    },
    /// Copy a local directory into a named volume on the leased host, or
    /// (--from) a volume back into a local directory.
    Sync(sync::SyncArgs),
    /// Listen on 127.0.0.1 and forward to ports published on the leased
    /// host, until the lease ends.
    Forward(forward::ForwardArgs),
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
    Credentials(String),
    /// A flag that cannot be used as given.
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub fn exit_code(&self) -> Exit {
        match self {
            Self::Unreachable { .. } => Exit::Unreachable,
            Self::Status(s) => Exit::of_status(s.code()),
            Self::Credentials(_) => Exit::NotAllowed,
            Self::Usage(_) => Exit::Usage,
            Self::Other(_) => Exit::Failure,
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        Self::Status(s)
    }
}

/// Adds `https://` when the address has no scheme.
pub fn coordinator_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("https://{addr}")
    }
}

/// With several coordinator addresses: how long to look for the one that
/// leads (a takeover after a leader is lost takes about the coordinators'
/// `--leader-ttl`), and the pause between rounds.
pub const FIND_LEADER_TIMEOUT: Duration = Duration::from_secs(30);
const FIND_LEADER_ROUND: Duration = Duration::from_millis(250);

/// A TLS channel to the coordinator, whose certificate must chain to `ca`.
/// `addrs` is one address, or several separated by commas: then the first
/// whose lease service reports SERVING (the leader; a standby reports
/// NOT_SERVING) is used, trying them in turn for up to
/// [`FIND_LEADER_TIMEOUT`].
pub async fn channel(addrs: &str, ca: &Path) -> Result<Channel, CliError> {
    let list = address_list(addrs);
    if list.len() < 2 {
        return channel_to(addrs.trim(), ca).await;
    }
    let deadline = tokio::time::Instant::now() + FIND_LEADER_TIMEOUT;
    loop {
        let mut why = Vec::new();
        for addr in &list {
            match channel_to(addr, ca).await {
                Ok(ch) => match leads(&ch).await {
                    Ok(()) => return Ok(ch),
                    Err(reason) => why.push(format!("{addr}: {reason}")),
                },
                Err(CliError::Unreachable { reason, .. }) => why.push(format!("{addr}: {reason}")),
                Err(e) => return Err(e),
            }
        }
        if tokio::time::Instant::now() + FIND_LEADER_ROUND >= deadline {
            return Err(CliError::Unreachable {
                addr: addrs.to_owned(),
                reason: format!(
                    "none leads after {FIND_LEADER_TIMEOUT:?} ({})",
                    why.join("; ")
                ),
            });
        }
        tokio::time::sleep(FIND_LEADER_ROUND).await;
    }
}

/// Whether the coordinator on `ch` serves leases (leads), by gRPC health.
async fn leads(ch: &Channel) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let req = tonic_health::pb::HealthCheckRequest {
        service: berth_proto::v1::lease_service_server::SERVICE_NAME.to_owned(),
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, health.check(req)).await {
        Err(_) => Err(format!("no health answer within {CONNECT_TIMEOUT:?}")),
        Ok(Err(s)) => Err(format!("health: {}", s.message())),
        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
        Ok(Ok(_)) => Err("a standby (not serving leases)".to_owned()),
    }
}

/// A TLS channel to the one coordinator at `addr`.
async fn channel_to(addr: &str, ca: &Path) -> Result<Channel, CliError> {
    let url = coordinator_url(addr);
    if !url.starts_with("https://") {
        return Err(CliError::Other(format!(
            "the coordinator speaks TLS only; use https:// (got {url})"
        )));
    }
    let ca_pem = berth_tls::files::read_pem(ca).map_err(|e| {
        CliError::Credentials(format!(
            "the coordinator's CA: {e}\n  set --ca or BERTH_CA (berth up writes {DEFAULT_CA})"
        ))
    })?;
    let unreachable = |reason: String| CliError::Unreachable {
        addr: url.clone(),
        reason,
    };
    Endpoint::from_shared(url.clone())
        .map_err(|e| unreachable(e.to_string()))?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))
        .map_err(|e| unreachable(berth_runtime::error_chain(&e)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|e| unreachable(berth_runtime::error_chain(&e)))
}

/// The tenant token: `--token-file`/`BERTH_TOKEN_FILE`, else `BERTH_TOKEN`,
/// else the file `berth up` writes.
pub fn token(token_file: Option<&Path>) -> Result<String, CliError> {
    let from_file = |p: &Path| {
        berth_tls::files::read_secret(p).map_err(|e| {
            CliError::Credentials(format!(
                "the tenant token: {e}\n  set --token-file, BERTH_TOKEN_FILE or BERTH_TOKEN"
            ))
        })
    };
    if let Some(p) = token_file {
        return from_file(p);
    }
    if let Ok(t) = std::env::var("BERTH_TOKEN")
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_owned());
    }
    from_file(Path::new(DEFAULT_TOKEN_FILE))
}

/// Where a lease's certificates go unless `--cert-dir` says otherwise.
pub fn default_cert_dir(lease_id: &str) -> PathBuf {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".berth").join("leases").join(lease_id)
}

/// The files `acquire` writes into a lease's certificate directory, and
/// the only ones `release` deletes.
pub const LEASE_FILES: [&str; 6] = [
    "key.pem",
    "cert.pem",
    "ca.pem",
    LEASE_MARKER,
    DOCKER_CONFIG_FILE,
    CLI_PLUGINS,
];
/// The docker CLI's configuration for a lease with a build cache
/// (`DOCKER_CONFIG` is the lease directory): the user's own, plus the
/// cache's login.
pub const DOCKER_CONFIG_FILE: &str = "config.json";
/// A link to the user's own docker CLI plugins (buildx), so they stay
/// found with `DOCKER_CONFIG` pointing at the lease directory.
pub const CLI_PLUGINS: &str = "cli-plugins";
/// Second line of the lease marker when `acquire` made the directory itself
/// (then `release` removes the directory too, once it is empty).
const MADE_BY_ACQUIRE: &str = "directory made by berth acquire";

/// Checks that `dir` may take a lease's certificates: it does not exist yet
/// (it will be made, 0700), or it is a directory holding nothing but the
/// files an earlier `acquire` wrote. A directory of the user's with other
/// files is refused before any host is asked for. Returns whether
/// `acquire` made (or will make) the directory.
pub fn check_cert_dir(dir: &Path) -> Result<bool, CliError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => {
            return Err(CliError::Usage(format!(
                "--cert-dir {}: {e}",
                dir.display()
            )));
        }
    };
    let mut foreign: Vec<String> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !LEASE_FILES.contains(&name.as_str()) {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        foreign.truncate(5);
        return Err(CliError::Usage(format!(
            "--cert-dir {} already holds other files ({}); berth acquire writes the lease's key and certificates only into a new or empty directory, so that release deletes nothing of yours",
            dir.display(),
            foreign.join(", ")
        )));
    }
    Ok(std::fs::read_to_string(dir.join(LEASE_MARKER))
        .is_ok_and(|m| m.lines().nth(1) == Some(MADE_BY_ACQUIRE)))
}

/// Writes a lease's credentials for the docker CLI: `ca.pem`, `cert.pem`,
/// `key.pem` and the lease marker, files 0600; a directory `acquire` makes
/// is 0700, an existing (empty) one keeps its mode.
pub fn write_cert_dir(
    dir: &Path,
    lease_id: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(), CliError> {
    let made = check_cert_dir(dir)?;
    let err =
        |e: berth_tls::TlsError| CliError::Other(format!("writing the lease's certificates: {e}"));
    if made {
        berth_tls::files::create_private_dir(dir).map_err(err)?;
    }
    let marker = if made {
        format!("{lease_id}\n{MADE_BY_ACQUIRE}\n")
    } else {
        format!("{lease_id}\n")
    };
    for (name, data) in [
        ("key.pem", key_pem),
        ("cert.pem", cert_pem),
        ("ca.pem", ca_pem),
        (LEASE_MARKER, marker.as_str()),
    ] {
        berth_tls::files::write_private(&dir.join(name), data.as_bytes()).map_err(err)?;
    }
    Ok(())
}

/// The docker CLI configuration a lease with a build cache gets: the
/// user's own (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`;
/// never modified) with the cache registry's login added. A `credsStore`
/// would send every login to its helper, the cache's too, so the copy has
/// none (logins the user keeps inline stay). Written with the lease's
/// files (0600) and deleted by release.
pub fn write_docker_config(dir: &Path, cache: &pb::BuildCache) -> Result<(), CliError> {
    let err = |e: String| CliError::Other(format!("writing the lease's docker config: {e}"));
    let user_dir = std::env::var_os("DOCKER_CONFIG")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")));
    let mut config = user_dir
        .as_ref()
        .filter(|d| d.as_path() != dir)
        .and_then(|d| std::fs::read_to_string(d.join(DOCKER_CONFIG_FILE)).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    let host = cache
        .repository
        .split_once('/')
        .map_or(cache.repository.as_str(), |(h, _)| h)
        .to_owned();
    let login = base64_encode(format!("{}:{}", cache.username, cache.password).as_bytes());
    if let Some(obj) = config.as_object_mut() {
        obj.remove("credsStore");
        if let Some(helpers) = obj.get_mut("credHelpers").and_then(|h| h.as_object_mut()) {
            helpers.remove(&host);
        }
        let auths = obj.entry("auths").or_insert_with(|| serde_json::json!({}));
        if !auths.is_object() {
            *auths = serde_json::json!({});
        }
        auths[&host] = serde_json::json!({ "auth": login });
    }
    let text = serde_json::to_string_pretty(&config).map_err(|e| err(e.to_string()))?;
    berth_tls::files::write_private(&dir.join(DOCKER_CONFIG_FILE), text.as_bytes())
        .map_err(|e| err(e.to_string()))?;
    if let Some(plugins) = user_dir.map(|d| d.join(CLI_PLUGINS)).filter(|p| p.is_dir()) {
        let link = dir.join(CLI_PLUGINS);
        let _ = std::fs::remove_file(&link);
        let _ = std::os::unix::fs::symlink(plugins, link);
    }
    Ok(())
}

/// Standard base64 with padding (a docker config's `auth`).
fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Deletes what `acquire` wrote for `lease_id` in `dir`: the lease files,
/// then the directory itself if `acquire` made it and nothing else is in it.
pub fn remove_cert_dir(dir: &Path) -> std::io::Result<()> {
    let made = std::fs::read_to_string(dir.join(LEASE_MARKER))
        .is_ok_and(|m| m.lines().nth(1) == Some(MADE_BY_ACQUIRE));
    for name in LEASE_FILES {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if made {
        // Fails (and is left alone) if someone put a file there since.
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}

/// The directory of `lease_id`: the one given (if its marker names this
/// lease) or the default one. `None` when there is none to use.
fn lease_cert_dir(given: Option<&Path>, lease_id: &str) -> Option<PathBuf> {
    let marked = |d: &Path| {
        std::fs::read_to_string(d.join(LEASE_MARKER))
            .is_ok_and(|m| m.lines().next().map(str::trim) == Some(lease_id))
    };
    if let Some(d) = given
        && marked(d)
    {
        return Some(d.to_owned());
    }
    let d = default_cert_dir(lease_id);
    marked(&d).then_some(d)
}

/// A request with a deadline and the tenant token.
pub(crate) fn request<T>(
    msg: T,
    timeout: Duration,
    token: &str,
) -> Result<tonic::Request<T>, CliError> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| CliError::Credentials("the tenant token is not valid header text".into()))?;
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

/// The lease watch of `berth forward`: the coordinator, with the CLI's
/// credentials.
pub async fn forward_watch(
    cli: &Cli,
    lease_id: &str,
) -> Result<forward::CoordinatorWatch, CliError> {
    let token = token(cli.token_file.as_deref())?;
    let channel = channel(&cli.coordinator, &cli.ca).await?;
    Ok(forward::CoordinatorWatch {
        channel,
        token,
        lease_id: lease_id.to_owned(),
    })
}

/// Runs one non-`up` subcommand, printing its result to stdout.
pub async fn run_client(cli: &Cli) -> Result<(), CliError> {
    let out = client_output(cli).await?;
    print!("{out}");
    Ok(())
}

/// Runs one non-`up` subcommand and returns what it prints.
///
/// Given several coordinator addresses (a leader and its standbys), a
/// call cut off because its coordinator went away (or that reached a
/// standby) is made once more, with the coordinator that leads by then:
/// every client call is safe to repeat (an Acquire retry of the same build
/// gets the same lease, or a new one if the first was never recorded;
/// Renew, Release and Drain of the same lease end in the same state), so a
/// build sees a leader's loss as one slower call.
pub async fn client_output(cli: &Cli) -> Result<String, CliError> {
    match client_output_once(cli).await {
        Err(e) if several_addresses(&cli.coordinator) && leader_lost(&e) => {
            eprintln!("berth: {e}; repeating the call with the coordinator that leads");
            client_output_once(cli).await
        }
        result => result,
    }
}

/// LeaseService.Get of `lease_id`: the lease as the coordinator has it.
async fn get_lease(
    leases: &mut LeaseServiceClient<Channel>,
    lease_id: &str,
    token: &str,
) -> Result<Option<pb::Lease>, CliError> {
    let req = request(
        pb::GetRequest {
            lease_id: lease_id.to_owned(),
        },
        CALL_TIMEOUT,
        token,
    )?;
    Ok(leases.get(req).await?.into_inner().lease)
}

/// The coordinator addresses in `addrs` (one, or several separated by
/// commas).
fn address_list(addrs: &str) -> Vec<&str> {
    addrs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect()
}

/// Whether `addrs` names more than one coordinator.
fn several_addresses(addrs: &str) -> bool {
    address_list(addrs).len() > 1
}

/// Whether a call failed because its coordinator stopped answering or
/// does not lead: UNAVAILABLE (a standby's answer, a refused or reset
/// connection) or UNKNOWN (a connection closed mid-call; the coordinator
/// itself never answers UNKNOWN).
fn leader_lost(e: &CliError) -> bool {
    matches!(e, CliError::Status(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown))
}

async fn client_output_once(cli: &Cli) -> Result<String, CliError> {
    if matches!(
        cli.command,
        Command::Up(_) | Command::Sync(_) | Command::Forward(_)
    ) {
        return Err(CliError::Other("not a coordinator client command".into()));
    }
    let token = token(cli.token_file.as_deref())?;
    let ch = channel(&cli.coordinator, &cli.ca).await?;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let mut admin = AdminServiceClient::new(ch);
    match &cli.command {
        Command::Up(_) | Command::Sync(_) | Command::Forward(_) => {
            Err(CliError::Other("not a coordinator client command".into()))
        }
        Command::Acquire {
            build,
            ttl,
            wait,
            cert_dir,
            format,
            progress_every,
        } => {
            // Refused before a host is taken: a directory of the user's.
            if let Some(d) = cert_dir {
                check_cert_dir(d)?;
            }
            // The lease's key is made here and never sent anywhere. A
            // directory an earlier acquire wrote keeps its key: a retry of
            // the same build then brings the key its lease is pinned to.
            let name = format!("berth build {build}");
            let kept = cert_dir.as_deref().map(|d| d.join("key.pem"));
            let key = match kept.filter(|k| k.exists()) {
                Some(k) => berth_tls::files::read_pem(&k)
                    .map_err(|e| CliError::Other(e.to_string()))
                    .and_then(|pem| {
                        berth_tls::KeyAndCsr::for_key(&pem, &name)
                            .map_err(|e| CliError::Other(format!("{}: {e}", k.display())))
                    })?,
                None => berth_tls::KeyAndCsr::generate(&name)
                    .map_err(|e| CliError::Other(e.to_string()))?,
            };
            let req = pb::AcquireRequest {
                build_id: build.clone(),
                ttl: Some(from_duration(*ttl)),
                wait: Some(from_duration(*wait)),
                csr_pem: key.csr_pem.clone(),
            };
            let progress = Progress {
                build,
                every: *progress_every,
                leases: leases.clone(),
                admin: admin.clone(),
                token: &token,
            };
            let call = leases.acquire(request(req, *wait + CALL_TIMEOUT, &token)?);
            let resp = progress.wait_for(call).await?.into_inner();
            let lease = resp.lease.ok_or_else(|| {
                CliError::Other("the coordinator answered without a lease".into())
            })?;
            if resp.client_cert_pem.is_empty() || resp.ca_pem.is_empty() {
                return Err(CliError::Other(
                    "the coordinator answered without a client certificate".into(),
                ));
            }
            let dir = cert_dir
                .clone()
                .unwrap_or_else(|| default_cert_dir(&lease.lease_id));
            write_cert_dir(
                &dir,
                &lease.lease_id,
                &resp.ca_pem,
                &resp.client_cert_pem,
                &key.key_pem,
            )?;
            if let Some(cache) = &resp.build_cache {
                write_docker_config(&dir, cache)?;
            }
            match format {
                status::Format::Env => {
                    let mut out = export_lines(&lease, &dir);
                    if let Some(cache) = &resp.build_cache {
                        out.push_str(&cache_export_lines(cache, &dir));
                    }
                    Ok(out)
                }
                status::Format::Json => Ok(status::json(&lease, &dir)),
                status::Format::DockerContext => {
                    Ok(format!("{}\n", status::create_context(&lease, &dir).await?))
                }
            }
        }
        Command::Renew {
            lease,
            ttl,
            cert_dir,
        } => {
            let dir = lease_cert_dir(cert_dir.as_deref(), lease);
            let key = match &dir {
                Some(d) => {
                    let pem = berth_tls::files::read_pem(&d.join("key.pem"))
                        .map_err(|e| CliError::Other(e.to_string()))?;
                    Some(
                        berth_tls::KeyAndCsr::for_key(&pem, "berth renew")
                            .map_err(|e| CliError::Other(e.to_string()))?,
                    )
                }
                None => {
                    eprintln!(
                        "berth: no certificate directory for lease {lease}; the deadline moves but no certificate is re-issued"
                    );
                    None
                }
            };
            let req = pb::RenewRequest {
                lease_id: lease.clone(),
                ttl: Some(from_duration(*ttl)),
                csr_pem: key.as_ref().map(|k| k.csr_pem.clone()).unwrap_or_default(),
            };
            let resp = leases
                .renew(request(req, CALL_TIMEOUT, &token)?)
                .await?
                .into_inner();
            if let (Some(d), Some(k)) = (&dir, &key)
                && !resp.client_cert_pem.is_empty()
            {
                write_cert_dir(d, lease, &resp.ca_pem, &resp.client_cert_pem, &k.key_pem)?;
            }
            Ok(describe_lease(resp.lease.as_ref()))
        }
        Command::Release { lease, cert_dir } => {
            let before = get_lease(&mut leases, lease, &token).await?;
            let resp = leases
                .release(request(
                    pb::ReleaseRequest {
                        lease_id: lease.clone(),
                    },
                    CALL_TIMEOUT,
                    &token,
                )?)
                .await?
                .into_inner();
            let already = before.as_ref().is_some_and(|l| is_ended(l.state));
            if already {
                eprintln!("berth: lease {lease} had already ended; nothing to release");
            }
            if let Some(d) = lease_cert_dir(cert_dir.as_deref(), lease) {
                if let Err(e) = remove_cert_dir(&d) {
                    eprintln!(
                        "berth: cannot delete the lease's files in {}: {e}",
                        d.display()
                    );
                }
                // A context made by `acquire --format docker-context`.
                status::remove_context(lease).await;
            }
            Ok(describe_lease(resp.lease.as_ref()))
        }
        Command::Get { lease, build } => {
            let found = match (build, lease) {
                (Some(build), _) => {
                    leases
                        .find(request(
                            pb::FindRequest {
                                build_id: build.clone(),
                            },
                            CALL_TIMEOUT,
                            &token,
                        )?)
                        .await?
                        .into_inner()
                        .lease
                }
                (None, Some(lease)) => get_lease(&mut leases, lease, &token).await?,
                (None, None) => return Err(CliError::Other("give --lease or --build".into())),
            };
            Ok(describe_lease(found.as_ref()))
        }
        Command::Hosts => {
            let resp = admin
                .list_hosts(request(pb::ListHostsRequest {}, CALL_TIMEOUT, &token)?)
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
        Command::Leases {
            all: _,
            show: Some(id),
        } => {
            let resp = admin
                .list_leases(request(
                    pb::ListLeasesRequest {
                        include_ended: true,
                    },
                    CALL_TIMEOUT,
                    &token,
                )?)
                .await?
                .into_inner();
            let l = resp
                .leases
                .into_iter()
                .find(|l| &l.lease_id == id)
                .ok_or_else(|| {
                    CliError::Status(tonic::Status::not_found(format!(
                        "lease {id} is not known to the coordinator (ended leases are kept for a while only)"
                    )))
                })?;
            let mut s = describe_lease(Some(&l));
            s.push_str("  timeline\n");
            s.push_str(&timeline::format(&l.timeline));
            Ok(s)
        }
        Command::Leases { all, show: None } => {
            let resp = admin
                .list_leases(request(
                    pb::ListLeasesRequest {
                        include_ended: *all,
                    },
                    CALL_TIMEOUT,
                    &token,
                )?)
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
        Command::Status => {
            let stats = admin
                .pool_stats(request(pb::PoolStatsRequest {}, CALL_TIMEOUT, &token)?)
                .await
                .map(tonic::Response::into_inner);
            match &stats {
                // Only a status the server sent proves it reachable.
                Err(e) if e.code() == tonic::Code::Unavailable => Err(CliError::Status(e.clone())),
                Err(e) if e.code() == tonic::Code::Unauthenticated => {
                    Err(CliError::Status(e.clone()))
                }
                _ => Ok(status::describe(
                    &coordinator_url(&cli.coordinator),
                    stats.as_ref(),
                )),
            }
        }
        Command::Drain { host, reason } => {
            let resp = admin
                .drain_host(request(
                    pb::DrainHostRequest {
                        host_id: host.clone(),
                        reason: reason.clone(),
                    },
                    CALL_TIMEOUT,
                    &token,
                )?)
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

/// What `berth acquire` needs to report progress while it waits.
struct Progress<'a> {
    build: &'a str,
    every: Duration,
    leases: LeaseServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    token: &'a str,
}

impl Progress<'_> {
    /// Waits for `call`, printing a progress line on stderr every `every`
    /// (stdout stays `eval`-able): the build's place in its tenant's queue
    /// (LeaseService.Find) and, when the token may use the admin API, the
    /// pool's queue and ready hosts. The pool's figures are not asked for
    /// again once refused (a token without admin rights).
    async fn wait_for<F, T>(mut self, call: F) -> Result<T, CliError>
    where
        F: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let started = tokio::time::Instant::now();
        let mut tick = tokio::time::interval_at(started + self.every, self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(call);
        let (mut find_allowed, mut stats_allowed) = (true, true);
        loop {
            tokio::select! {
                r = &mut call => return r.map_err(CliError::from),
                _ = tick.tick() => {
                    let lease = if find_allowed {
                        match self.find().await {
                            Ok(l) => l,
                            Err(e) => {
                                // A coordinator without Find is not asked
                                // again; anything else (not queued yet, busy)
                                // may pass by the next line.
                                find_allowed = !matches!(&e, CliError::Status(s) if s.code() == tonic::Code::Unimplemented);
                                None
                            }
                        }
                    } else {
                        None
                    };
                    let stats = if stats_allowed {
                        self.stats().await.map_err(|_| stats_allowed = false).ok()
                    } else {
                        None
                    };
                    eprintln!(
                        "{}",
                        status::progress_line(self.build, started.elapsed(), lease.as_ref(), stats.as_ref())
                    );
                }
            }
        }
    }

    async fn find(&mut self) -> Result<Option<pb::Lease>, CliError> {
        let req = pb::FindRequest {
            build_id: self.build.to_owned(),
        };
        let req = request(req, CALL_TIMEOUT, self.token)?;
        Ok(self.leases.find(req).await?.into_inner().lease)
    }

    async fn stats(&mut self) -> Result<pb::PoolStatsResponse, CliError> {
        let req = request(pb::PoolStatsRequest {}, CALL_TIMEOUT, self.token)?;
        Ok(self.admin.pool_stats(req).await?.into_inner())
    }
}

pub(crate) fn is_ended(state: i32) -> bool {
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
pub fn export_lines(l: &pb::Lease, cert_dir: &Path) -> String {
    let mut s = String::new();
    let cert_dir = cert_dir.to_string_lossy();
    for (k, v) in [
        ("DOCKER_HOST", l.docker_host.as_str()),
        ("DOCKER_TLS_VERIFY", "1"),
        ("DOCKER_CERT_PATH", &cert_dir),
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

/// The `export` lines of a lease's build cache: where it is, and the
/// docker configuration that holds its login.
pub fn cache_export_lines(cache: &pb::BuildCache, cert_dir: &Path) -> String {
    format!(
        "export BERTH_CACHE_REPO={}\nexport DOCKER_CONFIG={}\n",
        shell_quote(&cache.repository),
        shell_quote(&cert_dir.to_string_lossy())
    )
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
    if l.queue_position > 0 {
        let _ = writeln!(
            s,
            "  queue     position {} of {} in tenant {}'s queue",
            l.queue_position, l.tenant_queued, l.tenant
        );
    }
    if !l.message.is_empty() {
        let _ = writeln!(s, "  note      {}", l.message);
    }
    // The cloud announced it takes the host back: the build should know.
    for e in l
        .timeline
        .iter()
        .filter(|e| e.step == pb::TimelineStep::InterruptionNotice as i32)
    {
        let _ = writeln!(
            s,
            "  interruption-notice  {} (the host is taken back then; the lease goes on until it is)",
            e.detail
        );
    }
    if let Some(w) = &l.wipe {
        let _ = writeln!(
            s,
            "  wipe      {} in {} ms: removed {} containers, {} images, {} volumes, {} networks, {} plugins, {} bytes of build cache{}; left {}/{}/{}/{}/{}/{} (containers/images/volumes/networks/plugins/cache), swarm {}{}{}",
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
            w.plugins_removed,
            w.build_cache_reclaimed_bytes,
            if w.swarm_left { ", left the swarm" } else { "" },
            w.containers_left,
            w.images_left,
            w.volumes_left,
            w.networks_left,
            w.plugins_left,
            w.build_cache_left,
            if w.swarm_state_after.is_empty() {
                "unknown"
            } else {
                &w.swarm_state_after
            },
            if w.listeners_left.is_empty() {
                String::new()
            } else {
                format!(", TCP listeners left: {}", w.listeners_left.join(" "))
            },
            if w.error.is_empty() {
                String::new()
            } else {
                format!("; error: {}", w.error)
            }
        );
    }
    s
}

pub(crate) fn format_time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(to_system_time)
        .map(|t: SystemTime| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn lease_state_name(s: i32) -> String {
    berth_proto::names::lease_state(s)
}

pub fn host_state_name(s: i32) -> String {
    berth_proto::names::host_state(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_lost_or_standby_coordinator_repeats_a_call_and_only_with_several_addresses() {
        use super::{CliError, leader_lost, several_addresses};
        assert!(several_addresses("a:1,b:2"));
        assert!(several_addresses(" a:1 , b:2 ,"));
        assert!(!several_addresses("a:1"));
        assert!(!several_addresses("a:1,"));
        for code in [tonic::Code::Unavailable, tonic::Code::Unknown] {
            assert!(leader_lost(&CliError::Status(tonic::Status::new(
                code, "x"
            ))));
        }
        for code in [
            tonic::Code::FailedPrecondition,
            tonic::Code::ResourceExhausted,
            tonic::Code::NotFound,
            tonic::Code::PermissionDenied,
            tonic::Code::InvalidArgument,
            tonic::Code::DeadlineExceeded,
        ] {
            assert!(!leader_lost(&CliError::Status(tonic::Status::new(
                code, "x"
            ))));
        }
        assert!(!leader_lost(&CliError::Usage("x".into())));
    }

    use super::*;

    #[test]
    fn base64_matches_the_rfc() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(i.as_bytes()), o, "{i}");
        }
    }

    #[test]
    fn exports_are_quoted_for_eval() {
        let l = pb::Lease {
            lease_id: "abc".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            host_addr: "198.18.0.2".into(),
            host_id: "it's".into(),
            ..Default::default()
        };
        let out = export_lines(&l, Path::new("/home/ci/.berth/leases/abc"));
        assert!(out.contains("export DOCKER_HOST='tcp://198.18.0.2:2376'\n"));
        assert!(out.contains("export DOCKER_TLS_VERIFY='1'\n"));
        assert!(out.contains("export DOCKER_CERT_PATH='/home/ci/.berth/leases/abc'\n"));
        assert!(out.contains("export BERTH_HOST_ADDR='198.18.0.2'\n"));
        assert!(out.contains(r"export BERTH_HOST_ID='it'\''s'"));
    }

    #[test]
    fn urls_get_a_scheme() {
        assert_eq!(coordinator_url("127.0.0.1:7070"), "https://127.0.0.1:7070");
        assert_eq!(coordinator_url("https://c:1"), "https://c:1");
    }

    #[test]
    fn exit_codes_follow_status() {
        let code = |c| CliError::Status(tonic::Status::new(c, "x")).exit_code();
        assert_eq!(code(tonic::Code::ResourceExhausted).code(), 3);
        assert_eq!(code(tonic::Code::NotFound).code(), 4);
        assert_eq!(code(tonic::Code::FailedPrecondition).code(), 6);
        assert_eq!(code(tonic::Code::Internal).code(), 1);
        assert_eq!(code(tonic::Code::Unauthenticated).code(), 7);
        assert_eq!(code(tonic::Code::PermissionDenied).code(), 7);
        assert_eq!(code(tonic::Code::Unavailable), Exit::Unreachable);
    }

    #[test]
    fn a_users_directory_is_refused_and_release_deletes_only_what_acquire_wrote() {
        #![allow(clippy::unwrap_used)]
        let tmp = tempfile::tempdir().unwrap();
        // A directory with a file of the user's: refused, untouched.
        let users = tmp.path().join("work");
        std::fs::create_dir_all(&users).unwrap();
        std::fs::write(users.join("notes.txt"), "mine").unwrap();
        let e = check_cert_dir(&users).unwrap_err();
        assert_eq!(e.exit_code(), Exit::Usage);
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert!(write_cert_dir(&users, "l1", "ca", "cert", "key").is_err());
        assert_eq!(std::fs::read_dir(&users).unwrap().count(), 1);

        // An empty directory of the user's: used, its mode kept; release
        // leaves the directory (and anything added since) in place.
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).unwrap();
        write_cert_dir(&empty, "l2", "ca", "cert", "key").unwrap();
        assert_eq!(lease_cert_dir(Some(&empty), "l2"), Some(empty.clone()));
        let mode = std::fs::metadata(&empty).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        std::fs::write(empty.join("later.txt"), "mine").unwrap();
        remove_cert_dir(&empty).unwrap();
        let left: Vec<_> = std::fs::read_dir(&empty)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("later.txt")]);

        // A directory acquire makes: 0700, removed whole at release; a
        // retry may write into it again.
        let made = tmp.path().join("made");
        write_cert_dir(&made, "l3", "ca", "cert", "key").unwrap();
        let mode = std::fs::metadata(&made).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(check_cert_dir(&made).unwrap());
        write_cert_dir(&made, "l3", "ca", "cert2", "key").unwrap();
        remove_cert_dir(&made).unwrap();
        assert!(!made.exists());
    }
}
