//! Matching queued leases with idle hosts: the oldest waiting build gets the
//! host that has been idle longest. Whether a host may be offered at all is
//! the host state machine's call (`host::Host::offerable`); this file keeps
//! the idle queue and hands hosts out. What an assignment then sends and
//! what happens when it fails is `effects.rs`'s.

use std::collections::{HashSet, VecDeque};

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
    /// Hands idle hosts to queued leases, oldest lease first.
    pub(super) fn try_assign(&mut self, cfg: &PoolConfig, now: Now) {
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
            self.queue.pop_front();
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

    /// Whether `hid` may be offered: its state machine says so, and it has
    /// never held a lease (a burned host is not offered whatever its agent
    /// says: after a lease nothing on it is trusted).
    fn offerable(&self, cfg: &PoolConfig, hid: &str, now: Now) -> bool {
        !self.burned.contains_key(hid)
            && self
                .hosts
                .get(hid)
                .is_some_and(|e| e.host.offerable(now.mono, cfg.silence_limit()))
    }
}
