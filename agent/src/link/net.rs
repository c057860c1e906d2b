//! The coordinator link through the host's own network (`--link-via-host-net`).
//!
//! A local host is a network namespace, but the agent runs in the root
//! namespace and would reach the coordinator over loopback: cutting the
//! host's network would leave its link untouched, unlike on EC2 where the
//! agent's traffic leaves through the instance's NIC. With this option the
//! link's TCP socket is created inside the host's namespace and dials a small
//! relay on the root side of the host's veth (the host's gateway address),
//! which forwards to the coordinator. The link then shares fate with the
//! host's network: `ip -n HOST link set eth0 down` partitions the agent from
//! the coordinator for real.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Bound on creating the socket inside the namespace.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the relay's own connection to the coordinator.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// What failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkNetError {
    #[error("coordinator URL {0:?} has no host:port")]
    BadUrl(String),
    #[error("resolving the coordinator {target}: {source}")]
    Resolve {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the link relay on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The coordinator's socket address from its URL.
pub async fn coordinator_addr(url: &str) -> Result<SocketAddr, LinkNetError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| LinkNetError::BadUrl(url.to_owned()))?;
    let target = rest.split('/').next().unwrap_or_default().to_owned();
    if target.is_empty() {
        return Err(LinkNetError::BadUrl(url.to_owned()));
    }
    let found = tokio::net::lookup_host(target.as_str())
        .await
        .map_err(|source| LinkNetError::Resolve {
            target: target.clone(),
            source,
        })?
        .next();
    found.ok_or_else(|| LinkNetError::Resolve {
        target,
        source: std::io::Error::other("no address"),
    })
}

/// Listens on `bind` (an address of the root namespace, port 0 for any) and
/// forwards every connection to `upstream` until `stop` fires. The accept
/// loop and every connection are tasks of `tracker`, so whoever owns it can
/// wait until the relay is gone. Returns the address actually bound.
pub async fn start_relay(
    bind: SocketAddr,
    upstream: SocketAddr,
    stop: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, LinkNetError> {
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|source| LinkNetError::Bind { addr: bind, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| LinkNetError::Bind { addr: bind, source })?;
    let connections = tracker.clone();
    tracker.spawn(
        async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut down, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let stop = stop.clone();
                connections.spawn(
                    async move {
                        let up =
                            tokio::time::timeout(UPSTREAM_TIMEOUT, TcpStream::connect(upstream))
                                .await;
                        let Ok(Ok(mut up)) = up else { return };
                        let _ = up.set_nodelay(true);
                        let _ = down.set_nodelay(true);
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        }
                    }
                    .in_current_span(),
                );
            }
        }
        .in_current_span(),
    );
    Ok(local)
}

/// A tonic connector that dials `target` from inside the namespace `netns`.
#[derive(Debug, Clone)]
pub struct NetnsDialer {
    pub netns: PathBuf,
    pub target: SocketAddr,
}

impl NetnsDialer {
    async fn dial(self) -> std::io::Result<TokioIo<TcpStream>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let netns = self.netns.clone();
        let domain = Domain::for_address(self.target);
        std::thread::Builder::new()
            .name("berth-link-socket".to_owned())
            .spawn(move || {
                let _ = tx.send(socket_in(&netns, domain));
            })?;
        let std_stream = match tokio::time::timeout(SOCKET_TIMEOUT, rx).await {
            Ok(Ok(r)) => r?,
            _ => return Err(std::io::Error::other("creating the link socket timed out")),
        };
        let socket = TcpSocket::from_std_stream(std_stream);
        let stream = socket.connect(self.target).await?;
        stream.set_nodelay(true)?;
        Ok(TokioIo::new(stream))
    }
}

/// An unconnected, non-blocking TCP socket created inside `netns`: a socket
/// stays in the namespace it was made in, and `setns` only moves the calling
/// thread, so a fresh thread does it and ends.
fn socket_in(netns: &std::path::Path, domain: Domain) -> std::io::Result<std::net::TcpStream> {
    crate::provider::netns::enter(netns)?;
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl tower::Service<http::Uri> for NetnsDialer {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().dial())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn coordinator_urls_resolve() {
        assert_eq!(
            coordinator_addr("http://127.0.0.1:7070").await.unwrap(),
            "127.0.0.1:7070".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            coordinator_addr("https://127.0.0.1:9/x").await.unwrap(),
            "127.0.0.1:9".parse::<SocketAddr>().unwrap()
        );
        assert!(coordinator_addr("127.0.0.1:7070").await.is_err());
        assert!(coordinator_addr("http://").await.is_err());
    }

    #[tokio::test]
    async fn the_relay_forwards_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let relay = start_relay(
            "127.0.0.1:0".parse().unwrap(),
            echo_addr,
            stop.clone(),
            &tracker,
        )
        .await
        .unwrap();
        let mut c = TcpStream::connect(relay).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        // Stopped, the relay's tasks end (the open connection too) and it
        // accepts nothing more.
        stop.cancel();
        tracker.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), tracker.wait())
            .await
            .unwrap();
        assert!(TcpStream::connect(relay).await.is_err());
    }
}
