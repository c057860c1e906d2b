//! The processes a benchmark runs and the guards that end them: the berth
//! binaries (built in the bench's own profile, so `--release` benchmarks
//! release code), a scenario's [`Env`] (its prefix, directories and pool
//! credentials, swept at start and at the end), [`Coordinator`] and
//! [`Agent`] child processes, and readers of a process's RSS and CPU time
//! from `/proc`.
//!
//! Credentials are the real ones, made as `berth up` makes them: a tenants
//! file with one admin tenant (its token authenticates every CI and admin
//! call), the pool join token (agents) and its sha256 (coordinator), and the
//! CA the coordinator creates under its state directory, which every client
//! and agent trusts. CI calls send a certificate signing request as
//! `berth acquire` does; one key and CSR is made per process and reused
//! (the coordinator still signs one certificate per call).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use berth_cli::up::launch;
use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_client::AdminServiceClient;
use berth_proto::v1::lease_service_client::LeaseServiceClient;
use berth_tls::PoolCredentials;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{BenchError, Result};

/// How long a coordinator has to write its address file.
pub const COORDINATOR_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an agent has to print READY.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process has after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Where scenarios keep their state and runtime paths.
pub const STATE_ROOT: &str = "/tmp/berth-t";
pub const RUN_ROOT: &str = "/run/berth-t";
/// Where a coordinator keeps its store when a scenario wants it in memory
/// (tmpfs: fsync returns at once), to measure what durability costs.
pub const MEMORY_ROOT: &str = "/dev/shm/berth-t";

/// The berth binaries the benchmarks run.
#[derive(Debug)]
pub struct Bins {
    pub agent: PathBuf,
    pub coordinator: PathBuf,
}

/// `berth-agent` and `berth-coordinator`, built in the profile this process
/// was built in (`berth_testkit::bin`, once per process).
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| Bins {
        agent: berth_testkit::bin("berth-agent"),
        coordinator: berth_testkit::bin("berth-coordinator"),
    })
}

/// One key pair and CSR for the whole process: CI acquires and simulated
/// agents send it. Only its public key is used by the coordinator, which
/// signs a certificate per call either way; generating one per call would
/// measure the client, not berth.
pub fn shared_csr() -> &'static str {
    &shared_key().csr_pem
}

/// The key pair behind [`shared_csr`] (a client of the lease's front needs it).
pub fn shared_key() -> &'static berth_tls::KeyAndCsr {
    static KEY: OnceLock<berth_tls::KeyAndCsr> = OnceLock::new();
    KEY.get_or_init(|| {
        berth_tls::KeyAndCsr::generate("berth-bench").expect("generating a key pair and CSR")
    })
}

/// A scenario's prefix, directories and pool credentials. Created swept;
/// swept again on drop, after the guards declared later (and so dropped
/// earlier) have stopped their processes.
#[derive(Debug)]
pub struct Env {
    pub prefix: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// The agents' `--state-dir` (their hosts' data roots and state files).
    hosts: PathBuf,
    /// The pool's credentials under `state_dir`.
    pub creds: PoolCredentials,
    /// The admin tenant's token (`authorization: Bearer`).
    pub token: String,
    /// The pool join token agents present.
    pub join_token: String,
}

impl Env {
    /// `base` like `bn1-`; the test tag goes in front.
    pub fn new(base: &str) -> Result<Self> {
        let prefix = berth_testkit::test_prefix(base);
        let name = prefix.trim_end_matches('-');
        let state_dir = Path::new(STATE_ROOT).join(name);
        let mut env = Env {
            creds: PoolCredentials::paths(&state_dir),
            hosts: state_dir.join("hosts"),
            state_dir,
            run_dir: Path::new(RUN_ROOT).join(name),
            prefix,
            token: String::new(),
            join_token: String::new(),
        };
        env.sweep();
        let _ = std::fs::remove_dir_all(&env.state_dir);
        let _ = std::fs::remove_dir_all(env.memory_dir());
        for d in [&env.state_dir, &env.hosts_dir(), &env.run_dir] {
            std::fs::create_dir_all(d)
                .map_err(BenchError::io(format!("creating {}", d.display())))?;
        }
        let credentials = |e| BenchError::step("writing the pool credentials", e);
        env.creds = PoolCredentials::ensure(&env.state_dir, "bench").map_err(credentials)?;
        env.token = env.creds.admin_token().map_err(credentials)?;
        env.join_token = env.creds.join_token().map_err(credentials)?;
        Ok(env)
    }

    pub fn hosts_dir(&self) -> PathBuf {
        self.hosts.clone()
    }

    /// The same env with its hosts' directories on tmpfs (under
    /// [`Env::memory_dir`], removed with the env): their writes and syncs
    /// no longer share a file system with the coordinator's store.
    pub fn hosts_in_memory(mut self) -> Result<Self> {
        self.hosts = self.memory_dir().join("hosts");
        std::fs::create_dir_all(&self.hosts)
            .map_err(BenchError::io(format!("creating {}", self.hosts.display())))?;
        Ok(self)
    }

    /// A directory of this env on tmpfs; removed with the env.
    pub fn memory_dir(&self) -> PathBuf {
        Path::new(MEMORY_ROOT).join(self.prefix.trim_end_matches('-'))
    }

    /// Kills what still runs from this env's directories, then lets the
    /// agent's own sweep remove dockerds, namespaces, mounts and cgroups.
    pub fn sweep(&self) {
        // Hosts' directories are on disk, or in memory (`hosts_in_memory`).
        let roots = [self.state_dir.clone(), self.memory_dir()];
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let left: Vec<i32> = roots
                .iter()
                .flat_map(|r| berth_testkit::processes_mentioning(&r.to_string_lossy()))
                .filter_map(|l| l.split(':').next()?.parse().ok())
                .collect();
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The agent's sweep also removes what carries the prefix alone
        // (namespaces, dockerds, mounts): always once, on the disk's dir.
        self.sweep_hosts(&self.state_dir.join("hosts"));
        let in_memory = self.memory_dir().join("hosts");
        if in_memory.exists() {
            self.sweep_hosts(&in_memory);
        }
    }

    fn sweep_hosts(&self, hosts: &Path) {
        let out = Command::new(&bins().agent)
            .arg("sweep")
            .arg("--state-dir")
            .arg(hosts)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--prefix")
            .arg(&self.prefix)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "berth-bench: sweep of {} failed: {}",
                self.prefix,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("berth-bench: cannot run the sweep: {e}"),
        }
    }

    /// The dockerd socket of one of this env's hosts.
    pub fn docker_socket(&self, host_id: &str) -> PathBuf {
        self.run_dir.join(host_id).join("docker.sock")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.sweep();
        let _ = std::fs::remove_dir_all(self.memory_dir());
    }
}

/// SIGTERM, then SIGKILL after `timeout`; reaps the child.
fn stop_child(child: &mut Child, timeout: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A `berth-coordinator` process on 127.0.0.1:0, with the env's tenants and
/// join token and a CA of its own.
#[derive(Debug)]
pub struct Coordinator {
    child: Child,
    pub addr: SocketAddr,
    pub pid: i32,
    pub log: PathBuf,
    /// The pool CA it created (what agents get as `--ca`).
    pub ca_pem: PathBuf,
    /// The admin tenant's token.
    pub token: String,
}

impl Coordinator {
    /// Starts it with `extra` flags; its log goes to `STATE/NAME.log`, its
    /// state (CA, lease store) to `STATE/NAME`.
    pub fn start(env: &Env, name: &str, extra: &[String]) -> Result<Self> {
        Self::start_at(env, name, &env.state_dir.join(name), extra)
    }

    /// [`Coordinator::start`] with its state directory at `state_dir`.
    pub fn start_at(env: &Env, name: &str, state_dir: &Path, extra: &[String]) -> Result<Self> {
        Self::start_on(
            env,
            name,
            state_dir,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            extra,
        )
    }

    /// [`Coordinator::start_at`] listening on `listen`.
    pub fn start_on(
        env: &Env,
        name: &str,
        state_dir: &Path,
        listen: SocketAddr,
        extra: &[String],
    ) -> Result<Self> {
        let addr_file = env.state_dir.join(format!("{name}.addr"));
        let log = env.state_dir.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&addr_file);
        let log_file = std::fs::File::create(&log)
            .map_err(BenchError::io(format!("creating {}", log.display())))?;
        let child = Command::new(&bins().coordinator)
            .args(launch::coordinator_args(
                &env.creds, state_dir, listen, &addr_file,
            ))
            // Benchmarks (and their smoke tests) run side by side: each
            // coordinator's ops endpoint on a port of its own.
            .arg("--ops-listen=127.0.0.1:0")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(BenchError::io("starting berth-coordinator"))?;
        let pid = i32::try_from(child.id()).unwrap_or(0);
        let mut c = Coordinator {
            child,
            addr: "127.0.0.1:1".parse().expect("addr"),
            pid,
            log,
            ca_pem: berth_tls::Ca::paths(state_dir).0,
            token: env.token.clone(),
        };
        let deadline = Instant::now() + COORDINATOR_START_TIMEOUT;
        loop {
            if let Some(a) = std::fs::read_to_string(&addr_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                c.addr = a;
                return Ok(c);
            }
            if let Ok(Some(status)) = c.child.try_wait() {
                return Err(BenchError::step(
                    "starting berth-coordinator",
                    format!("exited with {status}; log:\n{}", c.log_text()),
                ));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: "the coordinator's address file".into(),
                    timeout: COORDINATOR_START_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its gRPC endpoint: TLS, trusting the pool CA only.
    pub fn endpoint(&self) -> Result<Endpoint> {
        let ca = std::fs::read_to_string(&self.ca_pem).map_err(BenchError::io(format!(
            "reading the pool CA {}",
            self.ca_pem.display()
        )))?;
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        Ok(Endpoint::from_shared(self.url())
            .map_err(|e| BenchError::step("coordinator URL", e))?
            .tls_config(tls)?
            .tcp_nodelay(true))
    }

    /// A fresh HTTP/2 connection to it.
    pub async fn channel(&self) -> Result<Channel> {
        Ok(self.endpoint()?.connect().await?)
    }

    /// CI and admin clients on a fresh connection, with the admin tenant's token.
    pub async fn clients(&self) -> Result<Clients> {
        Ok(Clients::new(self.channel().await?, &self.token))
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}

/// A `berth-agent` process: one local host with its own dockerd.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    pub pid: i32,
    /// Just before the spawn.
    pub spawned: Instant,
    ready_rx: tokio::sync::mpsc::UnboundedReceiver<(Instant, String)>,
    /// When READY was printed (as read) and the host id it named.
    pub ready: Option<(Instant, String)>,
    pub log: PathBuf,
}

impl Agent {
    pub fn spawn(env: &Env, coordinator: &Coordinator, recycle: bool, name: &str) -> Result<Self> {
        Self::spawn_to(env, &coordinator.url(), &coordinator.ca_pem, recycle, name)
    }

    /// [`Agent::spawn`] given the coordinator URL (or several, separated by
    /// commas) and the pool CA.
    pub fn spawn_to(env: &Env, url: &str, ca: &Path, recycle: bool, name: &str) -> Result<Self> {
        let log = env.state_dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log)
            .map_err(BenchError::io(format!("creating {}", log.display())))?;
        let mut cmd = Command::new(&bins().agent);
        cmd.args(launch::agent_args(
            &env.creds,
            url,
            ca,
            &launch::HostDirs {
                hosts: &env.hosts_dir(),
                run: &env.run_dir,
                prefix: &env.prefix,
            },
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
        if recycle {
            cmd.arg("--recycle");
        }
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(BenchError::io("starting berth-agent"))?;
        let pid = i32::try_from(child.id()).unwrap_or(0);
        let (tx, ready_rx) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let Some(out) = stdout else { return };
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let at = Instant::now();
                if let Some(rest) = line.strip_prefix("READY ") {
                    let host_id = rest
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix("host_id="))
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send((at, host_id));
                }
            }
        });
        Ok(Agent {
            child,
            pid,
            spawned,
            ready_rx,
            ready: None,
            log,
        })
    }

    /// Waits for the READY line; returns the time from spawn to it.
    pub async fn wait_ready(&mut self) -> Result<Duration> {
        if let Some((at, _)) = &self.ready {
            return Ok(at.duration_since(self.spawned));
        }
        match tokio::time::timeout(AGENT_READY_TIMEOUT, self.ready_rx.recv()).await {
            Ok(Some((at, host_id))) => {
                self.ready = Some((at, host_id));
                Ok(at.duration_since(self.spawned))
            }
            Ok(None) => Err(BenchError::step(
                "booting berth-agent",
                format!(
                    "it exited before READY; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            )),
            Err(_) => Err(BenchError::Timeout {
                what: "the agent's READY line".into(),
                timeout: AGENT_READY_TIMEOUT,
            }),
        }
    }

    pub fn host_id(&self) -> Option<&str> {
        self.ready.as_ref().map(|(_, h)| h.as_str())
    }

    /// SIGTERM and wait (the agent destroys its host first).
    pub fn stop(&mut self) {
        stop_child(&mut self.child, STOP_TIMEOUT);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Resident set size of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: i32) -> Option<f64> {
    status_kib(pid, "VmRSS")
}

/// One `kB` field of `/proc/PID/status` (`VmRSS`, `RssAnon`, `RssFile`...).
pub fn status_kib(pid: i32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Resident memory of a process by kind of mapping, from `/proc/PID/smaps`
/// (KiB).
#[derive(Debug, Default, Clone, Copy)]
pub struct RssParts {
    /// The executable's own code (its executable mappings).
    pub exe_code: f64,
    /// The same mappings' size (resident or not).
    pub exe_code_mapped: f64,
    /// The executable's other mappings (read-only data, unwind tables,
    /// relocated data, `.data`).
    pub exe_data: f64,
    /// Of `exe_data`, the anonymous (written: relocated or `.data`) pages.
    pub exe_data_anon: f64,
    /// Every other file mapping (the C library, libm, ld.so...).
    pub libraries: f64,
    /// `[heap]`: the main malloc arena.
    pub heap: f64,
    /// Every other anonymous mapping: thread stacks (the main one
    /// included), the other malloc arenas, large allocations.
    pub other_anon: f64,
}

impl RssParts {
    pub fn of(pid: i32) -> Option<Self> {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
        let mut parts = RssParts::default();
        // The current mapping: its name, whether executable, its size.
        let mut current: Option<(String, bool, f64)> = None;
        for line in smaps.lines() {
            let mut fields = line.split_whitespace();
            let first = fields.next().unwrap_or_default();
            if first.contains('-') && !first.ends_with(':') {
                let perms = fields.next().unwrap_or_default();
                let name = fields.nth(3).unwrap_or_default().to_owned();
                let size = first
                    .split_once('-')
                    .and_then(|(a, b)| {
                        let a = u64::from_str_radix(a, 16).ok()?;
                        let b = u64::from_str_radix(b, 16).ok()?;
                        Some(b.saturating_sub(a) as f64 / 1024.0)
                    })
                    .unwrap_or(0.0);
                current = Some((name, perms.contains('x'), size));
                continue;
            }
            let Some((name, exec, size)) = &current else {
                continue;
            };
            let kib = |l: &str| -> f64 {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0)
            };
            let is_exe = Path::new(name) == exe;
            if first == "Rss:" {
                let rss = kib(line);
                if is_exe && *exec {
                    parts.exe_code += rss;
                    parts.exe_code_mapped += size;
                } else if is_exe {
                    parts.exe_data += rss;
                } else if name.starts_with('/') {
                    parts.libraries += rss;
                } else if name == "[heap]" {
                    parts.heap += rss;
                } else {
                    parts.other_anon += rss;
                }
            } else if first == "Anonymous:" && is_exe && !*exec {
                parts.exe_data_anon += kib(line);
            }
        }
        Some(parts)
    }
}

/// User + system CPU time a process has used so far.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields start after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz.max(1)))
}

/// Lease and admin clients over one channel, authenticated as a tenant.
#[derive(Debug, Clone)]
pub struct Clients {
    pub lease: LeaseServiceClient<Channel>,
    pub admin: AdminServiceClient<Channel>,
    token: std::sync::Arc<str>,
}

impl Clients {
    pub fn new(ch: Channel, token: &str) -> Self {
        Clients {
            lease: LeaseServiceClient::new(ch.clone()),
            admin: AdminServiceClient::new(ch).max_decoding_message_size(64 * 1024 * 1024),
            token: token.into(),
        }
    }

    fn authed<T>(&self, msg: T) -> tonic::Request<T> {
        berth_testkit::with_token(msg, &self.token)
    }

    /// Acquire with the shared CSR, as `berth acquire` sends one.
    pub async fn acquire(&mut self, build: &str, wait: Duration) -> Result<pb::Lease> {
        self.acquire_answer(build, wait)
            .await?
            .lease
            .ok_or_else(|| BenchError::step("Acquire", "answer without a lease"))
    }

    /// The whole Acquire answer (lease, certificate, CA).
    pub async fn acquire_answer(
        &mut self,
        build: &str,
        wait: Duration,
    ) -> Result<pb::AcquireResponse> {
        let req = self.authed(pb::AcquireRequest {
            build_id: build.to_owned(),
            ttl: Some(berth_proto::from_duration(Duration::from_secs(600))),
            wait: Some(berth_proto::from_duration(wait)),
            csr_pem: shared_csr().to_owned(),
        });
        Ok(self
            .lease
            .acquire(req)
            .await
            .map_err(BenchError::grpc("Acquire"))?
            .into_inner())
    }

    pub async fn release(&mut self, lease_id: &str) -> Result<pb::Lease> {
        let lease = self
            .lease
            .release(self.authed(pb::ReleaseRequest {
                lease_id: lease_id.to_owned(),
            }))
            .await
            .map_err(BenchError::grpc("Release"))?
            .into_inner()
            .lease
            .ok_or_else(|| BenchError::step("Release", "answer without a lease"))?;
        Ok(lease)
    }

    pub async fn get(&mut self, lease_id: &str) -> Result<pb::Lease> {
        self.lease
            .get(self.authed(pb::GetRequest {
                lease_id: lease_id.to_owned(),
            }))
            .await
            .map_err(BenchError::grpc("Get"))?
            .into_inner()
            .lease
            .ok_or_else(|| BenchError::step("Get", "answer without a lease"))
    }

    pub async fn hosts(&mut self) -> Result<Vec<pb::Host>> {
        Ok(self
            .admin
            .list_hosts(self.authed(pb::ListHostsRequest {}))
            .await
            .map_err(BenchError::grpc("ListHosts"))?
            .into_inner()
            .hosts)
    }

    /// Ready, connected, unleased hosts.
    pub async fn ready_hosts(&mut self) -> Result<Vec<pb::Host>> {
        Ok(self
            .hosts()
            .await?
            .into_iter()
            .filter(|h| {
                h.state == pb::HostState::Ready as i32 && h.connected && h.lease_id.is_empty()
            })
            .collect())
    }

    /// Polls every `every` until at least `n` hosts are Ready and free.
    pub async fn wait_ready_hosts(
        &mut self,
        n: usize,
        every: Duration,
        timeout: Duration,
    ) -> Result<Vec<pb::Host>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ready = self.ready_hosts().await?;
            if ready.len() >= n {
                return Ok(ready);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: format!("{n} ready hosts (have {})", ready.len()),
                    timeout,
                });
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parts of this test process's RSS add up to its `VmRSS`, and the
    /// kinds a dynamically linked Rust binary has are all found.
    #[test]
    fn rss_parts_add_up_to_the_rss() {
        let pid = i32::try_from(std::process::id()).unwrap();
        // Touch a heap allocation so that [heap] or an arena holds pages.
        let block = std::hint::black_box(vec![1u8; 1 << 20]);
        let parts = RssParts::of(pid).unwrap();
        let rss = rss_kib(pid).unwrap();
        let sum = parts.exe_code + parts.exe_data + parts.libraries + parts.heap + parts.other_anon;
        assert!(
            (sum - rss).abs() <= rss * 0.05,
            "{parts:?} sum {sum} vs VmRSS {rss}"
        );
        assert!(
            parts.exe_code > 0.0 && parts.exe_code <= parts.exe_code_mapped,
            "{parts:?}"
        );
        assert!(
            parts.exe_data > 0.0 && parts.exe_data_anon <= parts.exe_data,
            "{parts:?}"
        );
        assert!(parts.libraries > 0.0, "{parts:?}");
        assert!(parts.heap + parts.other_anon >= 1024.0, "{parts:?}");
        let anon = status_kib(pid, "RssAnon").unwrap();
        let file = status_kib(pid, "RssFile").unwrap();
        assert!(anon > 0.0 && file > 0.0, "{anon} {file}");
        assert!(status_kib(pid, "NoSuchField").is_none());
        drop(block);
    }
}
