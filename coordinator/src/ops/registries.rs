//! The pool's registries as the coordinator sees them: the pull-through
//! mirror (`--mirror-registry`) and the tenants' build cache
//! (`--cache-registry`), both CNCF distribution. Whether each answers is
//! asked the way hosts ask it (GET `/v2/` over TLS, trusting the pool CA
//! alone); its counters come from its debug listener (`--mirror-metrics`,
//! `--cache-metrics`, distribution's `http.debug.addr`, on loopback):
//!
//! - both: distribution's Prometheus `/metrics` (`http.debug.prometheus`);
//!   bytes served are the response bodies of its blob and manifest
//!   handlers.
//! - the mirror: requests are blob downloads (layers, image configs)
//!   answered 200; misses are blobs it fetched from the upstream, counted
//!   as what that leaves behind: one blob committed (a storage `Move`) to
//!   its storage, which a pull-through cache writes for nothing else. Hits
//!   are the rest. (distribution 2.8's own proxy counters, expvar's
//!   `registry.proxy`, are not used: they count no blob fetched from the
//!   upstream as a miss, and count its copy into storage as a request.)
//! - the build cache: hits and misses are manifest lookups (GET or HEAD,
//!   a build's `--cache-from`, a pull) answered 200 or 404.
//!
//! `AdminService.PoolStats` (hence `berth status`) probes at every call; a
//! task refreshes a snapshot every [`REFRESH_EVERY`] for `/metrics`, whose
//! encoding cannot wait on the network. Nothing here holds or sends a
//! credential: `/v2/` of the build cache answers 401 to anyone, which is
//! an answer.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::v1 as pb;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Bound on one probe (connect, TLS, request, answer).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the snapshot `/metrics` shows is refreshed.
pub const REFRESH_EVERY: Duration = Duration::from_secs(15);
/// The most of an answer read (distribution's `/metrics` is ~30 KB).
const MAX_ANSWER: u64 = 4 << 20;

/// Which registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The pull-through mirror of Docker Hub (or the pool's upstream).
    Mirror,
    /// The tenants' build cache.
    Cache,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Mirror => "mirror",
            Kind::Cache => "cache",
        }
    }
}

/// One registry to watch.
#[derive(Debug, Clone)]
pub struct Target {
    pub kind: Kind,
    /// `HOST:PORT` as hosts reach it.
    pub addr: String,
    /// Its debug listener (plain HTTP), if the coordinator may read it.
    pub metrics: Option<SocketAddr>,
}

/// The registries of the pool and their last probe.
pub struct Watch {
    targets: Vec<Target>,
    tls: tokio_rustls::TlsConnector,
    last: Mutex<Vec<pb::RegistryStatus>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// Watches `targets`, trusting the pool CA (`ca_pem`) for their TLS.
    pub fn new(targets: Vec<Target>, ca_pem: &str) -> Result<Self, berth_tls::TlsError> {
        let config = rustls::ClientConfig::builder_with_provider(berth_tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| berth_tls::TlsError::Cert {
                what: "protocol versions",
                reason: e.to_string(),
            })?
            .with_root_certificates(berth_tls::lease::roots(ca_pem)?)
            .with_no_client_auth();
        Ok(Watch {
            targets,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            last: Mutex::new(vec![]),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Probes every registry now (concurrently); the result also becomes
    /// the snapshot.
    pub async fn probe(&self) -> Vec<pb::RegistryStatus> {
        let probes: Vec<_> = self
            .targets
            .iter()
            .map(|t| tokio::spawn(probe(t.clone(), self.tls.clone())))
            .collect();
        let mut out = Vec::with_capacity(probes.len());
        for (p, t) in probes.into_iter().zip(&self.targets) {
            out.push(p.await.unwrap_or_else(|e| pb::RegistryStatus {
                name: t.kind.name().into(),
                address: t.addr.clone(),
                error: format!("probe failed: {e}"),
                ..Default::default()
            }));
        }
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = out.clone();
        out
    }

    /// The last probe's result.
    pub fn snapshot(&self) -> Vec<pb::RegistryStatus> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Refreshes the snapshot every [`REFRESH_EVERY`] until `stop` fires.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut every = berth_runtime::shutdown::Every::new(REFRESH_EVERY);
        while every.tick(&stop).await {
            if stop.run_until_cancelled(self.probe()).await.is_none() {
                return;
            }
        }
    }
}

async fn probe(t: Target, tls: tokio_rustls::TlsConnector) -> pb::RegistryStatus {
    let mut s = pb::RegistryStatus {
        name: t.kind.name().into(),
        address: t.addr.clone(),
        ..Default::default()
    };
    match tokio::time::timeout(PROBE_TIMEOUT, api_answers(&t.addr, &tls)).await {
        Ok(Ok(())) => s.answering = true,
        Ok(Err(e)) => s.error = e,
        Err(_) => s.error = format!("no answer within {PROBE_TIMEOUT:?}"),
    }
    if let Some(m) = t.metrics {
        let read = tokio::time::timeout(PROBE_TIMEOUT, async {
            let path = "/metrics";
            let stream = TcpStream::connect(m)
                .await
                .map_err(|e| format!("connect {m}: {e}"))?;
            let a = get(stream, &m.to_string(), path).await?;
            if a.status != 200 {
                return Err(format!("GET http://{m}{path}: status {}", a.status));
            }
            Ok(counters(t.kind, &String::from_utf8_lossy(&a.body)))
        })
        .await;
        match read {
            Ok(Ok(c)) => {
                s.counters_read = true;
                s.requests = c.requests;
                s.hits = c.hits;
                s.misses = c.misses;
                s.bytes_served = c.bytes_served;
            }
            Ok(Err(e)) if s.error.is_empty() => s.error = format!("counters: {e}"),
            Err(_) if s.error.is_empty() => {
                s.error = format!("counters: no answer within {PROBE_TIMEOUT:?}");
            }
            _ => {}
        }
    }
    s
}

/// GET `/v2/` over TLS: any answer of a registry (200, or 401 with token
/// authentication) counts.
async fn api_answers(addr: &str, tls: &tokio_rustls::TlsConnector) -> Result<(), String> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .ok_or_else(|| format!("{addr:?} is not HOST:PORT"))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host:?}: {e}"))?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let a = get(stream, addr, "/v2/").await?;
    if a.registry {
        Ok(())
    } else {
        Err(format!(
            "GET /v2/ answered {} without Docker-Distribution-Api-Version: not a registry",
            a.status
        ))
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// It carried `Docker-Distribution-Api-Version: registry/2.0`.
    registry: bool,
    body: Vec<u8>,
}

/// One HTTP/1.0 GET (the server closes the connection after the answer,
/// which is then read to its end: no chunked encoding to undo).
async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    host: &str,
    path: &str,
) -> Result<Answer, String> {
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: berth-coordinator\r\nAccept: */*\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = vec![];
    match (&mut s).take(MAX_ANSWER).read_to_end(&mut raw).await {
        Ok(_) => {}
        // A TLS peer that closes without close_notify: what came is whole
        // if its headers are.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(format!("read: {e}")),
    }
    parse_answer(&raw)
}

fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP answer")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .filter(|l| l.starts_with("HTTP/1."))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status line")?;
    let registry = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim()
                .eq_ignore_ascii_case("docker-distribution-api-version")
                && v.trim().starts_with("registry/2")
        })
    });
    Ok(Answer {
        status,
        registry,
        body: raw[end + 4..].to_vec(),
    })
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Counters {
    requests: u64,
    hits: u64,
    misses: u64,
    bytes_served: u64,
}

/// A registry's counters from distribution's Prometheus text.
fn counters(kind: Kind, body: &str) -> Counters {
    let mut c = Counters::default();
    let mut stored = 0;
    for line in body.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        // Whole numbers, far below what a u64 holds.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = value.max(0.0) as u64;
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix("=\""))
                .map(|v| v.trim_end_matches('}').trim_end_matches('"'))
        };
        let (handler, method, code) = (label("handler"), label("method"), label("code"));
        match (kind, name) {
            (Kind::Mirror, "registry_http_requests_total")
                if handler == Some("blob") && method == Some("get") && code == Some("200") =>
            {
                c.requests += n;
            }
            (Kind::Mirror, "registry_storage_action_seconds_count")
                if label("action") == Some("Move") =>
            {
                stored += n;
            }
            (Kind::Cache, "registry_http_requests_total")
                if handler == Some("manifest") && matches!(method, Some("get" | "head")) =>
            {
                match code {
                    Some("200") => c.hits += n,
                    Some("404") => c.misses += n,
                    _ => {}
                }
            }
            (_, "registry_http_response_size_bytes_sum")
                if matches!(handler, Some("blob" | "manifest")) =>
            {
                c.bytes_served += n;
            }
            _ => {}
        }
    }
    match kind {
        Kind::Mirror => {
            c.misses = stored.min(c.requests);
            c.hits = c.requests - c.misses;
        }
        Kind::Cache => c.requests = c.hits + c.misses,
    }
    c
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabel {
    registry: String,
}

/// `/metrics` of the registries, from the last snapshot.
#[derive(Debug)]
pub struct RegistryCollector(pub Arc<Watch>);

impl Collector for RegistryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.0.snapshot();
        let label = |s: &pb::RegistryStatus| RegistryLabel {
            registry: s.name.clone(),
        };
        let mut up = encoder.encode_descriptor(
            "registry_up",
            "Whether the pool's registry (mirror, cache) answered its last probe",
            None,
            MetricType::Gauge,
        )?;
        for s in &snap {
            ConstGauge::new(i64::from(s.answering)).encode(up.encode_family(&label(s))?)?;
        }
        let read: Vec<_> = snap.iter().filter(|s| s.counters_read).collect();
        type Field = fn(&pb::RegistryStatus) -> u64;
        let series: [(&str, &str, Field); 4] = [
            (
                "registry_requests",
                "Requests the registry counted (mirror: blob downloads; cache: manifest lookups)",
                |s| s.requests,
            ),
            (
                "registry_hits",
                "Requests served from the registry's storage (cache: tags found)",
                |s| s.hits,
            ),
            (
                "registry_misses",
                "Requests not served from storage (mirror: blobs fetched from the upstream; cache: tags not found)",
                |s| s.misses,
            ),
            (
                "registry_served_bytes",
                "Bytes of blobs and manifests the registry sent to clients",
                |s| s.bytes_served,
            ),
        ];
        for (name, help, field) in series {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &read {
                ConstCounter::new(field(s)).encode(m.encode_family(&label(s))?)?;
            }
        }
        let mut ratio = encoder.encode_descriptor(
            "registry_hit_ratio",
            "Hits over requests since the registry started",
            None,
            MetricType::Gauge,
        )?;
        for s in read.iter().filter(|s| s.requests > 0) {
            #[allow(clippy::cast_precision_loss)]
            let r = s.hits as f64 / s.requests as f64;
            ConstGauge::new(r).encode(ratio.encode_family(&label(s))?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed() {
        let a = parse_answer(
            b"HTTP/1.0 401 Unauthorized\r\nContent-Type: application/json\r\n\
              docker-distribution-api-version: registry/2.0\r\n\r\n{}",
        )
        .unwrap();
        assert_eq!(a.status, 401);
        assert!(a.registry);
        assert_eq!(a.body, b"{}");
        let a = parse_answer(b"HTTP/1.1 200 OK\r\nServer: nginx\r\n\r\n").unwrap();
        assert!(!a.registry);
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_answer(b"").is_err());
    }

    #[test]
    fn mirror_misses_are_blobs_fetched_into_its_storage() {
        let text = "\
registry_http_requests_total{code=\"200\",handler=\"blob\",method=\"get\"} 8
registry_http_requests_total{code=\"404\",handler=\"blob\",method=\"get\"} 1
registry_http_requests_total{code=\"200\",handler=\"manifest\",method=\"get\"} 2
registry_http_response_size_bytes_sum{handler=\"blob\"} 3000
registry_http_response_size_bytes_sum{handler=\"manifest\"} 100
registry_storage_action_seconds_count{action=\"Move\",driver=\"filesystem\"} 3
registry_storage_action_seconds_count{action=\"PutContent\",driver=\"filesystem\"} 17
";
        assert_eq!(
            counters(Kind::Mirror, text),
            Counters {
                requests: 8,
                hits: 5,
                misses: 3,
                bytes_served: 3100,
            }
        );
        assert_eq!(counters(Kind::Mirror, "<html>"), Counters::default());
    }

    #[tokio::test]
    async fn a_silent_registry_does_not_answer() {
        // Accepts and never answers: a stopped process's backlog.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (ca, _) = berth_tls::Ca::generate("berth test CA").unwrap();
        let w = Watch::new(
            vec![Target {
                kind: Kind::Cache,
                addr: addr.to_string(),
                metrics: None,
            }],
            ca.cert_pem(),
        )
        .unwrap();
        let s = w.probe().await;
        assert_eq!(s.len(), 1);
        assert!(!s[0].answering);
        assert!(s[0].error.contains("no answer"), "{}", s[0].error);
        assert_eq!(w.snapshot(), s);
        drop(l);
    }
}
