//! The pool's invariants as one check, for property tests, the fuzz target
//! and the concurrency suite: a host is in at most one lease, host and lease
//! agree on who holds whom, a condemned host holds no lease and has no
//! stream, the pool keeps a stream exactly for the hosts whose state says
//! connected, idempotency keys point at live leases of their build, and the
//! idle queue holds each host at most once.

use std::collections::HashMap;

use super::{Inner, Pool};
use crate::lease::LeaseState;

impl Pool {
    /// Checks every invariant; the error names the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        check(&self.lock())
    }
}

fn check(g: &Inner) -> Result<(), String> {
    let mut holder: HashMap<&str, &str> = HashMap::new();
    for l in g.leases.values() {
        if l.state.holds_host() {
            let Some(hid) = l.host.as_deref() else {
                return Err(format!(
                    "lease {} is {} without a host",
                    l.id,
                    l.state.name()
                ));
            };
            if let Some(other) = holder.insert(hid, &l.id) {
                return Err(format!("host {hid} is in leases {other} and {}", l.id));
            }
            match g.hosts.get(hid) {
                Some(e) if e.host.lease.as_deref() == Some(l.id.as_str()) => {}
                Some(e) => {
                    return Err(format!(
                        "lease {} holds host {hid}, which says it holds {:?}",
                        l.id, e.host.lease
                    ));
                }
                None => return Err(format!("lease {} holds unknown host {hid}", l.id)),
            }
            if l.deadline.is_none() {
                return Err(format!("lease {} holds a host without a deadline", l.id));
            }
        }
        if l.state == LeaseState::Queued && l.host.is_some() {
            return Err(format!("queued lease {} names a host", l.id));
        }
    }
    for (hid, e) in &g.hosts {
        if e.host.condemned() && (e.host.lease.is_some() || e.host.connected()) {
            return Err(format!("condemned host {hid} is {:?}", e.host));
        }
        if e.tx.is_some() != e.host.connected() {
            return Err(format!(
                "host {hid} is {:?} but the pool {} its stream",
                e.host.state,
                if e.tx.is_some() { "keeps" } else { "has lost" }
            ));
        }
        if let Some(lid) = &e.host.lease {
            match g.leases.get(lid) {
                Some(l) if l.state.holds_host() && l.host.as_deref() == Some(hid.as_str()) => {}
                Some(l) => {
                    return Err(format!(
                        "host {hid} says it holds lease {lid}, which is {} on {:?}",
                        l.state.name(),
                        l.host
                    ));
                }
                None => return Err(format!("host {hid} holds unknown lease {lid}")),
            }
        }
    }
    for ((tenant, build), lid) in &g.live_by_build {
        match g.leases.get(lid) {
            Some(l) if !l.state.is_ended() && &l.build_id == build && &l.tenant == tenant => {}
            _ => {
                return Err(format!(
                    "build {build} of tenant {tenant:?} maps to {lid}, not a live lease of it"
                ));
            }
        }
    }
    if !g.idle.each_once() {
        return Err("the idle queue holds a host twice".into());
    }
    if !g.queue.consistent() {
        return Err("the per-tenant queues and their turn order disagree".into());
    }
    Ok(())
}
