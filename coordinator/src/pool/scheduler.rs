//! Matching queued leases with idle hosts: tenants take turns (`fair`), the
//! oldest waiting build of the tenant whose turn it is gets the host that
//! has been idle longest, and a tenant at its `max-active` is passed over. Whether a host may be offered at all is
//! the host state machine's call (`host::Host::offerable`); this file keeps
//! the idle queue and hands hosts out. What an assignment then sends and
//! what happens when it fails is `effects.rs`'s.

use std::collections::{HashMap, HashSet, VecDeque};

use tracing::debug;

use super::{Inner, Now, PoolConfig};
use crate::host::Event as HostEvent;
use crate::lease::{LeaseEvent, LeaseState};

/// Hosts that became offerable, oldest first. Entries are checked again
/// when popped, so stale ones (a host that stopped being offerable or was
/// forgotten) are harmless. A host id is queued at most once at a time
/// (`queued`), so repeated Ready reports cost nothing and taking an idle
/// host never has to scan for duplicates: both ends are O(1).
#[derive(Default)]
pub(super) struct IdleQueue {
    order: VecDeque<String>,
    queued: HashSet<String>,
}

impl IdleQueue {
    /// Queues `hid` unless it is already queued.
    fn push(&mut self, hid: &str) {
        if self.queued.insert(hid.to_owned()) {
            self.order.push_back(hid.to_owned());
        }
    }

    fn pop(&mut self) -> Option<String> {
        let hid = self.order.pop_front()?;
        self.queued.remove(&hid);
        Some(hid)
    }

    /// Entries waiting, stale ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether every host id is queued at most once (the invariant check).
    pub(super) fn each_once(&self) -> bool {
        self.order.len() == self.queued.len()
            && self.order.iter().all(|hid| self.queued.contains(hid))
    }
}

impl Inner {
    /// Hands idle hosts to queued leases: tenants in turn (see `fair`),
    /// oldest lease first within a tenant, passing over tenants that hold
    /// their `max-active` hosts.
    pub(super) fn try_assign(&mut self, cfg: &PoolConfig, now: Now) {
        if self.store_health.is_failing() {
            // No host is given while the store cannot record the gift; the
            // queue is served again once a commit succeeds (the next tick).
            return;
        }
        // Hosts held per tenant: counted only when some tenant has a cap.
        let mut held = cfg
            .tenants
            .values()
            .any(|l| l.max_active.is_some())
            .then(|| self.held_by_tenant());
        loop {
            let next = self
                .queue
                .next(|t| match (held.as_ref(), cfg.limits(t).max_active) {
                    (Some(held), Some(max)) => held.get(t).copied().unwrap_or(0) < max,
                    _ => true,
                });
            let Some((tenant, lid)) = next else {
                break;
            };
            let Some(l) = self.leases.get(&lid) else {
                self.queue.drop_front(&tenant);
                continue;
            };
            if l.state != LeaseState::Queued {
                self.queue.drop_front(&tenant);
                continue;
            }
            if l.watch.receiver_count() == 0 {
                // The caller gave up (disconnected) before a host was found.
                self.queue.drop_front(&tenant);
                self.set_message(&lid, "the client stopped waiting".into());
                self.apply(cfg, &lid, LeaseEvent::Abandoned, now);
                continue;
            }
            let Some(hid) = self.pop_idle(cfg, now) else {
                break;
            };
            self.host_step(cfg, &hid, HostEvent::LeaseAssigned(lid.clone()), now);
            let Some(e) = self
                .hosts
                .get(&hid)
                .filter(|e| e.host.lease.as_deref() == Some(lid.as_str()))
            else {
                // The host's machine would not take it; offerable says it
                // would, so this is not expected: try the next host.
                debug!(host_id = %hid, lease_id = %lid, "host did not take the lease");
                continue;
            };
            let (addr, docker_host) = (e.reg.host_addr.clone(), e.reg.docker_host.clone());
            self.queue.served(&tenant, cfg.limits(&tenant).weight);
            if let Some(held) = held.as_mut() {
                *held.entry(tenant).or_default() += 1;
            }
            let Some(l) = self.leases.get_mut(&lid) else {
                continue;
            };
            let deadline = (now.mono + l.ttl).min(l.created + cfg.max_lease);
            l.host = Some(hid.clone());
            l.host_addr = addr;
            l.docker_host = docker_host;
            l.assigned_at = Some(now.mono);
            l.deadline = Some(deadline);
            l.deadline_at = Some(now.wall + deadline.saturating_duration_since(now.mono));
            self.apply(cfg, &lid, LeaseEvent::HostChosen, now);
        }
    }

    /// Hosts each tenant holds (or is being given) now.
    pub(super) fn held_by_tenant(&self) -> HashMap<String, u32> {
        let mut held = HashMap::new();
        for l in self.leases.values().filter(|l| l.state.holds_host()) {
            *held.entry(l.tenant.clone()).or_default() += 1;
        }
        held
    }

    /// `tenant`'s builds waiting for a host.
    pub(super) fn queued_of(&self, tenant: &str) -> usize {
        self.queue
            .of(tenant)
            .filter(|id| self.leases.get(*id).map(|l| l.state) == Some(LeaseState::Queued))
            .count()
    }

    /// Queues lease `lid` of `tenant` last in its tenant's queue, or first
    /// (`front`: an assignment handed back keeps its place).
    pub(super) fn enqueue(&mut self, cfg: &PoolConfig, tenant: &str, lid: &str, front: bool) {
        let weight = cfg.limits(tenant).weight;
        if front {
            self.queue.push_front(tenant, lid, weight);
        } else {
            self.queue.push_back(tenant, lid, weight);
        }
    }

    /// Why a new request of `tenant` may not wait, if a limit says so: its
    /// own `max-queued`, or the pool's `--max-queued`. `waiting` counts the
    /// request itself.
    pub(super) fn queue_limit(&self, cfg: &PoolConfig, tenant: &str) -> Option<String> {
        if let Some(max) = cfg.limits(tenant).max_queued {
            let waiting = self.queued_of(tenant);
            if waiting > max as usize {
                return Some(format!(
                    "tenant {tenant} may have at most {max} builds waiting for a host (max-queued in the tenants file); {} are waiting already; retry later",
                    waiting - 1
                ));
            }
        }
        // The entry count bounds the waiting from above: exact only if needed.
        if self.queue.len() > cfg.max_queued {
            let waiting = self.queued_leases();
            if waiting > cfg.max_queued {
                return Some(format!(
                    "the pool's queue is full: at most {} builds may wait for a host (--max-queued); retry later",
                    cfg.max_queued
                ));
            }
        }
        None
    }

    /// Queues `hid` as idle if it may be offered now.
    pub(super) fn mark_idle_if_offerable(&mut self, cfg: &PoolConfig, hid: &str, now: Now) {
        if self.offerable(cfg, hid, now) {
            self.idle.push(hid);
        }
    }

    /// The host idle longest that may still be offered.
    fn pop_idle(&mut self, cfg: &PoolConfig, now: Now) -> Option<String> {
        while let Some(hid) = self.idle.pop() {
            if self.offerable(cfg, &hid, now) {
                return Some(hid);
            }
        }
        None
    }

    /// Whether `hid` may be offered: its state machine says so, it has
    /// never held a lease (a burned host is not offered whatever its agent
    /// says: after a lease nothing on it is trusted), and scale-in has not
    /// chosen it.
    pub(super) fn offerable(&self, cfg: &PoolConfig, hid: &str, now: Now) -> bool {
        !self.burned.contains_key(hid)
            && !self.retiring.contains_key(hid)
            && self
                .hosts
                .get(hid)
                .is_some_and(|e| e.host.offerable(now.mono, cfg.silence_limit()))
    }
}
