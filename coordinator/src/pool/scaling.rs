//! Elastic capacity inside the pool: the inputs of the decision
//! (`crate::capacity`) read under the lock, the desired number of hosts
//! for PoolStats, and the scale-in the tick carries out: the idle hosts the
//! decision retires are drained (never a leased one), and their agents end
//! them. The actuator that starts hosts (`berth up`, an Auto Scaling group)
//! follows the desired number. With an Auto Scaling group
//! (`PoolConfig::scale_in_by_group`) a retired host is first held back
//! (`Pool::retiring`) until the actuator has terminated its instance with a
//! decrement (`Pool::retired`), so the group does not replace it.

use tracing::info;

use super::{Inner, Now, Pool, PoolConfig};
use crate::capacity::{Decision, Inputs};
use crate::host::Event as HostEvent;

impl Inner {
    /// What the pool holds now, as the decision sees it.
    pub(super) fn capacity_inputs(&self, cfg: &PoolConfig, now: Now) -> Inputs {
        let mut i = Inputs {
            queued: u32::try_from(self.queued_leases()).unwrap_or(u32::MAX),
            ..Inputs::default()
        };
        for (id, e) in &self.hosts {
            if !e.host.listed() || self.burned.contains_key(id) {
                continue;
            }
            if e.host.lease.is_some() {
                i.leased += 1;
            }
            if e.host.draining || self.retiring.contains_key(id) {
                continue;
            }
            i.hosts += 1;
            if self.offerable(cfg, id, now) {
                i.idle += 1;
            }
        }
        i
    }

    /// Decides, logs a changed decision with its inputs, and drains the idle
    /// hosts it retires (registered first, first to go).
    pub(super) fn scale(&mut self, cfg: &PoolConfig, now: Now) -> Option<Decision> {
        let inputs = self.capacity_inputs(cfg, now);
        let decision = self.scaler.as_mut()?.decide(&inputs, now.mono);
        if self.desired != Some(decision.desired) {
            let from = self.desired.unwrap_or(0);
            info!(
                desired = decision.desired,
                from,
                leased = inputs.leased,
                queued = inputs.queued,
                idle = inputs.idle,
                hosts = inputs.hosts,
                "desired capacity changed"
            );
            if decision.desired > from {
                self.metrics.scale_outs.inc();
            }
            self.desired = Some(decision.desired);
        }
        if decision.retire_idle > 0 {
            let mut idle: Vec<(std::time::SystemTime, String)> = self
                .hosts
                .iter()
                .filter(|(id, _)| self.offerable(cfg, id, now))
                .map(|(id, e)| (e.registered_at, id.clone()))
                .collect();
            idle.sort();
            for (_, hid) in idle.into_iter().take(decision.retire_idle as usize) {
                info!(
                    host_id = %hid,
                    desired = decision.desired,
                    leased = inputs.leased,
                    queued = inputs.queued,
                    idle = inputs.idle,
                    hosts = inputs.hosts,
                    "scale-in: retiring an idle host"
                );
                self.metrics.hosts_retired.inc();
                let reason = format!(
                    "scale-in: {} idle hosts for {} wanted ({} hosts, {} desired)",
                    inputs.idle,
                    self.scaler.as_ref().map_or(0, |s| s.config().idle_target),
                    inputs.hosts,
                    decision.desired
                );
                if cfg.scale_in_by_group {
                    // Its instance leaves through the group first, so the
                    // group does not replace it (`Pool::retired`).
                    self.retiring.insert(hid, reason);
                } else {
                    self.host_step(cfg, &hid, HostEvent::Drained { reason }, now);
                }
            }
        }
        Some(decision)
    }
}

impl Pool {
    /// The hosts the pool should have now (booting ones included), when
    /// the pool is elastic.
    pub fn desired_hosts(&self, now: Now) -> Option<u32> {
        self.capacity(now).map(|(_, desired)| desired)
    }

    /// What the decision sees now and the hosts it wants, when the pool is
    /// elastic.
    pub fn capacity(&self, now: Now) -> Option<(Inputs, u32)> {
        let g = self.lock();
        let cfg = self.cfg.capacity.as_ref()?;
        let inputs = g.capacity_inputs(&self.cfg, now);
        Some((inputs, crate::capacity::desired(cfg, &inputs)))
    }

    /// The idle hosts scale-in chose whose instance the actuator has yet
    /// to terminate (`PoolConfig::scale_in_by_group`), with the reason.
    pub fn retiring(&self) -> Vec<(String, String)> {
        self.lock()
            .retiring
            .iter()
            .map(|(h, r)| (h.clone(), r.clone()))
            .collect()
    }

    /// The group terminated `host_id`'s instance: the host is drained
    /// (never offered again; its agent ends).
    pub fn retired(&self, host_id: &str, now: Now) {
        let mut g = self.lock();
        if let Some(reason) = g.retiring.remove(host_id) {
            g.host_step(&self.cfg, host_id, HostEvent::Drained { reason }, now);
        }
    }

    /// The group could not terminate `host_id`'s instance: the host is
    /// offered again (a later decision may choose it again).
    pub fn keep(&self, host_id: &str, now: Now) {
        let mut g = self.lock();
        if g.retiring.remove(host_id).is_some() {
            g.mark_idle_if_offerable(&self.cfg, host_id, now);
            g.try_assign(&self.cfg, now);
        }
    }
}
