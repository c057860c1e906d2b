//! `berth forward [LOCAL:]REMOTE ...`: listens on 127.0.0.1:LOCAL on the CI
//! machine and forwards each connection to `BERTH_HOST_ADDR:REMOTE`, the
//! port a container published on the leased host, so `curl
//! localhost:8080` works as it would with a local daemon. Plain TCP: the
//! published port is reachable at the host's address anyway (that is how
//! the pool works); the forward adds no new way in, only a local name.
//!
//! It stops when the lease ends: it asks the coordinator every `--poll`
//! (`Get`, with the tenant token the CLI uses anyway) and stops once the
//! lease is released, expired, lost or unknown; if the coordinator cannot
//! be reached it keeps forwarding until the last deadline it heard of has
//! passed (the agent ends the lease on time by itself). Polling the
//! coordinator was chosen over watching the Docker front refuse the lease
//! certificate because it is explicit: a refused TLS handshake also happens
//! on network trouble, and the front is not this command's business. On
//! stop, listeners close and open connections are cut.
//!
//! `--background --pid-file FILE` starts the same command as a detached
//! process (own process group, no terminal streams; `--log-file` keeps its
//! log) and returns once it listens; the pid file is written only then, and
//! removed when the forwarder stops.

use berth_runtime::fs::Durability;

use crate::Exit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use berth_proto::v1 as pb;
use berth_proto::v1::lease_service_client::LeaseServiceClient;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

/// Default interval between two lease checks.
pub const DEFAULT_POLL: &str = "2s";
/// Bound on connecting to the published port on the leased host.
pub const REMOTE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one lease check with the coordinator.
pub const LEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for open connections to end after the forward stops.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `--background` waits for the forwarder to listen.
pub const BACKGROUND_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Slack on the lease deadline when the coordinator cannot be asked.
pub const DEADLINE_SLACK: Duration = Duration::from_secs(60);

/// `berth forward` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ForwardArgs {
    /// Ports to forward: REMOTE (same port locally) or LOCAL:REMOTE; LOCAL 0
    /// picks a free port (printed).
    #[arg(required = true, value_name = "[LOCAL:]REMOTE")]
    pub ports: Vec<String>,
    /// The leased host's address (berth acquire exports it).
    #[arg(long, env = "BERTH_HOST_ADDR")]
    pub host_addr: IpAddr,
    /// The lease to follow: the forward stops when it ends.
    #[arg(long, env = "BERTH_LEASE_ID")]
    pub lease: String,
    /// How often to ask the coordinator whether the lease is still active.
    #[arg(long, env = "BERTH_FORWARD_POLL", default_value = DEFAULT_POLL, value_parser = humantime::parse_duration)]
    pub poll: Duration,
    /// Run detached; return once listening (needs --pid-file).
    #[arg(long, env = "BERTH_FORWARD_BACKGROUND", requires = "pid_file")]
    pub background: bool,
    /// Write the forwarder's pid here once it listens; removed when it stops.
    #[arg(long, env = "BERTH_FORWARD_PID_FILE")]
    pub pid_file: Option<PathBuf>,
    /// With --background: append the forwarder's messages here (default:
    /// discarded).
    #[arg(long, env = "BERTH_FORWARD_LOG_FILE")]
    pub log_file: Option<PathBuf>,
}

/// One forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub local: u16,
    pub remote: u16,
}

/// What went wrong in a forward.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{0}")]
    Usage(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("lease {lease}: {reason}")]
    LeaseEnded { lease: String, reason: String },
    #[error("checking lease {lease} with the coordinator: {reason}")]
    LeaseCheck { lease: String, reason: String },
    #[error("{0}")]
    Background(String),
    #[error("pid file {path}: {source}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ForwardError {
    /// The CLI exit code (see `cli` for the table).
    pub fn exit_code(&self) -> Exit {
        match self {
            Self::Usage(_) => Exit::Usage,
            Self::LeaseEnded { .. } => Exit::LeaseEnded,
            Self::LeaseCheck { .. } => Exit::Unreachable,
            Self::Listen { .. } | Self::Background(_) | Self::PidFile { .. } => Exit::Failure,
        }
    }
}

/// Parses `REMOTE` or `LOCAL:REMOTE`.
pub fn parse_port(spec: &str) -> Result<PortSpec, ForwardError> {
    let bad = |why: &str| ForwardError::Usage(format!("port {spec:?}: {why}"));
    let port = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| bad("expected [LOCAL:]REMOTE, e.g. 8080 or 18080:80"))
    };
    let (local, remote) = match spec.split_once(':') {
        Some((l, r)) => (port(l)?, port(r)?),
        None => {
            let p = port(spec)?;
            (p, p)
        }
    };
    if remote == 0 {
        return Err(bad("the remote port cannot be 0"));
    }
    Ok(PortSpec { local, remote })
}

/// What the coordinator says about a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Still active, until the given deadline unless renewed.
    Active { deadline: Option<SystemTime> },
    /// Ended: why.
    Ended(String),
}

/// Asks whether the followed lease is still active. An `Err` is a failure
/// to ask (transient), not an answer.
pub trait LeaseWatch: Send + Sync {
    fn check(&self) -> impl Future<Output = Result<LeaseStatus, String>> + Send;
}

/// [`LeaseWatch`] through the coordinator's `LeaseService.Get`.
pub struct CoordinatorWatch {
    pub channel: Channel,
    pub token: String,
    pub lease_id: String,
}

impl LeaseWatch for CoordinatorWatch {
    async fn check(&self) -> Result<LeaseStatus, String> {
        let req = super::request(
            pb::GetRequest {
                lease_id: self.lease_id.clone(),
            },
            LEASE_CHECK_TIMEOUT,
            &self.token,
        )
        .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(
            LEASE_CHECK_TIMEOUT,
            LeaseServiceClient::new(self.channel.clone()).get(req),
        )
        .await
        .map_err(|_| format!("no answer within {LEASE_CHECK_TIMEOUT:?}"))?;
        match answer {
            Ok(resp) => {
                let lease = resp.into_inner().lease.unwrap_or_default();
                if super::is_ended(lease.state) {
                    Ok(LeaseStatus::Ended(format!(
                        "the lease has ended ({})",
                        super::lease_state_name(lease.state)
                    )))
                } else {
                    Ok(LeaseStatus::Active {
                        deadline: lease
                            .deadline
                            .as_ref()
                            .and_then(berth_proto::to_system_time),
                    })
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => Ok(LeaseStatus::Ended(
                "the coordinator does not know the lease".into(),
            )),
            Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        }
    }
}

/// Binds one listener per port on 127.0.0.1.
pub async fn bind(
    ports: &[PortSpec],
    host: IpAddr,
) -> Result<Vec<(TcpListener, SocketAddr)>, ForwardError> {
    let mut out = Vec::with_capacity(ports.len());
    for p in ports {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p.local);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ForwardError::Listen { addr, source })?;
        out.push((listener, SocketAddr::new(host, p.remote)));
    }
    Ok(out)
}

/// Forwards until the lease ends (returns why) or `shutdown` fires.
pub async fn serve<W: LeaseWatch>(
    listeners: Vec<(TcpListener, SocketAddr)>,
    watch: &W,
    poll: Duration,
    shutdown: CancellationToken,
) -> String {
    let stop = shutdown.child_token();
    let tracker = TaskTracker::new();
    for (listener, remote) in listeners {
        tracker.spawn(accept_loop(listener, remote, stop.clone(), tracker.clone()));
    }
    let why = watch_lease(watch, poll, &stop).await;
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(CLOSE_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open {CLOSE_TIMEOUT:?} after the forward stopped");
    }
    why
}

async fn watch_lease<W: LeaseWatch>(watch: &W, poll: Duration, stop: &CancellationToken) -> String {
    let mut deadline: Option<SystemTime> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return "interrupted".into(),
            () = tokio::time::sleep(poll) => {}
        }
        match watch.check().await {
            Ok(LeaseStatus::Active { deadline: d }) => deadline = d.or(deadline),
            Ok(LeaseStatus::Ended(why)) => return why,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the lease; still forwarding");
                if let Some(d) = deadline
                    && SystemTime::now() > d + DEADLINE_SLACK
                {
                    return format!(
                        "the lease deadline has passed and the coordinator cannot be asked ({e})"
                    );
                }
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    remote: SocketAddr,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((client, peer)) => {
                tracker.spawn(forward_one(client, peer, remote, stop.clone()));
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn forward_one(
    mut client: TcpStream,
    peer: SocketAddr,
    remote: SocketAddr,
    stop: CancellationToken,
) {
    let connected = tokio::select! {
        () = stop.cancelled() => return,
        c = tokio::time::timeout(REMOTE_CONNECT_TIMEOUT, TcpStream::connect(remote)) => c,
    };
    let mut upstream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%peer, %remote, error = %e, "cannot reach the published port");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, %remote, "connecting to the published port timed out after {REMOTE_CONNECT_TIMEOUT:?}");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        () = stop.cancelled() => {}
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(%peer, %remote, error = %e, "connection ended");
            }
        }
    }
}

/// Writes `pid` to `path` atomically.
fn write_pid_file(path: &Path, pid: u32) -> Result<(), ForwardError> {
    let err = |source| ForwardError::PidFile {
        path: path.to_owned(),
        source,
    };
    let data = format!("{pid}\n");
    berth_runtime::fs::write_atomic(path, data.as_bytes(), 0o644, Durability::Process).map_err(err)
}

/// Removes the pid file if it still names this process.
fn remove_pid_file(path: &Path) {
    let mine =
        std::fs::read_to_string(path).is_ok_and(|s| s.trim() == std::process::id().to_string());
    if mine {
        let _ = std::fs::remove_file(path);
    }
}

/// `berth forward` in the foreground: binds, checks the lease once, then
/// forwards until the lease ends or a signal comes. Returns why it stopped.
pub async fn run<W: LeaseWatch>(
    args: &ForwardArgs,
    watch: &W,
    shutdown: CancellationToken,
) -> Result<String, ForwardError> {
    let ports: Vec<PortSpec> = args
        .ports
        .iter()
        .map(|p| parse_port(p))
        .collect::<Result<_, _>>()?;
    if args.poll.is_zero() {
        return Err(ForwardError::Usage("--poll must be longer than 0".into()));
    }
    // Refuse to start for a lease that is not active: a forward to a host
    // nobody leases would forward to whoever leases it next.
    match watch.check().await {
        Ok(LeaseStatus::Active { .. }) => {}
        Ok(LeaseStatus::Ended(reason)) => {
            return Err(ForwardError::LeaseEnded {
                lease: args.lease.clone(),
                reason,
            });
        }
        Err(reason) => {
            return Err(ForwardError::LeaseCheck {
                lease: args.lease.clone(),
                reason,
            });
        }
    }
    let listeners = bind(&ports, args.host_addr).await?;
    for (l, remote) in &listeners {
        if let Ok(local) = l.local_addr() {
            eprintln!("berth: forwarding {local} -> {remote}");
        }
    }
    if let Some(p) = &args.pid_file {
        write_pid_file(p, std::process::id())?;
    }
    let why = serve(listeners, watch, args.poll, shutdown).await;
    if let Some(p) = &args.pid_file {
        remove_pid_file(p);
    }
    eprintln!("berth: forward stopped: {why}");
    Ok(why)
}

/// `--background`: starts this same command detached and without
/// `--background`, waits until its pid file names it (it listens then), and
/// returns its pid.
pub fn spawn_background(args: &ForwardArgs) -> Result<u32, ForwardError> {
    let pid_file = args
        .pid_file
        .as_deref()
        .ok_or_else(|| ForwardError::Usage("--background needs --pid-file".into()))?;
    for p in &args.ports {
        parse_port(p)?;
    }
    // A stale file from an earlier forwarder must not pass for readiness.
    match std::fs::remove_file(pid_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ForwardError::PidFile {
                path: pid_file.to_owned(),
                source,
            });
        }
    }
    let exe = std::env::current_exe()
        .map_err(|e| ForwardError::Background(format!("cannot find the berth binary: {e}")))?;
    let argv: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--background")
        .collect();
    let stderr = match &args.log_file {
        Some(f) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .map_err(|e| ForwardError::Background(format!("log file {}: {e}", f.display())))?,
        ),
        None => Stdio::null(),
    };
    let mut child = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(exe)
            .args(argv)
            .env_remove("BERTH_FORWARD_BACKGROUND")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Not in the caller's process group: a Ctrl-C meant for the
            // CI step's foreground job does not reach it.
            .process_group(0)
            .spawn()
            .map_err(|e| ForwardError::Background(format!("cannot start the forwarder: {e}")))?
    };
    let pid = child.id();
    let started = Instant::now();
    loop {
        if std::fs::read_to_string(pid_file).is_ok_and(|s| s.trim() == pid.to_string()) {
            return Ok(pid);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ForwardError::Background(format!(
                "the forwarder exited before listening ({status}){}",
                args.log_file
                    .as_ref()
                    .map(|f| format!("; see {}", f.display()))
                    .unwrap_or_else(|| "; run it without --background to see why".into())
            )));
        }
        if started.elapsed() > BACKGROUND_READY_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ForwardError::Background(format!(
                "the forwarder did not listen within {BACKGROUND_READY_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Answers from a script; the last answer repeats.
    struct Scripted {
        answers: Mutex<Vec<Result<LeaseStatus, String>>>,
        asked: AtomicUsize,
    }

    impl Scripted {
        fn new(answers: Vec<Result<LeaseStatus, String>>) -> Self {
            Self {
                answers: Mutex::new(answers),
                asked: AtomicUsize::new(0),
            }
        }
    }

    impl LeaseWatch for Scripted {
        async fn check(&self) -> Result<LeaseStatus, String> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let mut a = self.answers.lock().unwrap();
            if a.len() > 1 {
                a.remove(0)
            } else {
                a[0].clone()
            }
        }
    }

    fn active() -> Result<LeaseStatus, String> {
        Ok(LeaseStatus::Active { deadline: None })
    }

    #[test]
    fn ports_parse() {
        assert_eq!(
            parse_port("8080").unwrap(),
            PortSpec {
                local: 8080,
                remote: 8080
            }
        );
        assert_eq!(
            parse_port("18080:80").unwrap(),
            PortSpec {
                local: 18080,
                remote: 80
            }
        );
        assert_eq!(
            parse_port("0:80").unwrap(),
            PortSpec {
                local: 0,
                remote: 80
            }
        );
        for bad in ["", "x", "80:", ":80", "1:2:3", "70000", "80:0", "0"] {
            assert!(parse_port(bad).is_err(), "{bad:?}");
        }
    }

    /// An echo server standing in for the published port.
    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn connections_are_forwarded_and_cut_when_the_lease_ends() {
        let upstream = echo_server().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let watch = Scripted::new(vec![
            active(),
            active(),
            Ok(LeaseStatus::Ended("released".into())),
        ]);
        let served = tokio::spawn(async move {
            let why = serve(
                vec![(listener, upstream)],
                &watch,
                Duration::from_millis(200),
                CancellationToken::new(),
            )
            .await;
            (why, watch.asked.load(Ordering::SeqCst))
        });
        let mut c = TcpStream::connect(local).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // The open connection is cut when the lease ends.
        let (why, asked) = tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(why, "released");
        assert_eq!(asked, 3);
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "the connection stays open after the lease ended");
        assert!(TcpStream::connect(local).await.is_err(), "still listening");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_coordinator_stops_the_forward_only_after_the_deadline() {
        let deadline = SystemTime::now() + Duration::from_secs(3600);
        let watch = Scripted::new(vec![
            Ok(LeaseStatus::Active {
                deadline: Some(deadline),
            }),
            Err("unavailable".into()),
        ]);
        let stop = CancellationToken::new();
        // The paused clock moves tokio time only; the deadline is wall
        // time, so the answer must be "still forwarding" for many polls.
        let r = tokio::time::timeout(
            Duration::from_secs(600),
            watch_lease(&watch, Duration::from_secs(2), &stop),
        )
        .await;
        assert!(r.is_err(), "stopped before the deadline: {r:?}");
        assert!(watch.asked.load(Ordering::SeqCst) > 100);

        let past = Scripted::new(vec![
            Ok(LeaseStatus::Active {
                deadline: Some(SystemTime::now() - DEADLINE_SLACK - Duration::from_secs(1)),
            }),
            Err("unavailable".into()),
        ]);
        let why = watch_lease(&past, Duration::from_secs(2), &stop).await;
        assert!(why.contains("deadline has passed"), "{why}");
    }

    #[tokio::test]
    async fn a_lease_that_ended_is_refused_up_front() {
        let args = ForwardArgs {
            ports: vec!["0:80".into()],
            host_addr: "127.0.0.1".parse().unwrap(),
            lease: "l1".into(),
            poll: Duration::from_secs(1),
            background: false,
            pid_file: None,
            log_file: None,
        };
        let watch = Scripted::new(vec![Ok(LeaseStatus::Ended("released".into()))]);
        let err = run(&args, &watch, CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), Exit::LeaseEnded, "{err}");
        let watch = Scripted::new(vec![Err("unavailable".into())]);
        let err = run(&args, &watch, CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), Exit::Unreachable, "{err}");
    }

    #[tokio::test]
    async fn the_pid_file_lives_as_long_as_the_forward() {
        let tmp = tempfile::tempdir().unwrap();
        let pid_file = tmp.path().join("fwd.pid");
        let args = ForwardArgs {
            ports: vec!["0:80".into()],
            host_addr: "127.0.0.1".parse().unwrap(),
            lease: "l1".into(),
            poll: Duration::from_millis(50),
            background: false,
            pid_file: Some(pid_file.clone()),
            log_file: None,
        };
        let watch = Scripted::new(vec![
            active(),
            active(),
            active(),
            Ok(LeaseStatus::Ended("released".into())),
        ]);
        let run = tokio::spawn(async move { run(&args, &watch, CancellationToken::new()).await });
        let mut seen = false;
        for _ in 0..100 {
            if std::fs::read_to_string(&pid_file)
                .is_ok_and(|s| s.trim() == std::process::id().to_string())
            {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(seen, "no pid file while forwarding");
        assert_eq!(run.await.unwrap().unwrap(), "released");
        assert!(!pid_file.exists(), "pid file left behind");
    }
}
