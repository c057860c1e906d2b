//! The gRPC listener: TCP, then TLS with the coordinator's rotating
//! certificate (`berth_tls::server`), handed to tonic as finished
//! connections. Doing the handshake here (rather than in tonic's own TLS)
//! is what lets the certificate be re-issued without a restart.
//!
//! Handshakes run in their own tasks, bounded in number
//! ([`MAX_HANDSHAKES`]) and in time ([`HANDSHAKE_TIMEOUT`]), so a client
//! that connects and says nothing holds neither the accept loop nor memory.
//! Every accepted socket gets TCP_NODELAY: an answer written in more than
//! one segment (an AcquireResponse with its certificates, then the
//! trailers) would otherwise wait for the client's delayed ACK, about 40 ms.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use berth_tls::server::RotatingCert;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// TLS handshakes in progress at once.
pub const MAX_HANDSHAKES: usize = 512;
/// Bound on one client's handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished connections waiting for tonic to take them.
const READY_QUEUE: usize = 128;
/// Pause after a failed accept (out of file descriptors) so the loop does
/// not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// How long a stopping server waits for its connections to close. Every
/// handler ends on shutdown (agent streams, waiting acquires), so only a
/// connection whose peer vanished without a word (a destroyed host's
/// network namespace) is still open by then; graceful shutdown would
/// otherwise hold it until HTTP/2 keepalive gives up on it (20 s), and the
/// coordinator (a deposed leader, whose restart `berth up` waits for)
/// with it.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(3);

/// The coordinator's gRPC server settings, for the leader and a standby:
/// HTTP/2 pings find dead connections (a host gone without a FIN).
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// Runs `server` (a tonic server future that stops on `shutdown`) to its
/// end, but for at most [`DRAIN_LIMIT`] after `shutdown` fired.
pub async fn until_drained<E>(
    server: impl std::future::Future<Output = Result<(), E>>,
    shutdown: &CancellationToken,
) -> Result<(), E> {
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_LIMIT).await;
        } => {
            warn!(limit = ?DRAIN_LIMIT, "connections still open after the drain limit: closing them");
            Ok(())
        }
    }
}

/// What a handler learns about the connection its request came on
/// (a request extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote_addr: Option<SocketAddr>,
}

/// The peer address of a request's connection.
pub fn remote_addr<T>(req: &tonic::Request<T>) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnInfo>()
        .and_then(|i| i.remote_addr)
}

/// One finished TLS connection.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: ConnInfo,
}

impl TlsConn {
    /// The client's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.info.remote_addr
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts and handshakes connections on `listener` until `shutdown`
/// fires; the stream yields finished TLS connections for tonic.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(READY_QUEUE);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                debug!(%peer, "too many TLS handshakes in progress; connection dropped");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                drop(permit);
                let inner = match done {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let conn = TlsConn {
                    inner,
                    info: ConnInfo {
                        remote_addr: Some(peer),
                    },
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Re-issues the server certificate when it is due, until `shutdown`.
pub async fn rotate(cert: Arc<RotatingCert>, shutdown: CancellationToken) {
    loop {
        let wait = cert.next_check(SystemTime::now());
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match cert.rotate_if_due(SystemTime::now()) {
            Ok(true) => info!(
                not_after = %humantime::format_rfc3339_seconds(cert.not_after()),
                "coordinator TLS certificate re-issued"
            ),
            Ok(false) => {}
            Err(e) => {
                error!(error = %e, "re-issuing the coordinator's TLS certificate failed; retrying")
            }
        }
    }
}
