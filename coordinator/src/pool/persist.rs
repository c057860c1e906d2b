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
use tracing::{info, warn};

use super::commit::Committer;
use super::{HostEntry, Inner, Lease, Now, PoolConfig, Registration};
use crate::host;
use crate::lease::LeaseState;
use crate::store::{HostRecord, LeaseRecord, TimelineRecord};

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
        tenant: l.tenant.clone(),
        state: l.state.name().to_owned(),
        host_id: l.host.clone().unwrap_or_default(),
        host_addr: l.host_addr.clone(),
        docker_host: l.docker_host.clone(),
        ttl_ns: u64::try_from(l.ttl.as_nanos()).unwrap_or(u64::MAX),
        deadline_ns: l.deadline_at.map(to_ns),
        created_ns: to_ns(l.created_at),
        message: l.message.clone(),
        wipe: l.wipe.as_ref().map(LeaseRecord::encode_wipe),
        timeline: l
            .timeline
            .iter()
            .map(|e| TimelineRecord {
                step: e.step.name().to_owned(),
                at_ns: to_ns(e.at),
                detail: e.detail.clone(),
            })
            .collect(),
        key: l.key.map(|k| k.to_hex()).unwrap_or_default(),
        key_locked: l.key_locked,
    }
}

/// The record of host `id`, or `None` when the pool keeps nothing of it.
fn host_record(g: &Inner, id: &str) -> Option<HostRecord> {
    let key = g.host_keys.get(id);
    let burned = g.burned.get(id);
    (key.is_some() || burned.is_some()).then(|| HostRecord {
        id: id.to_owned(),
        key: key.map(|k| k.to_hex()).unwrap_or_default(),
        burned_ns: burned.copied().map(to_ns),
    })
}

/// Records that do not decode (a damaged file, a record written by a newer
/// coordinator): each is logged with its key and left where it is in the
/// store, not restored; the coordinator starts and serves the rest. The
/// pool never writes those keys (lease ids are fresh UUIDs), so the record
/// stays for a person (or a newer coordinator) to read. A host whose record
/// is unreadable may have served a lease: it counts as burned (never
/// offered) for as long as its record stays unreadable. A lease whose
/// record is unreadable is unknown to the pool; if its agent comes back
/// holding it, the agent's report is adopted as after any lost record.
pub(super) fn quarantine(
    g: &mut Inner,
    leases: &[crate::store::Unreadable],
    hosts: &[crate::store::Unreadable],
    now: Now,
) {
    for u in leases {
        warn!(lease_id = %u.id, error = %u.error, "stored lease record cannot be decoded; quarantined: left in the store, not restored");
    }
    for u in hosts {
        warn!(host_id = %u.id, error = %u.error, "stored host record cannot be decoded; quarantined: left in the store, the host id counts as burned");
        g.burned.insert(u.id.clone(), now.wall);
    }
    g.quarantined = leases.len() + hosts.len();
}

/// Rebuilds the hosts' keys and burned marks from their records.
pub(super) fn restore_hosts(g: &mut Inner, records: Vec<HostRecord>) {
    let n = records.len();
    for r in records {
        if let Some(k) = berth_tls::KeyId::parse_hex(&r.key) {
            g.host_keys.insert(r.id.clone(), k);
        }
        if let Some(ns) = r.burned_ns {
            g.burned.insert(r.id.clone(), from_ns(ns));
        }
    }
    info!(
        hosts = n,
        burned = g.burned.len(),
        "restored host records from the store"
    );
}

/// Hands the leases changed under the lock to the committer (a copy of each
/// record; the write happens on the committer's thread).
pub(super) fn flush(g: &mut Inner, committer: &Committer) {
    if g.dirty.is_empty() && g.removed.is_empty() && g.dirty_hosts.is_empty() {
        return;
    }
    let put: Vec<LeaseRecord> = g
        .dirty
        .iter()
        .filter_map(|id| g.leases.get(id))
        .map(record)
        .collect();
    g.dirty.clear();
    let hosts: Vec<(String, Option<HostRecord>)> = g
        .dirty_hosts
        .iter()
        .map(|id| (id.clone(), host_record(g, id)))
        .collect();
    g.dirty_hosts.clear();
    committer.enqueue(put, std::mem::take(&mut g.removed), hosts);
}

/// Rebuilds `g` from stored records, as of `at`.
pub(super) fn restore(g: &mut Inner, cfg: &PoolConfig, mut records: Vec<LeaseRecord>, at: Now) {
    let (now, wall) = (at.mono, at.wall);
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
            tenant: r.tenant.clone(),
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
            // Steps a newer coordinator wrote that this one does not know
            // are left out rather than failing the restore.
            timeline: r
                .timeline
                .iter()
                .filter_map(|t| {
                    Some(crate::timeline::Entry {
                        step: crate::timeline::Step::from_name(&t.step)?,
                        at: from_ns(t.at_ns),
                        detail: t.detail.clone(),
                    })
                })
                .collect(),
            watch: tx,
            key: berth_tls::KeyId::parse_hex(&r.key),
            key_locked: r.key_locked,
            // Its record was durable: an answer may have left with it.
            answered: true,
        };
        if state.is_ended() {
            ended += 1;
            g.ended.push_back(r.id.clone());
        } else {
            live += 1;
            if !r.build_id.is_empty() {
                g.live_by_build
                    .insert((r.tenant.clone(), r.build_id.clone()), r.id.clone());
            }
        }
        if state.holds_host()
            && let Some(hid) = host
        {
            g.hosts
                .entry(hid.clone())
                .or_insert_with(|| placeholder(&hid, &r, now, wall));
            if let Some(e) = g.hosts.get_mut(&hid) {
                e.host.lease = Some(r.id.clone());
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
fn placeholder(hid: &str, r: &LeaseRecord, now: Instant, wall: SystemTime) -> HostEntry {
    HostEntry {
        host: host::Host::restored(r.id.clone(), now),
        reg: Registration {
            host_addr: r.host_addr.clone(),
            docker_host: r.docker_host.clone(),
            lease_id: r.id.clone(),
            lease_deadline: r.deadline_ns.map(from_ns),
            ..Registration::placeholder(hid)
        },
        tx: None,
        registered_at: wall,
        last_heartbeat: wall,
        last_wipe: None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pool::Pool;
    use crate::store::{LeaseStore, MemStore};
    use berth_proto::v1 as pb;

    fn rec(now: SystemTime, id: &str, build: &str, state: LeaseState, host: &str) -> LeaseRecord {
        LeaseRecord {
            id: id.into(),
            build_id: build.into(),
            tenant: "t".into(),
            state: state.name().into(),
            host_id: host.into(),
            host_addr: "198.18.0.2".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            ttl_ns: 60_000_000_000,
            deadline_ns: (!host.is_empty()).then(|| to_ns(now + Duration::from_secs(60))),
            created_ns: to_ns(now),
            message: String::new(),
            wipe: None,
            timeline: vec![TimelineRecord {
                step: "requested".into(),
                at_ns: to_ns(now),
                detail: format!("build {build}"),
            }],
            key: String::new(),
            key_locked: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn restoring_keeps_live_leases_fails_queued_ones_and_rewrites_them() {
        restoring_keeps_live_leases(Arc::new(MemStore::default()));
    }

    /// The restore rules, on any store that starts empty and accepts
    /// commits (run with a paused clock).
    pub(crate) fn restoring_keeps_live_leases(store: Arc<dyn LeaseStore>) {
        let (q, a, r) = (
            "00000000-0000-4000-8000-000000000001",
            "00000000-0000-4000-8000-000000000002",
            "00000000-0000-4000-8000-000000000003",
        );
        let now = Now {
            mono: Instant::now(),
            wall: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        };
        store
            .commit(
                &[
                    rec(now.wall, q, "bq", LeaseState::Queued, ""),
                    rec(now.wall, a, "ba", LeaseState::Active, "h1"),
                    rec(now.wall, r, "br", LeaseState::Released, "h2"),
                ],
                &[],
                &[],
            )
            .unwrap();
        let pool = Pool::with_store(PoolConfig::default(), store.clone(), now).unwrap();
        pool.check_invariants().unwrap();
        assert_eq!(
            pool.get("t", q).unwrap().state,
            pb::LeaseState::Failed as i32
        );
        assert!(pool.get("t", q).unwrap().message.contains("restarted"));
        assert_eq!(
            pool.get("t", a).unwrap().state,
            pb::LeaseState::Active as i32
        );
        assert_eq!(
            pool.get("t", r).unwrap().state,
            pb::LeaseState::Released as i32
        );
        // The failed queued lease was written back as failed.
        let stored = store.load().unwrap().records;
        assert!(stored.iter().any(|x| x.id == q && x.state == "failed"));
        // The active lease's build is still idempotent; the queued one's is free.
        let retry = pool
            .acquire(
                "t",
                "ba",
                berth_tls::KeyId([0; 32]),
                Duration::from_secs(60),
                Duration::ZERO,
                now,
            )
            .unwrap();
        assert_eq!(retry.lease_id, a);
        let fresh = pool
            .acquire(
                "t",
                "bq",
                berth_tls::KeyId([0; 32]),
                Duration::from_secs(60),
                Duration::ZERO,
                now,
            )
            .unwrap();
        assert_ne!(fresh.lease_id, q);
        // Its host is a disconnected placeholder holding the lease; past the
        // grace it is forgotten and the lease is lost.
        let hosts = pool.list_hosts();
        assert_eq!(hosts.len(), 1);
        assert!(!hosts[0].connected && hosts[0].lease_id == a);
        assert_eq!(hosts[0].host_addr, "198.18.0.2");
        pool.tick(now + (PoolConfig::default().lost_grace - Duration::from_millis(1)));
        assert_eq!(
            pool.list_hosts().len(),
            1,
            "forgotten before the grace passed"
        );
        pool.tick(now + PoolConfig::default().lost_grace);
        assert_eq!(
            pool.get("t", a).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        pool.check_invariants().unwrap();
    }
}
