//! What the orphan sweeper (`crate::sweeper`) asks of the pool: which hosts
//! hold a lease, are connected or have been gone since when; condemning an
//! instance (atomically with registration, so an agent cannot slip in
//! between the check and the refusal); and letting go of condemned
//! instances EC2 no longer lists. Deciding what is an orphan is the
//! sweeper's; what condemnation means for a host is the host state
//! machine's.

use std::collections::HashMap;

use tokio::time::Instant;

use super::{HostEntry, Now, Pool, Registration};
use crate::host::{self, Event as HostEvent};

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

impl Pool {
    /// Every host the pool knows, with whether it holds a lease or is connected.
    pub fn presences(&self) -> HashMap<String, Presence> {
        let g = self.lock();
        g.listed_hosts()
            .map(|e| {
                let p = match (&e.host.lease, e.host.disconnected_since()) {
                    (Some(_), _) => Presence::Leased,
                    (None, Some(since)) => Presence::Disconnected { since },
                    (None, None) => Presence::Connected,
                };
                (e.reg.host_id.clone(), p)
            })
            .collect()
    }

    /// Hosts that served a lease, with when it ended.
    pub fn burned_hosts(&self) -> HashMap<String, std::time::SystemTime> {
        self.lock().burned.clone()
    }

    /// Marks a host as being ended by the orphan sweeper, unless it holds a
    /// lease or is connected (checked under the same lock that registration
    /// takes, so a host cannot slip in between). Returns whether it is
    /// marked. `now` dates the record of an instance the pool never knew.
    pub fn condemn(&self, host_id: &str, now: Now) -> bool {
        let mut g = self.lock();
        if !g.hosts.contains_key(host_id) {
            g.hosts.insert(
                host_id.to_owned(),
                HostEntry {
                    host: host::Host::barred(),
                    reg: Registration::placeholder(host_id),
                    tx: None,
                    registered_at: now.wall,
                    last_heartbeat: now.wall,
                    last_wipe: None,
                },
            );
            return true;
        }
        g.host_transition(host_id, HostEvent::Condemn);
        g.hosts.get(host_id).is_some_and(|e| e.host.condemned())
    }

    /// Lets go of condemned instances that `keep` says are gone for good:
    /// their agents may register again (a host the pool still lists stays
    /// until its grace passes, as any disconnected host).
    pub fn retain_condemned(&self, keep: impl Fn(&str) -> bool, now: Now) {
        let mut g = self.lock();
        let gone: Vec<String> = g
            .hosts
            .iter()
            .filter(|(id, e)| e.host.condemned() && !keep(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            g.host_step(&self.cfg, &id, HostEvent::InstanceGone, now);
        }
    }
}
