//! The pool: every known host and lease, the FIFO queue of builds waiting for
//! a host, and the rules that tie them together.
//!
//! Waiting builds queue per tenant and tenants take turns (`fair`), within
//! the limits of the tenants file (`PoolConfig::tenants`).
//!
//! All state sits behind one mutex and every method is synchronous and short:
//! no method awaits while holding the lock. Messages to agents go out through
//! each agent's bounded channel with `try_send`, so a slow agent can never
//! stall the pool; an agent whose channel is full or closed is treated as
//! disconnected. Timers (queue waits, assignment timeouts, lease deadlines,
//! lost hosts) are checked by [`Pool::tick`], which the server calls on an
//! interval; acquire callers wait on a `watch` of their lease's state. The
//! pool never reads a clock: every call that needs the time takes a [`Now`].
//!
//! Invariant: a host is in at most one lease. Whether a host may be offered
//! is the host state machine's call (`crate::host`); the agent itself
//! refuses a second lease.
//!
//! This file holds the types every part shares and the lock; the parts, one
//! concern each: `registration` (checking a `Register`), `leases` (the
//! LeaseService calls), `agent` (the agent protocol and drains), `scheduler`
//! (the queue, the idle hosts and matching them), `effects` (carrying out
//! what the lease and host state machines ask for), `timers` (`tick`),
//! `views` (what the admin API and `/metrics` see), `sweep` (what the orphan
//! sweeper asks), and `commit`, `persist`, `invariants`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use berth_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use berth_tls::{KeyId, TenantLimits};

use crate::error::Error;
use crate::host;
use crate::lease::LeaseState;
use crate::ops::metrics::PoolMetrics;
use crate::store::{LeaseStore, MemStore, StoreError};
use crate::timeline;

mod agent;
mod commit;
mod effects;
mod fair;
mod invariants;
mod leases;
mod persist;
#[cfg(test)]
pub(crate) use persist::tests as persist_tests;
mod registration;
mod scaling;
mod scheduler;
mod sweep;
#[cfg(test)]
mod tests;
mod timers;
mod views;

pub use crate::clock::Now;
pub use commit::NotDurable;
pub use registration::{RegisteredTls, Registration};
pub use sweep::Presence;
pub use views::PoolStats;

/// What the coordinator sends down an agent's stream. Boxed: a channel
/// allocates room for 32 messages when it is made, and every connected
/// agent has one; 32 pointers take a tenth of 32 messages.
pub type AgentTx = mpsc::Sender<Box<pb::CoordinatorMessage>>;

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
    /// Most builds waiting at once, all tenants together.
    pub max_queued: usize,
    /// Each tenant's share (from the tenants file); a tenant not listed
    /// has the defaults (no cap, weight 1).
    pub tenants: HashMap<String, TenantLimits>,
    /// How long a disconnected host keeps its place (and its lease) before it
    /// is forgotten and its lease ends as host-lost.
    pub lost_grace: Duration,
    /// How many ended leases to remember for Get and ListLeases.
    pub history: usize,
    /// Hosts may serve again after a verified wipe (`--recycle`, local
    /// provider only): a host whose lease ended is not burned.
    pub recycle: bool,
    /// How long the id of a burned host is remembered (and refused). EC2
    /// never reuses an instance id; the orphan sweeper ends a burned
    /// instance that is still running long before this.
    pub burned_retention: Duration,
    /// Elastic capacity (`--max-hosts`): the pool decides how many hosts
    /// it should have and retires idle ones (see `crate::capacity`).
    pub capacity: Option<crate::capacity::CapacityConfig>,
    /// Scale-in goes through an Auto Scaling group (`--asg-name`): the idle
    /// hosts the decision retires are held back (never offered) until the
    /// actuator has terminated their instance with the group's desired
    /// capacity decremented, and only then drained. Without it they are
    /// drained at once (their agents end them).
    pub scale_in_by_group: bool,
}

impl PoolConfig {
    /// A host not heard from for this long is not offered.
    pub fn silence_limit(&self) -> Duration {
        self.heartbeat_interval * 3
    }

    /// `tenant`'s share of the pool.
    pub fn limits(&self, tenant: &str) -> TenantLimits {
        self.tenants.get(tenant).copied().unwrap_or_default()
    }
}

/// The default of `PoolConfig::max_queued` (`--max-queued`).
pub const DEFAULT_MAX_QUEUED: usize = 10_000;

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(2),
            assign_timeout: Duration::from_secs(5),
            default_ttl: Duration::from_secs(30 * 60),
            max_ttl: Duration::from_secs(24 * 3600),
            max_lease: Duration::from_secs(24 * 3600),
            max_wait: Duration::from_secs(3600),
            max_queued: DEFAULT_MAX_QUEUED,
            tenants: HashMap::new(),
            lost_grace: Duration::from_secs(30),
            history: 10_000,
            recycle: false,
            burned_retention: Duration::from_secs(7 * 24 * 3600),
            capacity: None,
            scale_in_by_group: false,
        }
    }
}

/// One host the pool knows: its state machine and what its agent told it.
struct HostEntry {
    /// The state machine's state: every rule about the host reads this.
    host: host::Host,
    reg: Registration,
    /// The sender of the stream `host` says is up; dropped (which closes the
    /// stream towards the agent) whenever the host leaves `Connected`.
    tx: Option<AgentTx>,
    registered_at: SystemTime,
    last_heartbeat: SystemTime,
    last_wipe: Option<pb::WipeReport>,
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
    /// The key the lease's client certificates carry: certificates are
    /// issued for it only, and the host's front admits no other. `None`
    /// only for a lease adopted from an agent that did not name one.
    key: Option<KeyId>,
    /// The host's front admitted the lease's certificate: the key no longer
    /// moves, not even for a retried acquire of the same build.
    key_locked: bool,
    /// An Acquire answer with the lease's certificate may have left: its
    /// holding a host was durable when it did. A lease restored from the
    /// store counts as answered (its record was durable). Until then a
    /// failed commit ends the lease instead of leaving a host held by a
    /// lease nobody was told of (`Pool::undo_unanswered`).
    answered: bool,
}

#[derive(Default)]
struct Inner {
    /// What happened, for `/metrics` (see `crate::ops::metrics`).
    metrics: Arc<PoolMetrics>,
    /// Every host the pool has a state for, condemned instances included
    /// (`host::HostState::Barred` ones are not listed anywhere).
    hosts: HashMap<String, HostEntry>,
    leases: HashMap<String, Lease>,
    /// (tenant, build id) -> its lease that has not ended (Acquire
    /// idempotency; two tenants may use the same build id).
    live_by_build: HashMap<(String, String), String>,
    /// Queued lease ids, one FIFO per tenant, tenants served in turn. May
    /// hold ids that are no longer queued; they are skipped when met.
    queue: fair::FairQueue,
    /// Hosts that became offerable, oldest first.
    idle: scheduler::IdleQueue,
    /// Ended lease ids, oldest first, for bounding the history.
    ended: VecDeque<String>,
    next_conn: u64,
    /// Lease ids changed since the last write to the store.
    dirty: BTreeSet<String>,
    /// Lease ids dropped from history since the last write to the store.
    removed: Vec<String>,
    /// Host id -> the key it is bound to: the one its first registration
    /// carried. A later registration of the id must carry it too.
    host_keys: HashMap<String, KeyId>,
    /// Host id -> when a lease it held ended. Such a host is never offered
    /// again (single-use): its registration is refused.
    burned: HashMap<String, SystemTime>,
    /// Host ids whose record (key, burned) changed since the last write.
    dirty_hosts: BTreeSet<String>,
    /// Elastic capacity's scale-in timer, when the pool is elastic.
    scaler: Option<crate::capacity::Scaler>,
    /// The last desired number of hosts decided (for the log).
    desired: Option<u32>,
    /// Idle hosts scale-in chose, waiting for the Auto Scaling actuator to
    /// terminate their instance (`PoolConfig::scale_in_by_group`), with
    /// the reason; never offered meanwhile.
    retiring: std::collections::BTreeMap<String, String>,
    /// Whether the store takes commits: while it fails no host is offered.
    store_health: Arc<commit::Health>,
    /// Stored records that did not decode at start (`persist::quarantine`).
    quarantined: usize,
}

/// How long a call waits for its changes to reach the store before it
/// answers UNAVAILABLE (the change stays pending and is retried). A commit
/// that fails ends the wait at once.
pub const STORE_WAIT: Duration = Duration::from_secs(10);

/// How long start-up waits for what restoring changed (queued leases
/// ended as failed) to be written before serving anyway, with the store
/// counted as failing until a commit succeeds.
pub const RESTORE_WRITE_WAIT: Duration = Duration::from_secs(10);

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

/// What an acquire caller waits on.
#[derive(Debug)]
pub struct Pending {
    pub lease_id: String,
    pub state: watch::Receiver<LeaseState>,
}

impl Pool {
    /// A pool that keeps its leases in memory only.
    pub fn new(cfg: PoolConfig) -> Self {
        Self::with_empty_store(cfg, Arc::new(MemStore::default()))
    }

    /// A pool that starts empty whatever `store` holds (unit tests).
    pub(crate) fn with_empty_store(cfg: PoolConfig, store: Arc<dyn LeaseStore>) -> Self {
        let committer = commit::Committer::start(store.clone());
        let inner = Inner {
            scaler: cfg.capacity.map(crate::capacity::Scaler::new),
            store_health: committer.health().clone(),
            ..Inner::default()
        };
        Self {
            cfg,
            inner: Mutex::new(inner),
            committer,
            store,
        }
    }

    /// A pool that writes every lease change through to `store`, starting
    /// from what the store holds at `now` (see `persist::restore`). Records
    /// that cannot be decoded are quarantined (`persist::quarantine`), not
    /// a reason to refuse to start; the wait for what restoring changed to
    /// be written is bounded by [`RESTORE_WRITE_WAIT`].
    pub fn with_store(
        cfg: PoolConfig,
        store: Arc<dyn LeaseStore>,
        now: Now,
    ) -> Result<Self, StoreError> {
        let records = store.load()?;
        let hosts = store.load_hosts()?;
        let committer = commit::Committer::start(store.clone());
        let mut inner = Inner {
            scaler: cfg.capacity.map(crate::capacity::Scaler::new),
            store_health: committer.health().clone(),
            ..Inner::default()
        };
        persist::quarantine(&mut inner, &records.unreadable, &hosts.unreadable, now);
        persist::restore_hosts(&mut inner, hosts.records);
        persist::restore(&mut inner, &cfg, records.records, now);
        let pool = Self {
            cfg,
            inner: Mutex::new(inner),
            committer,
            store,
        };
        // Writes what restoring changed (queued leases that failed).
        drop(pool.lock());
        if !pool
            .committer
            .wait_blocking(pool.committer.enqueued(), RESTORE_WRITE_WAIT)
        {
            tracing::error!(
                waited = ?RESTORE_WRITE_WAIT,
                why = pool.store_failing().unwrap_or_default(),
                "the store did not confirm what restoring changed in time; serving on (no host is offered while its commits fail)"
            );
        }
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
            .map_err(Error::from)
    }

    /// Why the store fails to take commits, or `None` while it works.
    /// While it fails no host is offered (see `docs/guarantees.md`).
    pub fn store_failing(&self) -> Option<String> {
        self.committer.health().failing()
    }

    /// Stored records left aside at start because they do not decode.
    pub fn quarantined(&self) -> usize {
        self.lock().quarantined
    }

    /// Commits the store failed since the start (for `/metrics`).
    pub fn store_failures(&self) -> u64 {
        self.committer.health().failures()
    }

    /// What the pool's events are counted in.
    pub fn metrics(&self) -> Arc<PoolMetrics> {
        self.lock().metrics.clone()
    }
}
