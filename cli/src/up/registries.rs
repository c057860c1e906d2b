//! The pool's registries under `berth up`: a pull-through mirror of Docker
//! Hub (or of `--mirror-upstream`), so a fresh host pulls base images from
//! this machine instead of the internet. CNCF distribution (Debian's
//! `docker-registry`) runs it, as a child of `berth up` restarted if it
//! dies, stopped with the pool.
//!
//! Where it listens: hosts live in network namespaces whose default route
//! is the machine's end of their veth pair, and the machine forwards
//! nothing between them; an address that is the machine's own, however, is
//! delivered locally from any of them. So the registries take a block of
//! the hosts' address range the way a host does (creating the root-side
//! veth `bbXXXX` is the lock on the block; agents of any prefix then skip
//! it), keep both ends of that pair on the machine, up, and listen on the
//! block's first address. The link carries an alias naming this state dir,
//! which is how a later run (or the stop) finds and removes it.
//!
//! TLS: the certificate is issued by the pool CA for that address; every
//! host's dockerd gets `--registry-mirror https://ADDR:PORT` and
//! `--registry-ca` (the pool CA), which the agent turns into
//! `registry-mirrors` and a `certs.d` entry of the host's own. The
//! upstream's credentials (`--mirror-upstream-credentials`) go into the
//! mirror's configuration on this machine (0600) and nowhere else: hosts
//! never see them.
//!
//! The tenants' build cache is a second instance on the same address
//! (port 5001) with token authentication: the coordinator, told
//! `--cache-registry` and `--cache-token-listen` (port 5002 of that
//! address, which is why the address is taken before the coordinator
//! starts), signs the tokens, and its token certificate is the registry's
//! only trusted signer. Hosts trust it through the pool CA like the mirror.
//! Its supervisor also runs the cache's retention passes (a size cap per
//! tenant, then distribution's offline garbage collection with the
//! registry stopped; see `super::retention`), every `--cache-gc-interval`
//! and on SIGUSR1.
//!
//! ```text
//! STATE_DIR/registries/            0700
//!   cache/config.yml, cert.pem, key.pem, data/   the build cache
//!   cache.debug.addr               its metrics endpoint (127.0.0.1)
//!   mirror/config.yml              0600 (JSON, which YAML reads)
//!   mirror/cert.pem, key.pem       issued by the pool CA for the address
//!   mirror/upstream-roots.pem      the system's CAs + --mirror-upstream-ca
//!   mirror/data/                   the cache (filesystem storage)
//!   mirror.debug.addr              its metrics endpoint (127.0.0.1)
//! STATE_DIR/logs/mirror.log
//! ```

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rand::Rng;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Docker Hub's registry endpoint: the default upstream.
pub const DOCKER_HUB: &str = "https://registry-1.docker.io";
/// The mirror's port on the registries' address.
pub const MIRROR_PORT: u16 = 5000;
/// The build cache registry's port on the registries' address.
pub const CACHE_PORT: u16 = 5001;
/// The coordinator's build cache token endpoint, on the same address.
pub const CACHE_TOKEN_PORT: u16 = 5002;
/// The cache registry's `auth.token.service` and `issuer`, as the
/// coordinator signs them (`coordinator/src/cache.rs`).
const CACHE_SERVICE: &str = "berth-cache";
const CACHE_ISSUER: &str = "berth-coordinator";
/// The coordinator's token certificate, in its state dir.
const CACHE_TOKEN_CERT: &str = "cache-token.pem";
/// How long a registry has to accept connections after it starts.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a registry has to stop after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one `ip` invocation.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// A registry that exits sooner than this after starting is crash-looping.
const CRASH_WINDOW: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How many random blocks to try for the registries' address.
const MAX_BLOCK_ATTEMPTS: usize = 64;
/// Number of /30 blocks in the hosts' range (see the agent's `netns`).
const BLOCKS: u32 = 1 << (32 - berth_proto::local::HOST_RANGE_PREFIX - 2);
/// Where Debian keeps the system's CA bundle.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The start of the alias of the registries' link.
const ALIAS_PREFIX: &str = "berth registries ";

#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Run no pull-through mirror: hosts pull from Docker Hub directly.
    #[arg(long, env = "BERTH_NO_MIRROR")]
    pub no_mirror: bool,
    /// Run no build cache registry: leases get no BERTH_CACHE_REPO.
    #[arg(long, env = "BERTH_NO_BUILD_CACHE")]
    pub no_build_cache: bool,
    /// The registry the mirror caches (`https://HOST[:PORT]`).
    #[arg(long, env = "BERTH_MIRROR_UPSTREAM", default_value = DOCKER_HUB)]
    pub mirror_upstream: String,
    /// CA certificate (PEM) the mirror trusts for the upstream, besides the
    /// system's.
    #[arg(long, env = "BERTH_MIRROR_UPSTREAM_CA")]
    pub mirror_upstream_ca: Option<PathBuf>,
    /// File holding `USERNAME:PASSWORD` for the upstream (e.g. a Docker Hub
    /// access token, for its higher pull limits). It goes into the mirror's
    /// configuration on this machine only, never to a host.
    #[arg(long, env = "BERTH_MIRROR_UPSTREAM_CREDENTIALS")]
    pub mirror_upstream_credentials: Option<PathBuf>,
    /// The most a tenant's build cache may hold (the distinct blobs its
    /// tags reference; B, KiB, MiB, GiB, TiB), unless its line in the
    /// tenants file sets its own (`cache-cap=SIZE`). Beyond it the tenant's
    /// least recently pushed tags are removed and the store
    /// garbage-collected.
    #[arg(long, env = "BERTH_CACHE_TENANT_CAP", default_value = "10GiB", value_parser = berth_runtime::size::parse_size)]
    pub cache_tenant_cap: u64,
    /// How often the build cache is checked against the cap; it is only
    /// stopped and garbage-collected when there is something to reclaim.
    /// 0: only when `berth up` gets SIGUSR1 (which also runs a pass now).
    #[arg(long, env = "BERTH_CACHE_GC_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub cache_gc_interval: Duration,
    /// The CNCF distribution binary (Debian's `docker-registry`).
    #[arg(long, env = "BERTH_REGISTRY_BIN", default_value = "docker-registry")]
    pub registry_bin: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "{0:?} not found; install Debian's docker-registry (scripts/up.sh does) or pass --no-mirror"
    )]
    MissingBinary(PathBuf),
    #[error("--mirror-upstream {0:?} must be http(s)://HOST[:PORT] (no path, no credentials)")]
    BadUpstream(String),
    #[error("--mirror-upstream-credentials {0}: expected one line USERNAME:PASSWORD")]
    BadCredentials(PathBuf),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the pool CA: {0}")]
    Tls(#[from] berth_tls::TlsError),
    #[error("`ip {args}`: {reason}")]
    Ip { args: String, reason: String },
    #[error("no free address block for the registries after {MAX_BLOCK_ATTEMPTS} attempts")]
    Exhausted,
    #[error("the {name} registry did not start: {reason}; see {log}")]
    Start {
        name: &'static str,
        reason: String,
        log: PathBuf,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError {
    let path = path.to_owned();
    move |source| RegistryError::Io {
        action,
        path,
        source,
    }
}

/// `STATE_DIR/registries`.
pub fn registries_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("registries")
}

/// The alias that marks the registries' link as this state dir's.
fn link_alias(state_dir: &Path) -> String {
    let hash = berth_tls::TokenHash::of(&state_dir.to_string_lossy()).to_hex();
    format!("{ALIAS_PREFIX}{}", &hash[..32])
}

/// The block's names and address: root-side veth `bbXXXX` (the lock the
/// agents also take), its peer, and the block's first address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub veth: String,
    pub peer: String,
    pub addr: Ipv4Addr,
}

impl Block {
    pub fn new(index: u32) -> Self {
        let index = index % BLOCKS;
        let base = u32::from(berth_proto::local::HOST_RANGE_BASE) + 4 * index;
        let veth = format!("bb{index:04x}");
        Block {
            peer: format!("{veth}p"),
            veth,
            addr: Ipv4Addr::from(base + 1),
        }
    }
}

async fn ip(args: &[&str]) -> Result<(), RegistryError> {
    let shown = args.join(" ");
    let child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| RegistryError::Ip {
            args: shown.clone(),
            reason: e.to_string(),
        })?;
    let out = tokio::time::timeout(IP_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| RegistryError::Ip {
            args: shown.clone(),
            reason: format!("timed out after {IP_TIMEOUT:?}"),
        })?
        .map_err(|e| RegistryError::Ip {
            args: shown.clone(),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RegistryError::Ip {
            args: shown,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Takes a free block: its veth pair, both ends up on the machine, the
/// address on the root side, the alias naming `state_dir`.
async fn take_block(state_dir: &Path) -> Result<Block, RegistryError> {
    let alias = link_alias(state_dir);
    for _ in 0..MAX_BLOCK_ATTEMPTS {
        let block = Block::new(rand::rng().random_range(0..BLOCKS));
        match ip(&[
            "link",
            "add",
            &block.veth,
            "type",
            "veth",
            "peer",
            "name",
            &block.peer,
        ])
        .await
        {
            Ok(()) => {}
            Err(RegistryError::Ip { reason, .. }) if reason.contains("File exists") => continue,
            Err(e) => return Err(e),
        }
        let cidr = format!("{}/32", block.addr);
        let wired = async {
            ip(&["link", "set", &block.veth, "alias", &alias]).await?;
            ip(&["addr", "add", &cidr, "dev", &block.veth]).await?;
            ip(&["link", "set", &block.peer, "up"]).await?;
            ip(&["link", "set", &block.veth, "up"]).await
        }
        .await;
        if let Err(e) = wired {
            let _ = ip(&["link", "del", &block.veth]).await;
            return Err(e);
        }
        return Ok(block);
    }
    Err(RegistryError::Exhausted)
}

/// The links whose alias names `state_dir` (normally none or one).
fn links_of(state_dir: &Path) -> Vec<String> {
    let alias = link_alias(state_dir);
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return vec![];
    };
    entries
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("ifalias")).is_ok_and(|a| a.trim() == alias)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Processes whose command line names a file under `dir`.
fn processes_under(dir: &Path) -> Vec<i32> {
    let needle = format!("{}/", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmd)
                .replace('\0', " ")
                .contains(&needle)
                .then_some(pid)
        })
        .collect()
}

/// Removes what an earlier, killed `berth up` with this state dir left of
/// its registries: their processes and their link.
pub async fn sweep(state_dir: &Path) {
    let dir = registries_dir(state_dir);
    for pid in processes_under(&dir) {
        warn!(pid, "killing a registry left by an earlier run");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    while !processes_under(&dir).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for link in links_of(state_dir) {
        if let Err(e) = ip(&["link", "del", &link]).await {
            warn!(%link, error = %e, "cannot remove the registries' link");
        }
    }
}

/// An upstream URL distribution's proxy accepts: scheme, host, port.
fn check_upstream(url: &str) -> Result<(), RegistryError> {
    let bad = || RegistryError::BadUpstream(url.to_owned());
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if ok { Ok(()) } else { Err(bad()) }
}

/// `USERNAME:PASSWORD` from the first line of `path`.
fn read_credentials(path: &Path) -> Result<(String, String), RegistryError> {
    let text = berth_tls::files::read_secret(path)?;
    let line = text.lines().next().unwrap_or("").trim();
    match line.split_once(':') {
        Some((u, p)) if !u.is_empty() && !p.is_empty() => Ok((u.to_owned(), p.to_owned())),
        _ => Err(RegistryError::BadCredentials(path.to_owned())),
    }
}

/// Where the kernel hands out ports to `connect` and `bind(0)` when
/// `/proc/sys/net/ipv4/ip_local_port_range` cannot be read: its default.
const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);
/// The lowest port a registry's metrics endpoint is given.
const LOWEST_DEBUG_PORT: u16 = 10000;
/// How many random candidates are tried before giving up.
const PORT_ATTEMPTS: usize = 64;

/// The kernel's ephemeral port range, from `text` (the contents of
/// `ip_local_port_range`), or the default.
fn ephemeral_range(text: Option<&str>) -> (u16, u16) {
    let mut parts = text.unwrap_or("").split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => (lo, hi),
        _ => DEFAULT_EPHEMERAL,
    }
}

/// The ports a registry's metrics endpoint is picked from: outside the
/// ephemeral range, so no outgoing connection of this machine takes the
/// port between the check and the registry's own bind.
fn debug_port_candidates(ephemeral: (u16, u16)) -> std::ops::RangeInclusive<u16> {
    if ephemeral.0 > LOWEST_DEBUG_PORT + 1000 {
        LOWEST_DEBUG_PORT..=ephemeral.0 - 1
    } else {
        ephemeral.1.saturating_add(1).max(LOWEST_DEBUG_PORT)..=u16::MAX
    }
}

/// `N` different free ports on 127.0.0.1 for the registries' metrics
/// endpoints (see [`debug_port_candidates`]); each is held while the next
/// is picked, so no two are the same.
fn free_local_ports<const N: usize>() -> Result<[u16; N], RegistryError> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let candidates = debug_port_candidates(ephemeral_range(text.as_deref()));
    let mut rng = rand::rng();
    let mut pick = || {
        let mut last = std::io::Error::other("no candidate port");
        for _ in 0..PORT_ATTEMPTS {
            let port = rng.random_range(candidates.clone());
            match std::net::TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => return Ok((port, l)),
                Err(e) => last = e,
            }
        }
        Err(io_err("cannot bind", Path::new("127.0.0.1"))(last))
    };
    let mut held = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let (p, listener) = pick()?;
        held.push(listener);
        *port = p;
    }
    Ok(ports)
}

/// How many of a registry's last log lines a start failure quotes.
const START_LOG_LINES: usize = 5;

/// The last `n` lines of the log at `path` (what a registry said before it
/// exited), or why it cannot be read.
fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(its log {}: {e})", path.display()),
    }
}

fn random_hex() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One registry instance: how to start it and where it listens.
#[derive(Debug, Clone)]
/// A registry's configuration before it is written.
struct Draft {
    /// `mirror` or `cache`: names its directory, log and debug address file.
    kind: &'static str,
    dir: PathBuf,
    config: serde_json::Value,
    debug_port: u16,
    addr: SocketAddr,
}

struct Instance {
    name: &'static str,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
    /// `SSL_CERT_FILE` for it (the mirror's upstream roots), if any.
    roots: Option<PathBuf>,
}

impl Instance {
    fn spawn(&self) -> Result<Child, RegistryError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err("cannot open", &self.log))?;
        let log_err = log.try_clone().map_err(io_err("cannot open", &self.log))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        // distribution reads REGISTRY_* variables as configuration: only
        // the file counts.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        if let Some(roots) = &self.roots {
            cmd.env("SSL_CERT_FILE", roots);
        }
        cmd.spawn().map_err(io_err("cannot start", &self.bin))
    }

    /// Waits until it accepts connections.
    async fn wait_ready(&self, child: &mut Child) -> Result<(), RegistryError> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let said = log_tail(&self.log, START_LOG_LINES);
                return Err(self.start_error(format!("it exited with {status}, saying:\n{said}")));
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(self.start_error(format!(
                    "nothing listens on {} after {START_TIMEOUT:?}",
                    self.addr
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn start_error(&self, reason: String) -> RegistryError {
        RegistryError::Start {
            name: self.name,
            reason,
            log: self.log.clone(),
        }
    }
}

/// Keeps `child` running until `stop` fires: restarted when it exits
/// (with backoff while it crash-loops), stopped with SIGTERM at the end.
/// With `upkeep`, also runs its retention passes (the build cache).
async fn supervise(
    instance: Instance,
    mut child: Child,
    stop: CancellationToken,
    mut upkeep: Option<Upkeep>,
) {
    let mut started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(500);
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                terminate(instance.name, &mut child).await;
                return;
            }
            () = upkeep_due(&mut upkeep) => {
                let Some(u) = &upkeep else { continue };
                match u.pass(&instance, child).await {
                    Ok(c) => {
                        child = c;
                        started = tokio::time::Instant::now();
                    }
                    Err(e) => {
                        warn!(registry = instance.name, error = %e, "cannot restart the registry");
                        eprintln!("berth up: the {} registry could not be restarted after retention: {e}", instance.name);
                        return;
                    }
                }
            }
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                let delay = if started.elapsed() < CRASH_WINDOW {
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    backoff
                } else {
                    backoff = Duration::from_millis(500);
                    backoff
                };
                eprintln!(
                    "berth up: the {} registry exited ({status}); restarting it in {} (log: {})",
                    instance.name,
                    humantime::format_duration(delay),
                    instance.log.display()
                );
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                match instance.spawn() {
                    Ok(c) => {
                        child = c;
                        started = tokio::time::Instant::now();
                    }
                    Err(e) => {
                        warn!(registry = instance.name, error = %e, "cannot restart the registry");
                        return;
                    }
                }
            }
        }
    }
}

/// The build cache's retention: when a pass is due and what it does
/// (`super::retention`).
struct Upkeep {
    /// distribution's `rootdirectory`.
    data: PathBuf,
    /// `--cache-tenant-cap`.
    cap: u64,
    /// The tenants file, for the tenants' own caps (read at each pass).
    tenants: PathBuf,
    every: Option<tokio::time::Interval>,
    usr1: Option<tokio::signal::unix::Signal>,
}

/// Bound on one `registry garbage-collect`.
const GC_TIMEOUT: Duration = Duration::from_secs(30 * 60);

impl Upkeep {
    fn new(data: PathBuf, cap: u64, tenants: PathBuf, every: Duration) -> Self {
        let every = (!every.is_zero()).then(|| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        let usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok();
        Upkeep {
            data,
            cap,
            tenants,
            every,
            usr1,
        }
    }

    /// One pass: plans while the registry serves; stops it only when
    /// something is to be reclaimed, removes the tags over their tenant's
    /// cap, collects, starts it again.
    async fn pass(&self, instance: &Instance, mut child: Child) -> Result<Child, RegistryError> {
        let caps = super::retention::Caps::load(self.cap, &self.tenants);
        let (data, planned) = (self.data.clone(), caps.clone());
        let plan = tokio::task::spawn_blocking(move || super::retention::plan(&data, &planned))
            .await
            .unwrap_or_default();
        if !plan.reclaims() {
            eprintln!(
                "berth up: build cache retention: nothing to reclaim (bytes per tenant: {:?}, cap {}, tenants' own caps {:?})",
                plan.usage, caps.pool_wide, caps.own
            );
            return Ok(child);
        }
        terminate(instance.name, &mut child).await;
        let (data, planned) = (self.data.clone(), caps.clone());
        let (plan, before, untagged) = tokio::task::spawn_blocking(move || {
            let before = super::retention::disk_usage(&data);
            // Planned again: pushes may have landed since.
            let plan = super::retention::plan(&data, &planned);
            let untagged = super::retention::untag(&plan);
            (plan, before, untagged)
        })
        .await
        .map_err(|e| RegistryError::Io {
            action: "cannot plan retention in",
            path: self.data.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        if let Err(e) = untagged {
            eprintln!("berth up: build cache retention: cannot remove a tag: {e}");
        }
        let collected = self.collect(instance).await;
        let after = super::retention::disk_usage(&self.data);
        let removed: Vec<_> = plan.remove.iter().map(|t| t.name.as_str()).collect();
        eprintln!(
            "berth up: build cache retention: bytes per tenant {:?}, cap {}, tenants' own caps {:?}: \
             removed {} tags {removed:?}; garbage-collected ({}): store {before} -> {after} bytes",
            plan.usage,
            caps.pool_wide,
            caps.own,
            removed.len(),
            match &collected {
                Ok(()) => "ok".to_owned(),
                Err(e) => e.clone(),
            },
        );
        let mut child = instance.spawn()?;
        instance.wait_ready(&mut child).await?;
        Ok(child)
    }

    /// `registry garbage-collect --delete-untagged CONFIG`, its output
    /// appended to the registry's log.
    async fn collect(&self, instance: &Instance) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&instance.log)
            .map_err(|e| format!("{}: {e}", instance.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&instance.bin)
            .arg("garbage-collect")
            .arg("--delete-untagged")
            .arg(&instance.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(GC_TIMEOUT, child.wait_with_output()).await {
            Err(_) => Err(format!("timed out after {GC_TIMEOUT:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(o)) if o.status.success() => Ok(()),
            Ok(Ok(o)) => Err(format!("exited with {}", o.status)),
        }
    }
}

/// Resolves when a retention pass is due (never without `upkeep`).
async fn upkeep_due(upkeep: &mut Option<Upkeep>) {
    let Some(u) = upkeep else {
        return std::future::pending().await;
    };
    let tick = async {
        match &mut u.every {
            Some(i) => {
                i.tick().await;
            }
            None => std::future::pending().await,
        }
    };
    let signal = async {
        match &mut u.usr1 {
            Some(s) => {
                if s.recv().await.is_none() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = tick => {}
        () = signal => {}
    }
}

async fn terminate(name: &str, child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(STOP_TIMEOUT, child.wait())
        .await
        .is_err()
    {
        warn!(registry = name, "did not stop in time; killing it");
        let _ = child.kill().await;
    }
}

/// The running registries of a pool.
#[derive(Debug)]
pub struct Registries {
    state_dir: PathBuf,
    block: Option<Block>,
    bin: Option<PathBuf>,
    mirror: Option<SocketAddr>,
    cache: Option<SocketAddr>,
    /// The debug (metrics) ports on 127.0.0.1 of the mirror and the cache,
    /// chosen before the coordinator starts: it reads their counters.
    mirror_debug: u16,
    cache_debug: u16,
    /// The coordinator's state dir, where the pool CA is kept.
    ca_dir: PathBuf,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Registries {
    /// Takes the registries' address (unless `--no-mirror` and
    /// `--no-build-cache` leave nothing to run), before the coordinator
    /// starts: the coordinator serves the build cache's token endpoint on
    /// it. `ca_dir` holds the pool CA (the coordinator's state dir).
    pub async fn reserve(
        args: &RegistryArgs,
        state_dir: &Path,
        ca_dir: &Path,
    ) -> Result<Self, RegistryError> {
        let mut me = Registries {
            state_dir: state_dir.to_owned(),
            block: None,
            bin: None,
            mirror: None,
            cache: None,
            mirror_debug: 0,
            cache_debug: 0,
            ca_dir: ca_dir.to_owned(),
            stop: CancellationToken::new(),
            tasks: vec![],
        };
        if args.no_mirror && args.no_build_cache {
            return Ok(me);
        }
        if !args.no_mirror {
            check_upstream(&args.mirror_upstream)?;
        }
        me.bin = Some(find_bin(&args.registry_bin)?);
        let dir = registries_dir(state_dir);
        berth_tls::files::create_private_dir(&dir)?;
        [me.mirror_debug, me.cache_debug] = free_local_ports()?;
        me.block = Some(take_block(state_dir).await?);
        Ok(me)
    }

    /// What the coordinator is told about the build cache: its registry
    /// and where to serve the token endpoint.
    /// Also where each registry's counters are read (`berth status`,
    /// the coordinator's `/metrics`).
    pub fn coordinator_args(&self, args: &RegistryArgs) -> Vec<String> {
        let Some(b) = &self.block else {
            return vec![];
        };
        let mut out: Vec<String> = vec![];
        if !args.no_mirror {
            out.extend([
                "--mirror-registry".into(),
                SocketAddr::new(b.addr.into(), MIRROR_PORT).to_string(),
                "--mirror-metrics".into(),
                format!("127.0.0.1:{}", self.mirror_debug),
            ]);
        }
        if !args.no_build_cache {
            out.extend([
                "--cache-registry".into(),
                SocketAddr::new(b.addr.into(), CACHE_PORT).to_string(),
                "--cache-token-listen".into(),
                SocketAddr::new(b.addr.into(), CACHE_TOKEN_PORT).to_string(),
                "--cache-metrics".into(),
                format!("127.0.0.1:{}", self.cache_debug),
            ]);
        }
        out
    }

    /// Starts what `args` ask for, once the coordinator runs (the pool CA
    /// and the cache's token certificate exist), and waits until each
    /// accepts connections.
    /// `tenants` is the tenants file (the tenants' own cache caps).
    pub async fn start(
        &mut self,
        args: &RegistryArgs,
        tenants: &Path,
    ) -> Result<(), RegistryError> {
        let (Some(block), Some(bin)) = (self.block.clone(), self.bin.clone()) else {
            return Ok(());
        };
        let result = async {
            if !args.no_mirror {
                let addr = SocketAddr::new(block.addr.into(), MIRROR_PORT);
                let instance = self.write_mirror(args, &bin, addr)?;
                let mut child = instance.spawn()?;
                // distribution's proxy asks the upstream for its auth
                // challenge at start and exits when it cannot reach it. The
                // pool starts anyway: a cache is not needed to serve builds,
                // hosts' dockerd fall back to the upstream while the mirror
                // does not answer, and the supervisor keeps restarting it
                // until it does.
                match instance.wait_ready(&mut child).await {
                    Ok(()) => {
                        info!(%addr, upstream = %args.mirror_upstream, "mirror registry started");
                    }
                    Err(e) => eprintln!(
                        "berth up: warning: {e}; hosts pull from the upstream until it answers \
                         (it is restarted with backoff)"
                    ),
                }
                self.mirror = Some(addr);
                let stop = self.stop.clone();
                self.tasks
                    .push(tokio::spawn(supervise(instance, child, stop, None)));
            }
            if !args.no_build_cache {
                let addr = SocketAddr::new(block.addr.into(), CACHE_PORT);
                let token = SocketAddr::new(block.addr.into(), CACHE_TOKEN_PORT);
                let instance = self.write_cache(&bin, addr, token)?;
                let mut child = instance.spawn()?;
                if let Err(e) = instance.wait_ready(&mut child).await {
                    terminate(instance.name, &mut child).await;
                    return Err(e);
                }
                info!(%addr, "build cache registry started");
                self.cache = Some(addr);
                let stop = self.stop.clone();
                let upkeep = Upkeep::new(
                    registries_dir(&self.state_dir).join("cache/data"),
                    args.cache_tenant_cap,
                    tenants.to_owned(),
                    args.cache_gc_interval,
                );
                self.tasks
                    .push(tokio::spawn(supervise(instance, child, stop, Some(upkeep))));
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            self.stop().await;
            return Err(e);
        }
        Ok(())
    }

    /// Writes the build cache registry's certificate and configuration:
    /// token authentication, the coordinator's endpoint as the realm and
    /// its token certificate as the only trusted signer.
    fn write_cache(
        &self,
        bin: &Path,
        addr: SocketAddr,
        token: SocketAddr,
    ) -> Result<Instance, RegistryError> {
        let mut draft = self.draft("cache", addr)?;
        draft.config["auth"] = serde_json::json!({
            "token": {
                "realm": format!("https://{token}/token"),
                "service": CACHE_SERVICE,
                "issuer": CACHE_ISSUER,
                "rootcertbundle": self.ca_dir.join(CACHE_TOKEN_CERT),
            },
        });
        self.finish(draft, "build cache", bin, None)
    }

    /// Writes the mirror's certificate, roots and configuration.
    fn write_mirror(
        &self,
        args: &RegistryArgs,
        bin: &Path,
        addr: SocketAddr,
    ) -> Result<Instance, RegistryError> {
        let mut draft = self.draft("mirror", addr)?;
        let roots = match &args.mirror_upstream_ca {
            Some(extra) => {
                let mut pem = std::fs::read_to_string(SYSTEM_ROOTS).unwrap_or_default();
                pem.push('\n');
                pem.push_str(&berth_tls::files::read_pem(extra)?);
                let path = draft.dir.join("upstream-roots.pem");
                berth_tls::files::write_private(&path, pem.as_bytes())?;
                Some(path)
            }
            None => None,
        };
        let mut proxy = serde_json::json!({ "remoteurl": args.mirror_upstream });
        if let Some(file) = &args.mirror_upstream_credentials {
            let (user, password) = read_credentials(file)?;
            proxy["username"] = user.into();
            proxy["password"] = password.into();
        }
        draft.config["proxy"] = proxy;
        draft.config["storage"]["cache"] = serde_json::json!({ "blobdescriptor": "inmemory" });
        self.finish(draft, "mirror", bin, roots)
    }

    /// Makes `registries/KIND/` with its data directory and a certificate
    /// from the pool CA for `addr`, and the configuration every registry of
    /// the pool shares (TLS, storage, metrics on a loopback debug port).
    fn draft(&self, kind: &'static str, addr: SocketAddr) -> Result<Draft, RegistryError> {
        let dir = registries_dir(&self.state_dir).join(kind);
        berth_tls::files::create_private_dir(&dir)?;
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(io_err("cannot create", &data))?;
        let (cert, key) = self.issue_cert(&dir, addr)?;
        let debug_port = if kind == "mirror" {
            self.mirror_debug
        } else {
            self.cache_debug
        };
        let config = serde_json::json!({
            "version": "0.1",
            "log": { "level": "info", "formatter": "text", "fields": { "service": format!("berth-{kind}") } },
            "storage": {
                "filesystem": { "rootdirectory": data },
                "delete": { "enabled": true },
            },
            "http": {
                "addr": addr.to_string(),
                "secret": random_hex(),
                "tls": { "certificate": cert, "key": key },
                "headers": { "X-Content-Type-Options": ["nosniff"] },
                "debug": {
                    "addr": format!("127.0.0.1:{debug_port}"),
                    "prometheus": { "enabled": true, "path": "/metrics" },
                },
            },
        });
        Ok(Draft {
            kind,
            dir,
            config,
            debug_port,
            addr,
        })
    }

    /// Writes a drafted configuration and its debug address; the instance
    /// logs to `logs/KIND.log`.
    fn finish(
        &self,
        draft: Draft,
        name: &'static str,
        bin: &Path,
        roots: Option<PathBuf>,
    ) -> Result<Instance, RegistryError> {
        let Draft {
            kind,
            dir,
            config,
            debug_port,
            addr,
        } = draft;
        let path = dir.join("config.yml");
        berth_tls::files::write_private(&path, format!("{config:#}\n").as_bytes())?;
        let debug_file = registries_dir(&self.state_dir).join(format!("{kind}.debug.addr"));
        berth_tls::files::write_private(
            &debug_file,
            format!("127.0.0.1:{debug_port}\n").as_bytes(),
        )?;
        let logs = self.state_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(io_err("cannot create", &logs))?;
        Ok(Instance {
            name,
            bin: bin.to_owned(),
            config: path,
            log: logs.join(format!("{kind}.log")),
            addr,
            roots,
        })
    }

    /// A server certificate from the pool CA for `addr`, in `dir`.
    fn issue_cert(
        &self,
        dir: &Path,
        addr: SocketAddr,
    ) -> Result<(PathBuf, PathBuf), RegistryError> {
        let (ca_cert, ca_key) = berth_tls::Ca::paths(&self.ca_dir);
        let ca = berth_tls::Ca::load(&ca_cert, &ca_key)?;
        let (cert_pem, key_pem) = ca.issue_server(&[addr.ip().to_string()])?;
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        berth_tls::files::write_private(&key, key_pem.as_bytes())?;
        berth_tls::files::write_private(&cert, cert_pem.as_bytes())?;
        Ok((cert, key))
    }

    /// The build cache registry's address, if one runs.
    pub fn cache(&self) -> Option<SocketAddr> {
        self.cache
    }

    /// The mirror's address, if one runs.
    pub fn mirror(&self) -> Option<SocketAddr> {
        self.mirror
    }

    /// What every agent of the pool gets: the mirror and the CA its
    /// certificate chains to.
    pub fn agent_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec![];
        if let Some(m) = self.mirror {
            out.push("--registry-mirror".into());
            out.push(format!("https://{m}").into());
        }
        if let Some(c) = self.cache {
            out.push("--pool-registry".into());
            out.push(c.to_string().into());
        }
        if !out.is_empty() {
            out.push("--registry-ca".into());
            out.push(berth_tls::Ca::paths(&self.ca_dir).0.into());
        }
        out
    }

    /// Stops every registry and removes the link.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        if let Some(block) = self.block.take()
            && let Err(e) = ip(&["link", "del", &block.veth]).await
        {
            warn!(link = %block.veth, error = %e, "cannot remove the registries' link");
        }
        // Whatever a failed start left (processes, a link) goes too.
        sweep(&self.state_dir).await;
    }
}

/// The registry binary: a path, or a name looked up in PATH.
fn find_bin(bin: &Path) -> Result<PathBuf, RegistryError> {
    if bin.components().count() > 1 {
        return if bin.is_file() {
            Ok(bin.to_owned())
        } else {
            Err(RegistryError::MissingBinary(bin.to_owned()))
        };
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .ok_or_else(|| RegistryError::MissingBinary(bin.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_ports_are_picked_outside_the_ephemeral_range() {
        assert_eq!(ephemeral_range(Some("32768\t60999\n")), (32768, 60999));
        assert_eq!(ephemeral_range(Some("1024 65000")), (1024, 65000));
        assert_eq!(ephemeral_range(Some("garbage")), DEFAULT_EPHEMERAL);
        assert_eq!(ephemeral_range(None), DEFAULT_EPHEMERAL);
        assert_eq!(debug_port_candidates((32768, 60999)), 10000..=32767);
        assert_eq!(debug_port_candidates((1024, 50000)), 50001..=u16::MAX);
        let ports: [u16; 2] = free_local_ports().unwrap();
        assert_ne!(ports[0], ports[1]);
        let (lo, hi) = ephemeral_range(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                .ok()
                .as_deref(),
        );
        for port in ports {
            assert!(!(lo..=hi).contains(&port), "{port} is in {lo}..={hi}");
            // Free: the registry can bind it.
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }

    #[test]
    fn a_start_failure_quotes_the_end_of_the_log() {
        let dir = std::env::temp_dir().join(format!("berth-logtail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("cache.log");
        std::fs::write(
            &log,
            "one\ntwo\nthree\nlisten tcp 127.0.0.1:5001: bind: address already in use\n",
        )
        .unwrap();
        assert_eq!(
            log_tail(&log, 2),
            "three\nlisten tcp 127.0.0.1:5001: bind: address already in use"
        );
        assert_eq!(log_tail(&log, 10).lines().count(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(log_tail(&log, 2).contains("its log"));
    }

    #[test]
    fn blocks_follow_the_agents_layout() {
        let b = Block::new(0);
        assert_eq!(b.veth, "bb0000");
        assert_eq!(b.peer, "bb0000p");
        assert_eq!(b.addr, Ipv4Addr::new(198, 18, 0, 1));
        let b = Block::new(0x1234);
        assert_eq!(b.veth, "bb1234");
        assert_eq!(b.addr, Ipv4Addr::new(198, 18, 0x48, 0xd1));
        assert_eq!(Block::new(BLOCKS), Block::new(0));
    }

    #[test]
    fn upstreams_are_checked() {
        for ok in [
            DOCKER_HUB,
            "https://198.18.0.6:5000",
            "http://upstream.internal:8080/",
        ] {
            assert!(check_upstream(ok).is_ok(), "{ok}");
        }
        for bad in [
            "registry-1.docker.io",
            "ftp://x",
            "https://",
            "https://u:p@host",
            "https://host/v2/",
            "https://host\n",
        ] {
            assert!(check_upstream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_file_is_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("creds");
        std::fs::write(&f, "bot:dckr_pat_x:y\n").unwrap();
        assert_eq!(
            read_credentials(&f).unwrap(),
            ("bot".to_owned(), "dckr_pat_x:y".to_owned())
        );
        for bad in ["", "nocolon\n", ":pw\n", "user:\n"] {
            std::fs::write(&f, bad).unwrap();
            assert!(read_credentials(&f).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn link_alias_names_the_state_dir() {
        let a = link_alias(Path::new("/var/lib/berth"));
        assert!(a.starts_with(ALIAS_PREFIX));
        assert_ne!(a, link_alias(Path::new("/tmp/berth-t/x")));
        assert!(a.len() < 64);
    }
}
