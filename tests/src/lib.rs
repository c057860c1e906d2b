//! Support for berth's end-to-end tests: a `berth up` pool started as a real
//! process tree (coordinator, agents, dockerds in network namespaces), the
//! stock `docker` CLI pointed at a lease, and guards that stop and sweep
//! everything a test started, also when it fails.
//!
//! The binaries under test are built by `cargo build` from the test itself,
//! so a test never runs stale code. Tests need root, dockerd, the docker CLI,
//! busybox-static, iproute2 and nsenter; when one is missing they fail with a
//! message naming it (set `BERTH_SKIP_E2E=1` to skip them deliberately).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bench;

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
    for tool in ["dockerd", "docker", "ip", "nsenter"] {
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

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The directory holding the workspace's binaries, built on first use.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--bins",
                "-p",
                "berth-agent",
                "-p",
                "berth-coordinator",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cannot run cargo to build the berth binaries");
        assert!(status.success(), "building the berth binaries failed");
        // This test binary lives in target/<profile>/deps.
        let exe = std::env::current_exe().unwrap();
        exe.parent().and_then(Path::parent).unwrap().to_owned()
    })
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.is_file(), "{} is missing after cargo build", p.display());
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
}

fn dirs(prefix: &str) -> (PathBuf, PathBuf) {
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

    /// The stock docker CLI, pointed at this lease's host.
    pub fn docker(&self) -> Command {
        docker_cli(self.docker_host())
    }
}

/// The stock docker CLI with a clean config, pointed at `docker_host`.
pub fn docker_cli(docker_host: &str) -> Command {
    let mut c = Command::new("docker");
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

/// A pool started with `berth up` for one test. Dropping it stops the pool
/// with SIGTERM (agents clean up), kills whatever is left of its process
/// group, and sweeps the test's prefix.
pub struct Pool {
    pub prefix: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub addr: SocketAddr,
    child: Option<Child>,
    pgid: Option<Pid>,
    rt: tokio::runtime::Runtime,
}

impl Pool {
    /// Starts `berth up --hosts N` with this test's own prefix and waits
    /// until N hosts are Ready.
    pub fn start(base_prefix: &str, hosts: u16, extra: &[&str]) -> Self {
        let prefix = &test_prefix(base_prefix);
        sweep(prefix);
        let (state_dir, run_dir) = dirs(prefix);
        // Start from nothing: a stale coordinator.addr would point at a
        // coordinator of an earlier run.
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir).unwrap();
        let log = std::fs::File::create(state_dir.join("up.log")).unwrap();
        let child = Command::new(bin("berth"))
            .arg("up")
            .arg("--hosts")
            .arg(hosts.to_string())
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--prefix")
            .arg(prefix)
            .arg("--listen")
            .arg("127.0.0.1:0")
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
        };
        pool.addr = wait_for("the coordinator address", Duration::from_secs(60), || {
            pool.assert_running();
            std::fs::read_to_string(&addr_file)
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        pool.wait_ready_hosts(usize::from(hosts), Duration::from_secs(60));
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

    /// Runs the `berth` CLI against this pool.
    pub fn berth(&self, args: &[&str]) -> Output {
        run(Command::new(bin("berth"))
            .arg("--coordinator")
            .arg(self.addr.to_string())
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

    fn channel(&self) -> tonic::transport::Channel {
        let url = format!("http://{}", self.addr);
        self.rt
            .block_on(
                tonic::transport::Endpoint::from_shared(url)
                    .unwrap()
                    .connect(),
            )
            .expect("cannot reach the coordinator")
    }

    pub fn hosts(&self) -> Vec<pb::Host> {
        let ch = self.channel();
        self.rt
            .block_on(AdminServiceClient::new(ch).list_hosts(pb::ListHostsRequest {}))
            .unwrap()
            .into_inner()
            .hosts
    }

    pub fn lease(&self, lease_id: &str) -> pb::Lease {
        let ch = self.channel();
        self.rt
            .block_on(LeaseServiceClient::new(ch).get(pb::GetRequest {
                lease_id: lease_id.to_owned(),
            }))
            .unwrap()
            .into_inner()
            .lease
            .unwrap()
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
    }
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
            if cmd.contains(needle) {
                found.push(format!("{name}: {cmd}"));
            }
        }
    }
    found
}

/// Mount points under `root`.
pub fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&root))
        .map(str::to_owned)
        .collect()
}
