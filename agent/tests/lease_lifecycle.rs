//! One host's whole life against the real dockerd: the `berth-agent` binary
//! boots a host in its own network namespace, registers with an in-process
//! fake coordinator (the generated `AgentService` server trait on
//! 127.0.0.1:0, over TLS, checking the join token and signing the agent's
//! CSR with a test CA), takes a lease, serves the stock docker CLI through
//! its mutual-TLS front (a lease certificate signed by the same CA), is
//! released, wipes and verifies, and destroys itself, leaving nothing behind.
//! A dockerd that listens on TCP is refused before the host registers.
//!
//! Needs root, dockerd, the docker CLI, iproute2, nsenter and a static
//! busybox. Without them it fails when `CI=true` and skips otherwise.

// Helpers outside `#[test]` fns: a panic there is a test failure, as intended.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use berth_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use berth_proto::v1::{
    AgentMessage, AssignLease, CoordinatorMessage, EndLease, EndReason, HostState, Register,
    Registered, WipeReport, agent_message::Msg, coordinator_message,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const FRONT_PORT: u16 = 2376;
/// Bounds for each step; generous for a loaded 2-core CI machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);
const DOCKER_CLI_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(90);
const HEARTBEAT_MS: u32 = 200;

// ---------------------------------------------------------------------------
// Fake coordinator

/// The sending half of the coordinator's response stream.
type ToAgent = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// Records every agent message and lets the test push coordinator messages
/// into the current stream. Admits only the join token; signs the agent's
/// CSR like the real coordinator.
#[derive(Clone)]
struct FakeCoordinator {
    seen: Arc<Mutex<Option<mpsc::UnboundedSender<AgentMessage>>>>,
    current: Arc<Mutex<Option<ToAgent>>>,
    ca: Arc<berth_tls::Ca>,
    join_token: String,
}

impl Default for FakeCoordinator {
    fn default() -> Self {
        let (ca, _) = berth_tls::Ca::generate("test pool CA").unwrap();
        FakeCoordinator {
            seen: Arc::default(),
            current: Arc::default(),
            ca: Arc::new(ca),
            join_token: berth_tls::token::generate(),
        }
    }
}

#[tonic::async_trait]
impl AgentService for FakeCoordinator {
    type ConnectStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let expected = format!("Bearer {}", self.join_token);
        let presented = request.metadata().get("authorization");
        if presented.and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return Err(Status::unauthenticated("invalid pool join token"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        *self.current.lock().unwrap() = Some(tx.clone());
        let seen = self.seen.lock().unwrap().clone();
        let ca = self.ca.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                if let Some(Msg::Register(r)) = &msg.msg {
                    let addr = r.host_addr.parse().unwrap();
                    let cert = ca
                        .sign_host(&r.csr_pem, &r.host_id, addr, SystemTime::now())
                        .unwrap();
                    let registered = Registered {
                        heartbeat_interval_ms: HEARTBEAT_MS,
                        server_cert_pem: cert,
                        ca_pem: ca.cert_pem().to_owned(),
                    };
                    let reply = CoordinatorMessage {
                        msg: Some(coordinator_message::Msg::Registered(registered)),
                    };
                    let _ = tx.send(Ok(reply)).await;
                }
                if let Some(seen) = &seen {
                    let _ = seen.send(msg);
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl FakeCoordinator {
    async fn send(&self, msg: coordinator_message::Msg) {
        let tx = self
            .current
            .lock()
            .unwrap()
            .clone()
            .expect("agent connected");
        tx.send(Ok(CoordinatorMessage { msg: Some(msg) }))
            .await
            .expect("stream open");
    }

    /// Writes the coordinator's CA and the join token where the agent reads
    /// them; returns the agent's flags for them.
    fn agent_credentials(&self, dir: &Path) -> Vec<String> {
        std::fs::create_dir_all(dir).unwrap();
        let (ca, token) = (dir.join("coordinator-ca.pem"), dir.join("join-token"));
        std::fs::write(&ca, self.ca.cert_pem()).unwrap();
        std::fs::write(&token, &self.join_token).unwrap();
        vec![
            "--ca".into(),
            ca.display().to_string(),
            "--join-token-file".into(),
            token.display().to_string(),
        ]
    }

    /// A lease certificate like `berth acquire` writes: the key made here,
    /// the certificate signed by the pool CA for `lease_id`.
    fn lease_client(&self, dir: &Path, docker_host: &str, lease_id: &str) -> Client {
        let cert_dir = dir.join(format!("certs-{lease_id}"));
        std::fs::create_dir_all(&cert_dir).unwrap();
        let k = berth_tls::KeyAndCsr::generate("ci").unwrap();
        let now = SystemTime::now();
        let cert = self
            .ca
            .sign_lease(&k.csr_pem, lease_id, now, now + Duration::from_secs(3600))
            .unwrap();
        std::fs::write(cert_dir.join("ca.pem"), self.ca.cert_pem()).unwrap();
        std::fs::write(cert_dir.join("cert.pem"), cert).unwrap();
        std::fs::write(cert_dir.join("key.pem"), k.key_pem).unwrap();
        Client {
            docker_host: docker_host.to_owned(),
            cert_dir,
        }
    }
}

/// The docker CLI's view of one lease: where and with which certificate.
struct Client {
    docker_host: String,
    cert_dir: PathBuf,
}

impl Client {
    fn command(&self) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", &self.docker_host)
            .env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", &self.cert_dir)
            .env("DOCKER_BUILDKIT", "0")
            .env_remove("DOCKER_CONTEXT");
        c
    }
}

/// Starts the fake on 127.0.0.1:0; returns its URL and the message feed.
async fn start_coordinator(
    fake: FakeCoordinator,
) -> (String, mpsc::UnboundedReceiver<AgentMessage>) {
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    *fake.seen.lock().unwrap() = Some(seen_tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cert, key) = fake.ca.issue_server(&["127.0.0.1".into()]).unwrap();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key));
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AgentServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (format!("https://{addr}"), seen_rx)
}

/// The next message that is not a heartbeat.
async fn next_message(rx: &mut mpsc::UnboundedReceiver<AgentMessage>) -> Msg {
    loop {
        let m = tokio::time::timeout(MESSAGE_TIMEOUT, rx.recv())
            .await
            .expect("agent message within timeout")
            .expect("coordinator feed open");
        match m.msg {
            Some(Msg::Heartbeat(_)) | None => continue,
            Some(msg) => return msg,
        }
    }
}

fn state_of(msg: &Msg) -> Option<HostState> {
    match msg {
        Msg::StateChanged(s) => HostState::try_from(s.state).ok(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Environment, clean-up guard and observations of the machine

/// Why this machine cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if uid != 0 {
        return Some(format!("needs root (uid is {uid})"));
    }
    for tool in ["dockerd", "docker", "ip", "nsenter"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!("needs `{tool}` in PATH"));
        }
    }
    if busybox().is_none() {
        return Some("needs a static busybox at /bin/busybox (Debian's busybox-static)".into());
    }
    None
}

fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Sweeps the test's prefix and removes its directories when dropped, so a
/// failing assertion leaves nothing behind either.
struct Guard {
    base: PathBuf,
    prefix: String,
}

impl Guard {
    /// Temp dirs for `prefix`, after sweeping whatever earlier, killed runs
    /// of the same test left.
    fn new(base_prefix: &'static str) -> Self {
        // BERTH_TEST_TAG keeps two checkouts running these tests at once
        // from sweeping each other's hosts.
        let tag = std::env::var("BERTH_TEST_TAG").unwrap_or_default();
        assert!(
            tag.len() <= 4
                && tag
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "BERTH_TEST_TAG must be at most 4 lowercase letters or digits"
        );
        let prefix = format!("{tag}{base_prefix}");
        let base = PathBuf::from(format!("/tmp/{prefix}{}", std::process::id()));
        let guard = Guard { base, prefix };
        guard.sweep();
        std::fs::create_dir_all(guard.base.join("ctx")).unwrap();
        guard
    }
    fn state(&self) -> PathBuf {
        self.base.join("state")
    }
    fn run(&self) -> PathBuf {
        self.base.join("run")
    }
    fn sweep(&self) -> berth_agent::CleanupReport {
        let (state, run, prefix) = (self.state(), self.run(), self.prefix.clone());
        // Its own thread and runtime: Drop may run inside or outside a runtime.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(berth_agent::sweep(&state, &run, &prefix))
        })
        .join()
        .expect("sweep thread")
        .expect("sweep")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let report = self.sweep();
        if report != berth_agent::CleanupReport::default() {
            eprintln!("guard swept leftovers: {report:?}");
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn cgroups_with_prefix(prefix: &str) -> Vec<PathBuf> {
    let mut found = vec![];
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for c in std::fs::read_dir(h.path()).into_iter().flatten().flatten() {
            if c.file_name()
                .to_string_lossy()
                .starts_with(&format!("berth-{prefix}"))
            {
                found.push(c.path());
            }
        }
    }
    found
}

fn mounts_under(base: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let base = base.to_string_lossy().into_owned();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&base))
        .map(String::from)
        .collect()
}

fn processes_mentioning(base: &Path) -> Vec<String> {
    let base = base.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        // The agent itself mentions the base in its flags; it is checked on its own.
        if cmdline.contains(&base) && !comm.starts_with("berth-agent") {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

/// The mount namespace of process `pid` (`self` for this one), as its
/// `mnt:[INODE]` link; empty if the process is gone.
fn mount_ns(pid: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .map(|l| l.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Runs the docker CLI against the host's front.
async fn docker(client: &Client, args: &[&str]) -> Result<String, String> {
    let child = client
        .command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawning docker: {e}"))?;
    let out = tokio::time::timeout(DOCKER_CLI_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("docker {args:?} timed out"))?
        .map_err(|e| format!("docker {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

// ---------------------------------------------------------------------------

/// The agent under test: its process, and its stdout after the READY line.
struct Agent {
    child: tokio::process::Child,
    ready: String,
    boot_time: Duration,
}

/// Starts the binary for `guard`'s prefix and dirs and waits for READY.
async fn start_agent(
    guard: &Guard,
    fake: &FakeCoordinator,
    coordinator: &str,
    extra: &[&str],
) -> Agent {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
        .args(["--coordinator", coordinator, "--prefix", &guard.prefix])
        .args(fake.agent_credentials(&guard.base.join("creds")))
        .args(["--front-port", &FRONT_PORT.to_string()])
        .arg("--state-dir")
        .arg(guard.state())
        .arg("--run-dir")
        .arg(guard.run())
        .args(extra)
        .env("RUST_LOG", "info,berth_agent=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start berth-agent");
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(BOOT_TIMEOUT, lines.next_line())
        .await
        .expect("READY within the boot timeout")
        .expect("read stdout")
        .expect("a READY line");
    let boot_time = started.elapsed();
    eprintln!("[{}] boot to READY: {boot_time:?}: {ready}", &guard.prefix);
    Agent {
        child,
        ready,
        boot_time,
    }
}

/// Waits for the first Register and checks it against the READY line.
async fn expect_register(
    seen: &mut mpsc::UnboundedReceiver<AgentMessage>,
    agent: &Agent,
    prefix: &str,
) -> (Register, SocketAddr) {
    let Msg::Register(register) = next_message(seen).await else {
        panic!("first message must be Register")
    };
    let host_addr: IpAddr = register.host_addr.parse().expect("host address");
    let IpAddr::V4(v4) = host_addr else {
        panic!("IPv4 host address expected")
    };
    // 198.18.0.0/15: blocks from 16384 on are in 198.19.x.x.
    assert!(
        v4.octets()[0] == 198 && v4.octets()[1] & 0xfe == 18,
        "address in 198.18.0.0/15 expected, got {v4}"
    );
    assert!(register.host_id.starts_with(prefix), "{}", register.host_id);
    assert_eq!(
        agent.ready,
        format!(
            "READY host_id={} host_addr={} docker_host={} status=http://{}:{}",
            register.host_id,
            register.host_addr,
            register.docker_host,
            register.host_addr,
            berth_agent::ops::status::DEFAULT_STATUS_PORT
        )
    );
    assert_eq!(
        register.docker_host,
        format!("tcp://{host_addr}:{FRONT_PORT}")
    );
    assert_eq!(register.provider, "local");
    assert_eq!(HostState::try_from(register.state), Ok(HostState::Ready));
    assert!(register.lease_id.is_empty());
    assert!(!register.docker_version.is_empty());
    let resources = register.resources.expect("resources");
    assert!(resources.cpus >= 1 && resources.memory_bytes > 0 && resources.disk_bytes > 0);
    (register, SocketAddr::new(host_addr, FRONT_PORT))
}

async fn assign(fake: &FakeCoordinator, lease_id: &str, ttl: Duration) {
    let deadline = berth_proto::from_system_time(SystemTime::now() + ttl);
    fake.send(coordinator_message::Msg::AssignLease(AssignLease {
        lease_id: lease_id.into(),
        build_id: format!("build-of-{lease_id}"),
        deadline: Some(deadline),
    }))
    .await;
}

async fn expect_accepted(seen: &mut mpsc::UnboundedReceiver<AgentMessage>, lease_id: &str) {
    let m = next_message(seen).await;
    assert_eq!(state_of(&m), Some(HostState::Leased), "{m:?}");
    let m = next_message(seen).await;
    assert!(
        matches!(&m, Msg::LeaseAccepted(a) if a.lease_id == lease_id),
        "{m:?}"
    );
}

async fn expect_state(seen: &mut mpsc::UnboundedReceiver<AgentMessage>, state: HostState) {
    let m = next_message(seen).await;
    assert_eq!(state_of(&m), Some(state), "{m:?}");
}

async fn expect_wipe_report(
    seen: &mut mpsc::UnboundedReceiver<AgentMessage>,
    lease_id: &str,
) -> WipeReport {
    let m = next_message(seen).await;
    let Msg::WipeReport(report) = m else {
        panic!("WipeReport expected, got {m:?}")
    };
    eprintln!("wipe report: {report:?}");
    assert_eq!(report.lease_id, lease_id);
    assert!(report.verified, "{report:?}");
    assert!(report.error.is_empty(), "{report:?}");
    assert_eq!(
        (
            report.containers_left,
            report.images_left,
            report.volumes_left,
            report.networks_left,
            report.build_cache_left
        ),
        (0, 0, 0, 0, 0)
    );
    report
}

/// The front must refuse (RST), not time out: the namespace is still there.
async fn assert_front_refuses(front: SocketAddr) {
    let refused = tokio::net::TcpStream::connect(front)
        .await
        .expect_err("front must refuse without a lease");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
}

/// Waits for the agent to exit 0 and checks that nothing of the host is left.
async fn assert_clean_exit(guard: &Guard, mut agent: Agent, register: &Register) {
    let waiting = Instant::now();
    let status = tokio::time::timeout(EXIT_TIMEOUT, agent.child.wait())
        .await
        .expect("agent exits")
        .expect("wait");
    eprintln!(
        "[{}] Terminating -> exit: {:?}",
        &guard.prefix,
        waiting.elapsed()
    );
    assert!(status.success(), "agent exit status {status}");

    let block = register
        .host_id
        .trim_start_matches(&guard.prefix)
        .to_owned();
    assert_eq!(
        netns_with_prefix(&guard.prefix),
        Vec::<String>::new(),
        "network namespaces left"
    );
    assert!(!link_exists(&format!("bb{block}")), "veth left");
    assert_eq!(
        processes_mentioning(&guard.base),
        Vec::<String>::new(),
        "processes left"
    );
    assert_eq!(
        mounts_under(&guard.base),
        Vec::<String>::new(),
        "mounts left"
    );
    assert_eq!(
        cgroups_with_prefix(&guard.prefix),
        Vec::<PathBuf>::new(),
        "cgroups left"
    );
    assert!(
        !guard.state().join(&register.host_id).exists(),
        "host state dir left"
    );
    assert!(
        !guard.run().join(&register.host_id).exists(),
        "host run dir left"
    );
    // And the sweep finds nothing to do.
    assert_eq!(guard.sweep(), berth_agent::CleanupReport::default());
}

/// Builds a busybox image FROM scratch through the front (legacy builder:
/// there is no buildx here).
async fn build_busybox_image(guard: &Guard, client: &Client, tag: &str) {
    let ctx = guard.base.join("ctx");
    std::fs::copy(busybox().unwrap(), ctx.join("busybox")).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )
    .unwrap();
    let ctx = ctx.to_string_lossy().into_owned();
    docker(client, &["build", "-q", "-t", tag, &ctx])
        .await
        .expect("docker build");
}

/// Whether this machine can run these tests; panics under CI if not.
fn can_run() -> bool {
    match missing_prerequisite() {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("cannot run the agent integration tests: {why}")
        }
        Some(why) => {
            eprintln!("skipping the agent integration test: {why}");
            false
        }
    }
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_serves_one_lease_then_wipes_and_destroys_itself() {
    if !can_run() {
        return;
    }
    let guard = Guard::new("bta-");
    let fake = FakeCoordinator::default();
    let (url, mut seen) = start_coordinator(fake.clone()).await;
    let agent = start_agent(&guard, &fake, &url, &[]).await;
    assert!(agent.boot_time < BOOT_TIMEOUT);
    let (register, front) = expect_register(&mut seen, &agent, &guard.prefix).await;
    let docker_host = register.docker_host.clone();

    // A heartbeat at the negotiated interval.
    let hb = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(AgentMessage {
                msg: Some(Msg::Heartbeat(h)),
            }) = seen.recv().await
            {
                return h;
            }
        }
    })
    .await
    .expect("a heartbeat");
    assert_eq!(HostState::try_from(hb.state), Ok(HostState::Ready));

    // No lease, no front.
    assert_front_refuses(front).await;

    assign(&fake, "lease-1", Duration::from_secs(600)).await;
    expect_accepted(&mut seen, "lease-1").await;
    let client = fake.lease_client(&guard.base, &docker_host, "lease-1");

    // The stock CLI through the front.
    let version = docker(&client, &["version", "--format", "{{.Server.Version}}"])
        .await
        .expect("docker version");
    assert_eq!(version, register.docker_version);
    build_busybox_image(&guard, &client, "bta-busybox").await;
    docker(&client, &["volume", "create", "bta-vol"])
        .await
        .expect("volume create");
    docker(&client, &["network", "create", "bta-net"])
        .await
        .expect("network create");
    let loop_cmd = "while true; do echo tick; sleep 1; done";
    docker(
        &client,
        &[
            "run",
            "-d",
            "--name",
            "bta-c1",
            "--network",
            "bta-net",
            "-v",
            "bta-vol:/data",
            "bta-busybox",
            "sh",
            "-c",
            loop_cmd,
        ],
    )
    .await
    .expect("docker run");
    docker(
        &client,
        &["create", "--name", "bta-c2", "bta-busybox", "true"],
    )
    .await
    .expect("docker create");

    // A streaming connection that the end of the lease must cut.
    let mut follow = client
        .command()
        .args(["logs", "-f", "bta-c1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("docker logs -f");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        follow.try_wait().unwrap().is_none(),
        "docker logs -f should still be streaming"
    );

    fake.send(coordinator_message::Msg::EndLease(EndLease {
        lease_id: "lease-1".into(),
        reason: EndReason::Released as i32,
    }))
    .await;
    expect_state(&mut seen, HostState::Wiping).await;
    // The front is closed before Wiping is reported.
    assert_front_refuses(front).await;
    let cut = tokio::time::timeout(Duration::from_secs(10), follow.wait()).await;
    assert!(
        cut.is_ok(),
        "docker logs -f must be cut when the lease ends"
    );

    let report = expect_wipe_report(&mut seen, "lease-1").await;
    assert_eq!(report.containers_removed, 2, "{report:?}");
    assert!(report.images_removed >= 1, "{report:?}");
    assert!(report.volumes_removed >= 1, "{report:?}");
    assert_eq!(report.networks_removed, 1, "{report:?}");
    expect_state(&mut seen, HostState::Terminating).await;

    assert_clean_exit(&guard, agent, &register).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycled_host_expires_a_lease_serves_another_and_cleans_up_on_sigterm() {
    if !can_run() {
        return;
    }
    let guard = Guard::new("btr-");
    let fake = FakeCoordinator::default();
    let (url, mut seen) = start_coordinator(fake.clone()).await;
    let agent = start_agent(&guard, &fake, &url, &["--recycle"]).await;
    let (register, front) = expect_register(&mut seen, &agent, &guard.prefix).await;
    let docker_host = register.docker_host.clone();

    // A short lease that nobody ends: the agent's own clock does.
    assign(&fake, "lease-1", Duration::from_secs(5)).await;
    expect_accepted(&mut seen, "lease-1").await;
    let client = fake.lease_client(&guard.base, &docker_host, "lease-1");
    docker(&client, &["volume", "create", "btr-vol"])
        .await
        .expect("volume create");
    let m = next_message(&mut seen).await;
    assert!(
        matches!(&m, Msg::LeaseEnded(e) if e.lease_id == "lease-1" && e.reason == EndReason::Expired as i32),
        "{m:?}"
    );
    expect_state(&mut seen, HostState::Wiping).await;
    let report = expect_wipe_report(&mut seen, "lease-1").await;
    assert_eq!(report.volumes_removed, 1, "{report:?}");
    // Recycle mode: a verified wipe makes the host Ready again.
    expect_state(&mut seen, HostState::Ready).await;
    assert_front_refuses(front).await;

    // The next lease rebinds the front at once and finds a clean host.
    assign(&fake, "lease-2", Duration::from_secs(600)).await;
    expect_accepted(&mut seen, "lease-2").await;
    // The ended lease's certificate no longer opens the front; the new one does.
    let refused = docker(&client, &["version"]).await;
    assert!(
        refused.is_err(),
        "lease-1's certificate opened lease-2's front"
    );
    let client = fake.lease_client(&guard.base, &docker_host, "lease-2");
    let volumes = docker(&client, &["volume", "ls", "-q"])
        .await
        .expect("volume ls");
    assert_eq!(volumes, "", "the previous lease's volume must be gone");

    // SIGTERM while leased: the front closes, the host is destroyed, exit 0.
    let pid = agent.child.id().expect("agent running");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    expect_state(&mut seen, HostState::Terminating).await;
    assert_clean_exit(&guard, agent, &register).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_removes_what_a_killed_agent_left() {
    if !can_run() {
        return;
    }
    let guard = Guard::new("bts-");
    let fake = FakeCoordinator::default();
    let (url, mut seen) = start_coordinator(fake.clone()).await;
    let mut agent = start_agent(&guard, &fake, &url, &[]).await;
    let (register, _front) = expect_register(&mut seen, &agent, &guard.prefix).await;
    let docker_host = register.docker_host.clone();
    assign(&fake, "lease-1", Duration::from_secs(600)).await;
    expect_accepted(&mut seen, "lease-1").await;
    let client = fake.lease_client(&guard.base, &docker_host, "lease-1");
    build_busybox_image(&guard, &client, "bts-busybox").await;
    // A running container (shim, container cgroup, overlay mount) with a
    // published port (docker-proxy inside the namespace).
    docker(
        &client,
        &[
            "run",
            "-d",
            "-p",
            "18080:8080",
            "bts-busybox",
            "sleep",
            "600",
        ],
    )
    .await
    .expect("docker run");

    // The agent dies without cleaning up.
    agent.child.start_kill().expect("SIGKILL the agent");
    let _ = tokio::time::timeout(EXIT_TIMEOUT, agent.child.wait())
        .await
        .expect("agent dies");
    assert_eq!(
        netns_with_prefix(&guard.prefix),
        vec![register.host_id.clone()],
        "a namespace is left"
    );
    let left = processes_mentioning(&guard.base);
    assert!(!left.is_empty(), "dockerd and friends are left");
    // dockerd runs in a mount namespace of its own: its mounts (the
    // container's overlay, its namespace handle) are left inside it, never
    // on the machine; the namespace lives as long as a process in it.
    let mine = mount_ns("self");
    let theirs: std::collections::BTreeSet<String> = left
        .iter()
        .filter_map(|p| p.split(':').next())
        .map(mount_ns)
        .filter(|ns| !ns.is_empty() && *ns != mine)
        .collect();
    assert!(
        !theirs.is_empty(),
        "dockerd shares the machine's mount namespace: {left:#?}"
    );
    assert_eq!(
        mounts_under(&guard.base),
        Vec::<String>::new(),
        "dockerd's mounts are visible on the machine"
    );
    assert!(
        !cgroups_with_prefix(&guard.prefix).is_empty(),
        "cgroups are left"
    );

    let report = guard.sweep();
    eprintln!("sweep after a killed agent: {report:?}");
    assert!(
        report.killed >= 3,
        "dockerd, containerd, the shim at least: {report:?}"
    );
    assert!(report.cgroups_removed >= 1, "{report:?}");
    assert_eq!(report.netns_deleted, 1, "{report:?}");
    assert_eq!(report.dirs_removed, 2, "{report:?}");

    let block = register
        .host_id
        .trim_start_matches(&guard.prefix)
        .to_owned();
    assert_eq!(
        netns_with_prefix(&guard.prefix),
        Vec::<String>::new(),
        "network namespaces left"
    );
    assert!(!link_exists(&format!("bb{block}")), "veth left");
    assert_eq!(
        processes_mentioning(&guard.base),
        Vec::<String>::new(),
        "processes left"
    );
    assert_eq!(
        mounts_under(&guard.base),
        Vec::<String>::new(),
        "mounts left"
    );
    // No process is left in dockerd's mount namespace, so it is gone, and
    // every mount inside it with it.
    let in_theirs: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| theirs.contains(&mount_ns(pid)))
        .collect();
    assert_eq!(
        in_theirs,
        Vec::<String>::new(),
        "processes left in dockerd's mount namespace"
    );
    assert_eq!(
        cgroups_with_prefix(&guard.prefix),
        Vec::<PathBuf>::new(),
        "cgroups left"
    );
    assert_eq!(
        guard.sweep(),
        berth_agent::CleanupReport::default(),
        "a second sweep finds nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerd_listening_on_tcp_is_refused_before_the_host_registers() {
    if !can_run() {
        return;
    }
    let guard = Guard::new("btt-");
    let fake = FakeCoordinator::default();
    let (url, mut seen) = start_coordinator(fake.clone()).await;
    // A dockerd that someone configured with an extra TCP host.
    let wrapper = guard.base.join("dockerd-with-tcp");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nexec dockerd \"$@\" --host=tcp://0.0.0.0:23750\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
        .args(["--coordinator", &url, "--prefix", &guard.prefix])
        .args(fake.agent_credentials(&guard.base.join("creds")))
        .arg("--dockerd")
        .arg(&wrapper)
        .arg("--state-dir")
        .arg(guard.state())
        .arg("--run-dir")
        .arg(guard.run())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start berth-agent");
    let out = tokio::time::timeout(BOOT_TIMEOUT + EXIT_TIMEOUT, child.wait_with_output())
        .await
        .expect("the agent gives up")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "agent exited 0; stderr:\n{stderr}");
    assert!(!stdout.contains("READY"), "the host went Ready: {stdout}");
    assert!(
        stderr.contains("listens on TCP") && stderr.contains(":23750"),
        "{stderr}"
    );
    // Never registered, so never offered to a build.
    assert!(
        seen.try_recv().is_err(),
        "the coordinator heard from the host"
    );
    // And the refused host was destroyed like any other.
    assert_eq!(netns_with_prefix(&guard.prefix), Vec::<String>::new());
    assert_eq!(processes_mentioning(&guard.base), Vec::<String>::new());
    assert_eq!(mounts_under(&guard.base), Vec::<String>::new());
}
