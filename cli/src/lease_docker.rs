//! A Docker API client for the leased host, as the stock docker CLI would
//! make it from `DOCKER_HOST=tcp://ADDR:2376`, `DOCKER_TLS_VERIFY=1` and
//! `DOCKER_CERT_PATH=DIR`: bollard over mutual TLS with the lease's own
//! client certificate.
//!
//! bollard's own `ssl` feature is not used: it also trusts the machine's
//! public roots (rustls-native-certs), while a pool host's certificate must
//! chain to the pool CA and nothing else. So bollard gets a custom
//! transport: one TCP connection per request, a rustls handshake with
//! [`berth_tls::lease_client_config`] (pool CA only, ring provider, the
//! lease certificate), and hyper's HTTP/1.1 client on top. Docker API calls
//! are few and large, so connection reuse would buy nothing measurable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::{BollardRequest, ClientVersion, Docker};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Bound on the TCP connect plus TLS handshake to the Docker front.
pub const DOCKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one short Docker API call (create, remove, import of the empty
/// helper image). Transfers get their own, longer bound.
pub const DOCKER_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// API version spoken to the host. dockerd 20.10 (Debian 12, the pool's AMI)
/// rejects anything above 1.41; newer daemons still accept it.
pub const DOCKER_API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// What went wrong reaching the leased host's Docker API.
#[derive(Debug, thiserror::Error)]
pub enum LeaseDockerError {
    #[error("DOCKER_HOST {0:?} is not tcp://ADDR:PORT (run `eval \"$(berth acquire ...)\"` first)")]
    BadHost(String),
    #[error(
        "the lease's certificates in {dir}: {reason}\n  set DOCKER_CERT_PATH (berth acquire prints it)"
    )]
    Certs { dir: PathBuf, reason: String },
}

/// Where the lease's Docker API is and the credentials to reach it.
#[derive(Debug, Clone)]
pub struct LeaseEndpoint {
    /// `ADDR:PORT` of the agent's Docker front.
    pub addr: SocketAddr,
    /// The directory holding `ca.pem`, `cert.pem`, `key.pem`.
    pub cert_dir: PathBuf,
}

impl LeaseEndpoint {
    /// From the values `berth acquire` exports.
    pub fn new(docker_host: &str, cert_dir: &Path) -> Result<Self, LeaseDockerError> {
        let bad = || LeaseDockerError::BadHost(docker_host.to_owned());
        let rest = docker_host
            .strip_prefix("tcp://")
            .or_else(|| docker_host.strip_prefix("https://"))
            .ok_or_else(bad)?;
        let addr: SocketAddr = rest.trim_end_matches('/').parse().map_err(|_| bad())?;
        Ok(Self {
            addr,
            cert_dir: cert_dir.to_owned(),
        })
    }

    /// A bollard client whose calls are bounded by `timeout` (bollard bounds
    /// each request until its response head; for an archive upload that is
    /// the whole transfer).
    pub fn docker(&self, timeout: Duration) -> Result<Docker, LeaseDockerError> {
        let read = |name: &str| {
            berth_tls::files::read_pem(&self.cert_dir.join(name)).map_err(|e| {
                LeaseDockerError::Certs {
                    dir: self.cert_dir.clone(),
                    reason: e.to_string(),
                }
            })
        };
        let config =
            berth_tls::lease_client_config(&read("ca.pem")?, &read("cert.pem")?, &read("key.pem")?)
                .map_err(|e| LeaseDockerError::Certs {
                    dir: self.cert_dir.clone(),
                    reason: e.to_string(),
                })?;
        let transport = TlsTransport {
            addr: self.addr,
            connector: TlsConnector::from(config),
            server_name: ServerName::IpAddress(self.addr.ip().into()),
        };
        let transport = Arc::new(transport);
        let docker = Docker::connect_with_custom_transport(
            move |req: BollardRequest| {
                let t = transport.clone();
                async move { t.request(req).await }
            },
            Some(format!("https://{}", self.addr)),
            timeout.as_secs().max(1),
            &DOCKER_API_VERSION,
        )
        .map_err(|e| LeaseDockerError::Certs {
            dir: self.cert_dir.clone(),
            reason: e.to_string(),
        })?;
        Ok(docker.with_timeout(timeout))
    }
}

struct TlsTransport {
    addr: SocketAddr,
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

fn io_error(kind: std::io::ErrorKind, msg: String) -> bollard::errors::Error {
    bollard::errors::Error::IOError {
        err: std::io::Error::new(kind, msg),
    }
}

impl TlsTransport {
    async fn request(
        &self,
        req: BollardRequest,
    ) -> Result<http::Response<hyper::body::Incoming>, bollard::errors::Error> {
        let addr = self.addr;
        let tls = tokio::time::timeout(DOCKER_CONNECT_TIMEOUT, async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            self.connector.connect(self.server_name.clone(), tcp).await
        })
        .await
        .map_err(|_| {
            io_error(
                std::io::ErrorKind::TimedOut,
                format!(
                    "connecting to the Docker front at {addr} timed out after {DOCKER_CONNECT_TIMEOUT:?}"
                ),
            )
        })?
        .map_err(|e| {
            io_error(
                e.kind(),
                format!("connecting to the Docker front at {addr}: {e} (has the lease ended?)"),
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            // Ends with the response body; an error here surfaces in the
            // response future or the body stream already.
            let _ = conn.await;
        });
        // bollard builds absolute URIs; HTTP/1.1 servers expect the
        // origin form and a Host header.
        let (mut parts, body) = req.into_parts();
        let origin = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse::<http::Uri>()
            .map_err(|e| io_error(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        parts.uri = origin;
        parts.headers.insert(
            http::header::HOST,
            http::HeaderValue::from_str(&addr.to_string())
                .map_err(|e| io_error(std::io::ErrorKind::InvalidInput, e.to_string()))?,
        );
        Ok(sender
            .send_request(http::Request::from_parts(parts, body))
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_must_be_tcp() {
        let dir = Path::new("/nonexistent");
        let e = LeaseEndpoint::new("tcp://198.18.0.2:2376", dir).unwrap();
        assert_eq!(e.addr, "198.18.0.2:2376".parse().unwrap());
        assert!(LeaseEndpoint::new("https://198.18.0.2:2376/", dir).is_ok());
        for bad in [
            "unix:///var/run/docker.sock",
            "198.18.0.2:2376",
            "tcp://host:2376",
            "",
        ] {
            assert!(
                matches!(
                    LeaseEndpoint::new(bad, dir),
                    Err(LeaseDockerError::BadHost(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn missing_certificates_are_named() {
        let e =
            LeaseEndpoint::new("tcp://127.0.0.1:2376", Path::new("/nonexistent/certs")).unwrap();
        let err = e.docker(DOCKER_CALL_TIMEOUT).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/certs"), "{err}");
        assert!(err.contains("DOCKER_CERT_PATH"), "{err}");
    }
}
