//! One host's whole life against the real dockerd: the `berth-agent` binary
//! boots a host in its own network namespace, registers with the test
//! kit's in-process fake coordinator (over TLS, checking the join token and
//! signing the agent's CSR with a test CA), takes a lease, serves the stock
//! docker CLI through its mutual-TLS front (a lease certificate signed by
//! the same CA), is released, wipes and verifies, and destroys itself,
//! leaving nothing behind. A dockerd that listens on TCP is refused before
//! the host registers.
//!
//! Needs root, dockerd, the docker CLI, iproute2, nsenter and a static
//! busybox: `berth_testkit::preflight` fails the test with the missing one
//! named (it skips only with `BERTH_SKIP_E2E=1`, and never under CI). Each
//! test works under its own prefix (`BERTH_TEST_TAG` in front) and sweeps
//! it before and after, also when it fails.

// Helpers outside `#[test]` fns: a panic there is a test failure, as intended.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use berth_proto::v1::{
    AssignLease, EndLease, EndReason, HostState, Register, Registered, WipeReport,
    agent_message::Msg, coordinator_message,
};
use berth_testkit::{
    AgentFeed, FakeCoordinator, busybox_context, cgroups_with_prefix, link_exists, mounts_under,
    netns_with_prefix, preflight, processes_mentioning,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const FRONT_PORT: u16 = 2376;
/// Bounds for each step; generous for a loaded 2-core CI machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// The `--boot-timeout` of the agent whose dockerd listens on TCP.
const TCP_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);
const DOCKER_CLI_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(90);
const HEARTBEAT_MS: u32 = 200;

// ---------------------------------------------------------------------------
// The fake coordinator's side

/// The docker CLI's view of one lease: where and with which certificate.
#[derive(Clone)]
struct Client {
    docker_host: String,
    cert_dir: PathBuf,
}

impl Client {
    /// A lease certificate like `berth acquire` writes, signed by the fake's CA.
    fn for_lease(fake: &FakeCoordinator, dir: &Path, docker_host: &str, lease_id: &str) -> Self {
        Client {
            docker_host: docker_host.to_owned(),
            cert_dir: fake.lease_certs(dir, lease_id),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::from(berth_testkit::docker_cli(&self.docker_host));
        c.env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", &self.cert_dir);
        c
    }
}

/// The next message that is not a heartbeat.
async fn next_message(feed: &mut AgentFeed) -> Msg {
    feed.next_non_heartbeat(MESSAGE_TIMEOUT).await
}

fn state_of(msg: &Msg) -> Option<HostState> {
    match msg {
        Msg::StateChanged(s) => HostState::try_from(s.state).ok(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Clean-up guard and observations of the machine

/// The test's prefix and directories (the test kit's layout). Sweeps them
/// when made (what earlier, killed runs left) and when dropped, so a
/// failing assertion leaves nothing behind either.
struct Guard {
    /// The test's own directory: credentials, build contexts, and the
    /// agent's state dir (`hosts/`).
    base: PathBuf,
    /// The agent's run dir (sockets, pidfiles, exec roots).
    run_dir: PathBuf,
    prefix: String,
}

impl Guard {
    fn new(base_prefix: &str) -> Self {
        // BERTH_TEST_TAG keeps two checkouts running these tests at once
        // from sweeping each other's hosts.
        let prefix = berth_testkit::test_prefix(base_prefix);
        let (base, run_dir) = berth_testkit::dirs(&prefix);
        let guard = Guard {
            base,
            run_dir,
            prefix,
        };
        guard.sweep();
        guard.remove_dirs();
        std::fs::create_dir_all(guard.base.join("ctx")).unwrap();
        guard
    }
    fn state(&self) -> PathBuf {
        self.base.join("hosts")
    }
    fn run(&self) -> PathBuf {
        self.run_dir.clone()
    }
    fn remove_dirs(&self) {
        let _ = std::fs::remove_dir_all(&self.base);
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
    /// The agent's own sweep of this prefix, in process: its report is
    /// what some tests check.
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
    /// Processes that mention the test's directories (dockerd, containerd,
    /// shims, ...).
    fn processes(&self) -> Vec<String> {
        let mut found = processes_mentioning(&self.base.to_string_lossy());
        for p in processes_mentioning(&self.run_dir.to_string_lossy()) {
            if !found.contains(&p) {
                found.push(p);
            }
        }
        found
    }
    /// Mounts under the test's directories.
    fn mounts(&self) -> Vec<String> {
        let mut found = mounts_under(&self.base);
        found.extend(mounts_under(&self.run_dir));
        found
    }
}

/// The mount namespace of process `pid` (`self` for this one), as its
/// `mnt:[INODE]` link; empty if the process is gone.
fn mount_ns(pid: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .map(|l| l.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Drop for Guard {
    fn drop(&mut self) {
        let report = self.sweep();
        if report != berth_agent::CleanupReport::default() {
            eprintln!("guard swept leftovers: {report:?}");
        }
        self.remove_dirs();
    }
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
async fn start_agent(guard: &Guard, fake: &FakeCoordinator, extra: &[&str]) -> Agent {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
        .args(["--coordinator", fake.url(), "--prefix", &guard.prefix])
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
    feed: &mut AgentFeed,
    agent: &Agent,
    prefix: &str,
) -> (Register, SocketAddr) {
    let Msg::Register(register) = next_message(feed).await else {
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
        client_key_sha256: fake.client_key(),
    }))
    .await;
}

async fn expect_accepted(feed: &mut AgentFeed, lease_id: &str) {
    let m = next_message(feed).await;
    assert_eq!(state_of(&m), Some(HostState::Leased), "{m:?}");
    let m = next_message(feed).await;
    assert!(
        matches!(&m, Msg::LeaseAccepted(a) if a.lease_id == lease_id),
        "{m:?}"
    );
}

/// The agent tells the coordinator when a lease's certificate first opens
/// the front (from then on the lease's key may no longer move).
async fn expect_in_use(feed: &mut AgentFeed, lease_id: &str) {
    let m = next_message(feed).await;
    assert!(
        matches!(&m, Msg::LeaseInUse(u) if u.lease_id == lease_id),
        "LeaseInUse for {lease_id} expected, got {m:?}"
    );
}

async fn expect_state(feed: &mut AgentFeed, state: HostState) {
    let m = next_message(feed).await;
    assert_eq!(state_of(&m), Some(state), "{m:?}");
}

async fn expect_wipe_report(feed: &mut AgentFeed, lease_id: &str) -> WipeReport {
    let m = next_message(feed).await;
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

/// A plaintext request to a front that listens with no lease admitted: the
/// connection is held, then dropped; nothing reaches dockerd. Returns what
/// came back (never an HTTP answer).
async fn plaintext_probe(front: SocketAddr) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(front)
        .await
        .expect("an offered host's front listens");
    s.write_all(b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = vec![];
    let read = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "a connection without a lease was held forever"
    );
    got
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
    assert_eq!(guard.processes(), Vec::<String>::new(), "processes left");
    assert_eq!(guard.mounts(), Vec::<String>::new(), "mounts left");
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
    busybox_context(&ctx, "berth\n");
    let ctx = ctx.to_string_lossy().into_owned();
    docker(client, &["build", "-q", "-t", tag, &ctx])
        .await
        .expect("docker build");
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_serves_one_lease_then_wipes_and_destroys_itself() {
    if !preflight() {
        return;
    }
    let guard = Guard::new("bta-");
    let (fake, mut seen) = FakeCoordinator::start_with_heartbeat(HEARTBEAT_MS).await;
    let agent = start_agent(&guard, &fake, &[]).await;
    assert!(agent.boot_time < BOOT_TIMEOUT);
    let (register, front) = expect_register(&mut seen, &agent, &guard.prefix).await;
    let docker_host = register.docker_host.clone();

    // A heartbeat at the negotiated interval.
    let hb = seen.next_heartbeat(Duration::from_secs(10)).await;
    assert_eq!(HostState::try_from(hb.state), Ok(HostState::Ready));

    // Offered, no lease: the front listens (a build may have its answer
    // before the agent has its lease) and admits nobody.
    let probe = tokio::spawn(plaintext_probe(front));
    // The build's docker CLI is ahead of its lease: it waits in the front
    // and gets in once the lease reaches the agent.
    let client = Client::for_lease(&fake, &guard.base, &docker_host, "lease-1");
    let early = tokio::spawn({
        let client = client.clone();
        async move { docker(&client, &["version", "--format", "{{.Server.Version}}"]).await }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !early.is_finished(),
        "answered before the lease reached the agent: {:?}",
        early.await
    );
    assign(&fake, "lease-1", Duration::from_secs(600)).await;
    expect_accepted(&mut seen, "lease-1").await;
    let version = early.await.unwrap().expect("the early client got in");
    assert_eq!(version, register.docker_version);
    let answer = probe.await.unwrap();
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/"),
        "plaintext reached dockerd: {answer:?}"
    );

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
    expect_in_use(&mut seen, "lease-1").await;
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

/// The certificate (DER) the front presents to a client of `lease_id`.
async fn served_certificate(
    fake: &FakeCoordinator,
    dir: &Path,
    front: SocketAddr,
    lease_id: &str,
) -> Option<Vec<u8>> {
    let certs = fake.lease_certs(dir, lease_id);
    let read = |f: &str| std::fs::read_to_string(certs.join(f)).unwrap();
    let config =
        berth_tls::lease_client_config(&read("ca.pem"), &read("cert.pem"), &read("key.pem"))
            .unwrap();
    let tcp = tokio::net::TcpStream::connect(front).await.ok()?;
    let name = rustls::pki_types::ServerName::IpAddress(front.ip().into());
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .ok()?
    .ok()?;
    let der = tls
        .get_ref()
        .1
        .peer_certificates()?
        .first()?
        .as_ref()
        .to_vec();
    Some(der)
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_reconnecting() {
    if !preflight() {
        return;
    }
    let guard = Guard::new("btc-");
    let (fake, mut seen) = FakeCoordinator::start_with_heartbeat(HEARTBEAT_MS).await;
    let agent = start_agent(&guard, &fake, &[]).await;
    let (register, front) = expect_register(&mut seen, &agent, &guard.prefix).await;
    assign(&fake, "lease-1", Duration::from_secs(600)).await;
    expect_accepted(&mut seen, "lease-1").await;
    let before = served_certificate(&fake, &guard.base, front, "lease-1")
        .await
        .expect("the front serves the lease");

    // The coordinator renews the host's certificate on the live stream,
    // mid-lease (for the same key and address).
    let renewed = fake
        .ca()
        .sign_host_for(
            &register.csr_pem,
            &register.host_id,
            front.ip(),
            SystemTime::now(),
            Duration::from_secs(2 * 3600),
        )
        .unwrap();
    let renewed_der = pem_to_der(&renewed);
    assert_ne!(renewed_der, before);
    fake.send(coordinator_message::Msg::Registered(Registered {
        heartbeat_interval_ms: HEARTBEAT_MS,
        server_cert_pem: renewed,
        ca_pem: fake.ca_pem().to_owned(),
    }))
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = served_certificate(&fake, &guard.base, front, "lease-1").await;
        if now.as_deref() == Some(renewed_der.as_slice()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the front still serves the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Taken on the live stream: no new registration, and the lease goes on.
    fake.send(coordinator_message::Msg::EndLease(EndLease {
        lease_id: "lease-1".into(),
        reason: EndReason::Released as i32,
    }))
    .await;
    loop {
        let m = next_message(&mut seen).await;
        assert!(!matches!(m, Msg::Register(_)), "the agent registered again");
        if state_of(&m) == Some(HostState::Wiping) {
            break;
        }
    }
    expect_wipe_report(&mut seen, "lease-1").await;
    expect_state(&mut seen, HostState::Terminating).await;
    assert_clean_exit(&guard, agent, &register).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycled_host_expires_a_lease_serves_another_and_cleans_up_on_sigterm() {
    if !preflight() {
        return;
    }
    let guard = Guard::new("btr-");
    let (fake, mut seen) = FakeCoordinator::start_with_heartbeat(HEARTBEAT_MS).await;
    let agent = start_agent(&guard, &fake, &["--recycle"]).await;
    let (register, front) = expect_register(&mut seen, &agent, &guard.prefix).await;
    let docker_host = register.docker_host.clone();

    // A short lease that nobody ends: the agent's own clock does.
    assign(&fake, "lease-1", Duration::from_secs(5)).await;
    expect_accepted(&mut seen, "lease-1").await;
    let client = Client::for_lease(&fake, &guard.base, &docker_host, "lease-1");
    docker(&client, &["volume", "create", "btr-vol"])
        .await
        .expect("volume create");
    expect_in_use(&mut seen, "lease-1").await;
    let m = next_message(&mut seen).await;
    assert!(
        matches!(&m, Msg::LeaseEnded(e) if e.lease_id == "lease-1" && e.reason == EndReason::Expired as i32),
        "{m:?}"
    );
    expect_state(&mut seen, HostState::Wiping).await;
    let report = expect_wipe_report(&mut seen, "lease-1").await;
    assert_eq!(report.volumes_removed, 1, "{report:?}");
    // Recycle mode: a verified wipe makes the host Ready again, and its
    // front listens again (before the Ready reached the coordinator).
    expect_state(&mut seen, HostState::Ready).await;
    tokio::net::TcpStream::connect(front)
        .await
        .expect("the offered host's front listens");

    // The next lease rebinds the front at once and finds a clean host.
    assign(&fake, "lease-2", Duration::from_secs(600)).await;
    expect_accepted(&mut seen, "lease-2").await;
    // The ended lease's certificate no longer opens the front; the new one does.
    let refused = docker(&client, &["version"]).await;
    assert!(
        refused.is_err(),
        "lease-1's certificate opened lease-2's front"
    );
    let client = Client::for_lease(&fake, &guard.base, &docker_host, "lease-2");
    let volumes = docker(&client, &["volume", "ls", "-q"])
        .await
        .expect("volume ls");
    assert_eq!(volumes, "", "the previous lease's volume must be gone");
    expect_in_use(&mut seen, "lease-2").await;

    // SIGTERM while leased: the front closes, the host is destroyed, exit 0.
    let pid = agent.child.id().expect("agent running");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    expect_state(&mut seen, HostState::Terminating).await;
    assert_clean_exit(&guard, agent, &register).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_removes_what_a_killed_agent_left() {
    if !preflight() {
        return;
    }
    let guard = Guard::new("bts-");
    let (fake, mut seen) = FakeCoordinator::start_with_heartbeat(HEARTBEAT_MS).await;
    let mut agent = start_agent(&guard, &fake, &[]).await;
    let (register, _front) = expect_register(&mut seen, &agent, &guard.prefix).await;
    let docker_host = register.docker_host.clone();
    assign(&fake, "lease-1", Duration::from_secs(600)).await;
    expect_accepted(&mut seen, "lease-1").await;
    let client = Client::for_lease(&fake, &guard.base, &docker_host, "lease-1");
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
    let left = guard.processes();
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
        guard.mounts(),
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
    assert_eq!(guard.processes(), Vec::<String>::new(), "processes left");
    assert_eq!(guard.mounts(), Vec::<String>::new(), "mounts left");
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
    if !preflight() {
        return;
    }
    let guard = Guard::new("btt-");
    let (fake, mut seen) = FakeCoordinator::start_with_heartbeat(HEARTBEAT_MS).await;
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
        .args(["--coordinator", fake.url(), "--prefix", &guard.prefix])
        .args(fake.agent_credentials(&guard.base.join("creds")))
        .arg("--dockerd")
        .arg(&wrapper)
        // dockerd 20.10 delays its start by 15 s when it binds TCP without
        // TLS, and a loaded machine adds to that: the refusal, not the boot
        // timeout, is what this test is about.
        .args(["--boot-timeout", "120s"])
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
    let out = tokio::time::timeout(TCP_BOOT_TIMEOUT + EXIT_TIMEOUT, child.wait_with_output())
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
        seen.try_next().is_none(),
        "the coordinator heard from the host"
    );
    // And the refused host was destroyed like any other.
    assert_eq!(netns_with_prefix(&guard.prefix), Vec::<String>::new());
    assert_eq!(guard.processes(), Vec::<String>::new());
    assert_eq!(guard.mounts(), Vec::<String>::new());
}
