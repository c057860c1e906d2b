//! The orphan sweeper of an EC2 pool: a pass every interval over the
//! pool's pending and running instances. An instance is an orphan when its
//! agent never registered within a limit, or its agent has been gone past a
//! limit. A pass tags an orphan `berth:orphan`; a later pass that still
//! finds it orphaned (and finds the tag) terminates it. An instance whose
//! host holds a lease is never touched, and [`Pool::condemn`] makes the
//! check and the refusal of a late registration one atomic step.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use berth_aws::{Ec2Api, InstanceInfo};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::Now;
use crate::ops::metrics::{Ec2Metrics, bump};
use crate::pool::{Pool, Presence};

/// Tag key the sweeper puts on an instance it found orphaned; its value is
/// the time (RFC 3339) it was first found so.
pub const ORPHAN_TAG: &str = "berth:orphan";

/// The sweeper's limits.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    pub pool_name: String,
    /// Time between passes.
    pub interval: Duration,
    /// An instance running this long without its agent ever registering
    /// (counted from launch or from the coordinator's start, whichever is
    /// later) is an orphan.
    pub unregistered_after: Duration,
    /// An instance whose agent has been gone this long is an orphan.
    pub gone_after: Duration,
    /// At most this many terminations per pass: a coordinator cut off from
    /// every agent must not end the whole pool at once.
    pub max_terminations: usize,
    /// A burned instance (it served a lease) still running this long after
    /// its lease ended is terminated by the coordinator: its agent should
    /// have ended it within seconds, and nothing on it is trusted.
    pub burned_grace: Duration,
}

/// How the sweeper sees one instance this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Its host holds a lease: never touched.
    Leased,
    /// Its agent is connected.
    Connected,
    /// Its agent was last seen this long ago.
    Gone(Duration),
    /// Its agent never registered; it has been running this long (since
    /// launch or the coordinator's start, whichever is later).
    NeverRegistered(Duration),
    /// It served a lease that ended this long ago: burned.
    Burned(Duration),
}

/// One thing a pass does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SweepAction {
    Tag { instance_id: String, reason: String },
    Terminate { instance_id: String, reason: String },
    Untag { instance_id: String },
}

/// Why an instance is an orphan, if it is one.
pub fn orphan_reason(seen: &Seen, cfg: &SweepConfig) -> Option<String> {
    let fmt =
        |d: &Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
    match seen {
        Seen::Leased | Seen::Connected => None,
        Seen::Burned(d) if *d >= cfg.burned_grace => Some(format!(
            "it served a lease that ended {} ago and is still running (limit {})",
            fmt(d),
            fmt(&cfg.burned_grace)
        )),
        Seen::Burned(_) => None,
        Seen::Gone(d) if *d >= cfg.gone_after => Some(format!(
            "its agent has been gone for {} (limit {})",
            fmt(d),
            fmt(&cfg.gone_after)
        )),
        Seen::NeverRegistered(d) if *d >= cfg.unregistered_after => Some(format!(
            "running for {} without its agent registering (limit {})",
            fmt(d),
            fmt(&cfg.unregistered_after)
        )),
        Seen::Gone(_) | Seen::NeverRegistered(_) => None,
    }
}

/// The pure part of a pass: what to do about each (instance, whether it
/// carries the orphan tag, how it is seen). Orphans are tagged first and
/// terminated on a later pass; tagged instances that are no longer orphans
/// lose the tag (unless leased: a leased instance is never touched).
pub fn plan(instances: &[(String, bool, Seen)], cfg: &SweepConfig) -> Vec<SweepAction> {
    let mut actions = Vec::new();
    let mut terminations = 0;
    for (id, tagged, seen) in instances {
        // A burned instance goes at once, tag or not: there is no agent
        // to wait for, only a used host to end.
        if let (Seen::Burned(_), Some(reason)) = (seen, orphan_reason(seen, cfg)) {
            if terminations < cfg.max_terminations {
                terminations += 1;
                actions.push(SweepAction::Terminate {
                    instance_id: id.clone(),
                    reason,
                });
            }
            continue;
        }
        match (orphan_reason(seen, cfg), tagged) {
            (Some(reason), false) => actions.push(SweepAction::Tag {
                instance_id: id.clone(),
                reason,
            }),
            (Some(reason), true) if terminations < cfg.max_terminations => {
                terminations += 1;
                actions.push(SweepAction::Terminate {
                    instance_id: id.clone(),
                    reason,
                });
            }
            (Some(_), true) => {}
            (None, true) if *seen != Seen::Leased => actions.push(SweepAction::Untag {
                instance_id: id.clone(),
            }),
            (None, _) => {}
        }
    }
    actions
}

/// The orphan sweeper.
pub struct Sweeper<A> {
    api: Arc<A>,
    pool: Arc<Pool>,
    cfg: SweepConfig,
    metrics: Arc<Ec2Metrics>,
    /// When the coordinator started: agents get `unregistered_after` from
    /// then to reconnect, however old their instance is.
    started: SystemTime,
    /// When each host was last seen registered, kept after the pool
    /// forgets a host, so "gone" outlives the pool's lost grace.
    last_seen: HashMap<String, Instant>,
    passes: u64,
}

impl<A: Ec2Api> Sweeper<A> {
    pub fn new(api: Arc<A>, pool: Arc<Pool>, cfg: SweepConfig, metrics: Arc<Ec2Metrics>) -> Self {
        Self {
            api,
            pool,
            cfg,
            metrics,
            started: SystemTime::now(),
            last_seen: HashMap::new(),
            passes: 0,
        }
    }

    /// A pass every interval until `shutdown` fires.
    pub async fn run(mut self, shutdown: CancellationToken) {
        info!(pool = %self.cfg.pool_name, interval = ?self.cfg.interval, unregistered_after = ?self.cfg.unregistered_after, gone_after = ?self.cfg.gone_after, "orphan sweeper started");
        let mut every = berth_runtime::shutdown::Every::new(self.cfg.interval);
        while every.tick(&shutdown).await {
            if shutdown.run_until_cancelled(self.pass()).await.is_none() {
                return;
            }
        }
    }

    /// One pass: list, judge, act.
    pub async fn pass(&mut self) {
        self.passes += 1;
        let pass = self.passes;
        let instances = match self.api.pool_instances(&self.cfg.pool_name).await {
            Ok(i) => i,
            Err(e) => {
                bump(&self.metrics.sweep_errors);
                error!(pass, error = %e, "orphan sweep: cannot list the pool's instances");
                return;
            }
        };
        let now = Instant::now();
        let wall = SystemTime::now();
        let at = Now { mono: now, wall };
        let presences = self.pool.presences();
        let burned = self.pool.burned_hosts();
        for (id, p) in &presences {
            if matches!(p, Presence::Leased | Presence::Connected) {
                self.last_seen.insert(id.clone(), now);
            }
        }
        let listed: HashSet<String> = instances.iter().map(|i| i.instance_id.clone()).collect();
        // Instances that are gone for good need no memory.
        self.last_seen.retain(|id, _| listed.contains(id));
        self.pool.retain_condemned(|id| listed.contains(id), at);

        let judged: Vec<(String, bool, Seen)> = instances
            .iter()
            .map(|i| {
                let seen = match (burned.get(&i.instance_id), presences.get(&i.instance_id)) {
                    (Some(at), p) if p != Some(&Presence::Leased) => {
                        Seen::Burned(wall.duration_since(*at).unwrap_or_default())
                    }
                    (_, p) => self.seen(i, p, now, wall),
                };
                (i.instance_id.clone(), i.tag(ORPHAN_TAG).is_some(), seen)
            })
            .collect();
        let actions = plan(&judged, &self.cfg);
        let (mut tagged, mut terminated) = (0, 0);
        for action in actions {
            match action {
                SweepAction::Tag {
                    instance_id,
                    reason,
                } => {
                    let stamp = humantime::format_rfc3339_seconds(wall).to_string();
                    match self.api.tag(&instance_id, ORPHAN_TAG, &stamp).await {
                        Ok(()) => {
                            tagged += 1;
                            bump(&self.metrics.orphans_tagged);
                            warn!(pass, %instance_id, %reason, "orphan sweep: tagged {ORPHAN_TAG}");
                        }
                        Err(e) => {
                            bump(&self.metrics.sweep_action_errors);
                            error!(pass, %instance_id, error = %e, "orphan sweep: tagging failed");
                        }
                    }
                }
                SweepAction::Terminate {
                    instance_id,
                    reason,
                } => {
                    // Atomic with registration: a host that holds a lease
                    // or connected since the listing is left alone. A
                    // burned host's registration is refused anyway, and its
                    // agent being connected is no reason to keep it.
                    if !burned.contains_key(&instance_id) && !self.pool.condemn(&instance_id, at) {
                        info!(pass, %instance_id, "orphan sweep: the agent is back; not terminating");
                        continue;
                    }
                    match self.api.terminate(&instance_id).await {
                        Ok(()) => {
                            terminated += 1;
                            if burned.contains_key(&instance_id) {
                                bump(&self.metrics.burned_terminated);
                                warn!(pass, %instance_id, %reason, "orphan sweep: terminated a burned instance");
                            } else {
                                bump(&self.metrics.orphans_terminated);
                                warn!(pass, %instance_id, %reason, "orphan sweep: terminated");
                            }
                        }
                        Err(e) => {
                            bump(&self.metrics.sweep_action_errors);
                            error!(pass, %instance_id, error = %e, "orphan sweep: terminating failed");
                        }
                    }
                }
                SweepAction::Untag { instance_id } => {
                    match self.api.untag(&instance_id, ORPHAN_TAG).await {
                        Ok(()) => {
                            bump(&self.metrics.orphans_untagged);
                            info!(pass, %instance_id, "orphan sweep: the agent is back; removed {ORPHAN_TAG}");
                        }
                        Err(e) => {
                            bump(&self.metrics.sweep_action_errors);
                            error!(pass, %instance_id, error = %e, "orphan sweep: untagging failed");
                        }
                    }
                }
            }
        }
        bump(&self.metrics.sweep_passes);
        info!(
            pass,
            instances = judged.len(),
            tagged,
            terminated,
            "orphan sweep: pass done"
        );
    }

    fn seen(&self, i: &InstanceInfo, p: Option<&Presence>, now: Instant, wall: SystemTime) -> Seen {
        match p {
            Some(Presence::Leased) => Seen::Leased,
            Some(Presence::Connected) => Seen::Connected,
            Some(Presence::Disconnected { since }) => {
                Seen::Gone(now.saturating_duration_since(*since))
            }
            None => match self.last_seen.get(&i.instance_id) {
                Some(at) => Seen::Gone(now.saturating_duration_since(*at)),
                None => {
                    let from = i.launch_time.map_or(self.started, |l| l.max(self.started));
                    Seen::NeverRegistered(wall.duration_since(from).unwrap_or_default())
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::PoolConfig;
    use crate::testing::{A, B, C, FakeEc2, reg};
    use std::sync::atomic::Ordering;

    const SECOND: Duration = Duration::from_secs(1);

    fn cfg() -> SweepConfig {
        SweepConfig {
            pool_name: "ci".into(),
            interval: 10 * SECOND,
            unregistered_after: 600 * SECOND,
            gone_after: 300 * SECOND,
            max_terminations: 2,
            burned_grace: 120 * SECOND,
        }
    }

    #[test]
    fn orphans_are_tagged_then_terminated_and_leased_ones_never_touched() {
        let c = cfg();
        let rows = vec![
            (
                "fresh".to_owned(),
                false,
                Seen::NeverRegistered(60 * SECOND),
            ),
            (
                "stale".to_owned(),
                false,
                Seen::NeverRegistered(601 * SECOND),
            ),
            (
                "stale-tagged".to_owned(),
                true,
                Seen::NeverRegistered(700 * SECOND),
            ),
            ("gone".to_owned(), false, Seen::Gone(300 * SECOND)),
            ("briefly-gone".to_owned(), true, Seen::Gone(10 * SECOND)),
            ("leased-tagged".to_owned(), true, Seen::Leased),
            ("connected".to_owned(), false, Seen::Connected),
            ("connected-tagged".to_owned(), true, Seen::Connected),
        ];
        let actions = plan(&rows, &c);
        let short: Vec<String> = actions
            .iter()
            .map(|a| match a {
                SweepAction::Tag { instance_id, .. } => format!("tag {instance_id}"),
                SweepAction::Terminate { instance_id, .. } => format!("terminate {instance_id}"),
                SweepAction::Untag { instance_id } => format!("untag {instance_id}"),
            })
            .collect();
        assert_eq!(
            short,
            [
                "tag stale",
                "terminate stale-tagged",
                "tag gone",
                "untag briefly-gone",
                "untag connected-tagged"
            ]
        );
        let SweepAction::Tag { reason, .. } = &actions[0] else {
            panic!()
        };
        assert_eq!(
            reason,
            "running for 10m 1s without its agent registering (limit 10m)"
        );
    }

    #[test]
    fn terminations_per_pass_are_capped() {
        let rows: Vec<_> = (0..5)
            .map(|i| (format!("i{i}"), true, Seen::Gone(3600 * SECOND)))
            .collect();
        let actions = plan(&rows, &cfg());
        assert_eq!(actions.len(), 2);
        assert!(
            actions
                .iter()
                .all(|a| matches!(a, SweepAction::Terminate { .. }))
        );
    }

    #[tokio::test]
    async fn sweeper_tags_then_terminates_an_orphan_and_spares_the_leased_host() {
        let ec2 = Arc::new(FakeEc2::default());
        // A: registered and leased. B: never registers. C: registered, then gone.
        ec2.launch(A, "10.0.0.5", Some("ci"), 3600 * SECOND);
        ec2.launch(B, "10.0.0.6", Some("ci"), 3600 * SECOND);
        ec2.launch(C, "10.0.0.7", Some("ci"), 3600 * SECOND);
        ec2.launch(
            "i-000000000000000ff",
            "10.0.0.9",
            Some("other"),
            3600 * SECOND,
        );
        let pool = Arc::new(Pool::new(PoolConfig::default()));
        let now = Now::system();
        let (tx_a, _rx_a) = tokio::sync::mpsc::channel(16);
        pool.register(reg(A, "10.0.0.5"), Default::default(), tx_a, now)
            .unwrap();
        let lease = pool
            .acquire(
                "ci",
                "build",
                berth_tls::KeyId([0; 32]),
                600 * SECOND,
                SECOND,
                now,
            )
            .unwrap();
        assert_eq!(pool.presences()[A], Presence::Leased);
        let (tx_c, _rx_c) = tokio::sync::mpsc::channel(16);
        let conn_c = pool
            .register(reg(C, "10.0.0.7"), Default::default(), tx_c, now)
            .unwrap();

        let metrics = Arc::new(Ec2Metrics::default());
        let cfg = SweepConfig {
            unregistered_after: Duration::ZERO,
            gone_after: Duration::ZERO,
            ..cfg()
        };
        let mut sweeper = Sweeper::new(ec2.clone(), pool.clone(), cfg, metrics.clone());
        sweeper.pass().await;
        assert_eq!(ec2.state(B), ("running".into(), true), "pass 1 tags B");
        assert_eq!(ec2.state(C), ("running".into(), false), "C is connected");
        sweeper.pass().await;
        assert_eq!(
            ec2.state(B),
            ("terminated".into(), true),
            "pass 2 terminates B"
        );

        // C's agent goes away: tagged, then terminated; its late return is refused.
        pool.disconnect(C, conn_c, Now::system());
        sweeper.pass().await;
        assert_eq!(ec2.state(C), ("running".into(), true));
        sweeper.pass().await;
        assert_eq!(ec2.state(C).0, "terminated");
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let late = pool.register(reg(C, "10.0.0.7"), Default::default(), tx, Now::system());
        assert_eq!(late.unwrap_err().code(), tonic::Code::PermissionDenied);

        // A, leased all along, was never touched; nor was the other pool's instance.
        assert_eq!(ec2.state(A), ("running".into(), false));
        let calls = ec2.calls.lock().unwrap().clone();
        assert!(
            !calls.iter().any(|c| c.contains(A) || c.contains("ff")),
            "{calls:?}"
        );
        assert_eq!(pool.presences()[A], Presence::Leased);
        drop(lease);
        let m = metrics.snapshot();
        assert_eq!(
            (m.sweep_passes, m.orphans_tagged, m.orphans_terminated),
            (4, 2, 2)
        );
    }

    #[tokio::test]
    async fn an_agent_that_returns_loses_the_tag_and_a_failed_listing_does_nothing() {
        let ec2 = Arc::new(FakeEc2::default());
        ec2.launch(B, "10.0.0.6", Some("ci"), 3600 * SECOND);
        let pool = Arc::new(Pool::new(PoolConfig::default()));
        let metrics = Arc::new(Ec2Metrics::default());
        let cfg = SweepConfig {
            unregistered_after: Duration::ZERO,
            ..cfg()
        };
        let mut sweeper = Sweeper::new(ec2.clone(), pool.clone(), cfg, metrics.clone());
        sweeper.pass().await;
        assert!(ec2.state(B).1);
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        pool.register(reg(B, "10.0.0.6"), Default::default(), tx, Now::system())
            .unwrap();
        sweeper.pass().await;
        assert_eq!(ec2.state(B), ("running".into(), false));
        ec2.down.store(true, Ordering::SeqCst);
        sweeper.pass().await;
        let m = metrics.snapshot();
        assert_eq!(
            (m.orphans_untagged, m.sweep_errors, m.orphans_terminated),
            (1, 1, 0)
        );
    }

    #[tokio::test]
    async fn a_young_unregistered_instance_is_left_alone() {
        let ec2 = Arc::new(FakeEc2::default());
        ec2.launch(B, "10.0.0.6", Some("ci"), 3600 * SECOND);
        let pool = Arc::new(Pool::new(PoolConfig::default()));
        // The coordinator just started: an old instance still gets the full limit.
        let mut sweeper = Sweeper::new(ec2.clone(), pool, cfg(), Arc::new(Ec2Metrics::default()));
        sweeper.pass().await;
        assert_eq!(ec2.state(B), ("running".into(), false));
    }
}
