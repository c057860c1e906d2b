//! berth's test kit, one harness for the end-to-end tests, the agent's
//! integration tests and the benchmarks: a `berth up` pool started as a
//! real process tree (coordinator, agents, dockerds in network namespaces),
//! the stock `docker` CLI pointed at a lease (mutual TLS with the
//! certificates `berth acquire` wrote), and guards that stop and sweep
//! everything a test started, also when it fails. The harness talks to the
//! coordinator like the CLI does: TLS against the pool CA, with the tenant
//! token `berth up` made. Agent tests that need no real coordinator use
//! the in-process [`FakeCoordinator`] ([`fake_coordinator`]).
//!
//! The binaries under test are never built here: `cargo nextest run` (and
//! `cargo test`) builds every binary of a package with integration tests,
//! with the tests' own feature set, before the first test runs, and
//! `scripts/bench.sh` builds the release binaries before the benchmarks.
//! Run a single end-to-end test with `--workspace` and a filter (`cargo
//! nextest run --workspace -E 'binary(lease_e2e)'`): `-p berth-tests` alone
//! rebuilds only the tests, and they would start stale daemons.
//! Tests need root, dockerd, the docker CLI, busybox-static, iproute2,
//! iptables and nsenter; when one is missing they fail with a message naming it (set
//! `BERTH_SKIP_E2E=1` to skip them deliberately; refused when `CI=true`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod background;
pub mod fake_coordinator;
pub mod postgres;

pub use background::Background;
pub use fake_coordinator::{AgentFeed, FakeCoordinator};

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_client::AdminServiceClient;
use berth_proto::v1::lease_service_client::LeaseServiceClient;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Where tests keep host state and short runtime paths.
pub const TEST_STATE_ROOT: &str = "/tmp/berth-t";
pub const TEST_RUN_ROOT: &str = "/run/berth-t";

/// Checks what end-to-end tests need. Returns false only when the developer
/// asked to skip them with `BERTH_SKIP_E2E=1`; otherwise a missing
/// prerequisite fails the test with a message that names it.
pub fn preflight() -> bool {
    if std::env::var_os("BERTH_SKIP_E2E").is_some_and(|v| v == "1")
        && std::env::var_os("CI").is_none_or(|v| v != "true")
    {
        eprintln!("SKIPPED: BERTH_SKIP_E2E=1");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root (network namespaces, dockerd); run them as root or set BERTH_SKIP_E2E=1"
    );
    for tool in [
        "dockerd", "docker", "ip", "nsenter", "ss", "curl", "openssl", "iptables",
    ] {
        assert!(
            which(tool).is_some(),
            "end-to-end tests need `{tool}` on PATH; run scripts/test.sh, which installs it"
        );
    }
    assert!(
        Path::new(busybox()).is_file(),
        "end-to-end tests need {} (Debian's busybox-static); run scripts/test.sh",
        busybox()
    );
    true
}

pub fn busybox() -> &'static str {
    "/bin/busybox"
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Whether a lease in `state` (a `pb::LeaseState` value) holds its host:
/// assigned (an Acquire may be answered then) or active.
pub fn holds_host(state: i32) -> bool {
    state == pb::LeaseState::Assigned as i32 || state == pb::LeaseState::Active as i32
}

/// The same for a state as stored (the PostgreSQL store's state column).
pub fn stored_state_holds_host(state: &str) -> bool {
    matches!(state, "assigned" | "active")
}

/// The directory holding the workspace's binaries: `BERTH_BIN_DIR` if set,
/// else the target directory of the running executable (a test in
/// `target/debug/deps`, `berth-bench` in `target/release`).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("BERTH_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let exe = std::env::current_exe().unwrap();
        let mut dir = exe.parent().unwrap().to_owned();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir = dir.parent().unwrap().to_owned();
        }
        dir
    })
}

/// A binary of the workspace, which must have been built before the test
/// ran (see the crate's notes).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run the tests with `cargo nextest run --workspace` (scripts/test.sh), \
         which builds every berth binary first, or build them with `cargo build --bins`",
        p.display()
    );
    p
}

/// Runs a command and returns its output, with the command in any panic.
pub fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Panics with both output streams unless the command succeeded.
pub fn ok(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    o
}

/// Polls `f` until it returns Some, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The test's own prefix for host ids, namespaces and directories:
/// `BERTH_TEST_TAG` (up to 4 lowercase letters or digits) in front of `base`,
/// so two checkouts can run the same tests side by side without sweeping
/// each other's hosts.
pub fn test_prefix(base: &str) -> String {
    let tag = std::env::var("BERTH_TEST_TAG").unwrap_or_default();
    assert!(
        tag.len() <= 4
            && tag
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "BERTH_TEST_TAG must be at most 4 lowercase letters or digits, got {tag:?}"
    );
    format!("{tag}{base}")
}

/// Removes what an earlier, killed run with this prefix left behind: first
/// any process still running from this test's directories (a `berth up`
/// that outlived its test would restart agents), then the agent's sweep of
/// dockerds, namespaces, mounts and cgroups.
pub fn sweep(prefix: &str) {
    let (state, run_dir) = dirs(prefix);
    let needle = state.to_string_lossy().into_owned();
    wait_for("leftover processes to die", Duration::from_secs(30), || {
        let left = process_ids_mentioning(&needle);
        for pid in &left {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        left.is_empty().then_some(())
    });
    let o = run(Command::new(bin("berth-agent"))
        .arg("sweep")
        .arg("--state-dir")
        .arg(state.join("hosts"))
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("--prefix")
        .arg(prefix));
    ok(o, "berth-agent sweep");
    sweep_registries_link(&state);
}

/// Deletes the link `berth up` put its registries' address on, if a killed
/// run left it: the one whose alias names this state dir (the alias is
/// made by `cli/src/up/registries.rs::link_alias`).
fn sweep_registries_link(state_dir: &Path) {
    let hash = berth_tls::TokenHash::of(&state_dir.to_string_lossy()).to_hex();
    let alias = format!("berth registries {}", &hash[..32]);
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return;
    };
    for e in entries.flatten() {
        if std::fs::read_to_string(e.path().join("ifalias")).is_ok_and(|a| a.trim() == alias) {
            let _ = run(Command::new("ip").args(["link", "del"]).arg(e.file_name()));
        }
    }
}

/// The state and run directories of a test prefix.
pub fn dirs(prefix: &str) -> (PathBuf, PathBuf) {
    (
        Path::new(TEST_STATE_ROOT).join(prefix.trim_end_matches('-')),
        Path::new(TEST_RUN_ROOT).join(prefix.trim_end_matches('-')),
    )
}

/// The `export` lines of `berth acquire`, parsed.
#[derive(Debug, Clone)]
pub struct LeaseEnv {
    pub vars: HashMap<String, String>,
}

impl LeaseEnv {
    pub fn parse(out: &str) -> Self {
        let vars = out
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
            .collect();
        Self { vars }
    }

    pub fn get(&self, k: &str) -> &str {
        self.vars
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing from acquire output {:?}", self.vars))
    }

    pub fn lease_id(&self) -> &str {
        self.get("BERTH_LEASE_ID")
    }

    pub fn host_addr(&self) -> &str {
        self.get("BERTH_HOST_ADDR")
    }

    pub fn docker_host(&self) -> &str {
        self.get("DOCKER_HOST")
    }

    /// The address of the host's Docker front, from `DOCKER_HOST`; panics
    /// like [`LeaseEnv::get`] when `berth acquire` wrote no such address.
    pub fn front_addr(&self) -> SocketAddr {
        front_addr(self.docker_host())
            .unwrap_or_else(|| panic!("DOCKER_HOST {} is no tcp://ADDR:PORT", self.docker_host()))
    }

    /// The directory `berth acquire` wrote ca.pem, cert.pem and key.pem to.
    pub fn cert_dir(&self) -> &Path {
        Path::new(self.get("DOCKER_CERT_PATH"))
    }

    /// The stock docker CLI, pointed at this lease's host with its
    /// certificates, exactly as after `eval "$(berth acquire ...)"`.
    pub fn docker(&self) -> Command {
        self.docker_at(Path::new("docker"))
    }

    /// [`LeaseEnv::docker`] with a given docker binary.
    pub fn docker_at(&self, program: &Path) -> Command {
        assert_eq!(self.get("DOCKER_TLS_VERIFY"), "1");
        let mut c = docker_cli_at(program, self.docker_host());
        c.env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", self.cert_dir());
        c
    }
}

/// Debian's docker CLI (20.10, from `docker.io`): unlike the machine's
/// default `docker` (28.x, no buildx plugin) it has BuildKit built in, so
/// `DOCKER_BUILDKIT=1` builds work with it and leave build cache behind.
pub const DEBIAN_DOCKER_CLI: &str = "/usr/bin/docker";

/// [`DEBIAN_DOCKER_CLI`], which must exist: a test that needs BuildKit
/// fails here with a message naming the package rather than skipping.
pub fn buildkit_docker_cli() -> &'static Path {
    let p = Path::new(DEBIAN_DOCKER_CLI);
    assert!(
        p.is_file(),
        "{DEBIAN_DOCKER_CLI} is missing: this test builds with BuildKit through Debian's 20.10 \
         docker CLI (package docker.io; scripts/test.sh installs it through scripts/deps.sh)"
    );
    p
}

/// The address in a lease's `DOCKER_HOST` (`tcp://ADDR:PORT`): where its
/// host's Docker front listens.
pub fn front_addr(docker_host: &str) -> Option<SocketAddr> {
    docker_host.strip_prefix("tcp://")?.parse().ok()
}

/// The stock docker CLI with a clean config, pointed at `docker_host`.
pub fn docker_cli(docker_host: &str) -> Command {
    docker_cli_at(Path::new("docker"), docker_host)
}

/// [`docker_cli`] with a given docker binary (e.g. [`DEBIAN_DOCKER_CLI`]).
pub fn docker_cli_at(program: &Path, docker_host: &str) -> Command {
    let mut c = Command::new(program);
    c.env("DOCKER_HOST", docker_host)
        .env("DOCKER_BUILDKIT", "0")
        .env("DOCKER_CONFIG", docker_config_dir())
        .env_remove("DOCKER_TLS_VERIFY")
        .env_remove("DOCKER_CERT_PATH")
        .env_remove("DOCKER_CONTEXT");
    c
}

fn docker_config_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = Path::new(TEST_STATE_ROOT).join("docker-config");
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// A build context: a Dockerfile FROM scratch with a static busybox and a
/// tiny web root, so `docker build` works without pulling anything.
pub fn busybox_context(dir: &Path, index_html: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(busybox(), dir.join("busybox")).unwrap();
    std::fs::write(dir.join("index.html"), index_html).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         COPY index.html /www/index.html\n\
         CMD [\"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
}

/// A plain HTTP/1.0 GET; returns the whole response.
pub fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: berth\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Where a test pool's coordinator keeps the pool's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// The embedded store in its state dir (`berth up`'s default).
    Embedded,
    /// A PostgreSQL cluster of the test's own (`--store postgres://...`,
    /// [`postgres::up_args`]), stopped with the pool.
    Postgres,
}

/// Defines each fault test twice from one body `fn(Store)`: `NAME` on the
/// embedded store and `postgres::NAME` on the shared store
/// ([`Pool::start_on`]). With `async` first, the bodies are `async
/// fn(Store)`, each run on a runtime of its own ([`block_on`]).
///
/// ```ignore
/// berth_testkit::on_each_store! {
///     coordinator_killed_mid_lease_restarts_and_the_lease_carries_on => coordinator_killed,
/// }
/// berth_testkit::on_each_store! { async
///     a_graceful_stop_and_a_new_coordinator_keep_the_lease => graceful_stop,
/// }
/// ```
#[macro_export]
macro_rules! on_each_store {
    (async $($test:ident => $body:ident),* $(,)?) => {
        $crate::on_each_store!(@each $crate::block_on; $($test => $body),*);
    };
    (@each $run:path; $($test:ident => $body:ident),*) => {
        $(
            #[test]
            fn $test() {
                $run($body($crate::Store::Embedded))
            }
        )*
        /// The same tests with the pool's state on PostgreSQL.
        mod postgres {
            $(
                #[test]
                fn $test() {
                    $run(super::$body($crate::Store::Postgres))
                }
            )*
        }
    };
    ($($test:ident => $body:ident),* $(,)?) => {
        $crate::on_each_store!(@each ::std::convert::identity; $($test => $body),*);
    };
}

/// Runs `f` to the end on a fresh multi-threaded runtime (two workers, so
/// a test may block one in `tokio::task::block_in_place`, e.g. to start
/// PostgreSQL or run `psql`).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A pool started with `berth up` for one test. Dropping it stops the pool
/// with SIGTERM (agents clean up), kills whatever is left of its process
/// group, and sweeps the test's prefix; then its PostgreSQL cluster, if it
/// has one, is stopped.
pub struct Pool {
    pub prefix: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub addr: SocketAddr,
    child: Option<Child>,
    pgid: Option<Pid>,
    rt: tokio::runtime::Runtime,
    /// Dropped after the pool stopped (fields drop after `Drop::drop`).
    postgres: Option<postgres::Postgres>,
}

impl Pool {
    /// Starts `berth up --hosts N` with this test's own prefix and waits
    /// until N hosts are Ready.
    pub fn start(base_prefix: &str, hosts: u16, extra: &[&str]) -> Self {
        Self::start_with(base_prefix, hosts, extra, |_| {})
    }

    /// [`Pool::start`] on `store`. On [`Store::Postgres`] the pool gets a
    /// PostgreSQL cluster of its own, database [`postgres::POOL_DB`], its
    /// prefix is `base_prefix` with `p` added (`bfc1-` -> `bfc1p-`, so both
    /// variants of a test can run side by side), and the pool is checked to
    /// be led from that database before it is returned.
    pub fn start_on(store: Store, base_prefix: &str, hosts: u16, extra: &[&str]) -> Self {
        if store == Store::Embedded {
            return Self::start(base_prefix, hosts, extra);
        }
        let pg = postgres::Postgres::start();
        let url = pg.create_db(postgres::POOL_DB);
        let key = pg.dir.join("store.key");
        postgres::write_key(&key);
        let mut args = postgres::up_args(&url, &key);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let base = format!("{}p-", base_prefix.trim_end_matches('-'));
        let mut pool = Self::spawn(&base, hosts, &args, |_| {});
        pool.postgres = Some(pg);
        pool.wait_ready_hosts(usize::from(hosts), Duration::from_secs(60));
        let pg = pool.postgres().expect("the pool's PostgreSQL");
        assert_eq!(
            pg.sql(
                postgres::POOL_DB,
                "SELECT count(*) FROM berth_leader WHERE term > 0 AND expires_at > now()"
            ),
            "1",
            "the pool is not led from its database"
        );
        assert!(
            !pool
                .state_dir
                .join("coordinator")
                .join("coordinator.redb")
                .exists(),
            "the coordinator on PostgreSQL made an embedded store"
        );
        pool
    }

    /// The pool's PostgreSQL cluster, when it runs on [`Store::Postgres`].
    pub fn postgres(&self) -> Option<&postgres::Postgres> {
        self.postgres.as_ref()
    }

    /// The state of lease `id` as the pool's PostgreSQL holds it (`active`,
    /// `released`, ...); `None` on the embedded store.
    pub fn stored_state(&self, id: &str) -> Option<String> {
        Some(self.postgres()?.lease_state(id))
    }

    /// [`Pool::start`], with `setup` run on the fresh state dir before
    /// `berth up` starts (e.g. to add a tenant to its tenants file).
    pub fn start_with(
        base_prefix: &str,
        hosts: u16,
        extra: &[&str],
        setup: impl FnOnce(&Path),
    ) -> Self {
        let mut pool = Self::spawn(base_prefix, hosts, extra, setup);
        pool.wait_ready_hosts(usize::from(hosts), Duration::from_secs(60));
        pool
    }

    /// [`Pool::start_with`] without waiting for any host: once the
    /// coordinator answers (for pools whose hosts are not expected to become
    /// Ready).
    pub fn start_unready(
        base_prefix: &str,
        hosts: u16,
        extra: &[&str],
        setup: impl FnOnce(&Path),
    ) -> Self {
        Self::spawn(base_prefix, hosts, extra, setup)
    }

    /// Starts `berth up` and waits until its coordinator answers.
    fn spawn(base_prefix: &str, hosts: u16, extra: &[&str], setup: impl FnOnce(&Path)) -> Self {
        let prefix = &test_prefix(base_prefix);
        sweep(prefix);
        let (state_dir, run_dir) = dirs(prefix);
        // Start from nothing: a stale coordinator.addr would point at a
        // coordinator of an earlier run.
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir).unwrap();
        setup(&state_dir);
        let log = std::fs::File::create(state_dir.join("up.log")).unwrap();
        // An elastic pool (--max-hosts) is sized by its coordinator: `hosts`
        // is then only how many Ready hosts to wait for.
        let elastic = extra.contains(&"--max-hosts");
        // The registry mirror's default upstream is Docker Hub, beyond
        // what tests may reach: only the mirror's own tests run one.
        let mirror = extra
            .iter()
            .any(|a| a.starts_with("--mirror") || *a == "--no-mirror");
        let no_mirror: &[&str] = if mirror { &[] } else { &["--no-mirror"] };
        let child = Command::new(bin("berth"))
            .arg("up")
            .args(
                (!elastic)
                    .then(|| ["--hosts".to_owned(), hosts.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--prefix")
            .arg(prefix)
            // Any free port, unless the test names one.
            .args(
                (!extra.iter().any(|a| a.starts_with("--listen")))
                    .then_some(["--listen", "127.0.0.1:0"])
                    .into_iter()
                    .flatten(),
            )
            .args(no_mirror)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Own process group: the guard can kill the whole tree.
            .process_group(0)
            .spawn()
            .expect("cannot start berth up");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let addr_file = state_dir.join("coordinator.addr");
        let mut pool = Self {
            prefix: prefix.to_owned(),
            state_dir,
            run_dir,
            addr: "127.0.0.1:1".parse().unwrap(),
            child: Some(child),
            pgid: None,
            rt,
            postgres: None,
        };
        // berth up copies the pool CA for the CLI once the coordinator has
        // written its address; both must be there before the first call.
        let ca = pool.ca_pem_path();
        pool.addr = wait_for("the coordinator address", Duration::from_secs(60), || {
            pool.assert_running();
            if !ca.exists() {
                return None;
            }
            std::fs::read_to_string(&addr_file)
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        pool
    }

    fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!("berth up exited early ({status}); log:\n{}", self.log());
        }
    }

    /// `berth up`'s own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("up.log")).unwrap_or_default()
    }

    /// The pool CA as `berth up` publishes it for the CLI.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.state_dir.join("cli").join("ca.pem")
    }

    /// The CLI's tenant token file `berth up` made.
    pub fn token_path(&self) -> PathBuf {
        self.state_dir.join("cli").join("token")
    }

    /// The pool CA with its key, as the coordinator keeps it (tests use it
    /// to forge what an attacker could not: e.g. an expired certificate).
    pub fn ca(&self) -> berth_tls::Ca {
        let (cert, key) = berth_tls::Ca::paths(&self.state_dir.join("coordinator"));
        berth_tls::Ca::load(&cert, &key).expect("the pool CA")
    }

    /// The `berth` CLI against this pool, with its CA and tenant token.
    pub fn berth_cmd(&self) -> Command {
        let mut c = Command::new(bin("berth"));
        c.arg("--coordinator")
            .arg(self.addr.to_string())
            .env("BERTH_CA", self.ca_pem_path())
            .env("BERTH_TOKEN_FILE", self.token_path())
            .env("HOME", self.state_dir.join("home"))
            .env_remove("BERTH_TOKEN")
            .env_remove("BERTH_LEASE_ID")
            .env_remove("DOCKER_CERT_PATH");
        c
    }

    /// Runs the `berth` CLI against this pool.
    pub fn berth(&self, args: &[&str]) -> Output {
        run(self.berth_cmd().args(args))
    }

    /// Runs the `berth` CLI as the tenant whose token is in `token_file`.
    pub fn berth_as(&self, token_file: &Path, args: &[&str]) -> Output {
        run(self
            .berth_cmd()
            .env("BERTH_TOKEN_FILE", token_file)
            .args(args))
    }

    /// `berth acquire`, which must succeed.
    pub fn acquire(&self, build: &str, ttl: &str, wait: &str) -> LeaseEnv {
        let o = ok(
            self.berth(&["acquire", "--build", build, "--ttl", ttl, "--wait", wait]),
            "berth acquire",
        );
        LeaseEnv::parse(&stdout(&o))
    }

    /// The coordinator's gRPC endpoint, over TLS with the pool CA.
    pub fn endpoint(&self) -> tonic::transport::Endpoint {
        self.endpoint_at(self.addr)
    }

    /// The gRPC endpoint of a coordinator of this pool at `addr` (one of
    /// several on a shared store), over TLS with the pool CA.
    pub fn endpoint_at(&self, addr: SocketAddr) -> tonic::transport::Endpoint {
        let url = format!("https://{addr}");
        let ca = std::fs::read_to_string(self.ca_pem_path()).expect("the pool CA for the CLI");
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .tls_config(tls)
            .unwrap()
    }

    fn channel(&self) -> tonic::transport::Channel {
        self.rt
            .block_on(self.endpoint().connect())
            .expect("cannot reach the coordinator")
    }

    /// The CLI's tenant token (an admin tenant), as `berth up` made it.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.token_path())
            .unwrap()
            .trim()
            .to_owned()
    }

    /// A request carrying the CLI's tenant token.
    pub fn authed<T>(&self, msg: T) -> tonic::Request<T> {
        with_token(msg, &self.token())
    }

    pub fn hosts(&self) -> Vec<pb::Host> {
        let ch = self.channel();
        self.rt
            .block_on(AdminServiceClient::new(ch).list_hosts(self.authed(pb::ListHostsRequest {})))
            .unwrap()
            .into_inner()
            .hosts
    }

    pub fn lease(&self, lease_id: &str) -> pb::Lease {
        self.try_lease(lease_id)
            .unwrap_or_else(|s| panic!("Get {lease_id}: {s}"))
    }

    /// `Get` of a lease, with the status on failure.
    /// `Acquire` over gRPC as the CLI's tenant: `build` with the key of
    /// `csr_pem`, a TTL of 30 minutes, waiting up to a minute for a host.
    pub fn acquire_csr(
        &self,
        build: &str,
        csr_pem: &str,
    ) -> Result<pb::AcquireResponse, tonic::Status> {
        let req = self.authed(pb::AcquireRequest {
            build_id: build.to_owned(),
            ttl: Some(berth_proto::from_duration(Duration::from_secs(30 * 60))),
            wait: Some(berth_proto::from_duration(Duration::from_secs(60))),
            csr_pem: csr_pem.to_owned(),
        });
        self.rt
            .block_on(LeaseServiceClient::new(self.channel()).acquire(req))
            .map(tonic::Response::into_inner)
    }

    /// `Renew` over gRPC as the CLI's tenant: `ttl` from now, certifying
    /// the key of `csr_pem`.
    pub fn renew_csr(
        &self,
        lease_id: &str,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<pb::RenewResponse, tonic::Status> {
        let req = self.authed(pb::RenewRequest {
            lease_id: lease_id.to_owned(),
            ttl: Some(berth_proto::from_duration(ttl)),
            csr_pem: csr_pem.to_owned(),
        });
        self.rt
            .block_on(LeaseServiceClient::new(self.channel()).renew(req))
            .map(tonic::Response::into_inner)
    }

    pub fn try_lease(&self, lease_id: &str) -> Result<pb::Lease, tonic::Status> {
        let ch = self.channel();
        self.rt
            .block_on(LeaseServiceClient::new(ch).get(self.authed(pb::GetRequest {
                lease_id: lease_id.to_owned(),
            })))
            .map(|r| r.into_inner().lease.unwrap_or_default())
    }

    /// AdminService.PoolStats.
    pub fn pool_stats(&self) -> pb::PoolStatsResponse {
        let ch = self.channel();
        self.rt
            .block_on(AdminServiceClient::new(ch).pool_stats(self.authed(pb::PoolStatsRequest {})))
            .unwrap()
            .into_inner()
    }

    /// Every lease the coordinator knows, ended ones included.
    pub fn all_leases(&self) -> Vec<pb::Lease> {
        let ch = self.channel();
        self.rt
            .block_on(
                AdminServiceClient::new(ch).list_leases(self.authed(pb::ListLeasesRequest {
                    include_ended: true,
                })),
            )
            .unwrap()
            .into_inner()
            .leases
    }

    /// Asserts that no host holds two live leases, from the coordinator's
    /// own listing.
    pub fn assert_no_host_in_two_leases(&self) {
        let mut by_host: HashMap<String, Vec<String>> = HashMap::new();
        for l in self.all_leases() {
            if holds_host(l.state) && !l.host_id.is_empty() {
                by_host.entry(l.host_id).or_default().push(l.lease_id);
            }
        }
        for (host, leases) in by_host {
            assert!(leases.len() <= 1, "host {host} is in leases {leases:?}");
        }
    }

    /// Whether the coordinator answers at all (it may be restarting).
    pub fn coordinator_answers(&self) -> bool {
        let endpoint = self.endpoint().connect_timeout(Duration::from_secs(1));
        let req = self.authed(pb::ListHostsRequest {});
        self.rt.block_on(async {
            let Ok(ch) = endpoint.connect().await else {
                return false;
            };
            AdminServiceClient::new(ch).list_hosts(req).await.is_ok()
        })
    }

    /// The pid of this pool's coordinator process (the one `berth up`
    /// runs on `STATE_DIR/coordinator`, not another one a test started
    /// under the pool's state dir).
    pub fn coordinator_pid(&self) -> Option<Pid> {
        let state = self.state_dir.join("coordinator");
        processes_mentioning(&state.to_string_lossy())
            .into_iter()
            .find(|p| {
                p.split_once(": ")
                    .is_some_and(|(_, cmd)| cmd.contains("berth-coordinator "))
            })
            .and_then(|p| p.split(':').next()?.parse().ok())
            .map(Pid::from_raw)
    }

    /// The pid of `berth up` itself.
    pub fn up_pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .map(Pid::from_raw)
    }

    /// The pid of a host's dockerd, per its pidfile.
    pub fn dockerd_pid(&self, host_id: &str) -> Option<Pid> {
        let pidfile = self.run_dir.join(host_id).join("dockerd.pid");
        let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
        std::path::Path::new(&format!("/proc/{pid}"))
            .exists()
            .then_some(Pid::from_raw(pid))
    }

    /// The pid of the agent serving a host: one started to take the host
    /// over (`--resume-host HOST`), or else its dockerd's parent (an agent
    /// starts its host's dockerd as its child).
    pub fn agent_pid(&self, host_id: &str) -> Option<Pid> {
        let state = self.state_dir.to_string_lossy().into_owned();
        let resumer = processes_mentioning(&state).into_iter().find(|p| {
            p.split_once(": ").is_some_and(|(_, cmd)| {
                cmd.contains("berth-agent ") && cmd.contains(&format!("--resume-host {host_id}"))
            })
        });
        if let Some(p) = resumer {
            return p.split(':').next()?.parse().ok().map(Pid::from_raw);
        }
        let dockerd = self.dockerd_pid(host_id)?;
        let ppid = parent_pid(dockerd.as_raw())?;
        let cmd = std::fs::read(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmd)
            .contains("berth-agent")
            .then_some(Pid::from_raw(ppid))
    }

    /// Pids of this pool's agent processes (not sweeps).
    ///
    /// A child an agent has forked but not yet exec'd (`ip`, `dockerd`)
    /// still shows the agent's command line; it is not counted.
    pub fn agent_pids(&self) -> Vec<Pid> {
        let state = self.state_dir.to_string_lossy().into_owned();
        let pids: Vec<i32> = processes_mentioning(&state)
            .into_iter()
            .filter(|p| {
                p.split_once(": ").is_some_and(|(_, cmd)| {
                    cmd.contains("berth-agent ") && !cmd.contains(" sweep ")
                })
            })
            .filter_map(|p| p.split(':').next()?.parse().ok())
            .collect();
        pids.iter()
            .filter(|p| parent_pid(**p).is_none_or(|parent| !pids.contains(&parent)))
            .map(|p| Pid::from_raw(*p))
            .collect()
    }

    /// The agent state file of a host, if the host still exists.
    pub fn agent_state(&self, host_id: &str) -> Option<serde_json::Value> {
        let f = self
            .state_dir
            .join("hosts")
            .join(host_id)
            .join(berth_proto::host_dir::AGENT_STATE_FILE);
        serde_json::from_slice(&std::fs::read(f).ok()?).ok()
    }

    /// The agents' logs (one per slot), concatenated.
    pub fn agent_logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("logs")) {
            let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                if p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("agent-"))
                {
                    out.push_str(&strip_ansi(
                        &std::fs::read_to_string(&p).unwrap_or_default(),
                    ));
                }
            }
        }
        out
    }

    /// The coordinator's log.
    pub fn coordinator_log(&self) -> String {
        strip_ansi(
            &std::fs::read_to_string(self.state_dir.join("logs").join("coordinator.log"))
                .unwrap_or_default(),
        )
    }

    /// Runs `ip -n HOST ARGS` (inside the host's network namespace).
    pub fn ip_in_host(&self, host_id: &str, args: &[&str]) -> Output {
        run(Command::new("ip").arg("-n").arg(host_id).args(args))
    }

    /// Whether the host still exists on this machine (its namespace).
    pub fn host_exists(&self, host_id: &str) -> bool {
        Path::new("/run/netns").join(host_id).exists()
    }

    pub fn ready_hosts(&self) -> Vec<pb::Host> {
        self.hosts()
            .into_iter()
            .filter(|h| {
                h.state == pb::HostState::Ready as i32 && h.connected && h.lease_id.is_empty()
            })
            .collect()
    }

    pub fn wait_ready_hosts(&mut self, n: usize, timeout: Duration) -> Vec<pb::Host> {
        let what = format!("{n} ready hosts");
        wait_for(&what, timeout, || {
            self.assert_running();
            let ready = self.ready_hosts();
            (ready.len() >= n).then_some(ready)
        })
    }

    /// The dockerd socket of a host of this pool, for looking behind the front.
    pub fn docker_socket(&self, host_id: &str) -> PathBuf {
        self.run_dir.join(host_id).join("docker.sock")
    }

    /// The stock docker CLI on a host's dockerd socket, behind the front.
    pub fn docker_behind_front(&self, host_id: &str) -> Command {
        docker_cli(&format!("unix://{}", self.docker_socket(host_id).display()))
    }

    /// Stops the pool the way an operator would (SIGTERM, like Ctrl-C) and
    /// returns `berth up`'s exit status, or None if it had to be killed.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = Pid::from_raw(i32::try_from(child.id()).ok()?);
        self.pgid = Some(pid);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => break,
            }
        }
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
        // Whatever is left of the process tree goes now, then the sweep.
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        sweep(&self.prefix);
        // A test that passed leaves no files behind either; a failing one
        // keeps its directories (`up.log`, the daemons' logs) for whoever
        // reads the failure, until the next run with its prefix.
        remove_dirs_if_passed(&[&self.state_dir, &self.run_dir]);
    }
}

/// What a guard does last: unless its thread is panicking (a failing
/// test keeps its files, the daemons' logs among them, for whoever reads
/// the failure), removes each of `dirs` and everything in it, unless
/// something is still mounted under it (removing would reach into the
/// mounted file system): then it stays for the next run's sweep.
pub fn remove_dirs_if_passed(dirs: &[&Path]) {
    if std::thread::panicking() {
        return;
    }
    for dir in dirs {
        remove_unmounted(dir);
    }
}

fn remove_unmounted(dir: &Path) {
    let mounted = mounts_under(dir);
    if !mounted.is_empty() {
        eprintln!(
            "leaving {}: still mounted under it: {mounted:?}",
            dir.display()
        );
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("removing {}: {e}", dir.display());
    }
}

/// A process stopped with SIGSTOP (e.g. `berth up`, so it does not restart
/// a coordinator or agent a test killed), resumed when dropped, so a
/// failing test never leaves it frozen.
pub struct Frozen(pub Pid);

impl Frozen {
    /// Stops `pid` until the guard is dropped.
    pub fn stop(pid: Pid) -> Self {
        kill(pid, Signal::SIGSTOP).unwrap();
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// Log text without terminal colour codes (`ESC [ ... m`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `msg` as a request carrying a tenant token.
pub fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// Network namespaces whose names start with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let o = run(Command::new("ip").args(["netns", "list"]));
    stdout(&o)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

fn process_ids_mentioning(needle: &str) -> Vec<i32> {
    processes_mentioning(needle)
        .iter()
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect()
}

/// Processes whose command line mentions `needle`, as "PID: CMDLINE".
/// The parent of process `pid`, per `/proc/PID/stat`.
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    let me = std::process::id().to_string();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) || name == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if mentions(&cmd, needle) {
                found.push(format!("{name}: {cmd}"));
            }
        }
    }
    found
}

/// Whether `text` names `needle` as a whole: followed by the end, a
/// separator or (for a directory) a path below it, not by more of a name.
/// Tests run side by side, and one test's directory (`/tmp/berth-t/bcl`)
/// is a string prefix of another's (`/tmp/berth-t/bcl1`): a sweep or a
/// leak check must not take the other's processes for its own.
pub fn mentions(text: &str, needle: &str) -> bool {
    text.match_indices(needle).any(|(at, _)| {
        needle.ends_with('/')
            || text[at + needle.len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    })
}

/// Mount points at or under `root`.
pub fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    let below = format!("{}/", root.trim_end_matches('/'));
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| *m == root || m.starts_with(&below))
        .map(str::to_owned)
        .collect()
}

/// cgroup directories of hosts whose ids start with `prefix`, in every
/// hierarchy under /sys/fs/cgroup: dockerd puts a host's containers under
/// the cgroup parent `berth-HOST_ID`.
pub fn cgroups_with_prefix(prefix: &str) -> Vec<PathBuf> {
    let wanted = format!("berth-{prefix}");
    let mut found = Vec::new();
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return found;
    };
    for h in hierarchies.flatten() {
        let Ok(children) = std::fs::read_dir(h.path()) else {
            continue;
        };
        for c in children.flatten() {
            if c.file_name().to_string_lossy().starts_with(&wanted) {
                found.push(c.path());
            }
        }
    }
    found
}

/// Whether a network interface of this name exists in the machine's
/// namespace (e.g. the root-side end of a host's veth pair).
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// TCP listeners inside a network namespace, as `ss -Htlnp` run in it
/// reports them (one line per socket, with the owning process).
pub fn tcp_listeners_in_netns(netns: &str) -> Vec<String> {
    let o = ok(
        run(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["--", "ss", "-Htlnp"])),
        "ss in the host's namespace",
    );
    stdout(&o).lines().map(str::to_owned).collect()
}

/// `curl` against a host's Docker front; returns (success, stdout+stderr).
pub fn curl(args: &[&str]) -> (bool, String) {
    let o = run(Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args));
    (o.status.success(), format!("{}{}", stdout(&o), stderr(&o)))
}

#[cfg(test)]
mod tests {
    use super::{front_addr, mentions};

    #[test]
    fn a_directory_is_mentioned_only_as_a_whole_name() {
        let cmd = "berth up --state-dir /tmp/berth-t/bcl1 --run-dir /run/berth-t/bcl1/x";
        assert!(mentions(cmd, "/tmp/berth-t/bcl1"));
        assert!(mentions(cmd, "/run/berth-t/bcl1"));
        assert!(!mentions(cmd, "/tmp/berth-t/bcl"));
        assert!(!mentions(cmd, "/run/berth-t/bcl"));
        assert!(mentions(
            "dockerd --data-root=/run/berth-t/bfc1/h/docker",
            "/run/berth-t/bfc1"
        ));
        assert!(!mentions(
            "dockerd --data-root=/run/berth-t/bfc1p/h",
            "/run/berth-t/bfc1"
        ));
        assert!(mentions("x /run/berth-t/bfc1/", "/run/berth-t/bfc1/"));
        assert!(mentions("x /run/berth-t/bfc1/h", "/run/berth-t/bfc1/"));
    }

    #[test]
    fn front_addr_reads_only_tcp_docker_hosts_with_a_port() {
        assert_eq!(
            front_addr("tcp://198.18.0.2:2376"),
            Some("198.18.0.2:2376".parse().unwrap())
        );
        assert_eq!(
            front_addr("tcp://[::1]:2376"),
            Some("[::1]:2376".parse().unwrap())
        );
        assert_eq!(front_addr("unix:///run/docker.sock"), None);
        assert_eq!(front_addr("tcp://198.18.0.2"), None);
        assert_eq!(front_addr("198.18.0.2:2376"), None);
    }
}
