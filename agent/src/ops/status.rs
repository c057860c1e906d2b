//! The agent's status endpoint for operators and probes: plain HTTP on the
//! host's own address (default port [`DEFAULT_STATUS_PORT`], bound inside
//! the host's network namespace like the Docker front, but open in every
//! state: it stays reachable while the front is closed).
//!
//! - `GET /healthz`: 200 while the agent process serves at all.
//! - `GET /readyz`: 200 only when the host is Ready or Leased and its
//!   dockerd answers `/_ping`; 503 with the reason otherwise.
//! - `GET /status`: JSON — identity, state and since when, the lease id and
//!   deadline, versions, uptime, CPU/memory/disk, the last wipe report, the
//!   coordinator link.
//! - `GET /metrics`: Prometheus text format (prometheus-client).
//!
//! Nothing here reveals a credential: no certificate, key or token is ever
//! in the [`Board`]; a lease id names a lease, it does not open it (only the
//! lease's client certificate does).
//!
//! The [`Board`] only reads: the driver's status and wipes, the link's
//! status and dockerd's health, each a `watch` published at its source
//! (see [`Sources`]). It is never in a message path: the driver's messages
//! go straight to the link and dockerd's failures straight to the driver,
//! so a board that stops (or was never served) holds up nothing. It never
//! asks the driver.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use berth_proto::v1::WipeReport;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::docker::health::{DaemonHealth, Probe};
use crate::host::driver::Wipes;
use crate::host::state::HostState;
use crate::link::{LinkStatus, Status};
use crate::ops::stats::Sampler;

/// Default TCP port of the status endpoint on the host address.
pub const DEFAULT_STATUS_PORT: u16 = berth_proto::ports::AGENT_STATUS;
/// Bound on the dockerd ping behind `/readyz` and `/metrics`.
pub const STATUS_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Every state, for the one-hot `berth_agent_state` gauge.
const ALL_STATES: [HostState; 7] = [
    HostState::Booting,
    HostState::Warming,
    HostState::Ready,
    HostState::Leased,
    HostState::Wiping,
    HostState::Terminating,
    HostState::Unhealthy,
];

/// Where the status endpoint listens: `[ADDR]:PORT`, where a missing
/// address means the host's own address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusListen {
    Off,
    /// This port on the host address.
    HostAddr(u16),
    Addr(SocketAddr),
}

impl StatusListen {
    /// The address to bind for a host at `host_addr`, if any.
    pub fn resolve(self, host_addr: std::net::IpAddr) -> Option<SocketAddr> {
        match self {
            StatusListen::Off => None,
            StatusListen::HostAddr(port) => Some(SocketAddr::new(host_addr, port)),
            StatusListen::Addr(a) => Some(a),
        }
    }
}

impl std::str::FromStr for StatusListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not `off`, `:PORT` or `ADDR:PORT`");
        if s == "off" {
            return Ok(StatusListen::Off);
        }
        if let Some(port) = s.strip_prefix(':') {
            let port: u16 = port.parse().map_err(|_| bad())?;
            if port == 0 {
                return Err(format!("{s:?}: the status port must not be 0"));
            }
            return Ok(StatusListen::HostAddr(port));
        }
        s.parse().map(StatusListen::Addr).map_err(|_| bad())
    }
}

impl std::fmt::Display for StatusListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatusListen::Off => f.write_str("off"),
            StatusListen::HostAddr(p) => write!(f, ":{p}"),
            StatusListen::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// What the host is, fixed at boot.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub host_id: String,
    pub host_addr: String,
    pub docker_host: String,
    pub provider: String,
    pub instance_type: String,
    pub zone: String,
    pub agent_version: String,
    pub docker_version: String,
    pub coordinator: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    host_id: String,
    agent_version: String,
    docker_version: String,
    provider: String,
}

/// The agent's Prometheus metrics.
struct Metrics {
    registry: Registry,
    state: Family<StateLabel, Gauge>,
    leases_served: Counter,
    wipe_duration: Histogram,
    wipes: Family<OutcomeLabel, Counter>,
    dockerd_failures: Counter,
    dockerd_up: Gauge,
    reconnects: Counter,
    connected: Gauge,
    uptime: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Metrics {
    fn new(info: &HostInfo) -> Self {
        let mut registry = Registry::with_prefix("berth_agent");
        let state = Family::<StateLabel, Gauge>::default();
        registry.register(
            "state",
            "The host's state: 1 for the current one, 0 for the others",
            state.clone(),
        );
        let leases_served = Counter::default();
        registry.register(
            "leases_served",
            "Leases this host has served (accepted and opened its Docker front for)",
            leases_served.clone(),
        );
        // 50 ms .. ~100 s: an empty host wipes in well under a second, a
        // host full of images in tens of seconds.
        let wipe_duration = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        registry.register(
            "wipe_duration_seconds",
            "How long wipes took",
            wipe_duration.clone(),
        );
        let wipes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "wipes",
            "Wipes by outcome (verified: nothing left; failed: the host was destroyed instead)",
            wipes.clone(),
        );
        let dockerd_failures = Counter::default();
        registry.register(
            "dockerd_failures",
            "Times dockerd exited or stopped answering; the agent never restarts it, the host is replaced",
            dockerd_failures.clone(),
        );
        let dockerd_up = Gauge::default();
        registry.register(
            "dockerd_up",
            "1 when dockerd answered /_ping at this scrape",
            dockerd_up.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "coordinator_reconnects",
            "Registrations with the coordinator after the first one",
            reconnects.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "coordinator_connected",
            "1 while the agent's stream to the coordinator is up",
            connected.clone(),
        );
        let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "uptime_seconds",
            "Seconds since the agent started",
            uptime.clone(),
        );
        let build = Family::<InfoLabels, Gauge>::default();
        registry.register(
            "build_info",
            "Versions of this host (always 1)",
            build.clone(),
        );
        build
            .get_or_create(&InfoLabels {
                host_id: info.host_id.clone(),
                agent_version: info.agent_version.clone(),
                docker_version: info.docker_version.clone(),
                provider: info.provider.clone(),
            })
            .set(1);
        for s in ALL_STATES {
            // Every series exists from the start (at 0), so a scrape never
            // misses one.
            drop(state.get_or_create(&StateLabel {
                state: s.name().to_owned(),
            }));
        }
        for o in ["verified", "failed"] {
            drop(wipes.get_or_create(&OutcomeLabel { outcome: o.into() }));
        }
        Metrics {
            registry,
            state,
            leases_served,
            wipe_duration,
            wipes,
            dockerd_failures,
            dockerd_up,
            reconnects,
            connected,
            uptime,
        }
    }
}

/// The `watch`es the board reads, each published where its value is made.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The driver's status: state, lease.
    pub host: watch::Receiver<Status>,
    /// The coordinator link's status.
    pub link: watch::Receiver<LinkStatus>,
    /// dockerd's failures, as its watchers reported them to the driver.
    pub daemon: watch::Receiver<DaemonHealth>,
    /// The wipes the driver reported to the coordinator.
    pub wipes: watch::Receiver<Wipes>,
}

/// What the board has taken note of so far (the counters move by the
/// difference from it).
#[derive(Debug, Default)]
struct Seen {
    state: Option<HostState>,
    since: Option<SystemTime>,
    last_lease: Option<String>,
    leases_served: u64,
    registrations: u64,
    wipes: u64,
    dockerd_failures: u64,
}

/// Everything the status endpoint shows, shared by its handlers and kept
/// current by [`Board::follow`].
pub struct Board<P> {
    info: HostInfo,
    started: Instant,
    sources: Sources,
    seen: Mutex<Seen>,
    sampler: Mutex<Sampler>,
    probe: P,
    metrics: Metrics,
}

impl<P> std::fmt::Debug for Board<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl<P: Probe> Board<P> {
    pub fn new(
        info: HostInfo,
        started: Instant,
        sources: Sources,
        sampler: Sampler,
        probe: P,
    ) -> Arc<Self> {
        let metrics = Metrics::new(&info);
        let board = Arc::new(Board {
            info,
            started,
            sources,
            seen: Mutex::new(Seen::default()),
            sampler: Mutex::new(sampler),
            probe,
            metrics,
        });
        board.catch_up();
        board
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes note of every source as it is now.
    fn catch_up(&self) {
        self.observe_host();
        self.observe_link();
        self.observe_daemon();
        self.observe_wipes();
    }

    /// Takes note of the driver's current status: when the state changed,
    /// and each lease the host started serving.
    fn observe_host(&self) {
        let status = self.sources.host.borrow().clone();
        let mut seen = self.seen();
        if seen.state != Some(status.state) {
            seen.state = Some(status.state);
            seen.since = Some(SystemTime::now());
        }
        if status.state == HostState::Leased
            && let Some(id) = &status.lease_id
            && seen.last_lease.as_ref() != Some(id)
        {
            seen.last_lease = Some(id.clone());
            seen.leases_served += 1;
            self.metrics.leases_served.inc();
        }
    }

    fn observe_link(&self) {
        let link = self.sources.link.borrow().clone();
        let mut seen = self.seen();
        if link.registrations > seen.registrations {
            // Every registration after the first is a reconnect.
            let before = seen.registrations.max(1);
            let now = link.registrations.max(1);
            self.metrics.reconnects.inc_by(now - before);
            seen.registrations = link.registrations;
        }
        self.metrics.connected.set(i64::from(link.connected));
    }

    fn observe_daemon(&self) {
        let failures = self.sources.daemon.borrow().failures;
        let mut seen = self.seen();
        if failures > seen.dockerd_failures {
            self.metrics
                .dockerd_failures
                .inc_by(failures - seen.dockerd_failures);
            seen.dockerd_failures = failures;
        }
    }

    /// Counts the wipes reported since the last look. The outcome counts
    /// are exact (the driver publishes cumulative ones); the histogram gets
    /// the last report's duration for each new wipe, which is that wipe's
    /// own unless two finished between two looks (a lease apart: not seen).
    fn observe_wipes(&self) {
        let wipes = self.sources.wipes.borrow().clone();
        let mut seen = self.seen();
        let new = wipes.total().saturating_sub(seen.wipes);
        if new == 0 {
            return;
        }
        seen.wipes = wipes.total();
        for (outcome, now) in [("verified", wipes.verified), ("failed", wipes.failed)] {
            let counter = self.metrics.wipes.get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            });
            if now > counter.get() {
                counter.inc_by(now - counter.get());
            }
        }
        if let Some(last) = &wipes.last {
            #[allow(clippy::cast_precision_loss)]
            let seconds = last.duration_ms as f64 / 1000.0;
            for _ in 0..new {
                self.metrics.wipe_duration.observe(seconds);
            }
        }
    }

    /// Follows every source until `stop` fires or all of them are gone.
    pub async fn follow(self: Arc<Self>, stop: CancellationToken) {
        let Sources {
            mut host,
            mut link,
            mut daemon,
            mut wipes,
        } = self.sources.clone();
        let mut open = [true; 4];
        while open.iter().any(|o| *o) {
            tokio::select! {
                () = stop.cancelled() => return,
                r = host.changed(), if open[0] => match r {
                    Ok(()) => self.observe_host(),
                    Err(_) => open[0] = false,
                },
                r = link.changed(), if open[1] => match r {
                    Ok(()) => self.observe_link(),
                    Err(_) => open[1] = false,
                },
                r = daemon.changed(), if open[2] => match r {
                    Ok(()) => self.observe_daemon(),
                    Err(_) => open[2] = false,
                },
                r = wipes.changed(), if open[3] => match r {
                    Ok(()) => self.observe_wipes(),
                    Err(_) => open[3] = false,
                },
            }
        }
    }

    async fn dockerd_answers(&self) -> Result<(), String> {
        match tokio::time::timeout(STATUS_PING_TIMEOUT, self.probe.ping()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {STATUS_PING_TIMEOUT:?}")),
        }
    }

    /// `/readyz`: the reason the host is not ready, if it is not.
    pub async fn readiness(&self) -> Result<(), String> {
        let state = self.sources.host.borrow().state;
        if !matches!(state, HostState::Ready | HostState::Leased) {
            return Err(format!("host is {}", state.name()));
        }
        self.dockerd_answers()
            .await
            .map_err(|e| format!("dockerd does not answer /_ping: {e}"))
    }

    /// `/status`.
    pub fn report(&self) -> StatusReport {
        self.catch_up();
        let status = self.sources.host.borrow().clone();
        let link = self.sources.link.borrow().clone();
        let last_wipe = self
            .sources
            .wipes
            .borrow()
            .last
            .as_ref()
            .map(WipeSummary::of);
        let (resources, load) = {
            let mut s = self.sampler.lock().unwrap_or_else(|e| e.into_inner());
            (s.resources(), s.load())
        };
        let seen = self.seen();
        StatusReport {
            host: self.info.clone(),
            state: status.state.name(),
            state_since: seen.since.map(rfc3339),
            state_for_seconds: seen
                .since
                .and_then(|t| t.elapsed().ok())
                .map_or(0, |d| d.as_secs()),
            lease: status.lease_id.map(|id| LeaseReport {
                id,
                deadline: status.lease_deadline.map(rfc3339),
            }),
            uptime_seconds: self.started.elapsed().as_secs(),
            resources: ResourcesReport {
                cpus: resources.cpus,
                cpu_percent: load.cpu_percent,
                memory_bytes: resources.memory_bytes,
                memory_used_bytes: load.memory_used_bytes,
                disk_bytes: resources.disk_bytes,
                disk_free_bytes: resources.disk_free_bytes,
            },
            leases_served: seen.leases_served,
            dockerd_failures: seen.dockerd_failures,
            last_wipe,
            coordinator: LinkReport {
                url: self.info.coordinator.clone(),
                connected: link.connected,
                registrations: link.registrations,
                reconnects: link.registrations.saturating_sub(1),
            },
        }
    }

    /// `/metrics`, in the Prometheus text format.
    pub async fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        self.catch_up();
        let state = self.sources.host.borrow().state;
        for s in ALL_STATES {
            self.metrics
                .state
                .get_or_create(&StateLabel {
                    state: s.name().to_owned(),
                })
                .set(i64::from(s == state));
        }
        let up = self.dockerd_answers().await.is_ok();
        self.metrics.dockerd_up.set(i64::from(up));
        self.metrics
            .uptime
            .set(self.started.elapsed().as_secs_f64());
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.metrics.registry)?;
        Ok(out)
    }
}

/// The `/status` document.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub host: HostInfo,
    pub state: &'static str,
    pub state_since: Option<String>,
    pub state_for_seconds: u64,
    pub lease: Option<LeaseReport>,
    pub uptime_seconds: u64,
    pub resources: ResourcesReport,
    pub leases_served: u64,
    pub dockerd_failures: u64,
    pub last_wipe: Option<WipeSummary>,
    pub coordinator: LinkReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct LeaseReport {
    pub id: String,
    pub deadline: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResourcesReport {
    pub cpus: u32,
    pub cpu_percent: f32,
    pub memory_bytes: u64,
    pub memory_used_bytes: u64,
    pub disk_bytes: u64,
    pub disk_free_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    pub url: String,
    pub connected: bool,
    pub registrations: u64,
    pub reconnects: u64,
}

/// A wipe report as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WipeSummary {
    pub lease_id: String,
    pub verified: bool,
    pub duration_ms: u64,
    pub containers_removed: u32,
    pub images_removed: u32,
    pub volumes_removed: u32,
    pub networks_removed: u32,
    pub build_cache_reclaimed_bytes: u64,
    pub left: u32,
    pub error: String,
}

impl WipeSummary {
    fn of(w: &WipeReport) -> Self {
        WipeSummary {
            lease_id: w.lease_id.clone(),
            verified: w.verified,
            duration_ms: w.duration_ms,
            containers_removed: w.containers_removed,
            images_removed: w.images_removed,
            volumes_removed: w.volumes_removed,
            networks_removed: w.networks_removed,
            build_cache_reclaimed_bytes: w.build_cache_reclaimed_bytes,
            left: w.containers_left
                + w.images_left
                + w.volumes_left
                + w.networks_left
                + w.build_cache_left
                + w.plugins_left
                + u32::try_from(w.listeners_left.len()).unwrap_or(u32::MAX)
                + u32::from(!w.swarm_state_after.is_empty() && w.swarm_state_after != "inactive"),
            error: w.error.clone(),
        }
    }
}

/// The endpoint's routes.
pub fn router<P: Probe>(board: Arc<Board<P>>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<P>))
        .route("/status", get(status::<P>))
        .route("/metrics", get(metrics::<P>))
        .with_state(board)
}

async fn readyz<P: Probe>(State(board): State<Arc<Board<P>>>) -> Response {
    match board.readiness().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

async fn status<P: Probe>(State(board): State<Arc<Board<P>>>) -> Response {
    axum::Json(board.report()).into_response()
}

async fn metrics<P: Probe>(State(board): State<Arc<Board<P>>>) -> Response {
    berth_runtime::http::metrics_response(board.metrics_text().await)
}

/// Serves `router` on `listener` until `stop` fires.
pub async fn serve(listener: std::net::TcpListener, router: Router, stop: CancellationToken) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "status endpoint: cannot use its listener");
            return;
        }
    };
    berth_runtime::http::serve(listener, router, stop, "status endpoint").await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Clone, Default)]
    struct FakeProbe(Arc<AtomicBool>);
    impl Probe for FakeProbe {
        fn alive(&self) -> bool {
            true
        }
        async fn ping(&self) -> Result<(), String> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("refused".into())
            }
        }
    }

    fn info() -> HostInfo {
        HostInfo {
            host_id: "bt-0001".into(),
            host_addr: "198.18.0.6".into(),
            docker_host: "tcp://198.18.0.6:2376".into(),
            provider: "local".into(),
            instance_type: String::new(),
            zone: String::new(),
            agent_version: "0.1.0".into(),
            docker_version: "20.10".into(),
            coordinator: "https://127.0.0.1:7070".into(),
        }
    }

    fn status(state: HostState, lease: Option<&str>) -> Status {
        Status {
            state,
            lease_id: lease.map(str::to_owned),
            lease_deadline: lease
                .map(|_| SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000)),
            lease_key: None,
        }
    }

    /// The publishing ends of a board's sources.
    struct Publishers {
        host: watch::Sender<Status>,
        link: watch::Sender<LinkStatus>,
        daemon: watch::Sender<DaemonHealth>,
        wipes: watch::Sender<Wipes>,
    }

    fn sources() -> (Publishers, Sources) {
        let (host, host_rx) = watch::channel(status(HostState::Booting, None));
        let (link, link_rx) = watch::channel(LinkStatus::default());
        let (daemon, daemon_rx) = watch::channel(DaemonHealth::default());
        let (wipes, wipes_rx) = watch::channel(Wipes::default());
        let sources = Sources {
            host: host_rx,
            link: link_rx,
            daemon: daemon_rx,
            wipes: wipes_rx,
        };
        (
            Publishers {
                host,
                link,
                daemon,
                wipes,
            },
            sources,
        )
    }

    fn wipe(lease_id: &str, verified: bool, duration_ms: u64) -> WipeReport {
        WipeReport {
            lease_id: lease_id.into(),
            verified,
            duration_ms,
            containers_removed: 2,
            ..WipeReport::default()
        }
    }

    #[tokio::test]
    async fn readiness_state_lease_and_metrics_follow_the_host() {
        let (publish, sources) = sources();
        let probe = FakeProbe::default();
        let board = Board::new(
            info(),
            Instant::now(),
            sources,
            Sampler::new(std::path::Path::new("/")),
            probe.clone(),
        );
        assert_eq!(board.readiness().await, Err("host is booting".into()));
        publish.host.send_replace(status(HostState::Ready, None));
        board.observe_host();
        assert!(
            board
                .readiness()
                .await
                .unwrap_err()
                .contains("dockerd does not answer")
        );
        probe.0.store(true, Ordering::SeqCst);
        assert_eq!(board.readiness().await, Ok(()));

        publish
            .host
            .send_replace(status(HostState::Leased, Some("lease-1")));
        board.observe_host();
        // Seen twice, counted once.
        board.observe_host();
        let r = board.report();
        assert_eq!(r.state, "leased");
        assert_eq!(r.lease.as_ref().unwrap().id, "lease-1");
        assert_eq!(
            r.lease.unwrap().deadline.unwrap(),
            "2033-05-18T03:33:20.000Z"
        );
        assert_eq!(r.leases_served, 1);
        assert!(r.resources.cpus >= 1 && r.resources.memory_bytes > 0);
        assert!(r.last_wipe.is_none() && r.dockerd_failures == 0);

        publish.link.send_replace(LinkStatus {
            connected: true,
            registrations: 3,
            ..LinkStatus::default()
        });
        publish.wipes.send_modify(|w| {
            *w = Wipes {
                verified: 1,
                failed: 0,
                last: Some(wipe("lease-1", true, 300)),
            }
        });
        publish.host.send_replace(status(HostState::Wiping, None));
        assert_eq!(board.readiness().await, Err("host is wiping".into()));
        let r = board.report();
        assert_eq!(r.coordinator.reconnects, 2);
        let w = r.last_wipe.unwrap();
        assert!(w.verified && w.containers_removed == 2 && w.duration_ms == 300);
        // Read twice: the wipe still counts once.
        assert_eq!(board.report().leases_served, 1);

        let text = board.metrics_text().await.unwrap();
        for line in [
            "berth_agent_state{state=\"wiping\"} 1",
            "berth_agent_state{state=\"leased\"} 0",
            "berth_agent_leases_served_total 1",
            "berth_agent_coordinator_reconnects_total 2",
            "berth_agent_coordinator_connected 1",
            "berth_agent_wipes_total{outcome=\"verified\"} 1",
            "berth_agent_wipe_duration_seconds_count 1",
            "berth_agent_dockerd_up 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        // No credential material ever reaches the board.
        let json = serde_json::to_string(&board.report()).unwrap();
        assert!(!json.contains("PRIVATE KEY") && !json.contains("CERTIFICATE"));
    }

    #[tokio::test]
    async fn the_board_follows_its_sources_and_counts_each_event_once() {
        let (publish, sources) = sources();
        let board = Board::new(
            info(),
            Instant::now(),
            sources,
            Sampler::new(std::path::Path::new("/")),
            FakeProbe::default(),
        );
        let stop = CancellationToken::new();
        let follow = tokio::spawn(board.clone().follow(stop.clone()));

        publish.daemon.send_modify(|h| {
            h.failures = 2;
            h.last_failure = Some("dockerd's process is gone".into());
        });
        publish.wipes.send_modify(|w| {
            *w = Wipes {
                verified: 1,
                failed: 1,
                last: Some(wipe("lease-2", false, 1500)),
            }
        });
        // The follower notes the counts without a scrape.
        tokio::time::timeout(Duration::from_secs(5), async {
            while board.seen().wipes < 2 || board.seen().dockerd_failures < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let r = board.report();
        assert_eq!(r.dockerd_failures, 2);
        let w = r.last_wipe.unwrap();
        assert!(!w.verified && w.lease_id == "lease-2");
        let text = board.metrics_text().await.unwrap();
        for line in [
            "berth_agent_dockerd_failures_total 2",
            "berth_agent_wipes_total{outcome=\"verified\"} 1",
            "berth_agent_wipes_total{outcome=\"failed\"} 1",
            "berth_agent_wipe_duration_seconds_count 2",
            "berth_agent_dockerd_up 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        // Every source gone: the follower ends on its own.
        drop(publish);
        tokio::time::timeout(Duration::from_secs(5), follow)
            .await
            .unwrap()
            .unwrap();
        // What it last saw is still shown.
        assert_eq!(board.report().dockerd_failures, 2);
    }

    #[test]
    fn listen_values_parse() {
        assert_eq!("off".parse(), Ok(StatusListen::Off));
        assert_eq!(":9102".parse(), Ok(StatusListen::HostAddr(9102)));
        assert_eq!(
            "127.0.0.1:1".parse(),
            Ok(StatusListen::Addr("127.0.0.1:1".parse().unwrap()))
        );
        for bad in [":0", ":x", "9102", "host:1", ""] {
            assert!(bad.parse::<StatusListen>().is_err(), "{bad}");
        }
        let ip: std::net::IpAddr = "198.18.0.2".parse().unwrap();
        assert_eq!(
            StatusListen::HostAddr(9102).resolve(ip),
            Some("198.18.0.2:9102".parse().unwrap())
        );
        assert_eq!(StatusListen::Off.resolve(ip), None);
    }
}
