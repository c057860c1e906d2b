//! The coordinator's Prometheus metrics (prometheus-client). Events are
//! counted where they happen ([`PoolMetrics`], held by the pool and the
//! lease service); what is a matter of state (hosts by state, leases by
//! state, the queue) and the EC2 counters ([`Ec2Metrics`]) are
//! read from the pool at scrape time by [`PoolCollector`], so a scrape never
//! shows a stale gauge. [`registry`] puts both together for `/metrics` of
//! the ops endpoint (`crate::ops`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::pool::Pool;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

/// Counters and histograms of what happened.
#[derive(Debug)]
pub struct PoolMetrics {
    /// Time from Acquire to a host being assigned (first assignment only).
    pub queue_wait: Histogram,
    /// Time an Acquire call took, answered or not.
    pub acquire_latency: Histogram,
    /// Acquire calls by outcome: ok, no-host, error.
    pub acquires: Family<OutcomeLabel, Counter>,
    /// Time from the agent accepting a lease to its end.
    pub lease_duration: Histogram,
    /// Ended leases by how they ended.
    pub leases_ended: Family<StateLabel, Counter>,
    /// Wipe reports by outcome: verified or failed.
    pub wipes: Family<OutcomeLabel, Counter>,
    pub agent_connects: Counter,
    pub agent_disconnects: Counter,
    /// Acquires refused because a queue limit (a tenant's `max-queued`, the
    /// pool's `--max-queued`) was reached.
    pub limit_refusals: Counter,
    /// Calls refused because the server's `--max-requests` calls were in
    /// flight.
    pub request_limit_refusals: Counter,
    /// Elastic capacity: decisions that raised the desired number of hosts.
    pub scale_outs: Counter,
    /// Elastic capacity: idle hosts retired (drained) by a scale-in.
    pub hosts_retired: Counter,
    /// Interruption notices agents reported (spot, rebalance).
    pub interruption_notices: Counter,
    /// Leases ended because the store could not record them before their
    /// Acquire answer left (`Pool::undo_unanswered`).
    pub unanswered_leases_ended: Counter,
}

impl Default for PoolMetrics {
    fn default() -> Self {
        // 10 ms .. ~1.5 h: a warm pool answers in milliseconds, a busy one
        // queues builds for minutes.
        let wait = || Histogram::new(exponential_buckets(0.01, 3.0, 13));
        let m = PoolMetrics {
            queue_wait: wait(),
            acquire_latency: wait(),
            acquires: Family::default(),
            // 1 s .. ~1.5 d.
            lease_duration: Histogram::new(exponential_buckets(1.0, 3.0, 12)),
            leases_ended: Family::default(),
            wipes: Family::default(),
            agent_connects: Counter::default(),
            agent_disconnects: Counter::default(),
            limit_refusals: Counter::default(),
            request_limit_refusals: Counter::default(),
            scale_outs: Counter::default(),
            hosts_retired: Counter::default(),
            interruption_notices: Counter::default(),
            unanswered_leases_ended: Counter::default(),
        };
        // Every series exists from the start (at 0).
        for o in ["ok", "no-host", "error"] {
            drop(
                m.acquires
                    .get_or_create(&OutcomeLabel { outcome: o.into() }),
            );
        }
        for o in ["verified", "failed"] {
            drop(m.wipes.get_or_create(&OutcomeLabel { outcome: o.into() }));
        }
        for s in ["released", "expired", "host-lost", "failed"] {
            drop(
                m.leases_ended
                    .get_or_create(&StateLabel { state: s.into() }),
            );
        }
        m
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PoolMetrics {
    pub fn observe_queue_wait(&self, d: Duration) {
        self.queue_wait.observe(secs(d));
    }

    pub fn observe_acquire(&self, d: Duration, outcome: &str) {
        self.acquire_latency.observe(secs(d));
        self.acquires
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn lease_ended(&self, state: &str, active_for: Option<Duration>) {
        self.leases_ended
            .get_or_create(&StateLabel {
                state: state.into(),
            })
            .inc();
        if let Some(d) = active_for {
            self.lease_duration.observe(secs(d));
        }
    }

    pub fn wipe(&self, verified: bool) {
        let outcome = if verified { "verified" } else { "failed" };
        self.wipes
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// Reads the pool's state and the EC2 counters at scrape time.
pub struct PoolCollector {
    pub pool: Arc<Pool>,
    pub ec2: Arc<Ec2Metrics>,
}

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCollector").finish_non_exhaustive()
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

fn by_state(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(String, u32)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (state, n) in values {
        let labels = StateLabel {
            state: state.clone(),
        };
        ConstGauge::new(i64::from(*n)).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.pool.stats(crate::clock::Now::system());
        by_state(
            &mut encoder,
            "hosts",
            "Hosts by the state their agent last reported",
            &s.hosts_by_state,
        )?;
        gauge(
            &mut encoder,
            "hosts_connected",
            "Hosts whose agent stream is up",
            i64::from(s.hosts_connected),
        )?;
        gauge(
            &mut encoder,
            "hosts_draining",
            "Hosts being drained",
            i64::from(s.hosts_draining),
        )?;
        gauge(
            &mut encoder,
            "hosts_offerable",
            "Hosts that could take a lease right now",
            i64::from(s.hosts_offerable),
        )?;
        by_state(
            &mut encoder,
            "leases",
            "Leases the coordinator holds by state (ended ones while in its history)",
            &s.leases_by_state,
        )?;
        let active = s
            .leases_by_state
            .iter()
            .find(|(k, _)| k == "active")
            .map_or(0, |(_, n)| *n);
        gauge(
            &mut encoder,
            "leases_active",
            "Leases whose host serves them now",
            i64::from(active),
        )?;
        gauge(
            &mut encoder,
            "queue_length",
            "Builds waiting for a host",
            i64::from(s.queue_length),
        )?;
        gauge(
            &mut encoder,
            "store_failing",
            "1 while the lease store fails to take commits (no host is offered meanwhile), else 0",
            i64::from(s.store_error.is_some()),
        )?;
        gauge(
            &mut encoder,
            "store_quarantined_records",
            "Stored records that did not decode at start: left in the store, not restored",
            i64::try_from(self.pool.quarantined()).unwrap_or(i64::MAX),
        )?;
        counter(
            &mut encoder,
            "store_commit_failures",
            "Commits of the lease store that failed (each is retried)",
            self.pool.store_failures(),
        )?;
        let e = self.ec2.snapshot();
        for (name, help, v) in [
            (
                "ec2_agents_verified",
                "Agents that passed EC2 verification",
                e.agents_verified,
            ),
            (
                "ec2_agents_refused",
                "Agents EC2 verification refused",
                e.agents_refused,
            ),
            (
                "ec2_verify_errors",
                "EC2 verifications that could not be made",
                e.verify_errors,
            ),
            (
                "ec2_sweep_passes",
                "Orphan sweeper passes completed",
                e.sweep_passes,
            ),
            (
                "ec2_sweep_errors",
                "Sweeper passes that could not list the pool",
                e.sweep_errors,
            ),
            (
                "ec2_orphans_tagged",
                "Instances tagged berth:orphan",
                e.orphans_tagged,
            ),
            (
                "ec2_orphans_untagged",
                "Orphan tags removed (the agent came back)",
                e.orphans_untagged,
            ),
            (
                "ec2_orphans_terminated",
                "Orphans terminated",
                e.orphans_terminated,
            ),
            (
                "ec2_burned_terminated",
                "Burned instances (they served a lease) the coordinator terminated",
                e.burned_terminated,
            ),
            (
                "ec2_sweep_action_errors",
                "Tag, untag or terminate calls that failed",
                e.sweep_action_errors,
            ),
            (
                "ec2_asg_scale_outs",
                "Auto Scaling group desired capacity raised",
                e.asg_scale_outs,
            ),
            (
                "ec2_asg_scale_ins",
                "Idle instances terminated through the Auto Scaling group with a decrement",
                e.asg_scale_ins,
            ),
            (
                "ec2_asg_instances_protected",
                "Leased instances given scale-in protection",
                e.asg_protected,
            ),
            (
                "ec2_asg_instances_unprotected",
                "Instances whose scale-in protection was cleared",
                e.asg_unprotected,
            ),
            (
                "ec2_asg_errors",
                "Auto Scaling calls that failed",
                e.asg_errors,
            ),
        ] {
            counter(&mut encoder, name, help, v)?;
        }
        Ok(())
    }
}

/// Everything `/metrics` shows, under the prefix `berth`.
pub fn registry(
    pool: Arc<Pool>,
    ec2: Arc<Ec2Metrics>,
    registries: Option<Arc<crate::ops::registries::Watch>>,
) -> Registry {
    let m = pool.metrics();
    let mut r = Registry::with_prefix("berth");
    r.register(
        "queue_wait_seconds",
        "Time from Acquire to a host being assigned",
        m.queue_wait.clone(),
    );
    r.register(
        "acquire_duration_seconds",
        "Time Acquire calls took",
        m.acquire_latency.clone(),
    );
    r.register(
        "acquires",
        "Acquire calls by outcome (ok, no-host, error)",
        m.acquires.clone(),
    );
    r.register(
        "lease_duration_seconds",
        "Time from the agent accepting a lease to its end",
        m.lease_duration.clone(),
    );
    r.register(
        "leases_ended",
        "Ended leases by how they ended",
        m.leases_ended.clone(),
    );
    r.register(
        "wipes",
        "Wipe reports by outcome (verified, failed)",
        m.wipes.clone(),
    );
    r.register(
        "agent_connects",
        "Agent registrations (a reconnect counts again)",
        m.agent_connects.clone(),
    );
    r.register(
        "agent_disconnects",
        "Agent streams that ended",
        m.agent_disconnects.clone(),
    );
    r.register(
        "queue_limit_refusals",
        "Acquires refused because a queue limit was reached (a tenant's max-queued, --max-queued)",
        m.limit_refusals.clone(),
    );
    r.register(
        "request_limit_refusals",
        "Calls refused because the coordinator served --max-requests calls at once",
        m.request_limit_refusals.clone(),
    );
    r.register(
        "scale_outs",
        "Elastic capacity: decisions that raised the desired number of hosts",
        m.scale_outs.clone(),
    );
    r.register(
        "hosts_retired",
        "Elastic capacity: idle hosts drained by a scale-in",
        m.hosts_retired.clone(),
    );
    r.register(
        "interruption_notices",
        "Interruption notices agents reported (EC2 spot interruption, rebalance recommendation)",
        m.interruption_notices.clone(),
    );
    r.register(
        "unanswered_leases_ended",
        "Leases ended because the store could not record them before their Acquire answer left",
        m.unanswered_leases_ended.clone(),
    );
    r.register_collector(Box::new(PoolCollector { pool, ec2 }));
    if let Some(w) = registries {
        r.register_collector(Box::new(crate::ops::registries::RegistryCollector(w)));
    }
    r
}

/// The registry in the Prometheus text format.
pub fn encode(r: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, r)?;
    Ok(out)
}

/// Counters of what the EC2 parts did. Plain atomics; read them with
/// [`Ec2Metrics::snapshot`].
#[derive(Debug, Default)]
pub struct Ec2Metrics {
    /// Agents that passed verification.
    pub agents_verified: AtomicU64,
    /// Agents refused (unknown, not running, untagged, wrong address).
    pub agents_refused: AtomicU64,
    /// Verifications that could not be made (EC2 unreachable).
    pub verify_errors: AtomicU64,
    /// Sweeper passes completed.
    pub sweep_passes: AtomicU64,
    /// Sweeper passes that could not list the pool's instances.
    pub sweep_errors: AtomicU64,
    /// Instances tagged `berth:orphan`.
    pub orphans_tagged: AtomicU64,
    /// Tagged instances whose agent came back; the tag was removed.
    pub orphans_untagged: AtomicU64,
    /// Orphans terminated.
    pub orphans_terminated: AtomicU64,
    /// Burned instances (they served a lease) still running after the
    /// grace, terminated by the coordinator.
    pub burned_terminated: AtomicU64,
    /// Tag, untag or terminate calls that failed.
    pub sweep_action_errors: AtomicU64,
    /// Auto Scaling: SetDesiredCapacity calls that raised the group.
    pub asg_scale_outs: AtomicU64,
    /// Auto Scaling: idle instances terminated with a decrement.
    pub asg_scale_ins: AtomicU64,
    /// Auto Scaling: instances given scale-in protection (leased).
    pub asg_protected: AtomicU64,
    /// Auto Scaling: instances whose protection was cleared.
    pub asg_unprotected: AtomicU64,
    /// Auto Scaling calls that failed.
    pub asg_errors: AtomicU64,
}

/// A copy of [`Ec2Metrics`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ec2MetricsSnapshot {
    pub agents_verified: u64,
    pub agents_refused: u64,
    pub verify_errors: u64,
    pub sweep_passes: u64,
    pub sweep_errors: u64,
    pub orphans_tagged: u64,
    pub orphans_untagged: u64,
    pub orphans_terminated: u64,
    pub burned_terminated: u64,
    pub sweep_action_errors: u64,
    pub asg_scale_outs: u64,
    pub asg_scale_ins: u64,
    pub asg_protected: u64,
    pub asg_unprotected: u64,
    pub asg_errors: u64,
}

impl Ec2Metrics {
    pub fn snapshot(&self) -> Ec2MetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Ec2MetricsSnapshot {
            agents_verified: r(&self.agents_verified),
            agents_refused: r(&self.agents_refused),
            verify_errors: r(&self.verify_errors),
            sweep_passes: r(&self.sweep_passes),
            sweep_errors: r(&self.sweep_errors),
            orphans_tagged: r(&self.orphans_tagged),
            orphans_untagged: r(&self.orphans_untagged),
            orphans_terminated: r(&self.orphans_terminated),
            burned_terminated: r(&self.burned_terminated),
            sweep_action_errors: r(&self.sweep_action_errors),
            asg_scale_outs: r(&self.asg_scale_outs),
            asg_scale_ins: r(&self.asg_scale_ins),
            asg_protected: r(&self.asg_protected),
            asg_unprotected: r(&self.asg_unprotected),
            asg_errors: r(&self.asg_errors),
        }
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
