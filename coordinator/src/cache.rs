//! The tenants' build cache: a registry (CNCF distribution) with one
//! namespace per tenant, whose access the coordinator alone grants.
//!
//! The registry runs with distribution's token authentication: it trusts
//! tokens signed by the coordinator's cache key (its certificate is the
//! registry's `rootcertbundle`) and sends clients to the coordinator's
//! token endpoint (`--cache-token-listen`, HTTPS with a pool CA
//! certificate, the `realm`). A lease's login there is its lease id and a
//! password derived from it (HMAC with a secret of the coordinator's);
//! Acquire hands both to the CI machine. The endpoint grants a token only
//! while that lease is active, only for repositories under its tenant's
//! namespace, only `pull` and `push`, and never past the lease's deadline
//! (at most [`TOKEN_TTL`]). So tenant B's login gets nothing of tenant A's
//! namespace, and a lease's login opens nothing once the lease ended.
//!
//! Files under the state dir (made on first start, kept):
//! `cache-token-key.pem` (0600), `cache-token.pem` (the key's self-signed
//! certificate, what the registry trusts), `cache-secret` (0600).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use berth_proto::v1 as pb;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pool::Pool;

/// The registry's `auth.token.service` (the tokens' audience).
pub const SERVICE: &str = "berth-cache";
/// The registry's `auth.token.issuer`.
pub const ISSUER: &str = "berth-coordinator";
/// Longest life of one token (never past the lease's deadline).
pub const TOKEN_TTL: Duration = Duration::from_secs(300);
/// The key file (PKCS#8 PEM, P-256).
pub const KEY_FILE: &str = "cache-token-key.pem";
/// The key's certificate: the registry's `rootcertbundle`.
pub const CERT_FILE: &str = "cache-token.pem";
/// The secret lease passwords are derived with.
pub const SECRET_FILE: &str = "cache-secret";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the cache token key: {0}")]
    Key(String),
    #[error("the pool CA: {0}")]
    Tls(#[from] berth_tls::TlsError),
    #[error("cannot bind the cache token endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The tenant's namespace in the registry (also `berth up`'s retention
/// pass maps tenants to their namespaces with it).
pub use berth_tls::cache_namespace as namespace;

/// The cache's keys and where the registry is.
pub struct BuildCache {
    /// `HOST:PORT` of the registry, as hosts reach it.
    registry: String,
    key: EcdsaKeyPair,
    /// The key's id as distribution computes it (libtrust).
    kid: String,
    secret: ring::hmac::Key,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for BuildCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildCache")
            .field("registry", &self.registry)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// Makes the key, its certificate and the secret under `dir` unless they
/// exist. Called before the coordinator's address file is written, so the
/// registry finds the certificate once the coordinator is up.
pub fn ensure_files(dir: &Path) -> Result<(), CacheError> {
    let key_path = dir.join(KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    if !key_path.exists() {
        let key = rcgen::KeyPair::generate().map_err(|e| CacheError::Key(e.to_string()))?;
        berth_tls::files::write_private(&key_path, key.serialize_pem().as_bytes())?;
        let _ = std::fs::remove_file(&cert_path);
    }
    if !cert_path.exists() {
        let pem = berth_tls::files::read_secret(&key_path)?;
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| CacheError::Key(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| CacheError::Key(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "berth build cache tokens");
        params.not_after = rcgen::date_time_ymd(2100, 1, 1);
        let cert = params
            .self_signed(&key)
            .map_err(|e| CacheError::Key(e.to_string()))?;
        berth_tls::files::write_with_mode(&cert_path, cert.pem().as_bytes(), 0o644)?;
    }
    let secret_path = dir.join(SECRET_FILE);
    if !secret_path.exists() {
        let mut b = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .map_err(|_| CacheError::Key("no randomness".into()))?;
        berth_tls::files::write_private(&secret_path, hex(&b).as_bytes())?;
    }
    Ok(())
}

impl BuildCache {
    /// Loads the files [`ensure_files`] made under `dir`.
    pub fn load(dir: &Path, registry: String) -> Result<Self, CacheError> {
        let pem = berth_tls::files::read_secret(&dir.join(KEY_FILE))?;
        let kp = rcgen::KeyPair::from_pem(&pem).map_err(|e| CacheError::Key(e.to_string()))?;
        let rng = ring::rand::SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &kp.serialize_der(), &rng)
                .map_err(|e| CacheError::Key(e.to_string()))?;
        let kid = libtrust_key_id(&rcgen::PublicKeyData::subject_public_key_info(&kp));
        let secret_path = dir.join(SECRET_FILE);
        let secret = berth_tls::files::read_secret(&secret_path)?;
        let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.trim().as_bytes());
        Ok(Self {
            registry,
            key,
            kid,
            secret,
            rng,
        })
    }

    /// What Acquire hands a lease of `tenant`.
    pub fn for_lease(&self, tenant: &str, lease_id: &str) -> pb::BuildCache {
        pb::BuildCache {
            repository: format!("{}/{}", self.registry, namespace(tenant)),
            username: lease_id.to_owned(),
            password: self.password(tenant, lease_id),
        }
    }

    fn password(&self, tenant: &str, lease_id: &str) -> String {
        let tag = ring::hmac::sign(&self.secret, &message(tenant, lease_id));
        hex(tag.as_ref())
    }

    fn check_password(&self, tenant: &str, lease_id: &str, password: &str) -> bool {
        let Some(bytes) = unhex(password) else {
            return false;
        };
        ring::hmac::verify(&self.secret, &message(tenant, lease_id), &bytes).is_ok()
    }

    /// A signed token (JWT, ES256) granting `access` to `subject` until `exp`.
    fn token(
        &self,
        subject: &str,
        access: &[Access],
        now: SystemTime,
        exp: SystemTime,
    ) -> Result<String, ()> {
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let header = serde_json::json!({ "typ": "JWT", "alg": "ES256", "kid": self.kid });
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut jti).map_err(|_| ())?;
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "iat": secs(now),
            // Clock skew between the coordinator and the registry.
            "nbf": secs(now).saturating_sub(30),
            "exp": secs(exp),
            "jti": hex(&jti),
            "access": access.iter().map(|a| serde_json::json!({
                "type": "repository", "name": a.name, "actions": a.actions,
            })).collect::<Vec<_>>(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| ())?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        ))
    }
}

fn message(tenant: &str, lease_id: &str) -> Vec<u8> {
    format!("berth cache login\0{tenant}\0{lease_id}").into_bytes()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The key id distribution (libtrust) gives a public key: the SHA-256 of
/// its DER SubjectPublicKeyInfo, first 240 bits, base32 without padding,
/// in groups of four joined by `:`.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(spki_der);
    let b32 = base32(&digest[..30]);
    b32.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// RFC 4648 base32 (upper case), no padding.
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &b in data {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// One repository and the actions granted on it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Access {
    name: String,
    actions: Vec<String>,
}

/// What `scope` asks and `namespace` allows: repositories under
/// `NAMESPACE/`, actions `pull` and `push` only; anything else is left out
/// (the registry then refuses it).
fn grant(scopes: &[String], namespace: &str) -> Vec<Access> {
    let prefix = format!("{namespace}/");
    let mut out = vec![];
    for scope in scopes {
        // repository:NAME:ACTIONS (several scopes may share one parameter,
        // separated by spaces).
        for one in scope.split(' ') {
            let Some((kind, rest)) = one.split_once(':') else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            if kind != "repository" || !name.starts_with(&prefix) || !valid_repository(name) {
                continue;
            }
            let actions: Vec<String> = actions
                .split(',')
                .filter(|a| matches!(*a, "pull" | "push"))
                .map(str::to_owned)
                .collect();
            if !actions.is_empty() {
                out.push(Access {
                    name: name.to_owned(),
                    actions,
                });
            }
        }
    }
    out
}

/// A repository name as distribution accepts it: components of
/// `[a-z0-9]+([._-][a-z0-9]+)*` separated by `/`.
fn valid_repository(name: &str) -> bool {
    name.len() <= 255
        && name.split('/').all(|c| {
            !c.is_empty()
                && c.split(['.', '_', '-']).all(|p| {
                    !p.is_empty()
                        && p.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                })
        })
}

struct Endpoint {
    cache: Arc<BuildCache>,
    pool: Arc<Pool>,
}

/// The basic-auth login of a request.
fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"berth build cache\"")],
        "{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"a lease's build cache login is needed\"}]}\n",
    )
        .into_response()
}

/// `GET /token?service=berth-cache&scope=repository:NS/NAME:pull,push`.
async fn token(
    State(ep): State<Arc<Endpoint>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let Some((lease_id, password)) = basic_auth(&headers) else {
        return unauthorized();
    };
    // The lease, its tenant and state: an active lease only.
    let lease = ep
        .pool
        .list_leases(false)
        .into_iter()
        .find(|l| l.lease_id == lease_id);
    let Some(lease) = lease else {
        return unauthorized();
    };
    if lease.tenant.is_empty() || !ep.cache.check_password(&lease.tenant, &lease_id, &password) {
        return unauthorized();
    }
    if lease.state != pb::LeaseState::Active as i32 {
        info!(lease_id = %lease_id, "build cache login of a lease that is not active refused");
        return unauthorized();
    }
    let now = SystemTime::now();
    let deadline = lease
        .deadline
        .as_ref()
        .and_then(berth_proto::to_system_time)
        .unwrap_or(now);
    if deadline <= now {
        return unauthorized();
    }
    let exp = deadline.min(now + TOKEN_TTL);
    let mut scopes = vec![];
    let mut service_ok = true;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "scope" => scopes.push(v.into_owned()),
            "service" => service_ok &= v == SERVICE,
            _ => {}
        }
    }
    if !service_ok {
        return (StatusCode::BAD_REQUEST, "unknown service\n").into_response();
    }
    let access = grant(&scopes, &namespace(&lease.tenant));
    let Ok(token) = ep.cache.token(&lease_id, &access, now, exp) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "signing failed\n").into_response();
    };
    let expires_in = exp.duration_since(now).unwrap_or_default().as_secs();
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": expires_in,
        "issued_at": humantime::format_rfc3339_seconds(now).to_string(),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The TLS connections of the token endpoint, for `axum::serve`.
struct TlsListener {
    conns: tokio_stream::wrappers::ReceiverStream<Result<crate::listener::TlsConn, std::io::Error>>,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = crate::listener::TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.conns.next().await {
                Some(Ok(c)) => {
                    let peer = c.peer().unwrap_or(self.addr);
                    return (c, peer);
                }
                Some(Err(_)) => {}
                // Shut down: nothing more comes.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Binds the token endpoint (HTTPS, a pool CA certificate for its address).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, CacheError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| CacheError::Bind { addr, source })
}

/// Serves the token endpoint until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    ca: Arc<berth_tls::Ca>,
    cache: Arc<BuildCache>,
    pool: Arc<Pool>,
    stop: CancellationToken,
) -> Result<(), CacheError> {
    let addr = listener.local_addr().map_err(|source| CacheError::Bind {
        addr: "0.0.0.0:0"
            .parse()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        source,
    })?;
    let cert = Arc::new(berth_tls::server::RotatingCert::new(
        ca,
        vec![addr.ip().to_string()],
        SystemTime::now(),
    )?);
    let config = berth_tls::server::coordinator_server_config(cert.clone())?;
    // Registry clients (Go's) speak HTTP/1.1 to the token endpoint.
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let rotation = tokio::spawn(crate::listener::rotate(cert, stop.clone()));
    let conns = crate::listener::incoming(listener, Arc::new(config), stop.clone());
    let router = Router::new()
        .route("/token", get(token))
        .with_state(Arc::new(Endpoint { cache, pool }));
    info!(%addr, "build cache token endpoint serving");
    if let Err(e) = axum::serve(TlsListener { conns, addr }, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        warn!(error = %e, "build cache token endpoint failed");
    }
    let _ = rotation.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn namespaces_are_repository_names_and_never_meet() {
        assert_eq!(namespace("local"), "local");
        assert_eq!(namespace("team7"), "team7");
        for t in ["Local", "a-b", "a.b", "a_b", "-", "."] {
            let n = namespace(t);
            assert!(n.starts_with("h-"), "{t} -> {n}");
            assert!(valid_repository(&format!("{n}/app")), "{n}");
        }
        assert_ne!(namespace("Local"), namespace("local"));
        assert_ne!(namespace("a-b"), namespace("a_b"));
    }

    #[test]
    fn only_the_tenants_namespace_and_pull_push_are_granted() {
        let scopes = vec![
            "repository:a/app:pull,push".to_owned(),
            "repository:b/app:pull,push".to_owned(),
            "repository:ab/app:pull".to_owned(),
            "repository:a:pull".to_owned(),
            "repository:a/x:pull,push,delete,*".to_owned(),
            "registry:catalog:*".to_owned(),
            "repository:a/../b/app:pull".to_owned(),
            "repository:a/y:pull repository:b/y:pull".to_owned(),
        ];
        let g = grant(&scopes, "a");
        assert_eq!(
            g,
            vec![
                Access {
                    name: "a/app".into(),
                    actions: vec!["pull".into(), "push".into()]
                },
                Access {
                    name: "a/x".into(),
                    actions: vec!["pull".into(), "push".into()]
                },
                Access {
                    name: "a/y".into(),
                    actions: vec!["pull".into()]
                },
            ]
        );
    }

    #[test]
    fn key_ids_follow_libtrust() {
        // RFC 4648 test vectors.
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
        // 30 bytes -> 48 characters -> 12 groups of 4.
        let id = libtrust_key_id(b"any der");
        assert_eq!(id.len(), 12 * 4 + 11);
        assert_eq!(id.split(':').count(), 12);
    }

    #[test]
    fn passwords_bind_tenant_and_lease() {
        let dir = tempfile::tempdir().unwrap();
        ensure_files(dir.path()).unwrap();
        let c = BuildCache::load(dir.path(), "10.0.0.1:5001".into()).unwrap();
        let bc = c.for_lease("a", "L1");
        assert_eq!(bc.repository, "10.0.0.1:5001/a");
        assert_eq!(bc.username, "L1");
        assert!(c.check_password("a", "L1", &bc.password));
        assert!(!c.check_password("b", "L1", &bc.password));
        assert!(!c.check_password("a", "L2", &bc.password));
        assert!(!c.check_password("a", "L1", "00"));
        assert!(!c.check_password("a", "L1", "zz"));
        // The files are kept: a second load derives the same password.
        ensure_files(dir.path()).unwrap();
        let again = BuildCache::load(dir.path(), "10.0.0.1:5001".into()).unwrap();
        assert_eq!(again.for_lease("a", "L1").password, bc.password);
        let t = c
            .token("L1", &[], SystemTime::now(), SystemTime::now() + TOKEN_TTL)
            .unwrap();
        assert_eq!(t.split('.').count(), 3);
    }
}
