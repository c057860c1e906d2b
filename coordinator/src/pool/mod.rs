//! The pool: every known host and lease, the FIFO queue of builds waiting for
//! a host, and the rules that tie them together.
//!
//! All state sits behind one mutex and every method is synchronous and short:
//! no method awaits while holding the lock. Messages to agents go out through
//! each agent's bounded channel with `try_send`, so a slow agent can never
//! stall the pool; an agent whose channel is full or closed is treated as
//! disconnected. Timers (queue waits, assignment timeouts, lease deadlines,
//! lost hosts) are checked by [`Pool::tick`], which the server calls on an
//! interval; acquire callers wait on a `watch` of their lease's state.
//!
//! Invariant: a host is in at most one lease. A host is offered only when its
//! agent last reported Ready, it holds no lease here, it is connected, recently
//! heard from and not draining; the agent itself refuses a second lease.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use berth_proto::v1 as pb;
use berth_proto::{from_system_time, to_system_time};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::Status;
use tracing::{info, warn};

use crate::error::Error;
use crate::lease::{self, LeaseAction, LeaseEvent, LeaseState};
use crate::ops::metrics::PoolMetrics;
use crate::store::{LeaseStore, MemStore, StoreError};
use crate::timeline::{self, Step};
use crate::validate;

mod commit;
mod invariants;
mod persist;

/// What the coordinator sends down an agent's stream.
pub type AgentTx = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// Tunables of the pool. Defaults suit `berth up` on one machine.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// How often agents heartbeat; a host silent for three intervals is not offered.
    pub heartbeat_interval: Duration,
    /// How long an agent has to accept an assigned lease.
    pub assign_timeout: Duration,
    /// Lease time to live when the request gives none.
    pub default_ttl: Duration,
    /// Longest time to live one request may ask for.
    pub max_ttl: Duration,
    /// Longest a lease may live in total, renewals included.
    pub max_lease: Duration,
    /// Longest an acquire may wait in the queue.
    pub max_wait: Duration,
    /// How long a disconnected host keeps its place (and its lease) before it
    /// is forgotten and its lease ends as host-lost.
    pub lost_grace: Duration,
    /// How many ended leases to remember for Get and ListLeases.
    pub history: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(2),
            assign_timeout: Duration::from_secs(5),
            default_ttl: Duration::from_secs(30 * 60),
            max_ttl: Duration::from_secs(24 * 3600),
            max_lease: Duration::from_secs(24 * 3600),
            max_wait: Duration::from_secs(3600),
            lost_grace: Duration::from_secs(30),
            history: 10_000,
        }
    }
}

/// A validated agent registration.
#[derive(Debug, Clone)]
pub struct Registration {
    pub host_id: String,
    pub host_addr: String,
    pub docker_host: String,
    pub provider: String,
    pub resources: Option<pb::Resources>,
    pub agent_version: String,
    pub docker_version: String,
    pub state: pb::HostState,
    pub lease_id: String,
    pub lease_deadline: Option<SystemTime>,
    /// What `Registered` hands back: the front's server certificate and the
    /// pool CA (signed by the service before the host joins the pool).
    pub tls: RegisteredTls,
}

/// The TLS part of `Registered`.
#[derive(Debug, Clone, Default)]
pub struct RegisteredTls {
    pub server_cert_pem: String,
    pub ca_pem: String,
}

impl Registration {
    /// Checks a `Register` message from the network.
    pub fn from_proto(r: pb::Register) -> Result<Self, Error> {
        validate::id("host_id", &r.host_id)?;
        validate::host_addr(&r.host_addr)?;
        validate::docker_host(&r.docker_host)?;
        for (field, v) in [
            ("provider", &r.provider),
            ("agent_version", &r.agent_version),
            ("docker_version", &r.docker_version),
            ("instance_type", &r.instance_type),
            ("zone", &r.zone),
        ] {
            validate::text(field, v, validate::MAX_ID_LEN)?;
        }
        let state = pb::HostState::try_from(r.state)
            .map_err(|_| Error::invalid("state", format!("unknown host state {}", r.state)))?;
        if !r.lease_id.is_empty() {
            validate::lease_id(&r.lease_id)?;
        }
        let lease_deadline = r.lease_deadline.as_ref().and_then(to_system_time);
        Ok(Self {
            host_id: r.host_id,
            host_addr: r.host_addr,
            docker_host: r.docker_host,
            provider: r.provider,
            resources: r.resources,
            agent_version: r.agent_version,
            docker_version: r.docker_version,
            state,
            lease_id: r.lease_id,
            lease_deadline,
            tls: RegisteredTls::default(),
        })
    }
}

struct Conn {
    id: u64,
    tx: AgentTx,
}

struct Host {
    reg: Registration,
    /// What the agent last said it is doing (or Wiping, set here when the
    /// coordinator ended the host's lease and the agent has not spoken since).
    reported: pb::HostState,
    lease: Option<String>,
    conn: Option<Conn>,
    draining: bool,
    registered_at: SystemTime,
    last_heartbeat: SystemTime,
    last_seen: Instant,
    disconnected_at: Option<Instant>,
    last_wipe: Option<pb::WipeReport>,
    /// Whether `Inner::idle` holds an entry for this host that was pushed
    /// since one was last popped: a host is queued at most once, so
    /// taking an idle host never has to scan the queue for duplicates.
    queued_idle: bool,
}

struct Lease {
    id: String,
    /// The tenant that acquired it; only that tenant sees it through
    /// LeaseService. Empty for leases adopted from agents after a restart.
    tenant: String,
    build_id: String,
    state: LeaseState,
    host: Option<String>,
    host_addr: String,
    docker_host: String,
    ttl: Duration,
    created: Instant,
    created_at: SystemTime,
    queued_until: Instant,
    assigned_at: Option<Instant>,
    deadline: Option<Instant>,
    deadline_at: Option<SystemTime>,
    message: String,
    wipe: Option<pb::WipeReport>,
    /// Every step so far, oldest first (see `crate::timeline`).
    timeline: Vec<timeline::Entry>,
    watch: watch::Sender<LeaseState>,
}

#[derive(Default)]
struct Inner {
    /// What happened, for `/metrics` (see `crate::ops::metrics`).
    metrics: Arc<PoolMetrics>,
    hosts: HashMap<String, Host>,
    leases: HashMap<String, Lease>,
    /// (tenant, build id) -> its lease that has not ended (Acquire
    /// idempotency; two tenants may use the same build id).
    live_by_build: HashMap<(String, String), String>,
    /// Queued lease ids, oldest first. May hold ids that are no longer
    /// queued; they are skipped when met.
    queue: VecDeque<String>,
    /// Host ids that became offerable, oldest first; checked again when
    /// popped, so stale entries are harmless. A host is pushed only while
    /// it has no entry waiting (`Host::queued_idle`), so this stays at
    /// most one entry per host plus the stale ones of forgotten hosts.
    idle: VecDeque<String>,
    /// Ended lease ids, oldest first, for bounding the history.
    ended: VecDeque<String>,
    next_conn: u64,
    /// Lease ids changed since the last write to the store.
    dirty: BTreeSet<String>,
    /// Lease ids dropped from history since the last write to the store.
    removed: Vec<String>,
    /// Hosts the orphan sweeper is ending: they may not register.
    condemned: HashSet<String>,
}

/// What the pool knows of one host, for the orphan sweeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Holds a lease (assigned or active), connected or not: never touched.
    Leased,
    /// Its agent's stream is up.
    Connected,
    /// Registered once; its stream has been down since then.
    Disconnected { since: Instant },
}

/// How long a call waits for its changes to reach the store before it
/// answers UNAVAILABLE (the change stays pending and is retried).
pub const STORE_WAIT: Duration = Duration::from_secs(10);

/// The coordinator's view of the pool.
pub struct Pool {
    cfg: PoolConfig,
    inner: Mutex<Inner>,
    store: Arc<dyn LeaseStore>,
    /// Writes the leases changed under the lock to `store` (group commit).
    committer: commit::Committer,
}

/// The pool's lock. Dropping it hands every lease changed under it to the
/// committer; a call answers only after `Pool::durable`, so nothing a caller
/// was told is lost to a crash.
struct Locked<'a> {
    g: MutexGuard<'a, Inner>,
    committer: &'a commit::Committer,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.g
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.g
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        persist::flush(&mut self.g, self.committer);
    }
}

/// The pool at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// (state name, hosts), by name.
    pub hosts_by_state: Vec<(String, u32)>,
    pub hosts_connected: u32,
    pub hosts_draining: u32,
    pub hosts_offerable: u32,
    /// (state name, leases), by name.
    pub leases_by_state: Vec<(String, u32)>,
    pub queue_length: u32,
}

impl PoolStats {
    pub fn to_proto(&self) -> pb::PoolStatsResponse {
        pb::PoolStatsResponse {
            hosts_by_state: self.hosts_by_state.iter().cloned().collect(),
            hosts_connected: self.hosts_connected,
            hosts_draining: self.hosts_draining,
            hosts_offerable: self.hosts_offerable,
            leases_by_state: self.leases_by_state.iter().cloned().collect(),
            queue_length: self.queue_length,
        }
    }
}

/// What an acquire caller waits on.
#[derive(Debug)]
pub struct Pending {
    pub lease_id: String,
    pub state: watch::Receiver<LeaseState>,
}

impl Pool {
    /// A pool that keeps its leases in memory only.
    pub fn new(cfg: PoolConfig) -> Self {
        let store: Arc<dyn LeaseStore> = Arc::new(MemStore::default());
        Self {
            cfg,
            inner: Mutex::new(Inner::default()),
            committer: commit::Committer::start(store.clone()),
            store,
        }
    }

    /// A pool that writes every lease change through to `store`, starting
    /// from what the store holds (see `persist::restore`).
    pub fn with_store(cfg: PoolConfig, store: Arc<dyn LeaseStore>) -> Result<Self, StoreError> {
        let records = store.load()?;
        let mut inner = Inner::default();
        persist::restore(&mut inner, &cfg, records, Instant::now(), SystemTime::now());
        let pool = Self {
            cfg,
            inner: Mutex::new(inner),
            committer: commit::Committer::start(store.clone()),
            store,
        };
        // Writes what restoring changed (queued leases that failed).
        drop(pool.lock());
        pool.durable_blocking();
        Ok(pool)
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// The store the pool writes its leases to; other state that must
    /// outlive the process (e.g. a CA) goes in with `LeaseStore::put_meta`.
    pub fn store(&self) -> &Arc<dyn LeaseStore> {
        &self.store
    }

    fn lock(&self) -> Locked<'_> {
        // A panic while holding the lock is a bug, but the data is still the
        // best record there is: keep serving rather than poison every call.
        Locked {
            g: self.inner.lock().unwrap_or_else(|e| e.into_inner()),
            committer: &self.committer,
        }
    }

    /// Waits until every lease change made so far is in the store. Every
    /// call that answers with (or after) a change awaits this first: the
    /// answer must not leave before what it reports would survive a crash.
    pub async fn durable(&self) -> Result<(), Error> {
        self.committer
            .wait(self.committer.enqueued(), STORE_WAIT)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))
    }

    /// [`Pool::durable`] for callers outside the runtime (start-up).
    fn durable_blocking(&self) {
        self.committer.wait_blocking(self.committer.enqueued());
    }

    // ----- LeaseService -----

    /// Starts or joins the acquisition for `build_id`.
    pub fn acquire(
        &self,
        tenant: &str,
        build_id: &str,
        ttl: Duration,
        wait: Duration,
        now: Instant,
    ) -> Result<Pending, Error> {
        let mut g = self.lock();
        let key = (tenant.to_owned(), build_id.to_owned());
        if let Some(lid) = g.live_by_build.get(&key).cloned()
            && let Some(l) = g.leases.get(&lid)
        {
            return Ok(Pending {
                lease_id: lid,
                state: l.watch.subscribe(),
            });
        }
        let id = uuid::Uuid::new_v4().hyphenated().to_string();
        let (tx, rx) = watch::channel(LeaseState::Queued);
        g.leases.insert(
            id.clone(),
            Lease {
                id: id.clone(),
                tenant: tenant.to_owned(),
                build_id: build_id.to_owned(),
                state: LeaseState::Queued,
                host: None,
                host_addr: String::new(),
                docker_host: String::new(),
                ttl,
                created: now,
                created_at: SystemTime::now(),
                queued_until: now + wait,
                assigned_at: None,
                deadline: None,
                deadline_at: None,
                message: String::new(),
                wipe: None,
                timeline: Vec::new(),
                watch: tx,
            },
        );
        if let Some(l) = g.leases.get_mut(&id) {
            let at = SystemTime::now();
            timeline::record(
                &mut l.timeline,
                &id,
                Step::Requested,
                at,
                format!("build {build_id}"),
            );
            timeline::record(&mut l.timeline, &id, Step::Queued, at, "");
        }
        g.live_by_build.insert(key, id.clone());
        g.dirty.insert(id.clone());
        g.queue.push_back(id.clone());
        info!(lease_id = %id, tenant, build_id, ttl = ?ttl, wait = ?wait, "lease requested");
        g.try_assign(&self.cfg, now);
        if wait.is_zero() && g.leases.get(&id).map(|l| l.state) == Some(LeaseState::Queued) {
            let msg = g.no_host_message(&id, wait);
            g.set_message(&id, msg);
            g.apply(&self.cfg, &id, LeaseEvent::WaitExpired);
        }
        Ok(Pending {
            lease_id: id,
            state: rx,
        })
    }

    pub fn renew(
        &self,
        tenant: &str,
        lease_id: &str,
        ttl: Duration,
        now: Instant,
    ) -> Result<pb::Lease, Error> {
        let mut g = self.lock();
        let max_lease = self.cfg.max_lease;
        let l = g
            .leases
            .get_mut(lease_id)
            .filter(|l| l.tenant == tenant)
            .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))?;
        if l.state.is_ended() {
            return Err(ended_error(l));
        }
        l.ttl = ttl;
        let lid = l.id.clone();
        if l.state.holds_host() {
            let latest = l.created + max_lease;
            let deadline = (now + ttl).min(latest);
            let deadline_at = SystemTime::now() + deadline.saturating_duration_since(now);
            l.deadline = Some(deadline);
            l.deadline_at = Some(deadline_at);
            let msg = pb::coordinator_message::Msg::RenewLease(pb::RenewLease {
                lease_id: l.id.clone(),
                deadline: Some(from_system_time(deadline_at)),
            });
            info!(lease_id, ttl = ?ttl, capped = deadline < now + ttl, "lease renewed");
            timeline::record(
                &mut l.timeline,
                lease_id,
                Step::Renewed,
                SystemTime::now(),
                format!(
                    "deadline {}",
                    humantime::format_rfc3339_seconds(deadline_at)
                ),
            );
            if let Some(hid) = l.host.clone() {
                g.send(&hid, msg);
            }
        }
        g.dirty.insert(lid);
        g.lease_view(lease_id)
            .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))
    }

    pub fn release(&self, tenant: &str, lease_id: &str, now: Instant) -> Result<pb::Lease, Error> {
        let mut g = self.lock();
        match g.leases.get(lease_id).filter(|l| l.tenant == tenant) {
            None => return Err(Error::LeaseNotFound(lease_id.to_owned())),
            // The build must learn that its host is gone, not that all went well.
            Some(l) if l.state == LeaseState::HostLost => return Err(ended_error(l)),
            Some(_) => {}
        }
        g.apply(&self.cfg, lease_id, LeaseEvent::Release);
        g.try_assign(&self.cfg, now);
        g.lease_view(lease_id)
            .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))
    }

    /// Reports a lease of `tenant`. Another tenant's lease is not found,
    /// exactly as if it did not exist, so lease ids of others cannot even be
    /// probed. A lease whose host was lost is an error (FAILED_PRECONDITION
    /// with the reason), so a build's next call learns its host is gone.
    pub fn get(&self, tenant: &str, lease_id: &str) -> Result<pb::Lease, Error> {
        let g = self.lock();
        let l = g
            .leases
            .get(lease_id)
            .filter(|l| l.tenant == tenant)
            .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))?;
        if l.state == LeaseState::HostLost {
            return Err(ended_error(l));
        }
        g.lease_view(lease_id)
            .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))
    }

    /// Turns a settled lease state into the Acquire answer.
    pub fn outcome(&self, lease_id: &str) -> Result<pb::Lease, Error> {
        let g = self.lock();
        let l = g
            .leases
            .get(lease_id)
            .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))?;
        match l.state {
            LeaseState::Active => g
                .lease_view(lease_id)
                .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned())),
            LeaseState::Failed => Err(Error::NoHost(l.message.clone())),
            _ => Err(ended_error(l)),
        }
    }

    // ----- AdminService -----

    pub fn list_hosts(&self) -> Vec<pb::Host> {
        let g = self.lock();
        let mut hosts: Vec<_> = g.hosts.values().map(host_view).collect();
        hosts.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        hosts
    }

    pub fn list_leases(&self, include_ended: bool) -> Vec<pb::Lease> {
        let g = self.lock();
        let mut leases: Vec<_> = g
            .leases
            .values()
            .filter(|l| include_ended || !l.state.is_ended())
            .filter_map(|l| g.lease_view(&l.id))
            .collect();
        leases.sort_by(|a, b| {
            let key = |l: &pb::Lease| l.created_at.map(|t| (t.seconds, t.nanos));
            key(a).cmp(&key(b))
        });
        leases
    }

    pub fn drain(&self, host_id: &str, reason: &str) -> Result<pb::Host, Error> {
        let mut g = self.lock();
        let h = g
            .hosts
            .get_mut(host_id)
            .ok_or_else(|| Error::HostNotFound(host_id.to_owned()))?;
        h.draining = true;
        info!(host_id, reason, "host draining");
        g.send(
            host_id,
            pb::coordinator_message::Msg::Drain(pb::Drain {
                reason: reason.to_owned(),
            }),
        );
        g.hosts
            .get(host_id)
            .map(host_view)
            .ok_or_else(|| Error::HostNotFound(host_id.to_owned()))
    }

    // ----- AgentService -----

    /// Records a (re-)registering agent and returns its connection id; the
    /// previous stream of the same host, if any, is dropped.
    pub fn register(&self, reg: Registration, tx: AgentTx, now: Instant) -> u64 {
        let mut g = self.lock();
        self.register_in(&mut g, reg, tx, now)
    }

    /// [`Pool::register`], unless the orphan sweeper is ending this host.
    pub fn try_register(&self, reg: Registration, tx: AgentTx, now: Instant) -> Result<u64, Error> {
        let mut g = self.lock();
        if g.condemned.contains(&reg.host_id) {
            return Err(Error::Refused(format!(
                "host {} is being terminated as an orphan",
                reg.host_id
            )));
        }
        Ok(self.register_in(&mut g, reg, tx, now))
    }

    /// Every host the pool knows, with whether it holds a lease or is connected.
    pub fn presences(&self) -> HashMap<String, Presence> {
        let g = self.lock();
        g.hosts
            .iter()
            .map(|(id, h)| {
                let p = match (&h.lease, &h.conn, h.disconnected_at) {
                    (Some(_), _, _) => Presence::Leased,
                    (None, Some(_), _) => Presence::Connected,
                    (None, None, Some(since)) => Presence::Disconnected { since },
                    // Not connected and never disconnected cannot happen;
                    // calling it connected keeps the sweeper off it.
                    (None, None, None) => Presence::Connected,
                };
                (id.clone(), p)
            })
            .collect()
    }

    /// Marks a host as being ended by the orphan sweeper, unless it holds a
    /// lease or is connected (checked under the same lock that registration
    /// takes, so a host cannot slip in between). Returns whether it was marked.
    pub fn condemn(&self, host_id: &str) -> bool {
        let mut g = self.lock();
        let busy = g
            .hosts
            .get(host_id)
            .is_some_and(|h| h.lease.is_some() || h.conn.is_some());
        if busy {
            return false;
        }
        g.condemned.insert(host_id.to_owned());
        true
    }

    /// Forgets condemned hosts that `keep` says are gone for good.
    pub fn retain_condemned(&self, keep: impl Fn(&str) -> bool) {
        self.lock().condemned.retain(|id| keep(id));
    }

    fn register_in(&self, g: &mut Locked<'_>, reg: Registration, tx: AgentTx, now: Instant) -> u64 {
        g.metrics.agent_connects.inc();
        g.next_conn += 1;
        let conn_id = g.next_conn;
        let host_id = reg.host_id.clone();
        let reported = reg.state;
        let agent_lease = (!reg.lease_id.is_empty()).then(|| reg.lease_id.clone());
        let agent_deadline = reg.lease_deadline;
        let hb = self.cfg.heartbeat_interval;
        let registered = pb::coordinator_message::Msg::Registered(pb::Registered {
            heartbeat_interval_ms: u32::try_from(hb.as_millis()).unwrap_or(u32::MAX),
            server_cert_pem: reg.tls.server_cert_pem.clone(),
            ca_pem: reg.tls.ca_pem.clone(),
        });
        let known_lease = match g.hosts.get_mut(&host_id) {
            Some(h) => {
                h.reg = reg;
                h.reported = reported;
                h.conn = Some(Conn { id: conn_id, tx });
                h.disconnected_at = None;
                h.last_seen = now;
                h.last_heartbeat = SystemTime::now();
                h.lease.clone()
            }
            None => {
                g.hosts.insert(
                    host_id.clone(),
                    Host {
                        reg,
                        reported,
                        lease: None,
                        conn: Some(Conn { id: conn_id, tx }),
                        draining: false,
                        registered_at: SystemTime::now(),
                        last_heartbeat: SystemTime::now(),
                        last_seen: now,
                        disconnected_at: None,
                        last_wipe: None,
                        queued_idle: false,
                    },
                );
                None
            }
        };
        info!(host_id, conn_id, state = ?reported, lease_id = ?agent_lease, "agent registered");
        g.send(&host_id, registered);

        // Reconcile: the agent is the truth about what its host is doing.
        if let Some(known) = known_lease
            && agent_lease.as_deref() != Some(known.as_str())
        {
            // The agent no longer has the lease we gave it: it never got the
            // assignment, or it ended and wiped it while we were apart.
            g.set_message(&known, "the host came back without this lease".into());
            g.apply(&self.cfg, &known, LeaseEvent::HostLost);
        }
        if let Some(lid) = agent_lease {
            g.adopt_lease(&self.cfg, &host_id, &lid, agent_deadline, now);
        }
        if let Some(h) = g.hosts.get(&host_id)
            && h.draining
        {
            g.send(
                &host_id,
                pb::coordinator_message::Msg::Drain(pb::Drain {
                    reason: "draining".into(),
                }),
            );
        }
        g.mark_idle_if_offerable(&self.cfg, &host_id, now);
        g.try_assign(&self.cfg, now);
        conn_id
    }

    /// Handles one message from a registered agent's stream.
    pub fn agent_message(
        &self,
        host_id: &str,
        conn_id: u64,
        msg: pb::agent_message::Msg,
        now: Instant,
    ) -> Result<(), Error> {
        use pb::agent_message::Msg;
        let mut g = self.lock();
        let Some(h) = g.hosts.get_mut(host_id) else {
            return Err(Error::HostNotFound(host_id.to_owned()));
        };
        if h.conn.as_ref().map(|c| c.id) != Some(conn_id) {
            // A stream that a newer registration replaced: ignore it.
            return Ok(());
        }
        h.last_seen = now;
        match msg {
            Msg::Register(_) => {
                return Err(Error::Protocol("register sent twice on one stream".into()));
            }
            Msg::Heartbeat(hb) => {
                h.last_heartbeat = SystemTime::now();
                if let Some(r) = h.reg.resources.as_mut() {
                    r.disk_free_bytes = hb.disk_free_bytes;
                }
            }
            Msg::StateChanged(sc) => {
                let state = pb::HostState::try_from(sc.state).map_err(|_| {
                    Error::invalid("state", format!("unknown host state {}", sc.state))
                })?;
                validate::text("reason", &sc.reason, 1024)?;
                let was = h.reported;
                h.reported = state;
                info!(host_id, state = ?state, lease_id = %sc.lease_id, reason = %sc.reason, "host state");
                if matches!(state, pb::HostState::Terminating | pb::HostState::Unhealthy)
                    && let Some(lid) = h.lease.clone()
                {
                    let what = if state == pb::HostState::Unhealthy {
                        "unhealthy"
                    } else {
                        "terminating"
                    };
                    let why = if sc.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", sc.reason)
                    };
                    g.set_message(&lid, format!("the host became {what}{why}"));
                    g.apply(&self.cfg, &lid, LeaseEvent::HostLost);
                }
                if state == pb::HostState::Terminating && was != state {
                    // After any lease it held has ended (above).
                    g.host_terminated(host_id, &sc.reason);
                }
                g.mark_idle_if_offerable(&self.cfg, host_id, now);
                g.try_assign(&self.cfg, now);
            }
            Msg::LeaseAccepted(a) => {
                let lid = validate::lease_id(&a.lease_id)?;
                match g
                    .leases
                    .get(&lid)
                    .map(|l| l.host.as_deref() == Some(host_id))
                {
                    Some(true) => g.apply(&self.cfg, &lid, LeaseEvent::Accepted),
                    // Accepting a lease we did not give this host: make it let go.
                    _ => g.send_end(host_id, &lid, pb::EndReason::HostLost),
                }
            }
            Msg::LeaseRejected(r) => {
                let lid = validate::lease_id(&r.lease_id)?;
                validate::text("reason", &r.reason, 1024)?;
                if g.leases.get(&lid).and_then(|l| l.host.as_deref()) == Some(host_id) {
                    warn!(host_id, lease_id = %lid, reason = %r.reason, "agent rejected lease");
                    // Not offered again until the agent reports Ready.
                    if let Some(h) = g.hosts.get_mut(host_id) {
                        h.reported = pb::HostState::Unspecified;
                    }
                    g.apply(&self.cfg, &lid, LeaseEvent::Rejected);
                    g.try_assign(&self.cfg, now);
                }
            }
            Msg::LeaseEnded(e) => {
                let lid = validate::lease_id(&e.lease_id)?;
                let reason =
                    pb::EndReason::try_from(e.reason).unwrap_or(pb::EndReason::Unspecified);
                if g.leases.get(&lid).and_then(|l| l.host.as_deref()) == Some(host_id) {
                    g.apply(&self.cfg, &lid, LeaseEvent::EndedByAgent(reason));
                }
            }
            Msg::WipeReport(w) => {
                validate::text("error", &w.error, 4096)?;
                info!(
                    host_id,
                    lease_id = %w.lease_id,
                    verified = w.verified,
                    containers = w.containers_removed,
                    images = w.images_removed,
                    volumes = w.volumes_removed,
                    networks = w.networks_removed,
                    duration_ms = w.duration_ms,
                    error = %w.error,
                    "wipe report"
                );
                g.metrics.wipe(w.verified);
                if let Some(l) = g.leases.get_mut(&w.lease_id)
                    && l.host.as_deref() == Some(host_id)
                {
                    let detail = format!(
                        "{} in {} ms",
                        if w.verified {
                            "verified"
                        } else {
                            "NOT verified"
                        },
                        w.duration_ms
                    );
                    timeline::record(
                        &mut l.timeline,
                        &w.lease_id,
                        Step::Wiped,
                        SystemTime::now(),
                        detail,
                    );
                    l.wipe = Some(w.clone());
                    let lid = l.id.clone();
                    g.dirty.insert(lid);
                }
                if let Some(h) = g.hosts.get_mut(host_id) {
                    h.last_wipe = Some(w);
                }
            }
        }
        Ok(())
    }

    /// The agent's stream `conn_id` ended.
    pub fn disconnect(&self, host_id: &str, conn_id: u64, now: Instant) {
        let mut g = self.lock();
        let metrics = g.metrics.clone();
        let Some(h) = g.hosts.get_mut(host_id) else {
            return;
        };
        if h.conn.as_ref().map(|c| c.id) != Some(conn_id) {
            return;
        }
        metrics.agent_disconnects.inc();
        h.conn = None;
        h.disconnected_at = Some(now);
        let terminating = h.reported == pb::HostState::Terminating;
        info!(host_id, conn_id, terminating, "agent disconnected");
        if terminating {
            g.forget_host(&self.cfg, host_id);
        } else if let Some(lid) = h.lease.clone()
            && g.leases.get(&lid).map(|l| l.state) == Some(LeaseState::Assigned)
        {
            // It cannot accept while gone; give the build another host.
            g.apply(&self.cfg, &lid, LeaseEvent::HostLost);
        }
        g.try_assign(&self.cfg, now);
    }

    /// Runs every timer that is due at `now`.
    pub fn tick(&self, now: Instant) {
        let mut g = self.lock();
        let cfg = &self.cfg;
        let mut due: Vec<(String, LeaseEvent, String)> = Vec::new();
        for l in g.leases.values() {
            match l.state {
                LeaseState::Queued if now >= l.queued_until => {
                    due.push((l.id.clone(), LeaseEvent::WaitExpired, String::new()));
                }
                LeaseState::Assigned
                    if l.assigned_at.is_some_and(|t| now >= t + cfg.assign_timeout) =>
                {
                    due.push((l.id.clone(), LeaseEvent::AssignTimedOut, String::new()));
                }
                LeaseState::Assigned | LeaseState::Active
                    if l.deadline.is_some_and(|d| now >= d) =>
                {
                    due.push((
                        l.id.clone(),
                        LeaseEvent::DeadlinePassed,
                        "the lease deadline passed".into(),
                    ));
                }
                _ => {}
            }
        }
        for (lid, event, msg) in due {
            match event {
                LeaseEvent::WaitExpired => {
                    let waited = g
                        .leases
                        .get(&lid)
                        .map(|l| l.queued_until.saturating_duration_since(l.created))
                        .unwrap_or_default();
                    let msg = g.no_host_message(&lid, waited);
                    g.set_message(&lid, msg);
                }
                LeaseEvent::AssignTimedOut => {
                    if let Some(hid) = g.leases.get(&lid).and_then(|l| l.host.clone())
                        && let Some(h) = g.hosts.get_mut(&hid)
                    {
                        warn!(host_id = %hid, lease_id = %lid, "agent did not accept the lease in time");
                        // Not offered again until it says it is Ready.
                        h.reported = pb::HostState::Unspecified;
                    }
                }
                _ => g.set_message(&lid, msg),
            }
            g.apply(cfg, &lid, event);
        }
        let lost: Vec<String> = g
            .hosts
            .iter()
            .filter(|(_, h)| h.disconnected_at.is_some_and(|t| now >= t + cfg.lost_grace))
            .map(|(id, _)| id.clone())
            .collect();
        for hid in lost {
            warn!(host_id = %hid, "host gone past its grace period; forgetting it");
            g.forget_host(cfg, &hid);
        }
        g.try_assign(cfg, now);
    }

    /// What the pool's events are counted in.
    pub fn metrics(&self) -> Arc<PoolMetrics> {
        self.lock().metrics.clone()
    }

    /// The pool at a glance (AdminService.PoolStats, `/metrics`).
    pub fn stats(&self) -> PoolStats {
        let g = self.lock();
        let now = Instant::now();
        let mut hosts: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
        let mut s = PoolStats::default();
        for h in g.hosts.values() {
            let name = berth_proto::names::host_state(h.reported as i32);
            *hosts.entry(name).or_default() += 1;
            s.hosts_connected += u32::from(h.conn.is_some());
            s.hosts_draining += u32::from(h.draining);
            s.hosts_offerable += u32::from(Inner::offerable(&self.cfg, h, now));
        }
        let mut leases: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
        for l in g.leases.values() {
            *leases.entry(l.state.name().to_owned()).or_default() += 1;
        }
        s.queue_length = u32::try_from(
            g.queue
                .iter()
                .filter(|id| g.leases.get(*id).map(|l| l.state) == Some(LeaseState::Queued))
                .count(),
        )
        .unwrap_or(u32::MAX);
        s.hosts_by_state = hosts.into_iter().collect();
        s.leases_by_state = leases.into_iter().collect();
        s
    }

    /// How many leases are waiting for a host.
    pub fn queue_len(&self) -> usize {
        let g = self.lock();
        g.queue
            .iter()
            .filter(|id| g.leases.get(*id).map(|l| l.state) == Some(LeaseState::Queued))
            .count()
    }
}

fn ended_error(l: &Lease) -> Error {
    Error::LeaseEnded {
        lease_id: l.id.clone(),
        state: l.state.name(),
        detail: if l.message.is_empty() {
            String::new()
        } else {
            format!(": {}", l.message)
        },
    }
}

impl Inner {
    /// Feeds `event` to lease `lid` and carries out what the state machine
    /// asks for, including events that follow from failed sends.
    fn apply(&mut self, cfg: &PoolConfig, lid: &str, event: LeaseEvent) {
        let mut work = vec![(lid.to_owned(), event)];
        while let Some((lid, event)) = work.pop() {
            let Some(l) = self.leases.get_mut(&lid) else {
                continue;
            };
            let from = l.state;
            let (to, actions) = lease::next(from, event);
            l.state = to;
            let host = l.host.clone();
            self.dirty.insert(lid.clone());
            if from != to {
                info!(
                    lease_id = %lid,
                    build_id = %l.build_id,
                    host_id = host.as_deref().unwrap_or(""),
                    from = from.name(),
                    to = to.name(),
                    event = ?event,
                    "lease transition"
                );
                self.timeline_step(&lid, from, to, event);
            }
            for action in actions {
                match action {
                    LeaseAction::SendAssign => {
                        let Some(hid) = host.as_deref() else { continue };
                        let l = &self.leases[&lid];
                        let msg = pb::coordinator_message::Msg::AssignLease(pb::AssignLease {
                            lease_id: lid.clone(),
                            build_id: l.build_id.clone(),
                            deadline: l.deadline_at.map(from_system_time),
                        });
                        if !self.send(hid, msg) {
                            work.push((lid.clone(), LeaseEvent::HostLost));
                        }
                    }
                    LeaseAction::SendEnd(reason) => {
                        if let Some(hid) = host.as_deref() {
                            self.send_end(hid, &lid, reason);
                        }
                    }
                    LeaseAction::Requeue => {
                        if let Some(hid) = host.as_deref()
                            && let Some(h) = self.hosts.get_mut(hid)
                            && h.lease.as_deref() == Some(lid.as_str())
                        {
                            h.lease = None;
                        }
                        if let Some(l) = self.leases.get_mut(&lid) {
                            l.host = None;
                            l.host_addr.clear();
                            l.docker_host.clear();
                            l.assigned_at = None;
                            l.deadline = None;
                            l.deadline_at = None;
                        }
                        self.queue.push_front(lid.clone());
                    }
                    LeaseAction::ReleaseHost => {
                        if let Some(hid) = host.as_deref()
                            && let Some(h) = self.hosts.get_mut(hid)
                            && h.lease.as_deref() == Some(lid.as_str())
                        {
                            h.lease = None;
                            // The agent wipes next; it is not offered again
                            // until it reports Ready itself.
                            if h.reported == pb::HostState::Leased
                                || h.reported == pb::HostState::Ready
                            {
                                h.reported = pb::HostState::Wiping;
                            }
                        }
                    }
                }
            }
            if from != to
                && let Some(l) = self.leases.get(&lid)
            {
                l.watch.send_replace(to);
                if to.is_ended() {
                    let key = (l.tenant.clone(), l.build_id.clone());
                    if self.live_by_build.get(&key) == Some(&lid) {
                        self.live_by_build.remove(&key);
                    }
                    self.ended.push_back(lid.clone());
                    self.trim_history(cfg);
                }
            }
        }
    }

    /// Hands Ready hosts to queued leases, oldest lease first.
    fn try_assign(&mut self, cfg: &PoolConfig, now: Instant) {
        while let Some(lid) = self.queue.front().cloned() {
            let Some(l) = self.leases.get(&lid) else {
                self.queue.pop_front();
                continue;
            };
            if l.state != LeaseState::Queued {
                self.queue.pop_front();
                continue;
            }
            if l.watch.receiver_count() == 0 {
                // The caller gave up (disconnected) before a host was found.
                self.queue.pop_front();
                self.set_message(&lid, "the client stopped waiting".into());
                self.apply(cfg, &lid, LeaseEvent::Abandoned);
                continue;
            }
            let Some(hid) = self.pop_idle(cfg, now) else {
                break;
            };
            self.queue.pop_front();
            let (addr, docker_host) = {
                let Some(h) = self.hosts.get_mut(&hid) else {
                    continue;
                };
                h.lease = Some(lid.clone());
                (h.reg.host_addr.clone(), h.reg.docker_host.clone())
            };
            let Some(l) = self.leases.get_mut(&lid) else {
                continue;
            };
            let deadline = (now + l.ttl).min(l.created + cfg.max_lease);
            l.host = Some(hid.clone());
            l.host_addr = addr;
            l.docker_host = docker_host;
            l.assigned_at = Some(now);
            l.deadline = Some(deadline);
            l.deadline_at = Some(SystemTime::now() + deadline.saturating_duration_since(now));
            self.apply(cfg, &lid, LeaseEvent::HostChosen);
        }
    }

    fn offerable(cfg: &PoolConfig, h: &Host, now: Instant) -> bool {
        h.reported == pb::HostState::Ready
            && h.lease.is_none()
            && h.conn.is_some()
            && !h.draining
            && now.saturating_duration_since(h.last_seen) < cfg.heartbeat_interval * 3
    }

    fn mark_idle_if_offerable(&mut self, cfg: &PoolConfig, hid: &str, now: Instant) {
        if let Some(h) = self.hosts.get_mut(hid)
            && !h.queued_idle
            && Self::offerable(cfg, h, now)
        {
            h.queued_idle = true;
            self.idle.push_back(hid.to_owned());
        }
    }

    fn pop_idle(&mut self, cfg: &PoolConfig, now: Instant) -> Option<String> {
        while let Some(hid) = self.idle.pop_front() {
            let Some(h) = self.hosts.get_mut(&hid) else {
                continue;
            };
            h.queued_idle = false;
            if Self::offerable(cfg, h, now) {
                return Some(hid);
            }
        }
        None
    }

    /// Sends to a host's agent; on a full or closed channel the host counts
    /// as disconnected. Returns whether the message was queued.
    fn send(&mut self, hid: &str, msg: pb::coordinator_message::Msg) -> bool {
        let Some(h) = self.hosts.get_mut(hid) else {
            return false;
        };
        let Some(conn) = h.conn.as_ref() else {
            return false;
        };
        let out = pb::CoordinatorMessage { msg: Some(msg) };
        match conn.tx.try_send(Ok(out)) {
            Ok(()) => true,
            Err(e) => {
                warn!(host_id = hid, error = %e, "agent stream not accepting messages; dropping it");
                h.conn = None;
                h.disconnected_at = Some(Instant::now());
                false
            }
        }
    }

    fn send_end(&mut self, hid: &str, lid: &str, reason: pb::EndReason) {
        self.send(
            hid,
            pb::coordinator_message::Msg::EndLease(pb::EndLease {
                lease_id: lid.to_owned(),
                reason: reason as i32,
            }),
        );
    }

    /// Takes note of a lease an agent says it holds.
    fn adopt_lease(
        &mut self,
        cfg: &PoolConfig,
        hid: &str,
        lid: &str,
        deadline_at: Option<SystemTime>,
        now: Instant,
    ) {
        match self.leases.get(lid) {
            Some(l) if l.host.as_deref() == Some(hid) => {
                if l.state.holds_host()
                    && let Some(h) = self.hosts.get_mut(hid)
                {
                    h.lease = Some(lid.to_owned());
                }
                let Some(l) = self.leases.get(lid) else {
                    return;
                };
                if l.state == LeaseState::Assigned {
                    self.apply(cfg, lid, LeaseEvent::Accepted);
                } else if l.state.is_ended() {
                    let reason = lease::end_reason(l.state);
                    self.send_end(hid, lid, reason);
                }
                // Active: nothing to do, the host carries on.
            }
            Some(_) => {
                // The lease belongs elsewhere (or was requeued): let go.
                self.send_end(hid, lid, pb::EndReason::HostLost);
            }
            None => {
                // A lease from before this coordinator started: the agent is
                // the truth, so keep it until its deadline.
                let remaining = deadline_at
                    .and_then(|d| d.duration_since(SystemTime::now()).ok())
                    .unwrap_or_default();
                let (tx, _) = watch::channel(LeaseState::Active);
                let (addr, docker_host) = self
                    .hosts
                    .get(hid)
                    .map(|h| (h.reg.host_addr.clone(), h.reg.docker_host.clone()))
                    .unwrap_or_default();
                self.leases.insert(
                    lid.to_owned(),
                    Lease {
                        id: lid.to_owned(),
                        tenant: String::new(),
                        build_id: String::new(),
                        state: LeaseState::Active,
                        host: Some(hid.to_owned()),
                        host_addr: addr,
                        docker_host,
                        ttl: remaining,
                        created: now,
                        created_at: SystemTime::now(),
                        queued_until: now,
                        assigned_at: Some(now),
                        deadline: Some(now + remaining),
                        deadline_at: Some(SystemTime::now() + remaining),
                        message: "adopted from the host after a coordinator restart".into(),
                        wipe: None,
                        timeline: Vec::new(),
                        watch: tx,
                    },
                );
                if let Some(h) = self.hosts.get_mut(hid) {
                    h.lease = Some(lid.to_owned());
                }
                self.dirty.insert(lid.to_owned());
                info!(
                    host_id = hid,
                    lease_id = lid,
                    "adopted lease reported by agent"
                );
            }
        }
    }

    /// Drops a host for good; a lease it held ends as host-lost.
    fn forget_host(&mut self, cfg: &PoolConfig, hid: &str) {
        if let Some(lid) = self.hosts.get(hid).and_then(|h| h.lease.clone()) {
            self.set_message(&lid, "the host went away".into());
            self.apply(cfg, &lid, LeaseEvent::HostLost);
        }
        self.hosts.remove(hid);
    }

    fn set_message(&mut self, lid: &str, msg: String) {
        if let Some(l) = self.leases.get_mut(lid) {
            l.message = msg;
            self.dirty.insert(lid.to_owned());
        }
    }

    fn no_host_message(&self, lid: &str, waited: Duration) -> String {
        let ahead = self
            .queue
            .iter()
            .take_while(|id| id.as_str() != lid)
            .filter(|id| self.leases.get(*id).map(|l| l.state) == Some(LeaseState::Queued))
            .count();
        let total = self.hosts.len();
        let leased = self.hosts.values().filter(|h| h.lease.is_some()).count();
        format!(
            "no host became ready within {} ({total} hosts in the pool, {leased} leased, {ahead} builds were waiting ahead)",
            humantime::format_duration(waited)
        )
    }

    fn trim_history(&mut self, cfg: &PoolConfig) {
        while self.ended.len() > cfg.history {
            if let Some(old) = self.ended.pop_front()
                && self.leases.get(&old).is_some_and(|l| l.state.is_ended())
            {
                self.leases.remove(&old);
                self.dirty.remove(&old);
                self.removed.push(old);
            }
        }
    }

    fn lease_view(&self, lid: &str) -> Option<pb::Lease> {
        let l = self.leases.get(lid)?;
        Some(pb::Lease {
            lease_id: l.id.clone(),
            build_id: l.build_id.clone(),
            state: l.state.to_proto() as i32,
            host_id: l.host.clone().unwrap_or_default(),
            host_addr: l.host_addr.clone(),
            docker_host: l.docker_host.clone(),
            deadline: l.deadline_at.map(from_system_time),
            created_at: Some(from_system_time(l.created_at)),
            message: l.message.clone(),
            wipe: l.wipe.clone(),
            tenant: l.tenant.clone(),
            timeline: timeline::to_proto(&l.timeline),
        })
    }

    /// Records the step a transition of lease `lid` stands for, and what
    /// the metrics take from it.
    fn timeline_step(&mut self, lid: &str, from: LeaseState, to: LeaseState, event: LeaseEvent) {
        let metrics = self.metrics.clone();
        let Some(l) = self.leases.get_mut(lid) else {
            return;
        };
        let at = SystemTime::now();
        let (step, detail) = match (from, to) {
            (LeaseState::Assigned, LeaseState::Queued) => (Step::Requeued, format!("{event:?}")),
            (_, to) => {
                let Some(step) = Step::entering(to) else {
                    return;
                };
                let detail = match step {
                    Step::Assigned => l.host.clone().unwrap_or_default(),
                    _ if to.is_ended() => l.message.clone(),
                    _ => String::new(),
                };
                (step, detail)
            }
        };
        if step == Step::Assigned && timeline::first(&l.timeline, Step::Assigned).is_none() {
            metrics.observe_queue_wait(l.created.elapsed());
        }
        if to.is_ended() {
            let active_for = timeline::first(&l.timeline, Step::Ready)
                .and_then(|ready| at.duration_since(ready).ok());
            metrics.lease_ended(to.name(), active_for);
        }
        timeline::record(&mut l.timeline, lid, step, at, detail);
    }

    /// The host `hid` is being destroyed: the step ends the timeline of the
    /// lease it served last (a host serves one lease, or more in recycle mode).
    fn host_terminated(&mut self, hid: &str, reason: &str) {
        let last = self
            .leases
            .values_mut()
            .filter(|l| l.host.as_deref() == Some(hid) && l.state.is_ended())
            .filter(|l| timeline::first(&l.timeline, Step::HostTerminated).is_none())
            .max_by_key(|l| l.created_at);
        if let Some(l) = last {
            let lid = l.id.clone();
            timeline::record(
                &mut l.timeline,
                &lid,
                Step::HostTerminated,
                SystemTime::now(),
                reason,
            );
            self.dirty.insert(lid);
        }
    }
}

fn host_view(h: &Host) -> pb::Host {
    pb::Host {
        host_id: h.reg.host_id.clone(),
        host_addr: h.reg.host_addr.clone(),
        docker_host: h.reg.docker_host.clone(),
        state: h.reported as i32,
        lease_id: h.lease.clone().unwrap_or_default(),
        resources: h.reg.resources,
        last_heartbeat: Some(from_system_time(h.last_heartbeat)),
        registered_at: Some(from_system_time(h.registered_at)),
        connected: h.conn.is_some(),
        draining: h.draining,
        agent_version: h.reg.agent_version.clone(),
        docker_version: h.reg.docker_version.clone(),
        provider: h.reg.provider.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::coordinator_message::Msg as Out;

    const SECOND: Duration = Duration::from_secs(1);
    /// The tenant of every lease in these tests.
    const T: &str = "t1";

    struct Agent {
        id: String,
        conn: u64,
        rx: mpsc::Receiver<Result<pb::CoordinatorMessage, Status>>,
    }

    impl Agent {
        fn join(pool: &Pool, id: &str, now: Instant) -> Self {
            let (tx, rx) = mpsc::channel(16);
            let reg = Registration {
                host_id: id.into(),
                host_addr: "198.18.0.2".into(),
                docker_host: "tcp://198.18.0.2:2376".into(),
                provider: "test".into(),
                resources: None,
                agent_version: "t".into(),
                docker_version: "t".into(),
                state: pb::HostState::Ready,
                lease_id: String::new(),
                lease_deadline: None,
                tls: RegisteredTls::default(),
            };
            let conn = pool.register(reg, tx, now);
            let mut a = Self {
                id: id.into(),
                conn,
                rx,
            };
            assert!(matches!(a.next(), Some(Out::Registered(_))));
            a
        }

        fn next(&mut self) -> Option<Out> {
            self.rx
                .try_recv()
                .ok()
                .and_then(|m| m.ok())
                .and_then(|m| m.msg)
        }

        fn expect_assign(&mut self) -> pb::AssignLease {
            match self.next() {
                Some(Out::AssignLease(a)) => a,
                other => panic!("{}: expected AssignLease, got {other:?}", self.id),
            }
        }

        fn say(&self, pool: &Pool, msg: pb::agent_message::Msg, now: Instant) {
            pool.agent_message(&self.id, self.conn, msg, now).unwrap();
        }

        fn accept(&self, pool: &Pool, lease_id: &str, now: Instant) {
            self.say(
                pool,
                pb::agent_message::Msg::LeaseAccepted(pb::LeaseAccepted {
                    lease_id: lease_id.into(),
                }),
                now,
            );
        }

        fn state(&self, pool: &Pool, state: pb::HostState, now: Instant) {
            self.say(
                pool,
                pb::agent_message::Msg::StateChanged(pb::StateChanged {
                    state: state as i32,
                    lease_id: String::new(),
                    reason: String::new(),
                }),
                now,
            );
        }
    }

    fn pool() -> Pool {
        Pool::new(PoolConfig::default())
    }

    fn state_of(p: &Pending) -> LeaseState {
        *p.state.borrow()
    }

    #[tokio::test(start_paused = true)]
    async fn two_builds_get_two_different_hosts() {
        let pool = pool();
        let now = Instant::now();
        let mut a = Agent::join(&pool, "h1", now);
        let mut b = Agent::join(&pool, "h2", now);
        let p1 = pool.acquire(T, "b1", 60 * SECOND, SECOND, now).unwrap();
        let p2 = pool.acquire(T, "b2", 60 * SECOND, SECOND, now).unwrap();
        let l1 = a.expect_assign();
        let l2 = b.expect_assign();
        assert_eq!(l1.lease_id, p1.lease_id);
        assert_eq!(l2.lease_id, p2.lease_id);
        assert!(l1.deadline.is_some());
        a.accept(&pool, &l1.lease_id, now);
        b.accept(&pool, &l2.lease_id, now);
        let o1 = pool.outcome(&p1.lease_id).unwrap();
        let o2 = pool.outcome(&p2.lease_id).unwrap();
        assert_eq!(o1.state, pb::LeaseState::Active as i32);
        assert_ne!(o1.host_id, o2.host_id);
        assert_eq!(o1.docker_host, "tcp://198.18.0.2:2376");
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_is_idempotent_per_build() {
        let pool = pool();
        let now = Instant::now();
        let mut a = Agent::join(&pool, "h1", now);
        let mut b = Agent::join(&pool, "h2", now);
        let p1 = pool.acquire(T, "b1", 60 * SECOND, SECOND, now).unwrap();
        let retry = pool.acquire(T, "b1", 60 * SECOND, SECOND, now).unwrap();
        assert_eq!(p1.lease_id, retry.lease_id);
        let assigned = a.next().or_else(|| b.next());
        assert!(matches!(assigned, Some(Out::AssignLease(_))));
        assert!(
            a.next().is_none() && b.next().is_none(),
            "a second host was assigned"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn empty_pool_with_no_wait_fails_at_once() {
        let pool = pool();
        let p = pool
            .acquire(T, "b1", 60 * SECOND, Duration::ZERO, Instant::now())
            .unwrap();
        assert_eq!(state_of(&p), LeaseState::Failed);
        let err = pool.outcome(&p.lease_id).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.to_string().contains("no host became ready"), "{err}");
        // The failed lease does not block a new attempt with the same build id.
        let again = pool
            .acquire(T, "b1", 60 * SECOND, SECOND, Instant::now())
            .unwrap();
        assert_ne!(again.lease_id, p.lease_id);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_wait_runs_out() {
        let pool = pool();
        let now = Instant::now();
        let p = pool.acquire(T, "b1", 60 * SECOND, 2 * SECOND, now).unwrap();
        pool.tick(now + SECOND);
        assert_eq!(state_of(&p), LeaseState::Queued);
        pool.tick(now + 2 * SECOND);
        assert_eq!(state_of(&p), LeaseState::Failed);
        assert_eq!(
            pool.outcome(&p.lease_id).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_order_and_released_hosts_are_not_reused() {
        let pool = pool();
        let now = Instant::now();
        let mut h1 = Agent::join(&pool, "h1", now);
        let first = pool.acquire(T, "b1", 60 * SECOND, SECOND, now).unwrap();
        let l1 = h1.expect_assign();
        h1.accept(&pool, &l1.lease_id, now);
        let second = pool
            .acquire(T, "b2", 60 * SECOND, 30 * SECOND, now)
            .unwrap();
        let third = pool
            .acquire(T, "b3", 60 * SECOND, 30 * SECOND, now)
            .unwrap();
        assert_eq!(pool.queue_len(), 2);

        pool.release(T, &first.lease_id, now).unwrap();
        match h1.next() {
            Some(Out::EndLease(e)) => {
                assert_eq!(e.lease_id, first.lease_id);
                assert_eq!(e.reason, pb::EndReason::Released as i32);
            }
            other => panic!("expected EndLease, got {other:?}"),
        }
        // The released host is wiping: nobody gets it.
        pool.tick(now);
        assert!(h1.next().is_none());
        assert_eq!(state_of(&second), LeaseState::Queued);

        // Its replacement registers and goes to the oldest waiter.
        let mut h2 = Agent::join(&pool, "h2", now);
        let l2 = h2.expect_assign();
        assert_eq!(l2.lease_id, second.lease_id);
        assert_eq!(state_of(&third), LeaseState::Queued);
    }

    #[tokio::test(start_paused = true)]
    async fn recycled_host_returns_only_after_reporting_ready() {
        let pool = pool();
        let now = Instant::now();
        let mut h1 = Agent::join(&pool, "h1", now);
        let first = pool.acquire(T, "b1", 60 * SECOND, SECOND, now).unwrap();
        h1.expect_assign();
        h1.accept(&pool, &first.lease_id, now);
        h1.state(&pool, pb::HostState::Leased, now);
        let second = pool
            .acquire(T, "b2", 60 * SECOND, 30 * SECOND, now)
            .unwrap();
        pool.release(T, &first.lease_id, now).unwrap();
        assert!(matches!(h1.next(), Some(Out::EndLease(_))));
        h1.state(&pool, pb::HostState::Wiping, now);
        assert!(h1.next().is_none());
        h1.state(&pool, pb::HostState::Ready, now);
        assert_eq!(h1.expect_assign().lease_id, second.lease_id);
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_or_unanswered_assignments_go_to_another_host() {
        let pool = pool();
        let now = Instant::now();
        let mut h1 = Agent::join(&pool, "h1", now);
        let p = pool
            .acquire(T, "b1", 60 * SECOND, 30 * SECOND, now)
            .unwrap();
        let l = h1.expect_assign();
        h1.say(
            &pool,
            pb::agent_message::Msg::LeaseRejected(pb::LeaseRejected {
                lease_id: l.lease_id.clone(),
                reason: "busy".into(),
            }),
            now,
        );
        assert_eq!(state_of(&p), LeaseState::Queued);
        let mut h2 = Agent::join(&pool, "h2", now);
        assert_eq!(h2.expect_assign().lease_id, p.lease_id);
        assert!(
            h1.next().is_none(),
            "the host that rejected was offered again"
        );

        // h2 never answers: after the timeout the lease goes to h3.
        pool.tick(now + 6 * SECOND);
        assert_eq!(state_of(&p), LeaseState::Queued);
        let later = now + 6 * SECOND;
        let mut h3 = Agent::join(&pool, "h3", later);
        assert_eq!(h3.expect_assign().lease_id, p.lease_id);
        h3.accept(&pool, &p.lease_id, later);
        assert_eq!(state_of(&p), LeaseState::Active);
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_end_leases_and_renew_is_capped() {
        let cfg = PoolConfig {
            max_lease: 100 * SECOND,
            ..PoolConfig::default()
        };
        let pool = Pool::new(cfg);
        let now = Instant::now();
        let mut h1 = Agent::join(&pool, "h1", now);
        let p = pool.acquire(T, "b1", 10 * SECOND, SECOND, now).unwrap();
        h1.expect_assign();
        h1.accept(&pool, &p.lease_id, now);

        let renewed = pool.renew(T, &p.lease_id, 500 * SECOND, now).unwrap();
        let Some(Out::RenewLease(r)) = h1.next() else {
            panic!("no RenewLease sent")
        };
        assert_eq!(r.deadline, renewed.deadline);
        let remaining = to_system_time(&renewed.deadline.unwrap())
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            remaining <= 100 * SECOND,
            "renew went past max_lease: {remaining:?}"
        );

        pool.tick(now + 99 * SECOND);
        assert_eq!(state_of(&p), LeaseState::Active);
        pool.tick(now + 100 * SECOND);
        assert_eq!(state_of(&p), LeaseState::Expired);
        assert!(
            matches!(h1.next(), Some(Out::EndLease(e)) if e.reason == pb::EndReason::Expired as i32)
        );
        let err = pool.renew(T, &p.lease_id, 10 * SECOND, now).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_leases_are_not_found() {
        let pool = pool();
        let id = uuid::Uuid::new_v4().to_string();
        assert_eq!(pool.get(T, &id).unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(
            pool.release(T, &id, Instant::now()).unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            pool.renew(T, &id, SECOND, Instant::now())
                .unwrap_err()
                .code(),
            tonic::Code::NotFound
        );
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_waiters_are_skipped() {
        let pool = pool();
        let now = Instant::now();
        let gone = pool
            .acquire(T, "gone", 60 * SECOND, 30 * SECOND, now)
            .unwrap();
        let gone_id = gone.lease_id.clone();
        drop(gone);
        let waiting = pool
            .acquire(T, "waiting", 60 * SECOND, 30 * SECOND, now)
            .unwrap();
        let mut h1 = Agent::join(&pool, "h1", now);
        assert_eq!(h1.expect_assign().lease_id, waiting.lease_id);
        let l = pool.get(T, &gone_id).unwrap();
        assert_eq!(l.state, pb::LeaseState::Failed as i32);
    }

    #[tokio::test(start_paused = true)]
    async fn a_terminating_host_that_disconnects_is_forgotten_and_its_lease_lost() {
        let pool = pool();
        let now = Instant::now();
        let mut h1 = Agent::join(&pool, "h1", now);
        let p = pool.acquire(T, "b1", 60 * SECOND, SECOND, now).unwrap();
        h1.expect_assign();
        h1.accept(&pool, &p.lease_id, now);
        h1.state(&pool, pb::HostState::Terminating, now);
        assert_eq!(state_of(&p), LeaseState::HostLost);
        pool.disconnect("h1", h1.conn, now);
        assert!(pool.list_hosts().is_empty());
        // A stale message on the old stream is refused, not applied.
        assert!(
            pool.agent_message(
                "h1",
                h1.conn,
                pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default()),
                now
            )
            .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silent_hosts_are_not_offered() {
        let pool = pool();
        let now = Instant::now();
        let mut h1 = Agent::join(&pool, "h1", now);
        let later = now + 10 * SECOND;
        let p = pool
            .acquire(T, "b1", 60 * SECOND, 30 * SECOND, later)
            .unwrap();
        assert!(h1.next().is_none());
        assert_eq!(state_of(&p), LeaseState::Queued);
        h1.say(
            &pool,
            pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default()),
            later,
        );
        h1.state(&pool, pb::HostState::Ready, later);
        assert_eq!(h1.expect_assign().lease_id, p.lease_id);
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_ready_reports_queue_a_host_once() {
        let pool = pool();
        let now = Instant::now();
        let mut h1 = Agent::join(&pool, "h1", now);
        let _h2 = Agent::join(&pool, "h2", now);
        for _ in 0..100 {
            h1.state(&pool, pb::HostState::Ready, now);
        }
        assert_eq!(pool.lock().idle.len(), 2, "one entry per idle host");
        // The oldest idle host is offered first, once.
        let p = pool.acquire(T, "b1", 60 * SECOND, SECOND, now).unwrap();
        assert_eq!(h1.expect_assign().lease_id, p.lease_id);
        assert_eq!(pool.lock().idle.len(), 1);

        // A host forgotten with an entry still queued, then back under the
        // same id: it is offered (once), never twice at the same time.
        h1.accept(&pool, &p.lease_id, now);
        pool.release(T, &p.lease_id, now).unwrap();
        h1.state(&pool, pb::HostState::Terminating, now);
        pool.disconnect("h1", h1.conn, now);
        let mut h1 = Agent::join(&pool, "h1", now);
        let a = pool.acquire(T, "b2", 60 * SECOND, SECOND, now).unwrap();
        let b = pool.acquire(T, "b3", 60 * SECOND, SECOND, now).unwrap();
        let c = pool
            .acquire(T, "b4", 60 * SECOND, 10 * SECOND, now)
            .unwrap();
        let got = h1.expect_assign();
        assert!(got.lease_id == a.lease_id || got.lease_id == b.lease_id);
        assert!(h1.next().is_none(), "a host was assigned twice");
        assert_eq!(state_of(&c), LeaseState::Queued);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnecting_agent_keeps_its_lease() {
        let pool = pool();
        let now = Instant::now();
        let mut h1 = Agent::join(&pool, "h1", now);
        let p = pool.acquire(T, "b1", 60 * SECOND, SECOND, now).unwrap();
        let assign = h1.expect_assign();
        h1.accept(&pool, &p.lease_id, now);
        pool.disconnect("h1", h1.conn, now);
        let (tx, _rx) = mpsc::channel(16);
        pool.register(
            Registration {
                host_id: "h1".into(),
                host_addr: "198.18.0.2".into(),
                docker_host: "tcp://198.18.0.2:2376".into(),
                provider: "test".into(),
                resources: None,
                agent_version: String::new(),
                docker_version: String::new(),
                state: pb::HostState::Leased,
                lease_id: p.lease_id.clone(),
                lease_deadline: assign.deadline.as_ref().and_then(to_system_time),
                tls: RegisteredTls::default(),
            },
            tx,
            now + SECOND,
        );
        assert_eq!(state_of(&p), LeaseState::Active);
        pool.tick(now + 40 * SECOND);
        assert_eq!(
            state_of(&p),
            LeaseState::Active,
            "lost grace applied to a connected host"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leases_belong_to_their_tenant() {
        let pool = pool();
        let now = Instant::now();
        let mut h1 = Agent::join(&pool, "h1", now);
        let mut h2 = Agent::join(&pool, "h2", now);
        let mine = pool.acquire("a", "ci-1", 60 * SECOND, SECOND, now).unwrap();
        // The same build id under another tenant is another build.
        let theirs = pool.acquire("b", "ci-1", 60 * SECOND, SECOND, now).unwrap();
        assert_ne!(mine.lease_id, theirs.lease_id);
        let (l1, l2) = (h1.expect_assign(), h2.expect_assign());
        h1.accept(&pool, &l1.lease_id, now);
        h2.accept(&pool, &l2.lease_id, now);
        let id = &mine.lease_id;
        assert_eq!(pool.get("a", id).unwrap().tenant, "a");
        assert_eq!(pool.get("b", id).unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(
            pool.renew("b", id, SECOND, now).unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            pool.release("b", id, now).unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            state_of(&mine),
            LeaseState::Active,
            "another tenant ended it"
        );
        pool.release("a", id, now).unwrap();
        assert_eq!(state_of(&mine), LeaseState::Released);
    }
}
