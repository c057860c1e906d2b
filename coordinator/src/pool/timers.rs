//! The pool's timers, run by [`Pool::tick`] on the server's interval: queue
//! waits that ran out, assignments an agent did not answer in time, lease
//! deadlines, and hosts disconnected past the lost-host grace. Each timer
//! that is due becomes an event for its state machine; nothing else happens
//! here, and the time is the caller's.

use tracing::warn;

use super::{Now, Pool};
use crate::host::Event as HostEvent;
use crate::lease::{LeaseEvent, LeaseState};

impl Pool {
    /// Runs every timer that is due at `now`.
    pub fn tick(&self, now: Now) {
        let mut g = self.lock();
        let cfg = &self.cfg;
        let at = now.mono;
        let mut due: Vec<(String, LeaseEvent, String)> = Vec::new();
        for l in g.leases.values() {
            match l.state {
                LeaseState::Queued if at >= l.queued_until => {
                    due.push((l.id.clone(), LeaseEvent::WaitExpired, String::new()));
                }
                LeaseState::Assigned
                    if l.assigned_at.is_some_and(|t| at >= t + cfg.assign_timeout) =>
                {
                    due.push((l.id.clone(), LeaseEvent::AssignTimedOut, String::new()));
                }
                LeaseState::Assigned | LeaseState::Active
                    if l.deadline.is_some_and(|d| at >= d) =>
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
                    let msg = g.no_host_message(&self.cfg, &lid, waited);
                    g.set_message(&lid, msg);
                }
                LeaseEvent::AssignTimedOut => {
                    if let Some(hid) = g.leases.get(&lid).and_then(|l| l.host.clone())
                        && g.hosts.contains_key(&hid)
                    {
                        warn!(host_id = %hid, lease_id = %lid, "agent did not accept the lease in time");
                        g.host_step(cfg, &hid, HostEvent::AssignmentFailed, now);
                    }
                }
                _ => g.set_message(&lid, msg),
            }
            g.apply(cfg, &lid, event, now);
        }
        let lost: Vec<String> = g
            .hosts
            .iter()
            .filter(|(_, e)| e.host.lost_at(cfg.lost_grace).is_some_and(|t| at >= t))
            .map(|(id, _)| id.clone())
            .collect();
        for hid in lost {
            warn!(host_id = %hid, "host gone past its grace period; forgetting it");
            g.host_step(cfg, &hid, HostEvent::LostGracePassed, now);
        }
        // Burned ids are remembered for a retention period, then let go
        // with their key (an EC2 id never comes back; a local one may be a
        // fresh host by then).
        let expired: Vec<String> = g
            .burned
            .iter()
            .filter(|(_, at)| {
                now.wall
                    .duration_since(**at)
                    .is_ok_and(|age| age >= cfg.burned_retention)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for hid in expired {
            g.burned.remove(&hid);
            if !g.hosts.contains_key(&hid) {
                g.host_keys.remove(&hid);
            }
            g.dirty_hosts.insert(hid);
        }
        g.try_assign(cfg, now);
        g.scale(cfg, now);
    }
}
