//! `berth up`: a whole pool on this machine. Runs `berth-coordinator` and N
//! `berth-agent` processes (each agent is one local host: its own dockerd in
//! its own network namespace), starts a fresh host whenever one terminates
//! (standing in for the auto-scaling group), restarts the coordinator if it
//! dies (as systemd would, on the same address and state dir), and on Ctrl-C
//! stops everything and sweeps whatever a killed earlier run left behind.
//!
//! A host that ended after serving a lease (the agent's `ENDED` line says
//! so and it exited 0) is replaced at once, however short its build was: a
//! single-use host that served one short build is the normal case. Only a
//! host that ended without serving a lease within [`CRASH_WINDOW`] of its
//! start (a failed boot, an agent that crashes) makes its slot back off.
//!
//! An agent that died without destroying its host (killed, crashed) leaves
//! the host's state file behind (`HOSTS_DIR/HOST_ID/agent-state.json`); the
//! slot's next agent then gets `--resume-host HOST_ID` and takes that host
//! over (resuming its lease or wiping it), as a restarted agent on an EC2
//! instance would. An agent that ended its host cleanly removed the file, and
//! the slot gets a fresh host.
//!
//! Before the hosts it starts the pool's registries ([`registries`]: the
//! pull-through mirror every host's dockerd is given, unless
//! `--no-mirror`, and the tenants' build cache, unless `--no-build-cache`,
//! whose token endpoint the coordinator serves), and stops them after the
//! hosts.
//!
//! It also makes the pool's credentials on first start, under its state dir
//! (all secrets 0600), so the demo needs no setup:
//! - `tenants` (one admin tenant, `local`; tenants an operator adds to the
//!   file are kept) and `cli/token`, `local`'s token;
//! - `join-token` (agents) and `join-token.sha256` (coordinator);
//! - `cli/ca.pem`, a copy of the pool CA the coordinator keeps under
//!   `coordinator/`.
//!
//! `cli/` is what the `berth` CLI reads by default; when `berth up` runs
//! under sudo it belongs to the invoking user, so `berth acquire` works
//! from that user's shell.

pub mod elastic;
pub mod launch;
pub mod registries;
pub mod retention;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use berth_tls::PoolCredentials;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long the coordinator has to write its address file.
pub const COORDINATOR_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long agents have to clean up after SIGTERM before SIGKILL.
pub const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the coordinator has to stop after SIGTERM.
pub const COORDINATOR_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// An agent that exits sooner than this after starting without having
/// served a lease is crash-looping; its slot waits before the next start.
pub const CRASH_WINDOW: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A slot's first wait after a crash (doubled up to [`MAX_BACKOFF`]).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Pause before restarting a coordinator that died.
pub const COORDINATOR_RESTART_DELAY: Duration = Duration::from_millis(500);
/// The agent's state file inside its host directory: its presence means
/// the host outlived its agent.
pub const AGENT_STATE_FILE: &str = berth_proto::host_dir::AGENT_STATE_FILE;

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Number of hosts in the pool.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub hosts: u16,
    /// Where hosts keep their data (dockerd data roots) and berth up its logs.
    #[arg(long, env = "BERTH_STATE_DIR", default_value = "/var/lib/berth")]
    pub state_dir: PathBuf,
    /// Short paths for sockets, pid files and dockerd exec roots.
    #[arg(long, env = "BERTH_RUN_DIR", default_value = "/run/berth")]
    pub run_dir: PathBuf,
    /// Prefix of host ids and network namespaces; leftovers with it are swept.
    #[arg(long, env = "BERTH_PREFIX", default_value = "berth-")]
    pub prefix: String,
    /// Address for the coordinator (default: the --coordinator address).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address of the coordinator's ops endpoint (/metrics, /healthz);
    /// default: port 9101 on the --listen address (port 0 with --listen
    /// on port 0). Written to STATE_DIR/coordinator.ops.addr.
    #[arg(long)]
    pub ops_listen: Option<SocketAddr>,
    /// Return hosts to the pool after a verified wipe instead of replacing them.
    #[arg(long)]
    pub recycle: bool,
    /// Directory holding berth-coordinator and berth-agent (default: next to this binary).
    #[arg(long, env = "BERTH_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Extra argument for every agent (repeatable).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// Extra argument for the coordinator (repeatable).
    #[arg(long = "coordinator-arg", allow_hyphen_values = true)]
    pub coordinator_args: Vec<String>,
    /// An elastic pool of at most this many hosts instead of a fixed
    /// --hosts: the coordinator decides how many hosts there should be
    /// (a host per build holding or waiting for one, plus --idle-hosts,
    /// within --min-hosts..=--max-hosts) and retires idle ones.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256), conflicts_with = "hosts")]
    pub max_hosts: Option<u16>,
    /// Elastic pool: the fewest hosts kept.
    #[arg(long, default_value_t = 0, requires = "max_hosts")]
    pub min_hosts: u16,
    /// Elastic pool: ready hosts kept beyond the builds' own.
    #[arg(long, default_value_t = 1, requires = "max_hosts")]
    pub idle_hosts: u16,
    /// Elastic pool: how long idle hosts stay above --idle-hosts before the
    /// excess goes.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration, requires = "max_hosts")]
    pub scale_in_after: Duration,
    #[command(flatten)]
    pub registries: registries::RegistryArgs,
}

impl UpArgs {
    /// The elastic settings, when --max-hosts is given.
    pub fn elastic(&self) -> Option<elastic::Elastic> {
        self.max_hosts.map(|max| elastic::Elastic {
            min: self.min_hosts,
            max,
            idle: self.idle_hosts,
            scale_in_after: self.scale_in_after,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("berth up needs root: it creates network namespaces and runs dockerd")]
    NotRoot,
    #[error("{what} not found at {path}; build it with `cargo build --bins` or pass --bin-dir")]
    MissingBinary { what: &'static str, path: PathBuf },
    #[error("bad --coordinator address {0:?}; pass --listen ADDR:PORT")]
    BadListen(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the coordinator did not start: {0}")]
    Coordinator(String),
    #[error("sweeping leftovers failed: {0}")]
    Sweep(String),
    #[error("another berth up is running with state dir {0}")]
    AlreadyRunning(PathBuf),
    #[error("pool credentials: {0}")]
    Credentials(#[from] berth_tls::TlsError),
    #[error("the pool's registries: {0}")]
    Registries(#[from] registries::RegistryError),
}

/// The pool's credentials (`berth_tls::PoolCredentials`) and the CA the
/// coordinator keeps in its own state dir.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub pool: PoolCredentials,
    pub coordinator_ca: PathBuf,
}

impl Credentials {
    /// Creates what is missing: `local` is the admin tenant.
    pub fn ensure(state_dir: &Path) -> Result<Self, UpError> {
        Ok(Self {
            pool: PoolCredentials::ensure(state_dir, "local")?,
            coordinator_ca: launch::coordinator_ca(state_dir),
        })
    }

    /// Copies the pool CA for the CLI and hands `cli/` to the user who ran
    /// sudo, if anyone did.
    fn publish_ca(&self) -> Result<(), UpError> {
        let pem = berth_tls::files::read_pem(&self.coordinator_ca)?;
        let pool = &self.pool;
        berth_tls::files::write_private(&pool.cli_ca, pem.as_bytes())?;
        let id = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
        if let (Some(uid), Some(gid)) = (id("SUDO_UID"), id("SUDO_GID")) {
            for p in [&pool.cli_dir, &pool.cli_token, &pool.cli_ca] {
                nix::unistd::chown(
                    p.as_path(),
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(gid)),
                )
                .map_err(|e| UpError::Io {
                    action: "cannot chown",
                    path: p.clone(),
                    source: e.into(),
                })?;
            }
        }
        Ok(())
    }
}

/// The local provider is single-tenant: a lease holder is root on a host
/// that shares this machine's kernel (and, through privileged containers,
/// its files and processes), so tenants of one `berth up` pool can reach
/// each other. Say so when the tenants file names more than one.
fn warn_if_shared(creds: &PoolCredentials) {
    let tenants = std::fs::read_to_string(&creds.tenants)
        .ok()
        .and_then(|t| berth_tls::Tenants::parse(&t).ok())
        .map_or(0, |t| t.len());
    if tenants > 1 {
        let msg = format!(
            "berth up: {} lists {tenants} tenants, but a local pool is single-tenant: every host shares this machine's kernel, and a lease holder is root on its host (see docs/security.md); use EC2 hosts to keep tenants apart",
            creds.tenants.display()
        );
        eprintln!("{msg}");
        warn!("{msg}");
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UpError {
    let path = path.to_owned();
    move |source| UpError::Io {
        action,
        path,
        source,
    }
}

struct Bins {
    coordinator: PathBuf,
    agent: PathBuf,
}

impl Bins {
    fn find(dir: Option<&Path>) -> Result<Self, UpError> {
        let dir = match dir {
            Some(d) => d.to_owned(),
            None => std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_owned))
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        let check = |what: &'static str, name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(UpError::MissingBinary { what, path })
            }
        };
        Ok(Self {
            coordinator: check("berth-coordinator", "berth-coordinator")?,
            agent: check("berth-agent", "berth-agent")?,
        })
    }
}

/// What a slot's watcher reports.
enum Event {
    Ready {
        slot: usize,
        line: String,
    },
    /// The agent's `ENDED` line: its host is destroyed.
    Ended {
        slot: usize,
        ended: berth_proto::supervisor::Ended,
    },
    Exited {
        slot: usize,
        status: std::io::Result<ExitStatus>,
    },
}

struct Slot {
    pid: Option<u32>,
    started: Instant,
    /// The wait before the next start, should this agent crash.
    backoff: Duration,
    /// The host the slot's agent announced in its READY line.
    host_id: Option<String>,
    /// Leases the slot's current host served, from its `ENDED` line.
    served: Option<u64>,
}

impl Slot {
    fn new(pid: u32) -> Self {
        Slot {
            pid: Some(pid),
            started: Instant::now(),
            backoff: FIRST_BACKOFF,
            host_id: None,
            served: None,
        }
    }
}

/// When a slot whose agent exited gets its next host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// The host served a lease and ended cleanly, or lived long enough.
    Now,
    /// A crash loop: wait this long first.
    After(Duration),
}

/// Decides a slot's restart after its agent exited (`clean`: exit status
/// 0) having lived `lived` and served `served` leases; returns the
/// decision and the backoff to keep for the next crash.
fn restart_after(
    clean: bool,
    served: u64,
    lived: Duration,
    backoff: Duration,
) -> (Restart, Duration) {
    if clean && served >= 1 {
        // A single-use host that did its job: never a crash.
        (Restart::Now, FIRST_BACKOFF)
    } else if lived < CRASH_WINDOW {
        (Restart::After(backoff), (backoff * 2).min(MAX_BACKOFF))
    } else {
        (Restart::Now, FIRST_BACKOFF)
    }
}

/// Runs the pool until `shutdown` fires, then stops it and cleans up.
pub async fn run(
    args: UpArgs,
    coordinator: &str,
    shutdown: CancellationToken,
) -> Result<(), UpError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(UpError::NotRoot);
    }
    let bins = Bins::find(args.bin_dir.as_deref())?;
    let listen = match args.listen {
        Some(l) => l,
        None => coordinator
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .parse()
            .map_err(|_| UpError::BadListen(coordinator.to_owned()))?,
    };
    let logs = args.state_dir.join("logs");
    let hosts_dir = args.state_dir.join("hosts");
    for d in [&logs, &hosts_dir, &args.run_dir] {
        std::fs::create_dir_all(d).map_err(io_err("cannot create", d))?;
    }

    // One `berth up` per state dir: a second one would sweep the first's hosts.
    let lock_path = args.state_dir.join("up.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("cannot open", &lock_path))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| UpError::AlreadyRunning(args.state_dir.clone()))?;

    sweep(&bins, &args).await?;
    registries::sweep(&args.state_dir).await;
    let creds = Credentials::ensure(&args.state_dir)?;
    warn_if_shared(&creds.pool);

    let addr_file = args.state_dir.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut ops = Ops {
        listen: args.ops_listen.unwrap_or_else(|| {
            let port = if listen.port() == 0 {
                0
            } else {
                DEFAULT_OPS_PORT
            };
            SocketAddr::new(listen.ip(), port)
        }),
        addr_file: args.state_dir.join(OPS_ADDR_FILE),
    };
    let _ = std::fs::remove_file(&ops.addr_file);
    // The registries' address first: the coordinator serves the build
    // cache's token endpoint there.
    let mut args = args;
    if shared_store(&args.coordinator_args)
        && !(args.registries.no_mirror && args.registries.no_build_cache)
    {
        // The registries' certificates come from the pool CA, whose key a
        // shared store keeps sealed in the database, not on this machine.
        eprintln!(
            "berth up: the coordinator keeps the pool CA in a shared store: no registry mirror or build cache on this machine (docs/high-availability.md)"
        );
        args.registries.no_mirror = true;
        args.registries.no_build_cache = true;
    }
    let mut regs = registries::Registries::reserve(
        &args.registries,
        &args.state_dir,
        &launch::coordinator_state_dir(&args.state_dir),
    )
    .await?;
    let cache_args = regs.coordinator_args(&args.registries);
    args.coordinator_args.extend(cache_args);
    let mut coordinator_child =
        match start_coordinator(&bins, &args, &creds, (listen, &ops), &addr_file, &logs) {
            Ok(c) => c,
            Err(e) => {
                regs.stop().await;
                return Err(e);
            }
        };
    let addr = match wait_for_addr(&addr_file, &mut coordinator_child).await {
        Ok(a) => a,
        Err(e) => {
            let _ = coordinator_child.kill().await;
            regs.stop().await;
            return Err(e);
        }
    };
    if let Err(e) = creds.publish_ca() {
        let _ = coordinator_child.kill().await;
        regs.stop().await;
        return Err(e);
    }
    let url = format!("https://{addr}");
    eprintln!(
        "berth up: coordinator at {addr} (log: {})",
        logs.join("coordinator.log").display()
    );
    // Written just after the gRPC address, once the ops endpoint is bound.
    let deadline = Instant::now() + COORDINATOR_START_TIMEOUT;
    let mut ops_addr = read_addr(&ops.addr_file);
    while ops_addr.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        ops_addr = read_addr(&ops.addr_file);
    }
    if let Some(a) = ops_addr {
        // A restarted coordinator keeps the same ops address.
        ops.listen = a;
        eprintln!("berth up: coordinator metrics at http://{a}/metrics");
    }

    if let Err(e) = regs.start(&args.registries, &creds.pool.tenants).await {
        let _ = coordinator_child.kill().await;
        return Err(e.into());
    }
    if let Some(c) = regs.cache() {
        eprintln!(
            "berth up: build cache registry at https://{c} (log: {})",
            logs.join("cache.log").display()
        );
    }
    if let Some(m) = regs.mirror() {
        eprintln!(
            "berth up: registry mirror of {} at https://{m} (log: {})",
            args.registries.mirror_upstream,
            logs.join("mirror.log").display()
        );
    }
    let registry_args = regs.agent_args();
    let launch = AgentLaunch {
        bins: &bins,
        args: &args,
        creds: &creds,
        url: &url,
        logs: &logs,
        registry_args: &registry_args,
    };
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    let elastic = args.elastic();
    let n = elastic.map_or(usize::from(args.hosts), |e| e.initial());
    // Elastic: the coordinator's desired number of hosts, followed below.
    let mut desired = match elastic {
        Some(_) => elastic::watch_desired(
            elastic::Admin {
                addr: addr.to_string(),
                ca: creds.pool.cli_ca.clone(),
                token: creds.pool.admin_token()?,
            },
            shutdown.clone(),
        ),
        None => tokio::sync::watch::channel(None).1,
    };
    let mut next_slot = n;
    let mut slots: HashMap<usize, Slot> = HashMap::new();
    for slot in 0..n {
        let pid = start_agent(&launch, slot, None, tx.clone())?;
        slots.insert(slot, Slot::new(pid));
    }
    let mut ready = 0usize;
    let mut announced = false;
    // Slots waiting to be restarted, and when.
    let mut restart_at: HashMap<usize, Instant> = HashMap::new();

    loop {
        let next_restart = restart_at.values().min().copied();
        tokio::select! {
            () = shutdown.cancelled() => break,
            status = coordinator_child.wait() => {
                // Like systemd's Restart=always: same address (agents dial
                // it), same state dir (the lease store).
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                eprintln!("berth up: coordinator exited ({status}); restarting it on {addr}");
                tokio::time::sleep(COORDINATOR_RESTART_DELAY).await;
                let _ = std::fs::remove_file(&addr_file);
                coordinator_child = start_coordinator(&bins, &args, &creds, (addr, &ops), &addr_file, &logs)?;
                match wait_for_addr(&addr_file, &mut coordinator_child).await {
                    Ok(a) => eprintln!("berth up: coordinator back at {a}"),
                    Err(e) => warn!(error = %e, "restarted coordinator did not come up; trying again"),
                }
            }
            Ok(()) = desired.changed() => {
                let Some(want) = *desired.borrow_and_update() else { continue };
                // Slots with a host, booting or waiting to restart.
                while slots.len() < want {
                    let slot = next_slot;
                    next_slot += 1;
                    eprintln!("berth up: desired capacity {want}: starting slot {slot}");
                    let pid = start_agent(&launch, slot, None, tx.clone())?;
                    slots.insert(slot, Slot::new(pid));
                }
            }
            () = sleep_until_opt(next_restart) => {
                let now = Instant::now();
                let due: Vec<usize> = restart_at.iter().filter(|(_, t)| **t <= now).map(|(s, _)| *s).collect();
                for slot in due {
                    restart_at.remove(&slot);
                    // A host that outlived its agent is taken over by the
                    // slot's next agent; otherwise the slot gets a fresh host.
                    let resume = slots
                        .get(&slot)
                        .and_then(|s| s.host_id.clone())
                        .filter(|h| hosts_dir.join(h).join(AGENT_STATE_FILE).is_file());
                    if let Some(h) = &resume {
                        eprintln!("berth up: slot {slot}: host {h} outlived its agent; resuming it");
                    }
                    let pid = start_agent(&launch, slot, resume, tx.clone())?;
                    if let Some(s) = slots.get_mut(&slot) {
                        s.pid = Some(pid);
                        s.started = Instant::now();
                        s.served = None;
                    }
                }
            }
            Some(ev) = rx.recv() => match ev {
                Event::Ready { slot, line } => {
                    ready += 1;
                    if let Some(s) = slots.get_mut(&slot) {
                        s.host_id = line
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix("host_id="))
                            .map(str::to_owned);
                    }
                    eprintln!("berth up: slot {slot}: {line}");
                    if !announced && ready >= n {
                        announced = true;
                        eprintln!("berth up: pool of {n} hosts ready. In another shell:");
                        let mut flag = if addr.to_string() == crate::DEFAULT_LISTEN {
                            String::new()
                        } else {
                            format!("--coordinator {addr} ")
                        };
                        if creds.pool.cli_ca != Path::new(super::DEFAULT_CA) {
                            flag.push_str(&format!(
                                "--ca {} --token-file {} ",
                                creds.pool.cli_ca.display(),
                                creds.pool.cli_token.display()
                            ));
                        }
                        eprintln!("  eval \"$(berth {flag}acquire --build demo-1)\"   # then use docker; finally: berth {flag}release");
                    }
                }
                Event::Ended { slot, ended } => {
                    if let Some(s) = slots.get_mut(&slot) {
                        s.served = Some(ended.leases_served);
                    }
                }
                Event::Exited { slot, status } => {
                    let clean = status.as_ref().is_ok_and(ExitStatus::success);
                    let live = slots.len();
                    let Some(s) = slots.get_mut(&slot) else { continue };
                    s.pid = None;
                    let lived = s.started.elapsed();
                    let served = s.served.unwrap_or(0);
                    // Elastic: a host that ended cleanly is not replaced
                    // while the pool has more than the coordinator wants.
                    let want = *desired.borrow();
                    if let Some(want) = want
                        && clean
                        && live > want
                    {
                        slots.remove(&slot);
                        eprintln!(
                            "berth up: slot {slot}: host ended after {:.2}s, {served} leases served; not replaced (desired capacity {want}, {} hosts left)",
                            lived.as_secs_f64(),
                            live - 1
                        );
                        continue;
                    }
                    let (restart, backoff) = restart_after(clean, served, lived, s.backoff);
                    s.backoff = backoff;
                    let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    let lived = format!("{:.2}s", lived.as_secs_f64());
                    let delay = match restart {
                        Restart::Now => {
                            eprintln!(
                                "berth up: slot {slot}: host ended ({status}) after {lived}, {served} leases served; starting a fresh host"
                            );
                            Duration::ZERO
                        }
                        Restart::After(delay) => {
                            eprintln!(
                                "berth up: slot {slot}: host ended ({status}) after {lived} without serving a lease; backing off: starting a fresh host in {}",
                                humantime::format_duration(delay)
                            );
                            delay
                        }
                    };
                    restart_at.insert(slot, Instant::now() + delay);
                }
            }
        }
    }

    eprintln!(
        "berth up: stopping {} hosts and the coordinator",
        slots.values().filter(|s| s.pid.is_some()).count()
    );
    stop_agents(&mut slots, &mut rx).await;
    signal(coordinator_child.id(), nix::sys::signal::Signal::SIGTERM);
    if tokio::time::timeout(COORDINATOR_STOP_TIMEOUT, coordinator_child.wait())
        .await
        .is_err()
    {
        warn!("coordinator did not stop in time; killing it");
        let _ = coordinator_child.kill().await;
    }
    regs.stop().await;
    sweep(&bins, &args).await?;
    eprintln!("berth up: stopped; nothing left behind");
    Ok(())
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn log_file(path: &Path) -> Result<std::fs::File, UpError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err("cannot open", path))
}

async fn wait_for_addr(path: &Path, child: &mut Child) -> Result<SocketAddr, UpError> {
    let deadline = Instant::now() + COORDINATOR_START_TIMEOUT;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(a) = s.trim().parse()
        {
            return Ok(a);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(UpError::Coordinator(format!(
                "it exited with {status}; see its log"
            )));
        }
        if Instant::now() > deadline {
            return Err(UpError::Coordinator(format!(
                "no address in {} after {}s",
                path.display(),
                COORDINATOR_START_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where the coordinator's ops endpoint listens and records its address.
struct Ops {
    listen: SocketAddr,
    addr_file: PathBuf,
}

/// Default port of the coordinator's ops endpoint under `berth up`.
pub const DEFAULT_OPS_PORT: u16 = berth_proto::ports::COORDINATOR_OPS;
/// The file (under the state dir) holding the ops endpoint's address.
pub const OPS_ADDR_FILE: &str = "coordinator.ops.addr";

fn read_addr(path: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn start_coordinator(
    bins: &Bins,
    args: &UpArgs,
    creds: &Credentials,
    (listen, ops): (SocketAddr, &Ops),
    addr_file: &Path,
    logs: &Path,
) -> Result<Child, UpError> {
    let state_dir = launch::coordinator_state_dir(&args.state_dir);
    Command::new(&bins.coordinator)
        .args(launch::coordinator_args(
            &creds.pool,
            &state_dir,
            listen,
            addr_file,
        ))
        .arg("--ops-listen")
        .arg(ops.listen.to_string())
        .arg("--ops-addr-file")
        .arg(&ops.addr_file)
        .args(args.recycle.then_some("--recycle"))
        .args(
            args.elastic()
                .map(|e| e.coordinator_args())
                .unwrap_or_default(),
        )
        .args(&args.coordinator_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&logs.join("coordinator.log"))?)
        .spawn()
        .map_err(io_err("cannot start", &bins.coordinator))
}

fn agent_command(
    bins: &Bins,
    args: &UpArgs,
    creds: &Credentials,
    url: &str,
    registry_args: &[std::ffi::OsString],
) -> Command {
    let hosts = args.state_dir.join("hosts");
    let dirs = launch::HostDirs {
        hosts: &hosts,
        run: &args.run_dir,
        prefix: &args.prefix,
    };
    let mut cmd = Command::new(&bins.agent);
    cmd.args(launch::agent_args(
        &creds.pool,
        url,
        &creds.coordinator_ca,
        &dirs,
    ));
    if args.recycle {
        cmd.arg("--recycle");
    }
    cmd.args(registry_args);
    cmd.args(&args.agent_args);
    cmd
}

/// What every agent of this pool is started with.
struct AgentLaunch<'a> {
    bins: &'a Bins,
    args: &'a UpArgs,
    creds: &'a Credentials,
    url: &'a str,
    logs: &'a Path,
    /// The pool's registry mirror and CA, for every agent.
    registry_args: &'a [std::ffi::OsString],
}

fn start_agent(
    launch: &AgentLaunch<'_>,
    slot: usize,
    resume: Option<String>,
    tx: mpsc::Sender<Event>,
) -> Result<u32, UpError> {
    let AgentLaunch {
        bins,
        args,
        creds,
        url,
        logs,
        registry_args,
    } = *launch;
    let log = logs.join(format!("agent-{slot}.log"));
    let mut cmd = agent_command(bins, args, creds, url, registry_args);
    if let Some(h) = &resume {
        cmd.arg("--resume-host").arg(h);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(&log)?)
        .spawn()
        .map_err(io_err("cannot start", &bins.agent))?;
    let pid = child.id().unwrap_or(0);
    info!(slot, pid, "agent started");
    let stdout = child.stdout.take();
    tokio::spawn(async move {
        if let Some(out) = stdout {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with(berth_proto::supervisor::READY_PREFIX) {
                    let _ = tx.send(Event::Ready { slot, line }).await;
                } else if let Some(ended) = berth_proto::supervisor::parse_ended(&line) {
                    let _ = tx.send(Event::Ended { slot, ended }).await;
                }
            }
        }
        let status = child.wait().await;
        let _ = tx.send(Event::Exited { slot, status }).await;
    });
    Ok(pid)
}

fn signal(pid: Option<u32>, sig: nix::sys::signal::Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

async fn stop_agents(slots: &mut HashMap<usize, Slot>, rx: &mut mpsc::Receiver<Event>) {
    for s in slots.values() {
        signal(s.pid, nix::sys::signal::Signal::SIGTERM);
    }
    let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
    while slots.values().any(|s| s.pid.is_some()) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Event::Exited { slot, .. })) => {
                if let Some(s) = slots.get_mut(&slot) {
                    s.pid = None;
                }
            }
            Ok(Some(Event::Ready { .. } | Event::Ended { .. })) => {}
            Ok(None) | Err(_) => break,
        }
    }
    for s in slots.values_mut() {
        if s.pid.is_some() {
            warn!(pid = ?s.pid, "agent did not stop in time; killing it");
            signal(s.pid.take(), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Removes what killed earlier runs with this prefix left behind (dockerds,
/// namespaces, mounts, cgroups), using the agent's own sweep.
async fn sweep(bins: &Bins, args: &UpArgs) -> Result<(), UpError> {
    let out = Command::new(&bins.agent)
        .arg("sweep")
        .arg("--state-dir")
        .arg(args.state_dir.join("hosts"))
        .arg("--run-dir")
        .arg(&args.run_dir)
        .arg("--prefix")
        .arg(&args.prefix)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(io_err("cannot run", &bins.agent))?;
    if !out.status.success() {
        return Err(UpError::Sweep(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(())
}

/// Whether the coordinator is told to keep the pool's state in a shared
/// store (`--coordinator-arg --store=postgres://...`, or `BERTH_STORE` in
/// the environment it inherits).
fn shared_store(coordinator_args: &[String]) -> bool {
    std::env::var_os("BERTH_STORE").is_some_and(|v| !v.is_empty())
        || coordinator_args
            .iter()
            .any(|a| a == "--store" || a.starts_with("--store="))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_host_that_served_its_lease_is_replaced_at_once_however_short_it_lived() {
        // The normal life of a single-use host: a second-long build.
        assert_eq!(
            restart_after(true, 1, Duration::from_millis(1500), 16 * S),
            (Restart::Now, FIRST_BACKOFF)
        );
        // Again and again: no backoff ever builds up.
        let mut backoff = FIRST_BACKOFF;
        for _ in 0..30 {
            let (r, b) = restart_after(true, 1, S, backoff);
            assert_eq!(r, Restart::Now);
            backoff = b;
        }
        assert_eq!(backoff, FIRST_BACKOFF);
    }

    #[test]
    fn a_host_that_ends_early_without_serving_backs_off_doubling_up_to_the_cap() {
        let mut backoff = FIRST_BACKOFF;
        let mut waits = vec![];
        for _ in 0..7 {
            let (r, b) = restart_after(false, 0, S, backoff);
            let Restart::After(d) = r else {
                panic!("a failed boot restarted at once")
            };
            waits.push(d.as_secs());
            backoff = b;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        // Exit 0 without a lease within the window (dockerd died right
        // after boot) is a crash loop too.
        assert_eq!(restart_after(true, 0, S, 4 * S).0, Restart::After(4 * S));
        // A lease served but a failed exit (terminating failed): backed off.
        assert_eq!(restart_after(false, 1, S, 4 * S).0, Restart::After(4 * S));
        // A host that lived past the window starts over.
        assert_eq!(
            restart_after(false, 0, CRASH_WINDOW, 16 * S),
            (Restart::Now, FIRST_BACKOFF)
        );
    }
}
