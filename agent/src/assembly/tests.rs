//! The assembly wired with fakes: a fake dockerd ([`Daemon`]), a fake
//! machine ([`Provider`]) and the test kit's fake coordinator, with the
//! real driver, link, status board and watchers in between. What is checked
//! is the wiring: the host registers and is shown on its status endpoint, a
//! shutdown or a dockerd exit ends the host through the driver, the
//! provider destroys it, and when `run_host` returns none of its tasks is
//! left (nothing holds dockerd's probe or its process, the status endpoint
//! is closed).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use berth_proto::v1::{HostState as P, agent_message::Msg};
use berth_testkit::{AgentFeed, FakeCoordinator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use super::*;
use crate::docker::client::DaemonInfo;
use crate::docker::daemon::{DaemonError, Exited};
use crate::docker::dockerd::DockerdError;
use crate::docker::health::Probe;
use crate::docker::wipe::fake::FakeDocker;
use crate::ops::status::StatusListen;
use crate::provider::ProviderError;

/// Bound on each step the tests wait for.
const WAIT: Duration = Duration::from_secs(20);
const HOST_ID: &str = "bw-0001";
const DOCKER_VERSION: &str = "20.10.24-fake";

/// A dockerd that always answers. The `Arc` is shared by every clone, so
/// its count says how many holders are left.
#[derive(Clone, Default)]
struct FakeProbe(Arc<AtomicBool>);

impl Probe for FakeProbe {
    fn alive(&self) -> bool {
        true
    }
    async fn ping(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A dockerd that boots at once (or fails to), whose exit the test decides.
struct FakeDaemon {
    probe: FakeProbe,
    exit: Mutex<Option<oneshot::Receiver<String>>>,
    fail_boot: bool,
}

impl Daemon for FakeDaemon {
    type Docker = FakeDocker;
    type Probe = FakeProbe;

    async fn boot(&self) -> Result<Running<FakeDocker, FakeProbe>, DaemonError> {
        if self.fail_boot {
            return Err(DaemonError::Boot(DockerdError::NoPid(
                "/nonexistent/dockerd.pid".into(),
            )));
        }
        let exit = self.exit.lock().unwrap().take();
        let exited = exit.map(|rx| -> Exited {
            Box::pin(async move { rx.await.unwrap_or_else(|_| "handle dropped".into()) })
        });
        Ok(Running {
            docker: FakeDocker::default(),
            probe: self.probe.clone(),
            info: DaemonInfo {
                server_version: DOCKER_VERSION.into(),
                storage_driver: "overlay2".into(),
                containers: 0,
                images: 0,
            },
            exited,
            wipe: crate::docker::daemon::WipePath::Api("a fake daemon"),
        })
    }

    async fn adopt(&self) -> Result<Running<FakeDocker, FakeProbe>, DaemonError> {
        Err(DaemonError::Adopt {
            host_id: HOST_ID.into(),
            reason: "the fake adopts nothing".into(),
        })
    }
}

/// A machine that counts how often it was destroyed.
#[derive(Default)]
struct FakeProvider {
    terminated: AtomicUsize,
}

impl Provider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn identity(&self) -> Result<Identity, ProviderError> {
        Ok(identity())
    }
    async fn terminate(&self) -> Result<(), ProviderError> {
        self.terminated.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn identity() -> Identity {
    Identity {
        host_id: HOST_ID.into(),
        local_id: HOST_ID.into(),
        host_addr: "127.0.0.1".parse().unwrap(),
        netns: None,
        instance_type: String::new(),
        zone: String::new(),
        network: crate::provider::hostnet::HostNetwork::Shared,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One host's fakes and where its status endpoint listens.
struct Rig {
    _dir: tempfile::TempDir,
    provider: Arc<FakeProvider>,
    probe: FakeProbe,
    /// dockerd's exit, until the test makes it happen.
    exit: Option<oneshot::Sender<String>>,
    status: SocketAddr,
    shutdown: CancellationToken,
    run: JoinHandle<Result<(), AgentError>>,
}

impl Rig {
    /// Starts `run_host` for a host whose dockerd boots (or fails to).
    fn start(coordinator: &FakeCoordinator, fail_boot: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = Config {
            coordinator: coordinator.url().to_owned(),
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            no_netns: true,
            front_port: free_port(),
            status_listen: StatusListen::Addr(status),
            boot_timeout: Duration::from_secs(5),
            ..Config::default()
        };
        std::fs::create_dir_all(config.state_dir.join(HOST_ID)).unwrap();
        let provider = Arc::new(FakeProvider::default());
        let probe = FakeProbe::default();
        let (exit, exit_rx) = oneshot::channel();
        let daemon = FakeDaemon {
            probe: probe.clone(),
            exit: Mutex::new(Some(exit_rx)),
            fail_boot,
        };
        let host = HostStart {
            credentials: Credentials {
                ca_pem: coordinator.ca_pem().to_owned(),
                join_token: coordinator.join_token().to_owned(),
            },
            identity: identity(),
            started: Instant::now(),
        };
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(run_host(
            config,
            provider.clone(),
            daemon,
            host,
            shutdown.clone(),
        ));
        Rig {
            _dir: dir,
            provider,
            probe,
            exit: Some(exit),
            status,
            shutdown,
            run,
        }
    }

    /// Waits for `run_host` to return.
    async fn finished(&mut self) -> Result<(), AgentError> {
        tokio::time::timeout(WAIT, &mut self.run)
            .await
            .expect("run_host returns")
            .expect("run_host does not panic")
    }

    /// Nothing of the host is left running: every task dropped what it
    /// held of dockerd, and the status endpoint is closed.
    async fn assert_nothing_runs(&self) {
        assert_eq!(
            Arc::strong_count(&self.probe.0),
            1,
            "a task still holds dockerd's probe"
        );
        if let Some(exit) = &self.exit {
            assert!(
                exit.is_closed(),
                "the dockerd exit watcher still holds the process"
            );
        }
        assert!(
            tokio::net::TcpStream::connect(self.status).await.is_err(),
            "the status endpoint still answers"
        );
    }
}

/// `GET path` on the status endpoint: the body, if it answered 200.
async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: berth\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_owned())
}

/// Waits for the host's first `Register` and checks it.
async fn registered(feed: &mut AgentFeed) {
    let Msg::Register(r) = feed.next_non_heartbeat(WAIT).await else {
        panic!("Register first")
    };
    assert_eq!(r.host_id, HOST_ID);
    assert_eq!(r.host_addr, "127.0.0.1");
    assert_eq!(r.provider, "fake");
    assert_eq!(r.docker_version, DOCKER_VERSION);
    assert_eq!(P::try_from(r.state), Ok(P::Ready));
}

/// The next state change the host reports, with its reason.
async fn next_state(feed: &mut AgentFeed) -> (P, String) {
    match feed.next_non_heartbeat(WAIT).await {
        Msg::StateChanged(s) => (P::try_from(s.state).unwrap(), s.reason),
        other => panic!("StateChanged expected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_ends_the_host_and_joins_every_task() {
    let (coordinator, mut feed) = FakeCoordinator::start().await;
    let mut rig = Rig::start(&coordinator, false);
    registered(&mut feed).await;
    feed.next_heartbeat(WAIT).await;

    // The board shows what the driver and the link publish.
    let shown = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(body) = get(rig.status, "/status").await {
                let s: serde_json::Value = serde_json::from_str(&body).unwrap();
                if s["state"] == "ready" && s["coordinator"]["connected"] == true {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("/status shows a Ready, connected host");
    assert_eq!(shown["host"]["host_id"], HOST_ID);
    assert_eq!(shown["host"]["docker_version"], DOCKER_VERSION);
    assert_eq!(shown["dockerd_failures"], 0);
    assert_eq!(get(rig.status, "/readyz").await.as_deref(), Some("ready\n"));

    rig.shutdown.cancel();
    // The driver's last word still reaches the coordinator.
    let (state, reason) = next_state(&mut feed).await;
    assert_eq!(state, P::Terminating, "{reason}");
    rig.finished().await.unwrap();
    assert_eq!(rig.provider.terminated.load(Ordering::SeqCst), 1);
    rig.assert_nothing_runs().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerd_exit_reaches_the_driver_which_ends_the_host() {
    let (coordinator, mut feed) = FakeCoordinator::start().await;
    let mut rig = Rig::start(&coordinator, false);
    registered(&mut feed).await;

    // dockerd dies on its own: straight to the driver, no one in between.
    let exit = rig.exit.take().unwrap();
    exit.send("signal: 9".into()).unwrap();
    let (state, reason) = next_state(&mut feed).await;
    assert_eq!(
        (state, reason.as_str()),
        (P::Unhealthy, "dockerd exited: signal: 9")
    );
    let (state, _) = next_state(&mut feed).await;
    assert_eq!(state, P::Terminating);
    rig.finished().await.unwrap();
    assert_eq!(rig.provider.terminated.load(Ordering::SeqCst), 1);
    rig.assert_nothing_runs().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_boot_destroys_the_host_and_starts_nothing() {
    let (coordinator, mut feed) = FakeCoordinator::start().await;
    let mut rig = Rig::start(&coordinator, true);
    let e = rig.finished().await.unwrap_err();
    assert!(
        matches!(
            e,
            AgentError::Daemon(DaemonError::Boot(DockerdError::NoPid(_)))
        ),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("booting the host: "), "{e}");
    assert_eq!(rig.provider.terminated.load(Ordering::SeqCst), 1);
    // Never announced, never registered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        feed.try_next().is_none(),
        "the coordinator heard from the host"
    );
    assert!(
        tokio::net::TcpStream::connect(rig.status).await.is_err(),
        "a status endpoint was opened"
    );
    assert_eq!(Arc::strong_count(&rig.probe.0), 1);
}

#[tokio::test(start_paused = true)]
async fn joining_stops_every_task_and_waits_for_each_to_end() {
    let tasks = Tasks::new();
    let ended = Arc::new(AtomicUsize::new(0));
    for i in 0..3u64 {
        let ended = ended.clone();
        tasks.spawn(|stop| async move {
            stop.cancelled().await;
            // Some clean-up after the token fires, still waited for.
            tokio::time::sleep(Duration::from_millis(100 * (i + 1))).await;
            ended.fetch_add(1, Ordering::SeqCst);
        });
    }
    // A task's own token stops that task alone.
    let (alone, handle) = tasks.spawn(|stop| async move { stop.cancelled().await });
    alone.cancel();
    handle.await.unwrap();
    assert_eq!(ended.load(Ordering::SeqCst), 0);
    tasks.join().await;
    assert_eq!(ended.load(Ordering::SeqCst), 3);
    assert!(tasks.tracker.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_task_that_ignores_its_token_holds_up_the_end_only_so_long() {
    let tasks = Tasks::new();
    tasks.spawn(|_stop| std::future::pending::<()>());
    let start = tokio::time::Instant::now();
    tasks.join().await;
    assert_eq!(start.elapsed(), TASKS_JOIN_TIMEOUT);
    assert_eq!(tasks.tracker.len(), 1);
}
