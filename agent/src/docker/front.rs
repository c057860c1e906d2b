//! The Docker front: the only way into a host's dockerd. A mutual-TLS
//! listener on `HOST_ADDR:PORT` that listens while the host is offered or
//! leased and, once a client is admitted, forwards bytes both ways to
//! dockerd's unix socket. A byte-level proxy needs no knowledge of HTTP, so
//! hijacked and upgraded connections (`run -it`, `attach`, `exec`, `build`)
//! work as they are, inside TLS.
//!
//! Admission happens in the TLS handshake (`berth_tls::lease_server_config`):
//! the client certificate must chain to the pool CA and name the lease the
//! front was opened for. No certificate, another lease's, an expired or
//! self-signed one, or plaintext: the handshake fails and nothing reaches
//! dockerd. The server certificate is the one the coordinator issued at
//! registration (read from the link's status when a lease opens the front);
//! its key never leaves the agent. A renewed lease certificate names the same
//! lease, so it is admitted without reopening anything.
//!
//! The coordinator answers an Acquire once the assignment is recorded,
//! without waiting for the agent, so a build may connect before its lease
//! has reached the agent. The front therefore listens from the moment the
//! host is offered ([`FrontControl::listen`]); a connection that arrives
//! with no lease admitted waits, before any handshake, until the lease
//! arrives ([`FrontControl::open`]) or [`LEASE_WAIT`] has passed, and is
//! then dropped. Nothing is admitted without a lease.
//!
//! Closing the front at the end of a lease cancels one token: the listener
//! is dropped (new connections are refused until the host is offered
//! again) and every open connection is cut, including a `docker logs -f`
//! in the middle of streaming and connections still waiting for a lease.
//!
//! The host address lives in the host's network namespace while the agent
//! stays in the root namespace (to reach the coordinator on loopback). A
//! socket belongs to the namespace it was created in, so the listener's
//! socket is created on a short-lived thread that first joins the host's
//! namespace. That thread and its `setns` cost milliseconds, so the socket
//! for the next listener is made ahead of time ([`DockerFront::prepare`],
//! and again after every close), unbound until the host is offered.
//!
//! The accept -> handshake -> proxy seam is [`serve_connection`], generic
//! over the client stream (a TLS stream in production, anything in tests).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use berth_tls::{Fix, KeyId, PinnedKey};
use tokio::sync::mpsc;

use crate::host::state::Event;
use crate::link::LinkStatus;

/// Bound on creating the listener (thread start, setns, bind).
pub const FRONT_BIND_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on waiting for the accept loop and every connection to end after
/// the front is closed. They only have to notice a cancelled token.
pub const FRONT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on connecting to dockerd's socket for one client connection.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one client's TLS handshake: a client that connects and says
/// nothing must not hold a task.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection waits for a lease to reach the agent: a build
/// gets its answer once its assignment is recorded, possibly before its
/// agent has the lease. The coordinator's default time for an agent to
/// accept an assignment; a lease not accepted by then has ended anyway.
pub const LEASE_WAIT: Duration = Duration::from_secs(5);
/// Longest opening a front waits for the coordinator to issue the host's
/// server certificate. Only an agent that resumes a lease after a restart
/// opens the front before its registration is answered.
pub const FRONT_CERT_WAIT: Duration = Duration::from_secs(30);
/// Copy buffer per direction: bulk transfers (`docker load`, build contexts)
/// go through the front, and TLS records hold up to 16 KiB.
pub const COPY_BUFFER: usize = 64 * 1024;
/// Bytes read from a client's socket at once, ahead of the TLS layer (two
/// full TLS records).
const READ_AHEAD: usize = 32 * 1024;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Listen backlog: a CI job's `docker compose up` opens a burst of connections.
const LISTEN_BACKLOG: i32 = 1024;
/// TLS handshakes in progress at once. The front is reachable by anyone on
/// the host's network; a flood of half-open handshakes must not take the
/// agent's memory or CPU. A connection beyond the cap is dropped at once;
/// an admitted connection no longer counts.
pub const MAX_HANDSHAKES: usize = 64;
/// At most one log line about refused clients per this interval; the line
/// says how many were refused since the last one.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs refused connections without letting a scan flood the log: the
/// first refusal of an interval is logged with its reason, the rest are
/// counted and summed up in the next line.
#[derive(Debug, Default)]
pub struct RefusalLog {
    state: std::sync::Mutex<RefusalState>,
}

#[derive(Debug, Default)]
struct RefusalState {
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl RefusalLog {
    /// Records one refusal; returns the number of earlier refusals it sums
    /// up when this one is to be logged, `None` when it is only counted.
    pub fn note(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        if s.last.is_some_and(|l| now < l + REFUSAL_LOG_INTERVAL) {
            s.suppressed += 1;
            return None;
        }
        s.last = Some(now);
        Some(std::mem::take(&mut s.suppressed))
    }

    fn refused(&self, why: &str, error: &dyn std::fmt::Display) {
        if let Some(earlier) = self.note() {
            tracing::info!(%error, refused_since_last_line = earlier, "{why}");
        }
    }
}

/// What failed in the front.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("entering network namespace {path:?}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the listener for {addr} timed out after {FRONT_BIND_TIMEOUT:?}")]
    BindTimeout { addr: SocketAddr },
    #[error("the bind thread for {addr} died")]
    BindThread { addr: SocketAddr },
    #[error("connecting to dockerd at {path:?}: {source}")]
    Upstream {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to dockerd at {path:?} timed out after {UPSTREAM_CONNECT_TIMEOUT:?}")]
    UpstreamTimeout { path: PathBuf },
    #[error("no server certificate yet: the coordinator has not answered the registration")]
    NoCertificate,
    #[error("TLS configuration for the lease: {0}")]
    Tls(#[from] berth_tls::TlsError),
}

/// What the driver needs from a front; the fake in the driver tests records calls.
pub trait FrontControl: Send + 'static {
    /// Starts accepting connections ahead of a lease (the host is offered):
    /// a client that learned of its lease before the agent did waits in
    /// the handshake instead of finding the port closed. Nobody is admitted
    /// until [`FrontControl::open`]. Does nothing when already listening.
    fn listen(&mut self) -> impl std::future::Future<Output = Result<(), FrontError>> + Send;
    /// Starts serving `lease_id` to certificates that carry `key`; replaces
    /// any previous lease's front. `in_use`: the lease's certificate was
    /// admitted before (an agent that restarted), so `key` is fixed.
    fn open(
        &mut self,
        lease_id: &str,
        key: KeyId,
        in_use: bool,
    ) -> impl std::future::Future<Output = Result<(), FrontError>> + Send;
    /// From the next handshake on, admits only certificates carrying `key`,
    /// unless the lease's key is fixed (a connection was admitted): whether
    /// the front now admits `key`.
    fn set_key(&mut self, key: KeyId) -> bool;
    /// Stops accepting and cuts every connection; returns once they are gone.
    fn close(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

/// The real front.
pub struct DockerFront {
    addr: SocketAddr,
    netns: Option<PathBuf>,
    upstream: PathBuf,
    /// The front's private key; its certificate comes from the link.
    key_pem: String,
    link: watch::Receiver<LinkStatus>,
    /// The listener and every connection task, while the front listens.
    listening: Option<Listening>,
    /// The lease connections are admitted for, if any; a connection that
    /// arrives first waits here (at most `lease_wait`).
    gate: watch::Sender<Option<Gate>>,
    /// A socket already in the host's namespace, not yet bound: the next
    /// `listen` binds it instead of paying for a thread and `setns`.
    spare: Option<Socket>,
    /// Where the first admitted connection of a lease is reported (the
    /// driver's inbox), if anywhere.
    uses: Option<mpsc::Sender<Event>>,
    /// How long a connection waits for a lease to reach the agent.
    lease_wait: Duration,
}

impl std::fmt::Debug for DockerFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerFront")
            .field("addr", &self.addr)
            .field("listening", &self.listening.is_some())
            .field("open", &self.is_open())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Listening {
    /// Cancelled at close: stops the accept loop and cuts every connection.
    token: CancellationToken,
    tracker: TaskTracker,
}

/// What a connection needs to be admitted for the current lease.
#[derive(Clone)]
struct Gate {
    /// The lease's TLS configuration (a renewed server certificate replaces it).
    acceptor: watch::Receiver<TlsAcceptor>,
    /// The key the lease's certificates must carry.
    pinned: PinnedKey,
    first_use: Option<FirstUse>,
}

/// Where a lease's first admitted connection is reported (the connection
/// that fixed its pin: [`Fix::First`], once per lease).
#[derive(Debug, Clone)]
struct FirstUse {
    lease_id: String,
    inbox: mpsc::Sender<Event>,
}

impl FirstUse {
    /// `key`: the key the admitted certificate carried, which the front
    /// fixed.
    async fn report(&self, key: KeyId) {
        let _ = self
            .inbox
            .send(Event::FrontInUse {
                lease_id: self.lease_id.clone(),
                key,
            })
            .await;
    }
}

impl DockerFront {
    /// A closed front for `addr` (in `netns`, if given) forwarding to the
    /// dockerd socket `upstream`, serving TLS with `key_pem` and the
    /// certificate the link publishes.
    pub fn new(
        addr: SocketAddr,
        netns: Option<PathBuf>,
        upstream: PathBuf,
        key_pem: String,
        link: watch::Receiver<LinkStatus>,
    ) -> Self {
        DockerFront {
            addr,
            netns,
            upstream,
            key_pem,
            link,
            listening: None,
            gate: watch::Sender::new(None),
            spare: None,
            uses: None,
            lease_wait: LEASE_WAIT,
        }
    }

    /// Reports each lease's first admitted connection to `inbox`
    /// (`Event::FrontInUse`): from then on the lease's key is fixed.
    pub fn reporting_use_to(mut self, inbox: mpsc::Sender<Event>) -> Self {
        self.uses = Some(inbox);
        self
    }

    /// How long a connection that arrives before its lease waits for it
    /// (default [`LEASE_WAIT`]).
    pub fn with_lease_wait(mut self, wait: Duration) -> Self {
        self.lease_wait = wait;
        self
    }

    /// Makes the socket for the next listener now, off the acquire path. A
    /// failure is only logged: `listen` then makes one itself and reports.
    pub async fn prepare(&mut self) {
        if self.spare.is_some() || self.listening.is_some() {
            return;
        }
        match socket_in_netns(self.addr, self.netns.clone()).await {
            Ok(s) => self.spare = Some(s),
            Err(e) => tracing::warn!(error = %e, "preparing the front's socket"),
        }
    }

    /// Whether a socket for the next listener is ready.
    pub fn is_prepared(&self) -> bool {
        self.spare.is_some()
    }

    /// Whether the front accepts connections.
    pub fn is_listening(&self) -> bool {
        self.listening.is_some()
    }

    /// Whether a lease is admitted.
    pub fn is_open(&self) -> bool {
        self.gate.borrow().is_some()
    }

    /// The listener, started now if the front is not listening yet.
    async fn listening(&mut self) -> Result<&Listening, FrontError> {
        let l = match self.listening.take() {
            Some(l) => l,
            None => self.start_listener().await?,
        };
        Ok(self.listening.insert(l))
    }

    /// Binds the spare socket (or a new one), listens and starts accepting.
    async fn start_listener(&mut self) -> Result<Listening, FrontError> {
        let socket = match self.spare.take() {
            Some(s) => s,
            None => socket_in_netns(self.addr, self.netns.clone()).await?,
        };
        let std_listener = listen(socket, self.addr)?;
        let listener = TcpListener::from_std(std_listener).map_err(|source| FrontError::Bind {
            addr: self.addr,
            source,
        })?;
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let span = tracing::info_span!("front", addr = %self.addr);
        tracker.spawn(
            accept_loop(
                listener,
                self.gate.subscribe(),
                self.lease_wait,
                self.upstream.clone(),
                token.clone(),
                tracker.clone(),
            )
            .instrument(span),
        );
        tracing::info!(addr = %self.addr, "docker front listening; no lease admitted yet");
        Ok(Listening { token, tracker })
    }
}

impl FrontControl for DockerFront {
    async fn listen(&mut self) -> Result<(), FrontError> {
        self.listening().await.map(|_| ())
    }

    #[tracing::instrument(skip(self), err)]
    async fn open(&mut self, lease_id: &str, key: KeyId, in_use: bool) -> Result<(), FrontError> {
        if self.is_open() {
            self.close().await;
        }
        let mut link = self.link.clone();
        let issued = tokio::time::timeout(FRONT_CERT_WAIT, link.wait_for(|s| s.issued.is_some()))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|s| s.issued.clone()))
            .ok_or(FrontError::NoCertificate)?;
        let pinned = if in_use {
            PinnedKey::fixed(key)
        } else {
            PinnedKey::new(key)
        };
        let make_acceptor = {
            let (key_pem, lease_id, pinned) =
                (self.key_pem.clone(), lease_id.to_owned(), pinned.clone());
            move |issued: &crate::link::Issued| -> Result<TlsAcceptor, FrontError> {
                let identity = berth_tls::ServerIdentity {
                    cert_pem: issued.server_cert_pem.clone(),
                    key_pem: key_pem.clone(),
                    ca_pem: issued.ca_pem.clone(),
                };
                Ok(TlsAcceptor::from(berth_tls::lease_server_config(
                    &identity,
                    &lease_id,
                    pinned.clone(),
                )?))
            }
        };
        let (acceptors, acceptor) = watch::channel(make_acceptor(&issued)?);
        let span = tracing::info_span!("front", lease_id = %lease_id, addr = %self.addr);
        let link = self.link.clone();
        // Normally listening since the host was offered; a resumed lease
        // (agent restart) starts it here.
        let listening = self.listening().await?;
        // A certificate renewed while the lease is open (a long lease)
        // serves every handshake from then on.
        listening.tracker.spawn(
            follow_certificate(
                link,
                issued,
                make_acceptor,
                acceptors,
                listening.token.clone(),
            )
            .instrument(span),
        );
        // A lease in use before a restart has its pin fixed from the
        // start, so no connection is its first use again.
        let first_use = self.uses.clone().map(|inbox| FirstUse {
            lease_id: lease_id.to_owned(),
            inbox,
        });
        self.gate.send_replace(Some(Gate {
            acceptor,
            pinned,
            first_use,
        }));
        tracing::info!(lease_id, addr = %self.addr, "docker front open");
        Ok(())
    }

    fn set_key(&mut self, key: KeyId) -> bool {
        let gate = self.gate.borrow();
        let Some(gate) = gate.as_ref() else {
            return false;
        };
        let moved = gate.pinned.set(key);
        if moved {
            tracing::info!(key = %key, "docker front: the lease's key moved");
        } else {
            // The first connection was admitted (its report is on its way
            // to the coordinator): one lease, one key in use.
            tracing::warn!(key = %key, fixed = %gate.pinned.get(), "docker front: the lease's key is fixed by its use; the move is refused");
        }
        moved
    }

    async fn close(&mut self) {
        // No connection from now on is admitted, whatever is in flight.
        self.gate.send_replace(None);
        let Some(listening) = self.listening.take() else {
            return;
        };
        listening.token.cancel();
        listening.tracker.close();
        if tokio::time::timeout(FRONT_CLOSE_TIMEOUT, listening.tracker.wait())
            .await
            .is_err()
        {
            // Tasks that ignore cancellation for this long are stuck in the
            // kernel; their sockets go when the tasks finally notice.
            tracing::warn!("docker front connections still closing after {FRONT_CLOSE_TIMEOUT:?}");
        } else {
            tracing::info!("docker front closed; all connections cut");
        }
        self.prepare().await;
    }
}

/// Creates the listening socket inside `netns` (or here without one).
pub async fn bind_in_netns(
    addr: SocketAddr,
    netns: Option<PathBuf>,
) -> Result<std::net::TcpListener, FrontError> {
    listen(socket_in_netns(addr, netns).await?, addr)
}

/// Creates an unbound TCP socket inside `netns` (or here without one).
///
/// `setns` changes the namespace of the calling thread only, and a socket
/// stays in the namespace it was created in; a dedicated std thread (not the
/// tokio blocking pool, whose threads are reused) is created, moved into
/// the namespace, makes the socket, and ends.
pub async fn socket_in_netns(
    addr: SocketAddr,
    netns: Option<PathBuf>,
) -> Result<Socket, FrontError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("berth-front-bind".to_owned())
        .spawn(move || {
            let _ = tx.send(socket_blocking(addr, netns.as_deref()));
        })
        .map_err(|source| FrontError::Bind { addr, source })?;
    match tokio::time::timeout(FRONT_BIND_TIMEOUT, rx).await {
        Err(_) => Err(FrontError::BindTimeout { addr }),
        Ok(Err(_)) => Err(FrontError::BindThread { addr }),
        Ok(Ok(result)) => result,
    }
}

fn socket_blocking(addr: SocketAddr, netns: Option<&Path>) -> Result<Socket, FrontError> {
    if let Some(path) = netns {
        crate::provider::netns::enter(path).map_err(|source| FrontError::Netns {
            path: path.to_owned(),
            source,
        })?;
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|source| FrontError::Bind { addr, source })?;
    // Recycle mode rebinds right after the previous lease's connections were
    // cut; their TIME_WAIT entries must not block the new listener.
    socket
        .set_reuse_address(true)
        .map_err(|source| FrontError::Bind { addr, source })?;
    Ok(socket)
}

/// Binds and listens on a socket from [`socket_in_netns`]; cheap, no thread.
fn listen(socket: Socket, addr: SocketAddr) -> Result<std::net::TcpListener, FrontError> {
    let bind_err = |source| FrontError::Bind { addr, source };
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(LISTEN_BACKLOG).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    Ok(socket.into())
}

/// Rebuilds the open front's TLS configuration whenever the link publishes
/// a renewed certificate, until `token` fires.
async fn follow_certificate(
    mut link: watch::Receiver<LinkStatus>,
    mut current: crate::link::Issued,
    make: impl Fn(&crate::link::Issued) -> Result<TlsAcceptor, FrontError>,
    acceptors: watch::Sender<TlsAcceptor>,
    token: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            changed = link.changed() => if changed.is_err() {
                return;
            },
        }
        let Some(issued) = link.borrow_and_update().issued.clone() else {
            continue;
        };
        if issued == current {
            continue;
        }
        match make(&issued) {
            Ok(a) => {
                tracing::info!("docker front: serving the renewed certificate");
                acceptors.send_replace(a);
                current = issued;
            }
            Err(e) => {
                tracing::warn!(error = %e, "docker front: the renewed certificate is unusable; keeping the current one")
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    gate: watch::Receiver<Option<Gate>>,
    lease_wait: Duration,
    upstream: PathBuf,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let refusals = std::sync::Arc::new(RefusalLog::default());
    loop {
        let accepted = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    refusals.refused(
                        "connection dropped: too many TLS handshakes in progress",
                        &format_args!("{MAX_HANDSHAKES} at once, from {peer} among others"),
                    );
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let child = token.child_token();
                let upstream = upstream.clone();
                let mut gate = gate.clone();
                let refusals = refusals.clone();
                let span = tracing::debug_span!("conn", %peer);
                tracker.spawn(
                    async move {
                        // The lease may still be on its way to the agent:
                        // its holder can have the answer first.
                        let waited = tokio::select! {
                            _ = child.cancelled() => return,
                            g = tokio::time::timeout(lease_wait, gate.wait_for(Option::is_some)) => g,
                        };
                        // The lease's gate, or none: timed out, or the front closed.
                        let gate = waited.ok().and_then(Result::ok).and_then(|g| g.clone());
                        let Some(Gate {
                            acceptor,
                            pinned,
                            first_use,
                        }) = gate
                        else {
                            refusals.refused(
                                "no lease reached the agent in time; connection dropped",
                                &format_args!("{peer} waited {lease_wait:?}"),
                            );
                            return;
                        };
                        let acceptor = acceptor.borrow().clone();
                        // rustls reads the socket at most 4 KiB at a time;
                        // reading ahead saves most of an upload's syscalls.
                        let stream = tokio::io::BufReader::with_capacity(READ_AHEAD, stream);
                        let handshake =
                            tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                        let tls = tokio::select! {
                            _ = child.cancelled() => return,
                            r = handshake => match r {
                                Err(_) => {
                                    refusals.refused(
                                        "TLS handshake timed out; connection dropped",
                                        &format_args!("{peer}"),
                                    );
                                    return;
                                }
                                Ok(Err(e)) => {
                                    // Wrong or missing certificate, plaintext, a scan.
                                    refusals.refused("client refused in the TLS handshake", &e);
                                    return;
                                }
                                Ok(Ok(tls)) => tls,
                            },
                        };
                        // The key the certificate carried is fixed from now on,
                        // unless the pin moved while this handshake ran (a
                        // retried acquire's new key): then this connection
                        // is not the lease holder's any more.
                        let key = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| KeyId::of_cert_der(c).ok());
                        let fixed = key.map(|k| (k, pinned.fix(k)));
                        let (key, fixed) = match fixed {
                            Some((k, f @ (Fix::First | Fix::Again))) => (k, f),
                            _ => {
                                refusals.refused(
                                    "the lease's key moved during the TLS handshake; connection dropped",
                                    &format_args!("{peer}"),
                                );
                                return;
                            }
                        };
                        // Admitted: it no longer counts against the cap.
                        drop(permit);
                        if let (Fix::First, Some(f)) = (fixed, &first_use) {
                            f.report(key).await;
                        }
                        match serve_connection(tls, &upstream, child).await {
                            Ok(()) => tracing::debug!("connection closed"),
                            Err(e) => tracing::warn!(error = %e, "connection failed"),
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                }
            }
        }
    }
    // Dropping the listener here closes the port: new connections get RST.
    drop(listener);
}

/// Proxies one client connection to dockerd until either side closes or
/// `cancel` fires. Generic over the client stream so a TLS stream can be
/// passed in as well as a plain TCP one.
pub async fn serve_connection<C>(
    mut client: C,
    upstream: &Path,
    cancel: CancellationToken,
) -> Result<(), FrontError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let connect = UnixStream::connect(upstream);
    let mut daemon = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, connect) => match r {
            Err(_) => return Err(FrontError::UpstreamTimeout { path: upstream.to_owned() }),
            Ok(Err(source)) => return Err(FrontError::Upstream { path: upstream.to_owned(), source }),
            Ok(Ok(s)) => s,
        },
    };
    tokio::select! {
        // Returning drops both streams: the client sees its connection end.
        _ = cancel.cancelled() => Ok(()),
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut daemon, COPY_BUFFER, COPY_BUFFER) => {
            if let Ok((up, down)) = r {
                tracing::debug!(bytes_to_daemon = up, bytes_to_client = down, "proxied");
            }
            // An I/O error here is a client or daemon hanging up mid-stream:
            // normal for Docker clients, not worth a warning.
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpStream, UnixListener};

    /// A stand-in dockerd: echoes every byte back, forever.
    fn echo_daemon(dir: &Path) -> PathBuf {
        let sock = dir.join("d.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        sock
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("berth-front-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// A pool CA, a front identity issued by it, and lease certificates.
    struct Pki {
        ca: berth_tls::Ca,
        key_pem: String,
        link: watch::Receiver<LinkStatus>,
        _link_tx: watch::Sender<LinkStatus>,
        /// The build's key pair.
        client: berth_tls::KeyAndCsr,
    }

    fn pki() -> Pki {
        let (ca, _) = berth_tls::Ca::generate("test CA").unwrap();
        let k = berth_tls::KeyAndCsr::generate("front").unwrap();
        let cert = ca
            .sign_host(
                &k.csr_pem,
                "h",
                "127.0.0.1".parse().unwrap(),
                std::time::SystemTime::now(),
            )
            .unwrap();
        let status = LinkStatus {
            issued: Some(crate::link::Issued {
                server_cert_pem: cert,
                ca_pem: ca.cert_pem().to_owned(),
            }),
            ..LinkStatus::default()
        };
        let (tx, rx) = watch::channel(status);
        Pki {
            ca,
            key_pem: k.key_pem,
            link: rx,
            _link_tx: tx,
            client: berth_tls::KeyAndCsr::generate("ci").unwrap(),
        }
    }

    impl Pki {
        fn front(&self, addr: SocketAddr, sock: PathBuf) -> DockerFront {
            DockerFront::new(addr, None, sock, self.key_pem.clone(), self.link.clone())
        }

        /// A lease certificate for the build's key.
        fn lease_cert(&self, lease: &str, k: &berth_tls::KeyAndCsr) -> String {
            let now = std::time::SystemTime::now();
            self.ca
                .sign_lease(&k.csr_pem, lease, now, now + Duration::from_secs(60))
                .unwrap()
        }

        /// The key of the build these tests acquire for.
        fn key(&self) -> KeyId {
            KeyId::of_csr_pem(&self.client.csr_pem).unwrap()
        }

        /// Connects with a certificate for `lease` and the build's key; Err if refused.
        async fn connect(
            &self,
            addr: SocketAddr,
            lease: &str,
        ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
            self.connect_with(addr, lease, &self.client).await
        }

        /// Connects with a certificate for `lease` and key `k`; Err if refused.
        async fn connect_with(
            &self,
            addr: SocketAddr,
            lease: &str,
            k: &berth_tls::KeyAndCsr,
        ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
            let cert = self.lease_cert(lease, k);
            let cfg =
                berth_tls::lease_client_config(self.ca.cert_pem(), &cert, &k.key_pem).unwrap();
            ping_through(addr, cfg).await
        }
    }

    /// Sends a plaintext `/_ping`; whether the connection ended within 5 s,
    /// and what came back meanwhile.
    async fn plaintext_ping(addr: SocketAddr) -> (bool, Vec<u8>) {
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET /_ping HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut got = vec![];
        let ended = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
        (ended.is_ok(), got)
    }

    /// Connects with `cfg` and has one `ping` echoed; Err if refused.
    async fn ping_through(
        addr: SocketAddr,
        cfg: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await?;
        // TLS 1.3: a refused client certificate shows on the first read.
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        Ok(tls)
    }

    #[tokio::test]
    async fn proxies_while_open_and_cuts_everything_on_close() {
        let dir = temp_dir("cut");
        let sock = echo_daemon(&dir);
        let addr = free_addr().await;
        let pki = pki();
        let mut front = pki.front(addr, sock);

        // Closed: nothing listens.
        assert!(TcpStream::connect(addr).await.is_err());

        front.open("l1", pki.key(), false).await.unwrap();
        assert!(front.is_open());
        let mut conn = pki.connect(addr, "l1").await.unwrap();

        // Another lease's certificate and plaintext are refused; nothing
        // they send reaches dockerd.
        assert!(pki.connect(addr, "l2").await.is_err());
        let (_, got) = plaintext_ping(addr).await;
        assert!(
            !got.windows(4).any(|w| w == b"GET "),
            "plaintext was echoed"
        );

        // A long-lived stream (like `docker logs -f`) is cut at close.
        front.close().await;
        assert!(!front.is_open());
        let mut rest = vec![];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "connection must be cut, got {n:?}"
        );
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "listener must be gone"
        );

        // The next lease's socket was made at close, unbound: still closed.
        assert!(front.is_prepared());
        assert!(TcpStream::connect(addr).await.is_err());

        // Reopen at once on the same port (recycle mode) for the next lease,
        // with that socket: the previous lease's certificate no longer gets in.
        front.open("l2", pki.key(), false).await.unwrap();
        assert!(!front.is_prepared());
        assert!(pki.connect(addr, "l1").await.is_err());
        pki.connect(addr, "l2").await.unwrap();
        front.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_client_ahead_of_its_lease_waits_for_it_and_nobody_gets_in_without_one() {
        let dir = temp_dir("ahead");
        let sock = echo_daemon(&dir);
        let addr = free_addr().await;
        let pki = pki();
        let mut front = pki
            .front(addr, sock)
            .with_lease_wait(Duration::from_millis(500));
        front.listen().await.unwrap();
        assert!(front.is_listening() && !front.is_open());

        // No lease reaches the agent: the connection is dropped after the
        // wait, without a handshake; plaintext never reaches dockerd.
        let (ended, got) = plaintext_ping(addr).await;
        assert!(ended, "dropped once the wait ran out, not held");
        assert!(got.is_empty(), "nothing answered without a lease: {got:?}");
        assert!(pki.connect(addr, "l1").await.is_err());

        // The build has its certificate before the agent has the lease: its
        // handshake waits and goes through once the lease arrives.
        let cfg = berth_tls::lease_client_config(
            pki.ca.cert_pem(),
            &pki.lease_cert("l1", &pki.client),
            &pki.client.key_pem,
        )
        .unwrap();
        let early = tokio::spawn(ping_through(addr, cfg));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!early.is_finished(), "admitted before its lease arrived");
        front.open("l1", pki.key(), false).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), early)
            .await
            .expect("admitted once the lease arrived")
            .unwrap()
            .expect("the early client got in");
        // Another lease's certificate still does not get in.
        assert!(pki.connect(addr, "l2").await.is_err());

        // The lease ends: the listener is gone until the host is offered again.
        front.close().await;
        assert!(!front.is_listening());
        assert!(TcpStream::connect(addr).await.is_err());
        front.listen().await.unwrap();
        assert!(pki.connect(addr, "l1").await.is_err(), "the ended lease");
        front.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn no_certificate_from_the_coordinator_means_no_front() {
        let (_tx, rx) = watch::channel(LinkStatus::default());
        let addr = free_addr().await;
        let mut front = DockerFront::new(addr, None, "/nonexistent".into(), String::new(), rx);
        let r = front.open("l1", KeyId([1; 32]), false).await;
        assert!(matches!(r, Err(FrontError::NoCertificate)), "{r:?}");
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn serve_connection_works_over_any_stream() {
        let dir = temp_dir("generic");
        let sock = echo_daemon(&dir);
        let (mut client, server) = tokio::io::duplex(64);
        let token = CancellationToken::new();
        let task = tokio::spawn({
            let token = token.clone();
            async move { serve_connection(server, &sock, token).await }
        });
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        token.cancel();
        // Cancellation alone must end the proxy: the client is still open.
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
        drop(client);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn missing_daemon_is_an_upstream_error() {
        let (_client, server) = tokio::io::duplex(64);
        let r = serve_connection(
            server,
            Path::new("/nonexistent/berth.sock"),
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(r, Err(FrontError::Upstream { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn bind_conflict_is_reported() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let r = bind_in_netns(addr, None).await;
        assert!(matches!(r, Err(FrontError::Bind { .. })), "{r:?}");
        let r = bind_in_netns(addr, Some(PathBuf::from("/nonexistent/netns"))).await;
        assert!(matches!(r, Err(FrontError::Netns { .. })), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_once_per_interval_with_a_count() {
        let log = RefusalLog::default();
        assert_eq!(log.note(), Some(0), "the first refusal is logged");
        for _ in 0..500 {
            assert_eq!(log.note(), None);
        }
        tokio::time::advance(REFUSAL_LOG_INTERVAL).await;
        assert_eq!(log.note(), Some(500), "the next line sums up the rest");
        assert_eq!(log.note(), None);
    }

    #[tokio::test]
    async fn only_the_leases_pinned_key_gets_in_and_its_first_use_fixes_it() {
        let dir = temp_dir("pinned");
        let sock = echo_daemon(&dir);
        let addr = free_addr().await;
        let pki = pki();
        let (inbox, mut events) = mpsc::channel(8);
        let mut front = pki.front(addr, sock).reporting_use_to(inbox);
        front.open("l1", pki.key(), false).await.unwrap();
        // A certificate of the lease, signed by the pool CA, with another key.
        let thief = berth_tls::KeyAndCsr::generate("thief").unwrap();
        assert!(pki.connect_with(addr, "l1", &thief).await.is_err());
        assert!(events.try_recv().is_err(), "a refused client is no use");
        // Before the first use the pin follows the coordinator (a retried
        // acquire with a new key): the new key gets in, the old one not.
        let retry = berth_tls::KeyAndCsr::generate("retry").unwrap();
        let retry_key = KeyId::of_csr_pem(&retry.csr_pem).unwrap();
        assert!(front.set_key(retry_key));
        assert!(pki.connect(addr, "l1").await.is_err());
        assert!(events.try_recv().is_err(), "a refused client is no use");
        assert!(front.set_key(pki.key()));
        let _c1 = pki.connect(addr, "l1").await.unwrap();
        let _c2 = pki.connect(addr, "l1").await.unwrap();
        let used = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap();
        assert_eq!(
            used,
            Some(Event::FrontInUse {
                lease_id: "l1".into(),
                key: pki.key(),
            })
        );
        assert!(events.try_recv().is_err(), "reported once");
        // In use, the key is fixed: a move that crossed the report (the
        // coordinator had not heard of the use yet) is refused, and the
        // key in use keeps the host.
        assert!(!front.set_key(retry_key), "the pin moved after first use");
        assert!(pki.connect_with(addr, "l1", &retry).await.is_err());
        pki.connect(addr, "l1").await.unwrap();
        front.close().await;
        // Opened again for a lease that was in use before the agent
        // restarted: fixed from the start, and not reported again.
        front.open("l1", pki.key(), true).await.unwrap();
        assert!(!front.set_key(retry_key), "a resumed lease's pin moved");
        assert!(pki.connect_with(addr, "l1", &retry).await.is_err());
        pki.connect(addr, "l1").await.unwrap();
        assert!(events.try_recv().is_err(), "a resumed lease reported again");
        front.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn stalled_handshakes_are_capped_and_their_end_frees_the_front() {
        let dir = temp_dir("cap");
        let sock = echo_daemon(&dir);
        let addr = free_addr().await;
        let pki = pki();
        let mut front = pki.front(addr, sock);
        front.open("l1", pki.key(), false).await.unwrap();
        // Connections that never say hello hold every handshake slot.
        let mut stalled = Vec::new();
        for _ in 0..MAX_HANDSHAKES {
            stalled.push(TcpStream::connect(addr).await.unwrap());
        }
        // The next one is dropped at once (EOF, no handshake), and so is
        // the lease holder's while the flood lasts.
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("dropped, not left waiting")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(pki.connect(addr, "l1").await.is_err());
        // The flood ends: the slots come back, the holder gets in.
        drop(stalled);
        let mut admitted = None;
        for _ in 0..50 {
            if let Ok(c) = pki.connect(addr, "l1").await {
                admitted = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(admitted.is_some(), "the holder got in once the flood ended");
        front.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
