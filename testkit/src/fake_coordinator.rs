//! One fake coordinator for every agent test: the generated `AgentService`
//! server trait, served over TLS on 127.0.0.1:0 by a certificate of its own
//! test CA, the way the agent meets the real one. It admits only streams
//! that carry its pool join token, answers each `Register` with
//! `Registered` (the heartbeat interval it was started with, and a server
//! certificate signed from the agent's CSR, like the coordinator's CA),
//! records every agent message in an [`AgentFeed`], and lets the test push
//! coordinator messages into the current stream, break it, or refuse new
//! streams (a coordinator that is restarting).
//!
//! Boundaries: no berth policy lives here (no lease book-keeping, no host
//! table); the test decides what the coordinator says and when. It depends
//! on the wire contract and the pool PKI only, never on the agent or the
//! coordinator crates. Dropping the [`FakeCoordinator`] stops its server.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use berth_proto::v1::{
    AgentMessage, CoordinatorMessage, Heartbeat, Registered, agent_message::Msg,
    coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Heartbeat interval the fake asks for unless told otherwise: short, so
/// tests see heartbeats quickly.
pub const DEFAULT_HEARTBEAT_MS: u32 = 100;
/// Buffer of each response stream.
const STREAM_BUFFER: usize = 16;

/// The sending half of the coordinator's response stream to one agent.
type ToAgent = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// What the service shares with the test's handle.
struct Shared {
    ca: berth_tls::Ca,
    join_token: String,
    heartbeat_interval_ms: u32,
    refuse: AtomicBool,
    current: Mutex<Option<ToAgent>>,
    seen: mpsc::UnboundedSender<AgentMessage>,
    /// The key of the (one) build whose lease certificates the fake writes.
    client: berth_tls::KeyAndCsr,
}

/// The `AgentService` implementation behind the fake.
#[derive(Clone)]
struct Service(Arc<Shared>);

#[tonic::async_trait]
impl AgentService for Service {
    type ConnectStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let shared = self.0.clone();
        if shared.refuse.load(Ordering::SeqCst) {
            return Err(Status::unavailable("coordinator restarting"));
        }
        let expected = format!("Bearer {}", shared.join_token);
        let presented = request.metadata().get("authorization");
        if presented.and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return Err(Status::unauthenticated("invalid pool join token"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        *shared.current.lock().unwrap() = Some(tx.clone());
        // Ends with the agent's stream (or the server's connection).
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                if let Some(Msg::Register(r)) = &msg.msg {
                    let addr = r
                        .host_addr
                        .parse()
                        .expect("Register.host_addr is an address");
                    let cert = shared
                        .ca
                        .sign_host(&r.csr_pem, &r.host_id, addr, SystemTime::now())
                        .expect("the agent's CSR signs");
                    let registered = Registered {
                        heartbeat_interval_ms: shared.heartbeat_interval_ms,
                        server_cert_pem: cert,
                        ca_pem: shared.ca.cert_pem().to_owned(),
                    };
                    let reply = CoordinatorMessage {
                        msg: Some(coordinator_message::Msg::Registered(registered)),
                    };
                    let _ = tx.send(Ok(reply)).await;
                }
                let _ = shared.seen.send(msg);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A running fake coordinator; see the module notes.
pub struct FakeCoordinator {
    url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCoordinator")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl FakeCoordinator {
    /// Starts a fake with a fresh CA and join token, asking for heartbeats
    /// every [`DEFAULT_HEARTBEAT_MS`]; returns it and the feed of what
    /// agents send it.
    pub async fn start() -> (Self, AgentFeed) {
        Self::start_with_heartbeat(DEFAULT_HEARTBEAT_MS).await
    }

    /// [`FakeCoordinator::start`] with its own heartbeat interval.
    pub async fn start_with_heartbeat(heartbeat_interval_ms: u32) -> (Self, AgentFeed) {
        let (ca, _) = berth_tls::Ca::generate("test pool CA").unwrap();
        let (seen, feed) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            ca,
            join_token: berth_tls::token::generate(),
            heartbeat_interval_ms,
            refuse: AtomicBool::new(false),
            current: Mutex::new(None),
            seen,
            client: berth_tls::KeyAndCsr::generate("ci").unwrap(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cert, key) = shared.ca.issue_server(&["127.0.0.1".into()]).unwrap();
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key));
        let router = tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AgentServiceServer::new(Service(shared.clone())));
        let server = tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
            {
                eprintln!("fake coordinator: server ended: {e}");
            }
        });
        let fake = FakeCoordinator {
            url: format!("https://{addr}"),
            shared,
            server,
        };
        (fake, AgentFeed(feed))
    }

    /// Where agents reach it (`https://127.0.0.1:PORT`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The test CA: it signed the fake's server certificate, signs the
    /// agents' front certificates and any lease certificate a test needs.
    pub fn ca(&self) -> &berth_tls::Ca {
        &self.shared.ca
    }

    /// The CA certificate agents must trust (`--ca`).
    pub fn ca_pem(&self) -> &str {
        self.shared.ca.cert_pem()
    }

    /// The pool join token it admits (`--join-token-file`).
    pub fn join_token(&self) -> &str {
        &self.shared.join_token
    }

    /// While set, new streams are refused with `UNAVAILABLE`.
    pub fn refuse_streams(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
    }

    fn current(&self) -> ToAgent {
        self.shared
            .current
            .lock()
            .unwrap()
            .clone()
            .expect("no agent has connected to the fake coordinator")
    }

    /// Sends `msg` on the newest agent stream.
    pub async fn send(&self, msg: coordinator_message::Msg) {
        self.current()
            .send(Ok(CoordinatorMessage { msg: Some(msg) }))
            .await
            .expect("the agent's stream is open");
    }

    /// Ends the newest agent stream with `status`, as a failing
    /// coordinator would.
    pub async fn break_stream(&self, status: Status) {
        self.current()
            .send(Err(status))
            .await
            .expect("the agent's stream is open");
    }

    /// Writes the CA and the join token into `dir`; returns the agent's
    /// flags that name them.
    pub fn agent_credentials(&self, dir: &Path) -> Vec<String> {
        std::fs::create_dir_all(dir).unwrap();
        let (ca, token) = (dir.join("coordinator-ca.pem"), dir.join("join-token"));
        std::fs::write(&ca, self.ca_pem()).unwrap();
        std::fs::write(&token, self.join_token()).unwrap();
        // The agent refuses a join token others may read.
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        vec![
            "--ca".into(),
            ca.display().to_string(),
            "--join-token-file".into(),
            token.display().to_string(),
        ]
    }

    /// The key every lease certificate of this fake carries, as a lease's
    /// `AssignLease.client_key_sha256` names it.
    pub fn client_key(&self) -> Vec<u8> {
        berth_tls::KeyId::of_csr_pem(&self.shared.client.csr_pem)
            .unwrap()
            .0
            .to_vec()
    }

    /// A lease's client certificate as `berth acquire` writes it (the
    /// build's key, a certificate for `lease_id` signed by the CA, valid for
    /// an hour) in `dir/certs-LEASE`, the `DOCKER_CERT_PATH` layout; returns
    /// that directory.
    pub fn lease_certs(&self, dir: &Path, lease_id: &str) -> PathBuf {
        let cert_dir = dir.join(format!("certs-{lease_id}"));
        std::fs::create_dir_all(&cert_dir).unwrap();
        let k = &self.shared.client;
        let now = SystemTime::now();
        let cert = self
            .ca()
            .sign_lease(&k.csr_pem, lease_id, now, now + Duration::from_secs(3600))
            .unwrap();
        std::fs::write(cert_dir.join("ca.pem"), self.ca_pem()).unwrap();
        std::fs::write(cert_dir.join("cert.pem"), cert).unwrap();
        std::fs::write(cert_dir.join("key.pem"), &k.key_pem).unwrap();
        cert_dir
    }
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Every message agents sent the fake, in order.
#[derive(Debug)]
pub struct AgentFeed(mpsc::UnboundedReceiver<AgentMessage>);

impl AgentFeed {
    /// The next message; panics if none comes within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> AgentMessage {
        tokio::time::timeout(timeout, self.0.recv())
            .await
            .unwrap_or_else(|_| panic!("no agent message within {timeout:?}"))
            .expect("the fake coordinator's feed is open")
    }

    /// The next message that is not a heartbeat.
    pub async fn next_non_heartbeat(&mut self, timeout: Duration) -> Msg {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await.msg {
                Some(Msg::Heartbeat(_)) | None => continue,
                Some(msg) => return msg,
            }
        }
    }

    /// The next heartbeat, skipping anything else.
    pub async fn next_heartbeat(&mut self, timeout: Duration) -> Heartbeat {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Some(Msg::Heartbeat(h)) = self.next(left).await.msg {
                return h;
            }
        }
    }

    /// A message already received, if any (never waits).
    pub fn try_next(&mut self) -> Option<AgentMessage> {
        self.0.try_recv().ok()
    }
}
