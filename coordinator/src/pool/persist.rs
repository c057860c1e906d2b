//! The pool's side of persistence: turning leases into store records
//! (written through whenever the pool's lock is released) and rebuilding the
//! pool from the records at start.
//!
//! Restoring follows one rule: the agents are the truth about their hosts,
//! the store is the truth about leases. A lease that held a host gets a
//! placeholder for that host, disconnected since the restart: when the agent
//! re-registers, the usual reconciliation runs (the agent's report wins); when
//! it does not come back within the lost-host grace, the lease ends as
//! host-lost. A lease that was still queued cannot be waited for any more
//! (its caller's call died with the old process), so it ends as failed and a
//! retry of Acquire with the same build id starts a new one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{Host, Inner, Lease, PoolConfig, Registration};
use crate::lease::LeaseState;
use crate::store::{LeaseRecord, LeaseStore};
use berth_proto::v1 as pb;

// Nanoseconds, so a restored deadline is exactly the one the agent holds.
fn to_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_ns(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// The lease state a record names; unknown names (a newer coordinator's
/// file) count as failed rather than stopping the coordinator.
pub(crate) fn state_from_name(name: &str) -> Option<LeaseState> {
    Some(match name {
        "queued" => LeaseState::Queued,
        "assigned" => LeaseState::Assigned,
        "active" => LeaseState::Active,
        "released" => LeaseState::Released,
        "expired" => LeaseState::Expired,
        "host-lost" => LeaseState::HostLost,
        "failed" => LeaseState::Failed,
        _ => return None,
    })
}

fn record(l: &Lease) -> LeaseRecord {
    LeaseRecord {
        id: l.id.clone(),
        build_id: l.build_id.clone(),
        tenant: String::new(),
        state: l.state.name().to_owned(),
        host_id: l.host.clone().unwrap_or_default(),
        host_addr: l.host_addr.clone(),
        docker_host: l.docker_host.clone(),
        ttl_ns: u64::try_from(l.ttl.as_nanos()).unwrap_or(u64::MAX),
        deadline_ns: l.deadline_at.map(to_ns),
        created_ns: to_ns(l.created_at),
        message: l.message.clone(),
        wipe: l.wipe.as_ref().map(LeaseRecord::encode_wipe),
    }
}

/// Writes the leases changed under the lock. A failed write is logged and
/// kept dirty for the next flush: the pool keeps serving from memory.
pub(super) fn flush(g: &mut Inner, store: &dyn LeaseStore) {
    if g.dirty.is_empty() && g.removed.is_empty() {
        return;
    }
    let put: Vec<LeaseRecord> = g
        .dirty
        .iter()
        .filter_map(|id| g.leases.get(id))
        .map(record)
        .collect();
    match store.commit(&put, &g.removed) {
        Ok(()) => {
            g.dirty.clear();
            g.removed.clear();
        }
        Err(e) => {
            error!(error = %e, leases = put.len(), "writing leases to the store failed; will retry")
        }
    }
}

/// Rebuilds `g` from stored records. `now`/`wall` are the monotonic and wall
/// clocks at the same moment.
pub(super) fn restore(
    g: &mut Inner,
    cfg: &PoolConfig,
    mut records: Vec<LeaseRecord>,
    now: Instant,
    wall: SystemTime,
) {
    records.sort_by_key(|r| r.created_ns);
    let (mut live, mut ended) = (0usize, 0usize);
    for r in records {
        let mut state = state_from_name(&r.state).unwrap_or_else(|| {
            warn!(lease_id = %r.id, state = %r.state, "stored lease in an unknown state; counting it as failed");
            LeaseState::Failed
        });
        let mut message = r.message.clone();
        if state == LeaseState::Queued {
            state = LeaseState::Failed;
            message = "the coordinator restarted while this lease was queued; retry the acquire"
                .to_owned();
            g.dirty.insert(r.id.clone());
        }
        let created_at = from_ns(r.created_ns);
        let age = wall.duration_since(created_at).unwrap_or_default();
        let created = now.checked_sub(age).unwrap_or(now);
        let deadline_at = r.deadline_ns.map(from_ns);
        let deadline = deadline_at.map(|d| now + d.duration_since(wall).unwrap_or(Duration::ZERO));
        let host = (!r.host_id.is_empty()).then(|| r.host_id.clone());
        let (tx, _) = watch::channel(state);
        let lease = Lease {
            id: r.id.clone(),
            build_id: r.build_id.clone(),
            state,
            host: host.clone(),
            host_addr: r.host_addr.clone(),
            docker_host: r.docker_host.clone(),
            ttl: Duration::from_nanos(r.ttl_ns),
            created,
            created_at,
            queued_until: now,
            // An agent that does not confirm an assignment made before the
            // restart within the usual time loses it.
            assigned_at: (state == LeaseState::Assigned).then_some(now),
            deadline,
            deadline_at,
            message,
            wipe: r.wipe_report(),
            watch: tx,
        };
        if state.is_ended() {
            ended += 1;
            g.ended.push_back(r.id.clone());
        } else {
            live += 1;
            if !r.build_id.is_empty() {
                g.live_by_build.insert(r.build_id.clone(), r.id.clone());
            }
        }
        if state.holds_host()
            && let Some(hid) = host
        {
            g.hosts
                .entry(hid.clone())
                .or_insert_with(|| placeholder(&hid, &r, now, wall));
            if let Some(h) = g.hosts.get_mut(&hid) {
                h.lease = Some(r.id.clone());
            }
        }
        g.leases.insert(r.id.clone(), lease);
    }
    g.trim_history(cfg);
    info!(
        live,
        ended,
        hosts = g.hosts.len(),
        "restored leases from the store"
    );
}

/// A host known only from a lease record: not connected, not offerable, and
/// forgotten (its lease lost) unless its agent registers within the grace.
fn placeholder(hid: &str, r: &LeaseRecord, now: Instant, wall: SystemTime) -> Host {
    Host {
        reg: Registration {
            host_id: hid.to_owned(),
            host_addr: r.host_addr.clone(),
            docker_host: r.docker_host.clone(),
            provider: String::new(),
            resources: None,
            agent_version: String::new(),
            docker_version: String::new(),
            state: pb::HostState::Unspecified,
            lease_id: r.id.clone(),
            lease_deadline: r.deadline_ns.map(from_ns),
        },
        reported: pb::HostState::Unspecified,
        lease: Some(r.id.clone()),
        conn: None,
        draining: false,
        registered_at: wall,
        last_heartbeat: wall,
        last_seen: now,
        disconnected_at: Some(now),
        last_wipe: None,
    }
}
