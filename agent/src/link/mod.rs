//! The agent's side of `AgentService.Connect`: one bidirectional stream to
//! the coordinator, kept up for the agent's whole life.
//!
//! A session (one connection) goes through its [`Phase`]s: connect (TLS,
//! HTTP/2), register (the stream opens with `Register`: identity,
//! resources, versions and the host's *current* state and lease, read from
//! the driver's `watch`), await `Registered{heartbeat_interval_ms}`, and
//! serve: heartbeats at that interval, the driver's outgoing messages
//! forwarded, and a spawned reader turning incoming messages into driver
//! events. Outgoing messages use an mpsc drained into a `ReceiverStream`
//! (the request stream); a failed send means the coordinator is gone.
//!
//! A failed session ends with a [`SessionError`] naming its phase, and the
//! reconnect loop decides on it: it reconnects with jittered exponential
//! backoff, started over after a session that got as far as serving.
//! While disconnected, incoming messages are simply lost and state
//! changes are dropped (the next `Register` carries the current state), but
//! reports (`WipeReport`, `LeaseEnded`) are kept, a bounded few, and sent
//! right after the next registration.
//!
//! Several coordinators (`--coordinator URL,URL,...`: a leader and its
//! standbys on a shared store) are tried in turn: a session that fails
//! moves on to the next address, or straight to the one a standby names as
//! the leader's (its UNAVAILABLE carries the `berth-leader` metadata).
//!
//! The connection is TLS (the coordinator's certificate must chain to the CA
//! the agent was given) and the stream carries the pool join token as bearer
//! metadata. `Register` carries a CSR for the Docker front's key; the
//! server certificate and pool CA that come back in `Registered` are
//! published in [`LinkStatus::issued`], where the front picks them up.

pub mod net;

use std::collections::VecDeque;
use std::future::Future;
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
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::Instrument;

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
/// The cap instead, with several coordinators: while a standby takes over
/// a lost leader's lead, agents find the new leader within about a second
/// of it (a standby's refusal costs it next to nothing).
pub const RECONNECT_MAX_SEVERAL: Duration = Duration::from_secs(1);
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
    /// The key the lease is pinned to (sent with `Register`).
    pub lease_key: Option<berth_tls::KeyId>,
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

/// How one session ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The stop token fired.
    Stopped,
    /// The driver is done and everything was sent.
    Finished,
}

/// The phases of one session, in order; a failure names the one it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Establishing the TLS/HTTP/2 connection.
    Connect,
    /// Opening the stream with `Register` and the join token.
    Register,
    /// Waiting for the coordinator's `Registered`.
    AwaitRegistered,
    /// Registered: heartbeats, the driver's messages, coordinator messages.
    Serve,
}

/// How the coordinator's side of the stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamEnd {
    #[error("coordinator closed the stream")]
    Closed,
    #[error("stream error: {0}")]
    Status(tonic::Status),
    /// The reader task is gone without saying why (it was aborted).
    #[error("reader ended")]
    ReaderGone,
}

/// Why a session with the coordinator failed; the reconnect loop decides
/// on it (a session that got as far as [`Phase::Serve`] starts the backoff
/// over).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    // Phase::Connect
    #[error("bad coordinator URL {url:?}")]
    BadUrl {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("connect")]
    Connect(#[source] tonic::transport::Error),
    // Phase::Register
    #[error("the join token is not valid header text")]
    BadJoinToken,
    #[error("request stream closed before register")]
    ClosedBeforeRegister,
    #[error("stream not accepted within {0:?}")]
    AcceptTimeout(Duration),
    #[error("connect rpc: {0}")]
    Refused(tonic::Status),
    // Phase::AwaitRegistered
    #[error("no Registered within {0:?}")]
    RegisteredTimeout(Duration),
    #[error("Registered carried no server certificate")]
    NoCertificate,
    #[error(transparent)]
    EndedUnregistered(StreamEnd),
    // Phase::Serve
    #[error("stream closed while sending queued reports")]
    QueuedReportsNotSent,
    #[error("stream closed")]
    SendFailed,
    #[error(transparent)]
    Lost(StreamEnd),
}

impl SessionError {
    /// The phase the session failed in.
    pub fn phase(&self) -> Phase {
        match self {
            SessionError::BadUrl { .. }
            | SessionError::ConnectTimeout(_)
            | SessionError::Connect(_) => Phase::Connect,
            SessionError::BadJoinToken
            | SessionError::ClosedBeforeRegister
            | SessionError::AcceptTimeout(_)
            | SessionError::Refused(_) => Phase::Register,
            SessionError::RegisteredTimeout(_)
            | SessionError::NoCertificate
            | SessionError::EndedUnregistered(_) => Phase::AwaitRegistered,
            SessionError::QueuedReportsNotSent
            | SessionError::SendFailed
            | SessionError::Lost(_) => Phase::Serve,
        }
    }
}

/// The metadata key a standby coordinator names the leader's address in.
pub const LEADER_KEY: &str = "berth-leader";

/// The addresses of `--coordinator`: one URL, or several separated by commas.
pub fn coordinator_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether `url` (https://HOST:PORT[/...]) is the address `addr` (HOST:PORT).
fn url_names(url: &str, addr: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next() == Some(addr)
}

/// Runs `f` unless `stop` fires first (`None`).
async fn or_stop<T>(stop: &CancellationToken, f: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        _ = stop.cancelled() => None,
        v = f => Some(v),
    }
}

/// The spawned reader of one session: the coordinator's messages into an
/// mpsc, ending with the reason the stream ended. Aborted when dropped;
/// [`Inbound::close`] also waits for it to be gone.
struct Inbound {
    rx: mpsc::Receiver<Result<CoordinatorMessage, StreamEnd>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Inbound {
    fn spawn(mut stream: tonic::Streaming<CoordinatorMessage>) -> Self {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let reader = tokio::spawn(
            async move {
                loop {
                    let item = match stream.message().await {
                        Ok(Some(m)) => Ok(m),
                        Ok(None) => Err(StreamEnd::Closed),
                        Err(status) => Err(StreamEnd::Status(status)),
                    };
                    let end = item.is_err();
                    if tx.send(item).await.is_err() || end {
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        Inbound {
            rx,
            reader: Some(reader),
        }
    }

    /// The next message, or how the stream ended.
    async fn recv(&mut self) -> Result<CoordinatorMessage, StreamEnd> {
        self.rx.recv().await.unwrap_or(Err(StreamEnd::ReaderGone))
    }

    async fn close(mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
            let _ = reader.await;
        }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

/// The link task.
pub struct Link {
    /// The address of the current (or next) session.
    coordinator: String,
    /// Every coordinator address this agent was given, in order.
    coordinators: Vec<String>,
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
        let coordinators = coordinator_urls(&coordinator);
        let link = Link {
            coordinator: coordinators.first().cloned().unwrap_or(coordinator),
            coordinators,
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
        match or_stop(&stop, booted).await {
            // The driver is gone before the host ever booted.
            None | Some(Err(_)) => return,
            Some(Ok(_)) => {}
        }
        let max = if self.coordinators.len() > 1 {
            RECONNECT_MAX_SEVERAL
        } else {
            RECONNECT_MAX
        };
        let mut backoff = Backoff::new(RECONNECT_BASE, max);
        loop {
            if !self.outbox_open && self.pending.is_empty() {
                return;
            }
            match self.session(&stop).await {
                Ok(Ended::Stopped | Ended::Finished) => return,
                Err(e) => {
                    // A session that was registered proved the coordinator
                    // reachable: the next attempt starts small again.
                    let phase = e.phase();
                    if phase == Phase::Serve {
                        backoff.reset();
                    }
                    // A verdict, not a failure: the coordinator will never
                    // take this host (it served a lease, or is not the host
                    // its id was first registered with). The driver ends it.
                    if let SessionError::Refused(s) = &e
                        && s.code() == tonic::Code::PermissionDenied
                    {
                        tracing::error!(coordinator = %self.coordinator, reason = %s.message(), "the coordinator refuses this host");
                        let _ = self
                            .to_driver
                            .send(Event::Refused {
                                reason: s.message().to_owned(),
                            })
                            .await;
                    }
                    tracing::warn!(coordinator = %self.coordinator, ?phase, error = %error_chain(&e), "coordinator link down; reconnecting");
                    self.move_on(&e);
                }
            }
            self.published.send_modify(|s| s.connected = false);
            let delay = backoff.next_delay(&mut rand::rng());
            if self.wait_before_reconnect(delay, &stop).await.is_some() {
                return;
            }
        }
    }

    /// After a failed session with several coordinators: the one a standby
    /// named as the leader, else the next address.
    fn move_on(&mut self, e: &SessionError) {
        if self.coordinators.len() < 2 {
            return;
        }
        let named = match e {
            SessionError::Refused(s) => s
                .metadata()
                .get(LEADER_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            _ => None,
        };
        let at = self
            .coordinators
            .iter()
            .position(|u| *u == self.coordinator);
        let next = named
            .and_then(|addr| {
                self.coordinators
                    .iter()
                    .position(|u| url_names(u, &addr))
                    .filter(|&i| Some(i) != at)
            })
            .unwrap_or_else(|| at.map_or(0, |i| (i + 1) % self.coordinators.len()));
        self.coordinator = self.coordinators[next].clone();
        tracing::info!(coordinator = %self.coordinator, "trying the next coordinator");
    }

    /// Sleeps `delay` while keeping the driver's reports; `Some` when the
    /// link is to end instead of reconnecting.
    async fn wait_before_reconnect(
        &mut self,
        delay: Duration,
        stop: &CancellationToken,
    ) -> Option<Ended> {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Some(Ended::Stopped),
                _ = &mut sleep => return None,
                m = self.outbox.recv(), if self.outbox_open => match m {
                    Some(m) => keep(&mut self.pending, m),
                    None => {
                        self.outbox_open = false;
                        // Done, and nothing worth reconnecting for.
                        if self.pending.is_empty() {
                            return Some(Ended::Finished);
                        }
                    }
                },
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
                lease_key_sha256: status.lease_key.map(|k| k.0.to_vec()).unwrap_or_default(),
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

    /// One connection, phase by phase: connect, register, await
    /// `Registered`, serve.
    async fn session(&mut self, stop: &CancellationToken) -> Result<Ended, SessionError> {
        let Some(channel) = or_stop(stop, self.connect()).await else {
            return Ok(Ended::Stopped);
        };
        let channel = channel?;
        let Some(opened) = or_stop(stop, self.register(channel)).await else {
            return Ok(Ended::Stopped);
        };
        let (tx, stream) = opened?;
        let mut inbound = Inbound::spawn(stream);
        let result = self.registered_then_serve(tx, &mut inbound, stop).await;
        inbound.close().await;
        result
    }

    /// Phase [`Phase::Connect`]: the TLS connection to the coordinator.
    async fn connect(&self) -> Result<Channel, SessionError> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.credentials.ca_pem.clone()));
        let endpoint = Endpoint::from_shared(self.coordinator.clone())
            .and_then(|e| e.tls_config(tls))
            .map_err(|source| SessionError::BadUrl {
                url: self.coordinator.clone(),
                source,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let connecting = async {
            match self.dialer.clone() {
                Some(d) => endpoint.connect_with_connector(d).await,
                None => endpoint.connect().await,
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => Err(SessionError::ConnectTimeout(CONNECT_TIMEOUT)),
            Ok(r) => r.map_err(SessionError::Connect),
        }
    }

    /// Phase [`Phase::Register`]: opens the stream with `Register` (the
    /// host's current state) and the join token; returns the request
    /// stream's sender and the coordinator's stream.
    async fn register(
        &mut self,
        channel: Channel,
    ) -> Result<
        (
            mpsc::Sender<AgentMessage>,
            tonic::Streaming<CoordinatorMessage>,
        ),
        SessionError,
    > {
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
        tx.try_send(register)
            .map_err(|_| SessionError::ClosedBeforeRegister)?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let bearer = format!("Bearer {}", self.credentials.join_token)
            .parse()
            .map_err(|_| SessionError::BadJoinToken)?;
        request.metadata_mut().insert("authorization", bearer);
        match tokio::time::timeout(REGISTER_TIMEOUT, client.connect(request)).await {
            Err(_) => Err(SessionError::AcceptTimeout(REGISTER_TIMEOUT)),
            Ok(Err(status)) => Err(SessionError::Refused(status)),
            Ok(Ok(response)) => Ok((tx, response.into_inner())),
        }
    }

    async fn registered_then_serve(
        &mut self,
        tx: mpsc::Sender<AgentMessage>,
        inbound: &mut Inbound,
        stop: &CancellationToken,
    ) -> Result<Ended, SessionError> {
        let Some(interval) = or_stop(stop, self.await_registered(inbound)).await else {
            return Ok(Ended::Stopped);
        };
        let interval = interval?;
        self.published.send_modify(|s| {
            s.connected = true;
            s.heartbeat_interval = Some(interval);
            s.registrations += 1;
        });
        tracing::info!(coordinator = %self.coordinator, heartbeat = ?interval, "registered with coordinator");
        self.serve(tx, inbound, interval, stop).await
    }

    /// Phase [`Phase::AwaitRegistered`]: waits for `Registered`, publishes
    /// the certificate it carries and returns the heartbeat interval.
    /// Anything else before it is still handed on to the driver.
    async fn await_registered(&mut self, inbound: &mut Inbound) -> Result<Duration, SessionError> {
        let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        loop {
            let next = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(SessionError::RegisteredTimeout(REGISTER_TIMEOUT));
                }
                m = inbound.recv() => m,
            };
            match next.map_err(SessionError::EndedUnregistered)? {
                CoordinatorMessage {
                    msg: Some(coordinator_message::Msg::Registered(r)),
                } => {
                    if r.server_cert_pem.is_empty() || r.ca_pem.is_empty() {
                        return Err(SessionError::NoCertificate);
                    }
                    let issued = Issued {
                        server_cert_pem: r.server_cert_pem,
                        ca_pem: r.ca_pem,
                    };
                    self.published.send_modify(|s| s.issued = Some(issued));
                    return Ok(heartbeat_interval(r.heartbeat_interval_ms));
                }
                other => self.dispatch(other),
            }
        }
    }

    /// Phase [`Phase::Serve`]: sends the reports kept while disconnected,
    /// then heartbeats at `interval`, forwards the driver's messages and
    /// dispatches the coordinator's, until the driver is done (everything
    /// sent), `stop` fires or the stream fails.
    async fn serve(
        &mut self,
        tx: mpsc::Sender<AgentMessage>,
        inbound: &mut Inbound,
        interval: Duration,
        stop: &CancellationToken,
    ) -> Result<Ended, SessionError> {
        while let Some(m) = self.pending.pop_front() {
            if !send(&tx, m.clone()).await {
                self.pending.push_front(m);
                return Err(SessionError::QueuedReportsNotSent);
            }
        }
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(Ended::Stopped),
                m = self.outbox.recv(), if self.outbox_open => match m {
                    Some(m) => {
                        if !send(&tx, m.clone()).await {
                            keep(&mut self.pending, m);
                            return Err(SessionError::SendFailed);
                        }
                    }
                    None => {
                        // The driver is done. Half-close our side and give the
                        // coordinator a moment to take the last messages.
                        self.outbox_open = false;
                        drop(tx);
                        let _ = tokio::time::timeout(CLOSE_GRACE, async {
                            while inbound.recv().await.is_ok() {}
                        })
                        .await;
                        return Ok(Ended::Finished);
                    }
                },
                _ = ticker.tick() => {
                    let hb = self.heartbeat_message();
                    if !send(&tx, hb).await {
                        return Err(SessionError::SendFailed);
                    }
                }
                m = inbound.recv() => match m.map_err(SessionError::Lost)? {
                    CoordinatorMessage { msg: Some(coordinator_message::Msg::Registered(r)) } => {
                        // Mid-stream: new settings, or the front's certificate
                        // renewed before it runs out (the front takes it).
                        let interval = heartbeat_interval(r.heartbeat_interval_ms);
                        ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        if !r.server_cert_pem.is_empty() && !r.ca_pem.is_empty() {
                            let issued = Issued {
                                server_cert_pem: r.server_cert_pem,
                                ca_pem: r.ca_pem,
                            };
                            tracing::info!("the front's server certificate was renewed");
                            self.published.send_modify(|s| s.issued = Some(issued));
                        }
                    }
                    msg => self.dispatch(msg),
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
    #![allow(clippy::unwrap_used)]
    use super::*;
    use berth_proto::v1::{LeaseEnded, StateChanged, WipeReport};
    use berth_testkit::FakeCoordinator;

    /// Bound on each message the tests wait for.
    const WAIT: Duration = Duration::from_secs(10);

    fn registration(csr_pem: &str) -> Registration {
        Registration {
            host_id: "btl-0001".into(),
            host_addr: "198.18.0.6".parse().unwrap(),
            docker_host: "tcp://198.18.0.6:2376".into(),
            provider: "local".into(),
            instance_type: String::new(),
            zone: String::new(),
            agent_version: "0.1.0".into(),
            docker_version: "20.10".into(),
            csr_pem: csr_pem.to_owned(),
        }
    }

    fn ready() -> Status {
        Status {
            state: HostState::Ready,
            lease_id: None,
            lease_deadline: None,
            lease_key: None,
        }
    }

    /// A link to `url` for a Ready host, and the ends the test holds.
    struct Rig {
        link: Link,
        status: watch::Receiver<LinkStatus>,
        _host: watch::Sender<Status>,
        _outbox: mpsc::UnboundedSender<AgentMessage>,
        _driver: mpsc::Receiver<Event>,
    }

    fn rig(url: &str, credentials: Credentials) -> Rig {
        let front_key = berth_tls::KeyAndCsr::generate("front").unwrap();
        let (host, host_rx) = watch::channel(ready());
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let (to_driver, driver) = mpsc::channel(8);
        let (link, status) = Link::new(
            url.to_owned(),
            credentials,
            registration(&front_key.csr_pem),
            Sampler::new(std::path::Path::new("/")),
            host_rx,
            outbox_rx,
            to_driver,
        );
        Rig {
            link,
            status,
            _host: host,
            _outbox: outbox,
            _driver: driver,
        }
    }

    #[tokio::test]
    async fn with_several_coordinators_a_failed_session_moves_on_to_the_next() {
        let (fake, mut seen) = FakeCoordinator::start().await;
        let good = Credentials {
            ca_pem: fake.ca_pem().to_owned(),
            join_token: fake.join_token().to_owned(),
        };
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("https://{}", closed.local_addr().unwrap());
        drop(closed);
        // The first address answers nothing: the link registers with the second.
        let r = rig(&format!("{dead}, {}", fake.url()), good);
        assert_eq!(r.link.coordinator, dead);
        let stop = CancellationToken::new();
        let task = tokio::spawn(r.link.run(stop.clone()));
        let msg = seen.next_non_heartbeat(WAIT).await;
        assert!(matches!(msg, Msg::Register(_)), "{msg:?}");
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn a_standby_naming_the_leader_sends_the_link_there() {
        let creds = Credentials {
            ca_pem: String::new(),
            join_token: String::new(),
        };
        let mut r = rig(
            "https://127.0.0.1:7001,https://127.0.0.1:7002,https://127.0.0.1:7003",
            creds,
        );
        let mut s = tonic::Status::unavailable("a standby");
        s.metadata_mut()
            .insert(LEADER_KEY, "127.0.0.1:7003".parse().unwrap());
        r.link.move_on(&SessionError::Refused(s));
        assert_eq!(r.link.coordinator, "https://127.0.0.1:7003");
        // Without a name: the next address, round and round.
        r.link.move_on(&SessionError::SendFailed);
        assert_eq!(r.link.coordinator, "https://127.0.0.1:7001");
        r.link.move_on(&SessionError::SendFailed);
        assert_eq!(r.link.coordinator, "https://127.0.0.1:7002");
        assert!(url_names("https://h:1/x", "h:1") && !url_names("https://h:1", "h:2"));
    }

    #[tokio::test]
    async fn a_failed_session_names_its_phase() {
        let (fake, mut seen) = FakeCoordinator::start().await;
        let good = Credentials {
            ca_pem: fake.ca_pem().to_owned(),
            join_token: fake.join_token().to_owned(),
        };
        let stop = CancellationToken::new();

        // Nothing listens: the connect phase fails.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", closed.local_addr().unwrap());
        drop(closed);
        let e = rig(&url, good.clone())
            .link
            .session(&stop)
            .await
            .unwrap_err();
        assert_eq!(e.phase(), Phase::Connect, "{e:?}");
        assert!(matches!(e, SessionError::Connect(_)), "{e:?}");

        // A wrong join token: refused when the stream opens.
        let wrong = Credentials {
            join_token: berth_tls::token::generate(),
            ..good.clone()
        };
        let e = rig(fake.url(), wrong)
            .link
            .session(&stop)
            .await
            .unwrap_err();
        assert_eq!(e.phase(), Phase::Register, "{e:?}");
        assert!(
            matches!(&e, SessionError::Refused(s) if s.code() == tonic::Code::Unauthenticated),
            "{e:?}"
        );
        assert!(seen.try_next().is_none(), "a refused agent was heard");

        // Registered, then the coordinator fails the stream: lost while serving.
        let mut r = rig(fake.url(), good);
        let link_status = r.status.clone();
        let session = tokio::spawn(async move { r.link.session(&stop).await });
        assert!(matches!(
            seen.next_non_heartbeat(WAIT).await,
            Msg::Register(_)
        ));
        fake.break_stream(tonic::Status::unavailable("restarting"))
            .await;
        let e = tokio::time::timeout(WAIT, session)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.phase(), Phase::Serve, "{e:?}");
        assert!(
            matches!(&e, SessionError::Lost(StreamEnd::Status(s)) if s.code() == tonic::Code::Unavailable),
            "{e:?}"
        );
        assert_eq!(link_status.borrow().registrations, 1);
    }

    #[tokio::test]
    async fn registers_heartbeats_reconnects_and_delivers_queued_reports() {
        use berth_proto::v1::{AssignLease, HostState as P};

        let (fake, mut seen) = FakeCoordinator::start().await;
        let front_key = berth_tls::KeyAndCsr::generate("front").unwrap();

        // A wrong join token is refused: the link never registers.
        {
            let wrong = Credentials {
                ca_pem: fake.ca_pem().to_owned(),
                join_token: berth_tls::token::generate(),
            };
            let r = rig(fake.url(), wrong);
            let refused = r.status.clone();
            let stop = CancellationToken::new();
            let task = tokio::spawn(r.link.run(stop.clone()));
            tokio::time::sleep(Duration::from_millis(800)).await;
            assert_eq!(refused.borrow().registrations, 0);
            assert!(refused.borrow().issued.is_none());
            assert!(seen.try_next().is_none(), "a refused agent was heard");
            stop.cancel();
            task.await.unwrap();
        }

        let (status_tx, status_rx) = watch::channel(ready());
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (driver_tx, mut driver_rx) = mpsc::channel(8);
        let credentials = Credentials {
            ca_pem: fake.ca_pem().to_owned(),
            join_token: fake.join_token().to_owned(),
        };
        let sampler = Sampler::new(std::path::Path::new("/"));
        let (link, mut link_status) = Link::new(
            fake.url().to_owned(),
            credentials,
            registration(&front_key.csr_pem),
            sampler,
            status_rx,
            out_rx,
            driver_tx,
        );
        let link_task = tokio::spawn(link.run(CancellationToken::new()));

        // First registration carries the identity and the current state.
        let Msg::Register(r) = seen.next_non_heartbeat(WAIT).await else {
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
        assert_eq!(issued.ca_pem, fake.ca_pem());
        let identity = berth_tls::ServerIdentity {
            cert_pem: issued.server_cert_pem,
            key_pem: front_key.key_pem.clone(),
            ca_pem: issued.ca_pem,
        };
        let pinned = berth_tls::PinnedKey::new(berth_tls::KeyId([7; 32]));
        assert!(berth_tls::lease_server_config(&identity, "l1", pinned).is_ok());
        // Heartbeats follow at the coordinator's interval.
        let hb = seen.next_heartbeat(Duration::from_secs(5)).await;
        assert_eq!(P::try_from(hb.state), Ok(P::Ready));

        // Coordinator messages reach the driver as events.
        fake.send(coordinator_message::Msg::AssignLease(AssignLease {
            lease_id: "l1".into(),
            build_id: "b".into(),
            deadline: None,
            client_key_sha256: vec![7; 32],
        }))
        .await;
        let event = tokio::time::timeout(Duration::from_secs(5), driver_rx.recv())
            .await
            .unwrap();
        assert!(
            matches!(event, Some(Event::Assign { ref lease_id, .. }) if lease_id == "l1"),
            "{event:?}"
        );

        // The coordinator goes away (the stream breaks, new streams are refused).
        fake.refuse_streams(true);
        fake.break_stream(tonic::Status::unavailable("restarting"))
            .await;
        link_status.wait_for(|s| !s.connected).await.unwrap();

        // Meanwhile the host moves on: a state change (dropped; the next
        // Register carries the state) and a wipe report (kept).
        let deadline = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        status_tx.send_replace(Status {
            state: HostState::Leased,
            lease_id: Some("l1".into()),
            lease_deadline: Some(deadline),
            lease_key: Some(berth_tls::KeyId([7; 32])),
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

        fake.refuse_streams(false);
        let Msg::Register(r) = seen.next_non_heartbeat(WAIT).await else {
            panic!("Register again after reconnecting")
        };
        assert_eq!(P::try_from(r.state), Ok(P::Leased));
        assert_eq!(r.lease_id, "l1");
        assert_eq!(
            r.lease_deadline,
            Some(berth_proto::from_system_time(deadline))
        );
        assert_eq!(seen.next_non_heartbeat(WAIT).await, Msg::WipeReport(report));
        assert_eq!(link_status.borrow().registrations, 2);

        // The driver finishing (outbox closed) ends the link.
        drop(out_tx);
        tokio::time::timeout(Duration::from_secs(5), link_task)
            .await
            .unwrap()
            .unwrap();
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
