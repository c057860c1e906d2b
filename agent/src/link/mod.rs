//! The agent's side of `AgentService.Connect`: one bidirectional stream to
//! the coordinator, kept up for the agent's whole life.
//!
//! Per connection: the first message is `Register` (identity, resources,
//! versions and the host's *current* state and lease, read from the driver's
//! `watch`), the coordinator answers `Registered{heartbeat_interval_ms}`, and
//! from then on heartbeats go out at that interval, the driver's outgoing
//! messages are forwarded, and a spawned reader turns incoming messages into
//! driver events. Outgoing messages use an mpsc drained into a
//! `ReceiverStream` (the request stream); a failed send means the coordinator
//! is gone.
//!
//! When the stream fails the link reconnects with jittered exponential
//! backoff. While disconnected, incoming messages are simply lost and state
//! changes are dropped (the next `Register` carries the current state), but
//! reports (`WipeReport`, `LeaseEnded`) are kept, a bounded few, and sent
//! right after the next registration.
//!
//! The connection is TLS (the coordinator's certificate must chain to the CA
//! the agent was given) and the stream carries the pool join token as bearer
//! metadata. `Register` carries a CSR for the Docker front's key; the
//! server certificate and pool CA that come back in `Registered` are
//! published in [`LinkStatus::issued`], where the front picks them up.

pub mod net;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use berth_proto::v1::{
    AgentMessage, CoordinatorMessage, Heartbeat, Register, agent_message::Msg,
    agent_service_client::AgentServiceClient, coordinator_message,
};
use berth_runtime::backoff::Backoff;
use berth_runtime::error_chain;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::host::state::{Event, HostState};
use crate::ops::stats::Sampler;

/// Bound on establishing the HTTP/2 connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the coordinator accepting the stream and answering `Registered`.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on queueing one message onto the request stream (HTTP/2 flow
/// control could otherwise stall the link forever).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings detect a coordinator that vanished without closing TCP.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay; doubles per failure up to [`RECONNECT_MAX`].
pub const RECONNECT_BASE: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Heartbeat interval if the coordinator says 0, and the bounds applied to
/// whatever it says (a typo must neither flood nor silence the link).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(60);
/// After the agent is done: how long to wait for the coordinator to close
/// its side, so the last messages are surely on the wire.
pub const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// Reports kept while disconnected.
pub const MAX_PENDING_REPORTS: usize = 32;
/// Buffer of the request stream.
const STREAM_BUFFER: usize = 64;

/// The part of `Register` that never changes during the agent's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub host_id: String,
    pub host_addr: IpAddr,
    pub docker_host: String,
    pub provider: String,
    pub instance_type: String,
    pub zone: String,
    pub agent_version: String,
    pub docker_version: String,
    /// CSR for the Docker front's key (the key stays with the agent).
    pub csr_pem: String,
}

/// What the agent authenticates with and whom it trusts.
#[derive(Clone)]
pub struct Credentials {
    /// The CA the coordinator's certificate must chain to.
    pub ca_pem: String,
    /// The pool join token.
    pub join_token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

/// What the coordinator issued at the last registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The Docker front's server certificate (SAN = host address).
    pub server_cert_pem: String,
    /// The pool CA that lease certificates must chain to.
    pub ca_pem: String,
}

/// What the driver publishes about the host for `Register` and heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: HostState,
    pub lease_id: Option<String>,
    pub lease_deadline: Option<SystemTime>,
}

/// What the link publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkStatus {
    pub connected: bool,
    pub heartbeat_interval: Option<Duration>,
    /// Successful registrations so far (reconnects = registrations - 1).
    pub registrations: u64,
    /// The certificate from the last `Registered`; kept while disconnected.
    pub issued: Option<Issued>,
}

/// Clamps the coordinator's heartbeat interval.
pub fn heartbeat_interval(ms: u32) -> Duration {
    if ms == 0 {
        return DEFAULT_HEARTBEAT;
    }
    Duration::from_millis(u64::from(ms)).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
}

/// Whether a message is a report worth keeping while disconnected.
fn is_report(m: &AgentMessage) -> bool {
    matches!(m.msg, Some(Msg::WipeReport(_)) | Some(Msg::LeaseEnded(_)))
}

fn keep(pending: &mut VecDeque<AgentMessage>, m: AgentMessage) {
    if is_report(&m) {
        if pending.len() >= MAX_PENDING_REPORTS {
            pending.pop_front();
        }
        pending.push_back(m);
    }
}

/// How one connection ended.
#[derive(Debug)]
enum SessionEnd {
    /// Stop token fired.
    Stopped,
    /// The driver is done and everything was sent.
    Finished,
    /// The connection failed; `registered` says whether it got that far.
    Failed { error: String, registered: bool },
}

/// Aborts the spawned reader when a session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The link task.
pub struct Link {
    coordinator: String,
    credentials: Credentials,
    registration: Registration,
    sampler: Sampler,
    status: watch::Receiver<Status>,
    outbox: mpsc::UnboundedReceiver<AgentMessage>,
    outbox_open: bool,
    to_driver: mpsc::Sender<Event>,
    published: watch::Sender<LinkStatus>,
    pending: VecDeque<AgentMessage>,
    /// Dial through the host's network instead of directly (see `linknet`).
    dialer: Option<crate::link::net::NetnsDialer>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("coordinator", &self.coordinator)
            .finish_non_exhaustive()
    }
}

impl Link {
    pub fn new(
        coordinator: String,
        credentials: Credentials,
        registration: Registration,
        sampler: Sampler,
        status: watch::Receiver<Status>,
        outbox: mpsc::UnboundedReceiver<AgentMessage>,
        to_driver: mpsc::Sender<Event>,
    ) -> (Self, watch::Receiver<LinkStatus>) {
        let (published, link_status) = watch::channel(LinkStatus::default());
        let link = Link {
            coordinator,
            credentials,
            registration,
            sampler,
            status,
            outbox,
            outbox_open: true,
            to_driver,
            published,
            pending: VecDeque::new(),
            dialer: None,
        };
        (link, link_status)
    }

    /// Makes every connection through `dialer` (the host's own network).
    pub fn dial_through(mut self, dialer: crate::link::net::NetnsDialer) -> Self {
        self.dialer = Some(dialer);
        self
    }

    /// Runs until `stop` fires, or the driver's outbox closes and everything
    /// left was delivered (or there is nothing worth delivering).
    pub async fn run(mut self, stop: CancellationToken) {
        // A host registers once it has booted (and, on EC2, never while
        // warming): the coordinator offers every registered Ready host.
        let booted = self
            .status
            .wait_for(|s| !matches!(s.state, HostState::Booting | HostState::Warming));
        tokio::select! {
            _ = stop.cancelled() => return,
            r = booted => if r.is_err() {
                // The driver is gone before the host ever booted.
                return;
            },
        }
        let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_MAX);
        loop {
            if !self.outbox_open && self.pending.is_empty() {
                return;
            }
            match self.session(&stop).await {
                SessionEnd::Stopped | SessionEnd::Finished => return,
                SessionEnd::Failed { error, registered } => {
                    if registered {
                        backoff.reset();
                    }
                    tracing::warn!(coordinator = %self.coordinator, %error, "coordinator link down; reconnecting");
                }
            }
            self.published.send_modify(|s| s.connected = false);
            let delay = backoff.next_delay(&mut rand::rng());
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = &mut sleep => break,
                    m = self.outbox.recv(), if self.outbox_open => match m {
                        Some(m) => keep(&mut self.pending, m),
                        None => {
                            self.outbox_open = false;
                            // Done, and nothing worth reconnecting for.
                            if self.pending.is_empty() {
                                return;
                            }
                        }
                    },
                }
            }
        }
    }

    fn register_message(&mut self) -> AgentMessage {
        let status = self.status.borrow().clone();
        let r = &self.registration;
        AgentMessage {
            msg: Some(Msg::Register(Register {
                host_id: r.host_id.clone(),
                host_addr: r.host_addr.to_string(),
                docker_host: r.docker_host.clone(),
                provider: r.provider.clone(),
                instance_type: r.instance_type.clone(),
                zone: r.zone.clone(),
                resources: Some(self.sampler.resources()),
                agent_version: r.agent_version.clone(),
                docker_version: r.docker_version.clone(),
                state: status.state.to_proto() as i32,
                lease_id: status.lease_id.unwrap_or_default(),
                lease_deadline: status.lease_deadline.map(berth_proto::from_system_time),
                csr_pem: r.csr_pem.clone(),
            })),
        }
    }

    fn heartbeat_message(&mut self) -> AgentMessage {
        let status = self.status.borrow().clone();
        let load = self.sampler.load();
        AgentMessage {
            msg: Some(Msg::Heartbeat(Heartbeat {
                state: status.state.to_proto() as i32,
                lease_id: status.lease_id.unwrap_or_default(),
                cpu_percent: load.cpu_percent,
                memory_used_bytes: load.memory_used_bytes,
                disk_free_bytes: load.disk_free_bytes,
            })),
        }
    }

    /// Hands a coordinator message to the driver. A full inbox means the
    /// driver is busy (tearing down); like a message sent while disconnected,
    /// it is lost, and the coordinator learns the outcome from our reports.
    fn dispatch(&self, msg: CoordinatorMessage) {
        if let Some(event) = Event::from_coordinator(msg) {
            tracing::debug!(?event, "from coordinator");
            if let Err(e) = self.to_driver.try_send(event) {
                tracing::warn!(error = %e, "driver not taking coordinator messages; dropped one");
            }
        }
    }

    async fn session(&mut self, stop: &CancellationToken) -> SessionEnd {
        let failed = |error: String| SessionEnd::Failed {
            error,
            registered: false,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.credentials.ca_pem.clone()));
        let endpoint = match Endpoint::from_shared(self.coordinator.clone())
            .and_then(|e| e.tls_config(tls))
        {
            Ok(e) => e
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true),
            Err(e) => return failed(format!("bad coordinator URL {:?}: {e}", self.coordinator)),
        };
        let channel = tokio::select! {
            _ = stop.cancelled() => return SessionEnd::Stopped,
            r = tokio::time::timeout(CONNECT_TIMEOUT, async {
                match self.dialer.clone() {
                    Some(d) => endpoint.connect_with_connector(d).await,
                    None => endpoint.connect().await,
                }
            }) => match r {
                Err(_) => return failed(format!("connect timed out after {CONNECT_TIMEOUT:?}")),
                Ok(Err(e)) => return failed(format!("connect: {}", error_chain(&e))),
                Ok(Ok(c)) => c,
            },
        };
        let mut client = AgentServiceClient::new(channel);
        // `Register` carries the current state, so state changes queued
        // before it are stale; only reports are kept. The driver publishes a
        // state before it queues the message announcing it, so draining first
        // and reading the state second loses nothing.
        while let Ok(m) = self.outbox.try_recv() {
            keep(&mut self.pending, m);
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        // Queued before the call: a server may wait for the first message
        // before it sends response headers.
        let register = self.register_message();
        if tx.try_send(register).is_err() {
            return failed("request stream closed before register".to_owned());
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        match format!("Bearer {}", self.credentials.join_token).parse() {
            Ok(v) => {
                request.metadata_mut().insert("authorization", v);
            }
            Err(_) => return failed("the join token is not valid header text".to_owned()),
        }
        let response = tokio::select! {
            _ = stop.cancelled() => return SessionEnd::Stopped,
            r = tokio::time::timeout(REGISTER_TIMEOUT, client.connect(request)) => match r {
                Err(_) => return failed(format!("stream not accepted within {REGISTER_TIMEOUT:?}")),
                Ok(Err(status)) => return failed(format!("connect rpc: {status}")),
                Ok(Ok(r)) => r,
            },
        };

        // The spawned reader: incoming messages into an mpsc, ending with the
        // reason the stream ended.
        let mut inbound = response.into_inner();
        let (in_tx, mut in_rx) = mpsc::channel::<Result<CoordinatorMessage, String>>(STREAM_BUFFER);
        let _reader = AbortOnDrop(tokio::spawn(async move {
            loop {
                let item = match inbound.message().await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err("coordinator closed the stream".to_owned()),
                    Err(status) => Err(format!("stream error: {status}")),
                };
                let end = item.is_err();
                if in_tx.send(item).await.is_err() || end {
                    return;
                }
            }
        }));

        // Wait for Registered; anything else before it is still handed on.
        let registered = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        let interval = loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return SessionEnd::Stopped,
                _ = tokio::time::sleep_until(registered) => {
                    return failed(format!("no Registered within {REGISTER_TIMEOUT:?}"));
                }
                m = in_rx.recv() => m,
            };
            match next {
                Some(Ok(CoordinatorMessage {
                    msg: Some(coordinator_message::Msg::Registered(r)),
                })) => {
                    if r.server_cert_pem.is_empty() || r.ca_pem.is_empty() {
                        return failed("Registered carried no server certificate".to_owned());
                    }
                    let issued = Issued {
                        server_cert_pem: r.server_cert_pem,
                        ca_pem: r.ca_pem,
                    };
                    self.published.send_modify(|s| s.issued = Some(issued));
                    break heartbeat_interval(r.heartbeat_interval_ms);
                }
                Some(Ok(other)) => self.dispatch(other),
                Some(Err(e)) => return failed(e),
                None => return failed("reader ended".to_owned()),
            }
        };
        self.published.send_modify(|s| {
            s.connected = true;
            s.heartbeat_interval = Some(interval);
            s.registrations += 1;
        });
        tracing::info!(coordinator = %self.coordinator, heartbeat = ?interval, "registered with coordinator");
        let lost = |error: String| SessionEnd::Failed {
            error,
            registered: true,
        };

        while let Some(m) = self.pending.pop_front() {
            if !send(&tx, m.clone()).await {
                self.pending.push_front(m);
                return lost("stream closed while sending queued reports".to_owned());
            }
        }

        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return SessionEnd::Stopped,
                m = self.outbox.recv(), if self.outbox_open => match m {
                    Some(m) => {
                        if !send(&tx, m.clone()).await {
                            keep(&mut self.pending, m);
                            return lost("stream closed".to_owned());
                        }
                    }
                    None => {
                        // The driver is done. Half-close our side and give the
                        // coordinator a moment to take the last messages.
                        self.outbox_open = false;
                        drop(tx);
                        let _ = tokio::time::timeout(CLOSE_GRACE, async {
                            while in_rx.recv().await.is_some() {}
                        })
                        .await;
                        return SessionEnd::Finished;
                    }
                },
                _ = ticker.tick() => {
                    let hb = self.heartbeat_message();
                    if !send(&tx, hb).await {
                        return lost("stream closed".to_owned());
                    }
                }
                m = in_rx.recv() => match m {
                    Some(Ok(CoordinatorMessage { msg: Some(coordinator_message::Msg::Registered(r)) })) => {
                        let interval = heartbeat_interval(r.heartbeat_interval_ms);
                        ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    Some(Ok(msg)) => self.dispatch(msg),
                    Some(Err(e)) => return lost(e),
                    None => return lost("reader ended".to_owned()),
                },
            }
        }
    }
}

/// Queues one message on the request stream; false if the stream is gone.
async fn send(tx: &mpsc::Sender<AgentMessage>, m: AgentMessage) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, tx.send(m)).await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::v1::{LeaseEnded, StateChanged, WipeReport};

    mod fake {
        //! A coordinator that can refuse streams and break the current one.
        use super::super::*;
        use berth_proto::v1::Registered;
        use berth_proto::v1::agent_service_server::AgentService;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        use tonic::{Request, Response, Status, Streaming};

        pub type ToAgent = mpsc::Sender<Result<CoordinatorMessage, Status>>;

        #[derive(Clone)]
        pub struct Fake {
            pub seen: mpsc::UnboundedSender<AgentMessage>,
            pub current: Arc<Mutex<Option<ToAgent>>>,
            pub refuse: Arc<AtomicBool>,
            pub ca: Arc<berth_tls::Ca>,
            pub join_token: String,
        }

        #[tonic::async_trait]
        impl AgentService for Fake {
            type ConnectStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

            async fn connect(
                &self,
                request: Request<Streaming<AgentMessage>>,
            ) -> Result<Response<Self::ConnectStream>, Status> {
                if self.refuse.load(Ordering::SeqCst) {
                    return Err(Status::unavailable("coordinator restarting"));
                }
                let expected = format!("Bearer {}", self.join_token);
                let presented = request.metadata().get("authorization");
                if presented.and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
                    return Err(Status::unauthenticated("invalid pool join token"));
                }
                let mut inbound = request.into_inner();
                let ca = self.ca.clone();
                let (tx, rx) = mpsc::channel(16);
                *self.current.lock().unwrap() = Some(tx.clone());
                let seen = self.seen.clone();
                tokio::spawn(async move {
                    while let Ok(Some(msg)) = inbound.message().await {
                        if let Some(Msg::Register(reg)) = &msg.msg {
                            let addr = reg.host_addr.parse().unwrap();
                            let now = std::time::SystemTime::now();
                            let r = Registered {
                                heartbeat_interval_ms: 100,
                                server_cert_pem: ca
                                    .sign_host(&reg.csr_pem, &reg.host_id, addr, now)
                                    .unwrap(),
                                ca_pem: ca.cert_pem().to_owned(),
                            };
                            let reply = CoordinatorMessage {
                                msg: Some(coordinator_message::Msg::Registered(r)),
                            };
                            let _ = tx.send(Ok(reply)).await;
                        }
                        let _ = seen.send(msg);
                    }
                });
                Ok(Response::new(ReceiverStream::new(rx)))
            }
        }
    }

    /// Next message from the agent that is not a heartbeat.
    async fn next_non_heartbeat(rx: &mut mpsc::UnboundedReceiver<AgentMessage>) -> Msg {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("message in time")
                .expect("feed open");
            match m.msg {
                Some(Msg::Heartbeat(_)) | None => continue,
                Some(msg) => return msg,
            }
        }
    }

    #[tokio::test]
    async fn registers_heartbeats_reconnects_and_delivers_queued_reports() {
        use berth_proto::v1::agent_service_server::AgentServiceServer;
        use berth_proto::v1::{AssignLease, HostState as P};
        use std::sync::atomic::Ordering;
        use std::sync::{Arc, Mutex};
        use tokio_stream::wrappers::TcpListenerStream;

        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let (ca, _) = berth_tls::Ca::generate("test CA").unwrap();
        let ca = Arc::new(ca);
        let fake = fake::Fake {
            seen: seen_tx,
            current: Arc::new(Mutex::new(None)),
            refuse: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            ca: ca.clone(),
            join_token: berth_tls::token::generate(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let (cert, key) = ca.issue_server(&["127.0.0.1".into()]).unwrap();
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key));
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(AgentServiceServer::new(fake.clone()))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let front_key = berth_tls::KeyAndCsr::generate("front").unwrap();

        // A wrong join token is refused: the link never registers.
        let wrong = Credentials {
            ca_pem: ca.cert_pem().to_owned(),
            join_token: berth_tls::token::generate(),
        };

        let ready = Status {
            state: HostState::Ready,
            lease_id: None,
            lease_deadline: None,
        };
        let (status_tx, status_rx) = watch::channel(ready);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (driver_tx, mut driver_rx) = mpsc::channel(8);
        let registration = Registration {
            host_id: "btl-0001".into(),
            host_addr: "198.18.0.6".parse().unwrap(),
            docker_host: "tcp://198.18.0.6:2376".into(),
            provider: "local".into(),
            instance_type: String::new(),
            zone: String::new(),
            agent_version: "0.1.0".into(),
            docker_version: "20.10".into(),
            csr_pem: front_key.csr_pem.clone(),
        };
        {
            let (_s, status) = watch::channel(status_rx.borrow().clone());
            let (_o, outbox) = mpsc::unbounded_channel();
            let (to_driver, _d) = mpsc::channel(8);
            let sampler = Sampler::new(std::path::Path::new("/"));
            let (link, refused) = Link::new(
                url.clone(),
                wrong,
                registration.clone(),
                sampler,
                status,
                outbox,
                to_driver,
            );
            let stop = CancellationToken::new();
            let task = tokio::spawn(link.run(stop.clone()));
            tokio::time::sleep(Duration::from_millis(800)).await;
            assert_eq!(refused.borrow().registrations, 0);
            assert!(refused.borrow().issued.is_none());
            assert!(seen.try_recv().is_err(), "a refused agent was heard");
            stop.cancel();
            task.await.unwrap();
        }

        let credentials = Credentials {
            ca_pem: ca.cert_pem().to_owned(),
            join_token: fake.join_token.clone(),
        };
        let sampler = Sampler::new(std::path::Path::new("/"));
        let (link, mut link_status) = Link::new(
            url,
            credentials,
            registration,
            sampler,
            status_rx,
            out_rx,
            driver_tx,
        );
        let link_task = tokio::spawn(link.run(CancellationToken::new()));

        // First registration carries the identity and the current state.
        let Msg::Register(r) = next_non_heartbeat(&mut seen).await else {
            panic!("Register first")
        };
        assert_eq!(
            (r.host_id.as_str(), r.host_addr.as_str()),
            ("btl-0001", "198.18.0.6")
        );
        assert_eq!(P::try_from(r.state), Ok(P::Ready));
        assert!(r.resources.unwrap().cpus >= 1);
        assert_eq!(r.csr_pem, front_key.csr_pem);
        // The issued certificate is published for the front.
        let issued = link_status
            .wait_for(|s| s.issued.is_some())
            .await
            .unwrap()
            .issued
            .clone()
            .unwrap();
        assert_eq!(issued.ca_pem, ca.cert_pem());
        let identity = berth_tls::ServerIdentity {
            cert_pem: issued.server_cert_pem,
            key_pem: front_key.key_pem.clone(),
            ca_pem: issued.ca_pem,
        };
        assert!(berth_tls::lease_server_config(&identity, "l1").is_ok());
        // Heartbeats follow at the coordinator's interval.
        let hb = tokio::time::timeout(Duration::from_secs(5), async {
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
        .unwrap();
        assert_eq!(P::try_from(hb.state), Ok(P::Ready));

        // Coordinator messages reach the driver as events.
        let tx = fake.current.lock().unwrap().clone().unwrap();
        let assign = AssignLease {
            lease_id: "l1".into(),
            build_id: "b".into(),
            deadline: None,
        };
        let msg = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::AssignLease(assign)),
        };
        tx.send(Ok(msg)).await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), driver_rx.recv())
            .await
            .unwrap();
        assert!(
            matches!(event, Some(Event::Assign { ref lease_id, .. }) if lease_id == "l1"),
            "{event:?}"
        );

        // The coordinator goes away (the stream breaks, new streams are refused).
        fake.refuse.store(true, Ordering::SeqCst);
        tx.send(Err(tonic::Status::unavailable("restarting")))
            .await
            .unwrap();
        link_status.wait_for(|s| !s.connected).await.unwrap();

        // Meanwhile the host moves on: a state change (dropped; the next
        // Register carries the state) and a wipe report (kept).
        let deadline = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        status_tx.send_replace(Status {
            state: HostState::Leased,
            lease_id: Some("l1".into()),
            lease_deadline: Some(deadline),
        });
        let changed = StateChanged {
            state: P::Leased as i32,
            lease_id: "l1".into(),
            reason: String::new(),
        };
        out_tx
            .send(AgentMessage {
                msg: Some(Msg::StateChanged(changed)),
            })
            .unwrap();
        let report = WipeReport {
            lease_id: "l0".into(),
            verified: true,
            ..WipeReport::default()
        };
        out_tx
            .send(AgentMessage {
                msg: Some(Msg::WipeReport(report.clone())),
            })
            .unwrap();
        // Let the link see both while still disconnected.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!link_status.borrow().connected);

        fake.refuse.store(false, Ordering::SeqCst);
        let Msg::Register(r) = next_non_heartbeat(&mut seen).await else {
            panic!("Register again after reconnecting")
        };
        assert_eq!(P::try_from(r.state), Ok(P::Leased));
        assert_eq!(r.lease_id, "l1");
        assert_eq!(
            r.lease_deadline,
            Some(berth_proto::from_system_time(deadline))
        );
        assert_eq!(next_non_heartbeat(&mut seen).await, Msg::WipeReport(report));
        assert_eq!(link_status.borrow().registrations, 2);

        // The driver finishing (outbox closed) ends the link.
        drop(out_tx);
        tokio::time::timeout(Duration::from_secs(5), link_task)
            .await
            .unwrap()
            .unwrap();
        server.abort();
    }

    #[test]
    fn heartbeat_interval_is_clamped() {
        assert_eq!(heartbeat_interval(0), DEFAULT_HEARTBEAT);
        assert_eq!(heartbeat_interval(1), MIN_HEARTBEAT);
        assert_eq!(heartbeat_interval(2500), Duration::from_millis(2500));
        assert_eq!(heartbeat_interval(u32::MAX), MAX_HEARTBEAT);
    }

    #[test]
    fn only_reports_are_kept_while_disconnected_and_bounded() {
        let mut pending = VecDeque::new();
        let msg = |m| AgentMessage { msg: Some(m) };
        keep(
            &mut pending,
            msg(Msg::StateChanged(StateChanged::default())),
        );
        keep(&mut pending, msg(Msg::WipeReport(WipeReport::default())));
        keep(&mut pending, msg(Msg::LeaseEnded(LeaseEnded::default())));
        assert_eq!(pending.len(), 2);
        for i in 0..100 {
            keep(
                &mut pending,
                msg(Msg::LeaseEnded(LeaseEnded {
                    lease_id: i.to_string(),
                    reason: 0,
                })),
            );
        }
        assert_eq!(pending.len(), MAX_PENDING_REPORTS);
        // The newest are kept.
        assert!(
            matches!(&pending.back().unwrap().msg, Some(Msg::LeaseEnded(l)) if l.lease_id == "99")
        );
    }
}
