//! The Auto Scaling actuator of an elastic EC2 pool (`--asg-name`): it
//! makes the group follow the pool's decisions (`crate::capacity`), so the
//! coordinator stays the one party that changes capacity. A pass every
//! interval:
//!
//! - protection first: an instance whose host holds a lease gets scale-in
//!   protection, so the group never takes a host from a build;
//! - scale out: the group's desired capacity is raised to the pool's
//!   desired number (at most the group's max) with SetDesiredCapacity; it
//!   is never lowered that way (the group would pick the instances);
//! - scale in: each idle host the pool chose to retire (`Pool::retiring`)
//!   is terminated with TerminateInstanceInAutoScalingGroup and
//!   `ShouldDecrementDesiredCapacity=true`, then drained; if the call
//!   fails, the host is offered again;
//! - an instance whose lease is over (or that never held one) loses its
//!   protection.
//!
//! Agents end their instance after a lease with TerminateInstances, which
//! leaves the desired capacity alone: the group replaces the instance.
//! [`plan`] is the pure part; every change is logged with the decision's
//! inputs and counted in [`Ec2Metrics`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use berth_aws::asg::MAX_PROTECTION_BATCH;
use berth_aws::{AsgApi, GroupInfo};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::capacity::Inputs;
use crate::clock::Now;
use crate::ops::metrics::{Ec2Metrics, bump};
use crate::pool::{Pool, Presence};

/// The actuator's settings.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// The Auto Scaling group's name.
    pub name: String,
    /// Time between passes.
    pub interval: Duration,
}

/// What one pass changes on the group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The desired capacity to set, when it rises.
    pub raise_to: Option<u32>,
    /// Instances to protect from scale-in (their host holds a lease).
    pub protect: Vec<String>,
    /// Instances whose protection to clear (no lease on their host).
    pub unprotect: Vec<String>,
}

/// The pure part of a pass: the group as read, the pool's desired number
/// of hosts, and which hosts hold a lease.
pub fn plan(group: &GroupInfo, desired: u32, presences: &HashMap<String, Presence>) -> Plan {
    let target = desired.min(group.max);
    let mut p = Plan {
        raise_to: (target > group.desired).then_some(target),
        ..Plan::default()
    };
    for i in &group.instances {
        // Leaving already: nothing to protect, and the call would fail.
        if i.lifecycle_state.starts_with("Terminating") {
            continue;
        }
        let leased = presences.get(&i.instance_id) == Some(&Presence::Leased);
        if leased && !i.protected {
            p.protect.push(i.instance_id.clone());
        } else if !leased && i.protected {
            p.unprotect.push(i.instance_id.clone());
        }
    }
    p
}

/// Applies the pool's decisions to one Auto Scaling group.
pub struct GroupActuator<A> {
    api: Arc<A>,
    pool: Arc<Pool>,
    cfg: GroupConfig,
    metrics: Arc<Ec2Metrics>,
    passes: u64,
}

impl<A: AsgApi> GroupActuator<A> {
    pub fn new(api: Arc<A>, pool: Arc<Pool>, cfg: GroupConfig, metrics: Arc<Ec2Metrics>) -> Self {
        Self {
            api,
            pool,
            cfg,
            metrics,
            passes: 0,
        }
    }

    /// A pass every interval until `shutdown` fires.
    pub async fn run(mut self, shutdown: CancellationToken) {
        info!(group = %self.cfg.name, interval = ?self.cfg.interval, "Auto Scaling actuator started");
        let mut every = berth_runtime::shutdown::Every::new(self.cfg.interval);
        while every.tick(&shutdown).await {
            if shutdown.run_until_cancelled(self.pass()).await.is_none() {
                return;
            }
        }
    }

    /// One pass: read the group, protect, scale out, scale in, unprotect.
    pub async fn pass(&mut self) {
        self.passes += 1;
        let pass = self.passes;
        let name = self.cfg.name.clone();
        let group = match self.api.describe_group(&name).await {
            Ok(Some(g)) => g,
            Ok(None) => {
                bump(&self.metrics.asg_errors);
                error!(pass, group = %name, "Auto Scaling: the group does not exist");
                return;
            }
            Err(e) => {
                bump(&self.metrics.asg_errors);
                error!(pass, group = %name, error = %e, "Auto Scaling: cannot read the group");
                return;
            }
        };
        let Some((inputs, desired)) = self.pool.capacity(Now::system()) else {
            return;
        };
        let plan = plan(&group, desired, &self.pool.presences());
        self.protect(pass, &plan.protect, true).await;
        if let Some(to) = plan.raise_to {
            self.raise(pass, &group, to, &inputs, desired).await;
        }
        self.scale_in(pass, &group, &inputs, desired).await;
        self.protect(pass, &plan.unprotect, false).await;
    }

    async fn raise(&self, pass: u64, group: &GroupInfo, to: u32, i: &Inputs, desired: u32) {
        match self.api.set_desired(&group.name, to).await {
            Ok(()) => {
                bump(&self.metrics.asg_scale_outs);
                info!(
                    pass,
                    group = %group.name,
                    group_desired = to,
                    from = group.desired,
                    group_max = group.max,
                    desired,
                    leased = i.leased,
                    queued = i.queued,
                    idle = i.idle,
                    hosts = i.hosts,
                    "Auto Scaling: desired capacity raised"
                );
            }
            Err(e) => {
                bump(&self.metrics.asg_errors);
                error!(pass, group = %group.name, to, error = %e, "Auto Scaling: cannot raise the desired capacity");
            }
        }
    }

    async fn scale_in(&self, pass: u64, group: &GroupInfo, i: &Inputs, desired: u32) {
        for (host_id, reason) in self.pool.retiring() {
            if !group.instances.iter().any(|x| x.instance_id == host_id) {
                // Not one of the group's: no capacity to decrement. Its
                // agent ends it once drained.
                warn!(pass, group = %group.name, %host_id, %reason, "scale-in: the instance is not in the group; draining it only");
                self.pool.retired(&host_id, Now::system());
                continue;
            }
            match self.api.terminate_and_decrement(&host_id).await {
                Ok(()) => {
                    bump(&self.metrics.asg_scale_ins);
                    info!(
                        pass,
                        group = %group.name,
                        %host_id,
                        %reason,
                        group_desired = group.desired,
                        desired,
                        leased = i.leased,
                        queued = i.queued,
                        idle = i.idle,
                        hosts = i.hosts,
                        "Auto Scaling: idle instance terminated, desired capacity decremented"
                    );
                    self.pool.retired(&host_id, Now::system());
                }
                Err(e) => {
                    bump(&self.metrics.asg_errors);
                    error!(pass, group = %group.name, %host_id, error = %e, "Auto Scaling: cannot terminate an idle instance; it stays in the pool");
                    self.pool.keep(&host_id, Now::system());
                }
            }
        }
    }

    async fn protect(&self, pass: u64, ids: &[String], protected: bool) {
        for batch in ids.chunks(MAX_PROTECTION_BATCH) {
            match self
                .api
                .set_protection(&self.cfg.name, batch, protected)
                .await
            {
                Ok(()) => {
                    let counter = if protected {
                        &self.metrics.asg_protected
                    } else {
                        &self.metrics.asg_unprotected
                    };
                    counter.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    info!(pass, group = %self.cfg.name, instances = ?batch, protected, "Auto Scaling: scale-in protection set");
                }
                Err(e) => {
                    bump(&self.metrics.asg_errors);
                    error!(pass, group = %self.cfg.name, instances = ?batch, protected, error = %e, "Auto Scaling: cannot set scale-in protection");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::CapacityConfig;
    use crate::pool::PoolConfig;
    use crate::testing::{A, B, C, reg};
    use berth_aws::{AsgError, GroupInstance};
    use std::sync::Mutex;

    /// An in-memory group that records calls.
    struct FakeAsg {
        group: Mutex<GroupInfo>,
        calls: Mutex<Vec<String>>,
        fail_terminate: bool,
    }

    impl FakeAsg {
        fn new(ids: &[&str], desired: u32, fail_terminate: bool) -> Self {
            FakeAsg {
                group: Mutex::new(GroupInfo {
                    name: "g".into(),
                    min: 1,
                    max: 4,
                    desired,
                    instances: ids
                        .iter()
                        .map(|id| GroupInstance {
                            instance_id: (*id).into(),
                            lifecycle_state: "InService".into(),
                            protected: false,
                        })
                        .collect(),
                }),
                calls: Mutex::new(Vec::new()),
                fail_terminate,
            }
        }
        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    fn failed(op: &'static str) -> AsgError {
        AsgError {
            op,
            target: String::new(),
            source: berth_aws::RetryError::Failed {
                error: "ValidationError".into(),
                attempts: 1,
            },
        }
    }

    impl AsgApi for FakeAsg {
        async fn describe_group(&self, _: &str) -> Result<Option<GroupInfo>, AsgError> {
            Ok(Some(self.group.lock().unwrap().clone()))
        }
        async fn set_desired(&self, _: &str, desired: u32) -> Result<(), AsgError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("desired {desired}"));
            self.group.lock().unwrap().desired = desired;
            Ok(())
        }
        async fn terminate_and_decrement(&self, id: &str) -> Result<(), AsgError> {
            self.calls.lock().unwrap().push(format!("terminate {id}"));
            if self.fail_terminate {
                return Err(failed("TerminateInstanceInAutoScalingGroup"));
            }
            let mut g = self.group.lock().unwrap();
            g.instances.retain(|i| i.instance_id != id);
            g.desired -= 1;
            Ok(())
        }
        async fn set_protection(
            &self,
            _: &str,
            ids: &[String],
            protected: bool,
        ) -> Result<(), AsgError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("protect {} {protected}", ids.join(",")));
            for i in &mut self.group.lock().unwrap().instances {
                if ids.contains(&i.instance_id) {
                    i.protected = protected;
                }
            }
            Ok(())
        }
    }

    fn group(desired: u32, max: u32, instances: &[(&str, &str, bool)]) -> GroupInfo {
        GroupInfo {
            name: "g".into(),
            min: 1,
            max,
            desired,
            instances: instances
                .iter()
                .map(|(id, state, protected)| GroupInstance {
                    instance_id: (*id).into(),
                    lifecycle_state: (*state).into(),
                    protected: *protected,
                })
                .collect(),
        }
    }

    #[test]
    fn the_plan_raises_within_max_never_lowers_and_protects_only_leased_instances() {
        let since = tokio::time::Instant::now();
        let presences = HashMap::from([
            ("i-leased".to_owned(), Presence::Leased),
            ("i-leased-done".to_owned(), Presence::Leased),
            ("i-idle".to_owned(), Presence::Connected),
            ("i-gone".to_owned(), Presence::Disconnected { since }),
        ]);
        let g = group(
            1,
            4,
            &[
                ("i-leased", "InService", false),
                ("i-leased-done", "InService", true),
                ("i-idle", "InService", true),
                ("i-gone", "InService", false),
                ("i-booting", "Pending", false),
                ("i-leaving", "Terminating", true),
            ],
        );
        let p = plan(&g, 9, &presences);
        assert_eq!(p.raise_to, Some(4), "capped at the group's max");
        assert_eq!(p.protect, ["i-leased"]);
        assert_eq!(p.unprotect, ["i-idle"]);
        // Desired below the group's: nothing lowered (scale-in terminates
        // chosen idle instances instead).
        assert_eq!(plan(&g, 0, &presences).raise_to, None);
        assert_eq!(plan(&group(3, 4, &[]), 3, &presences).raise_to, None);
        assert_eq!(plan(&group(3, 4, &[]), 4, &presences).raise_to, Some(4));
    }

    fn elastic_pool() -> Arc<Pool> {
        Arc::new(Pool::new(PoolConfig {
            capacity: Some(CapacityConfig {
                min: 1,
                max: 4,
                idle_target: 1,
                scale_in_after: Duration::from_secs(2),
            }),
            scale_in_by_group: true,
            ..PoolConfig::default()
        }))
    }

    type Rx = tokio::sync::mpsc::Receiver<Box<berth_proto::v1::CoordinatorMessage>>;

    struct World {
        pool: Arc<Pool>,
        api: Arc<FakeAsg>,
        metrics: Arc<Ec2Metrics>,
        act: GroupActuator<FakeAsg>,
        /// The agents' streams, kept open.
        _rxs: Vec<Rx>,
    }

    /// A pool of three registered idle hosts and an actuator on a fake group
    /// holding their instances.
    fn world(fail_terminate: bool) -> World {
        let pool = elastic_pool();
        let mut rxs = Vec::new();
        for (h, ip) in [(A, "10.0.0.1"), (B, "10.0.0.2"), (C, "10.0.0.3")] {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            pool.register(reg(h, ip), Default::default(), tx, Now::system())
                .unwrap();
            rxs.push(rx);
        }
        let api = Arc::new(FakeAsg::new(&[A, B, C], 3, fail_terminate));
        let metrics = Arc::new(Ec2Metrics::default());
        let act = GroupActuator::new(
            api.clone(),
            pool.clone(),
            GroupConfig {
                name: "g".into(),
                interval: Duration::from_secs(1),
            },
            metrics.clone(),
        );
        World {
            pool,
            api,
            metrics,
            act,
            _rxs: rxs,
        }
    }

    fn acquire(pool: &Pool, build: &str) -> crate::pool::Pending {
        pool.acquire(
            "t",
            build,
            berth_tls::KeyId([0; 32]),
            Duration::from_secs(600),
            Duration::from_secs(60),
            Now::system(),
        )
        .unwrap()
    }

    /// Ticks, waits past the scale-in delay, ticks again.
    async fn past_the_delay(pool: &Pool) {
        pool.tick(Now::system());
        tokio::time::advance(Duration::from_secs(3)).await;
        pool.tick(Now::system());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_excess_leaves_through_the_group_with_a_decrement_and_leased_hosts_are_protected()
    {
        let World {
            pool,
            api,
            metrics,
            mut act,
            _rxs,
        } = world(false);
        // A build takes a host: it is protected; desired (1 leased + 1
        // idle) is below the group's 3, which is not lowered.
        let _lease = acquire(&pool, "b1");
        let leased: Vec<String> = pool
            .presences()
            .into_iter()
            .filter(|(_, p)| *p == Presence::Leased)
            .map(|(h, _)| h)
            .collect();
        assert_eq!(leased.len(), 1);
        act.pass().await;
        assert_eq!(api.calls(), [format!("protect {} true", leased[0])]);

        // Idle above the target past the delay: one idle host is chosen,
        // held back (not offered, not yet drained) until the group
        // terminated its instance with a decrement.
        past_the_delay(&pool).await;
        let retiring = pool.retiring();
        assert_eq!(retiring.len(), 1, "{retiring:?}");
        let victim = retiring[0].0.clone();
        assert_ne!(victim, leased[0]);
        assert!(retiring[0].1.contains("scale-in"), "{}", retiring[0].1);
        let stats = pool.stats(Now::system());
        assert_eq!((stats.hosts_offerable, stats.hosts_draining), (1, 0));
        act.pass().await;
        assert_eq!(api.calls(), [format!("terminate {victim}")]);
        assert_eq!(api.group.lock().unwrap().desired, 2);
        assert!(pool.retiring().is_empty());
        assert_eq!(pool.stats(Now::system()).hosts_draining, 1);
        let snap = metrics.snapshot();
        assert_eq!((snap.asg_scale_ins, snap.asg_protected), (1, 1));
        // Nothing more to do: the leased host stays, protected.
        act.pass().await;
        assert_eq!(api.calls(), Vec::<String>::new());
        assert_eq!(pool.presences()[&leased[0]], Presence::Leased);

        // A burst: the group is raised to its max.
        let _burst: Vec<_> = (0..5).map(|n| acquire(&pool, &format!("q{n}"))).collect();
        act.pass().await;
        let calls = api.calls();
        assert_eq!(
            calls.last().map(String::as_str),
            Some("desired 4"),
            "{calls:?}"
        );
        assert_eq!(metrics.snapshot().asg_scale_outs, 1);
        pool.check_invariants().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_the_group_cannot_terminate_is_offered_again() {
        let World {
            pool,
            api,
            metrics,
            mut act,
            _rxs,
        } = world(true);
        past_the_delay(&pool).await;
        // 3 idle, target 1: two are chosen.
        assert_eq!(pool.retiring().len(), 2);
        assert_eq!(pool.stats(Now::system()).hosts_offerable, 1);
        act.pass().await;
        assert_eq!(api.calls().len(), 2);
        assert!(pool.retiring().is_empty());
        let stats = pool.stats(Now::system());
        assert_eq!(
            (stats.hosts_offerable, stats.hosts_draining),
            (3, 0),
            "offered again"
        );
        assert_eq!(metrics.snapshot().asg_errors, 2);
        assert_eq!(api.group.lock().unwrap().desired, 3);
        pool.check_invariants().unwrap();
        // Offered again means taken again: a build gets one of them.
        let _lease = acquire(&pool, "after");
        assert_eq!(pool.stats(Now::system()).hosts_offerable, 2);
    }
}
