//! The LeaseService calls as the pool serves them: acquire (start or join
//! the acquisition of a build), renew, release, get, and turning a settled
//! lease into Acquire's answer. Each call changes the pool under its lock
//! and returns; waiting for a host is the caller's (a `watch` of the lease's
//! state), matching leases with hosts is the scheduler's.

use std::time::Duration;

use berth_proto::from_system_time;
use berth_proto::v1 as pb;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Inner, Lease, Now, Pending, Pool};
use berth_tls::KeyId;

use crate::error::{Error, Unavailable};
use crate::lease::{LeaseEvent, LeaseState};
use crate::timeline::{self, Step};

impl Pool {
    /// Starts or joins the acquisition for `build_id`, whose certificates
    /// are to carry `key`. A retry (same tenant, same build) joins the live
    /// lease; with another key only while the lease's certificate has not
    /// been used yet (the key then moves, and the host's front follows).
    pub fn acquire(
        &self,
        tenant: &str,
        build_id: &str,
        client_key: KeyId,
        ttl: Duration,
        wait: Duration,
        now: Now,
    ) -> Result<Pending, Error> {
        let mut g = self.lock();
        let key = (tenant.to_owned(), build_id.to_owned());
        if let Some(lid) = g.live_by_build.get(&key).cloned()
            && let Some(l) = g.leases.get_mut(&lid)
        {
            if l.key != Some(client_key) {
                if l.key_locked {
                    return Err(Error::KeyPinned {
                        lease_id: lid,
                        why: "its certificate is in use, so a retried acquire may not bring another key",
                    });
                }
                l.key = Some(client_key);
                info!(lease_id = %lid, build_id, "a retried acquire moved the lease's key (not used yet)");
                let host = l.host.clone().filter(|_| l.state.holds_host());
                let state = l.watch.subscribe();
                g.dirty.insert(lid.clone());
                if let Some(hid) = host {
                    let msg = pb::coordinator_message::Msg::LeaseKey(pb::LeaseKey {
                        lease_id: lid.clone(),
                        client_key_sha256: client_key.0.to_vec(),
                    });
                    g.send(&hid, msg, now);
                }
                return Ok(Pending {
                    lease_id: lid,
                    state,
                });
            }
            return Ok(Pending {
                lease_id: lid,
                state: l.watch.subscribe(),
            });
        }
        if let Some(why) = g.store_health.failing() {
            // Nothing is created: there is no host to give while the
            // store cannot record that it was given.
            info!(tenant, build_id, %why, "lease refused: the store is failing");
            return Err(Error::Unavailable(Unavailable::StoreFailing(why)));
        }
        let id = uuid::Uuid::new_v4().hyphenated().to_string();
        let (tx, rx) = watch::channel(LeaseState::Queued);
        let mut lease = Lease {
            id: id.clone(),
            tenant: tenant.to_owned(),
            build_id: build_id.to_owned(),
            state: LeaseState::Queued,
            host: None,
            host_addr: String::new(),
            docker_host: String::new(),
            ttl,
            created: now.mono,
            created_at: now.wall,
            queued_until: now.mono + wait,
            assigned_at: None,
            deadline: None,
            deadline_at: None,
            message: String::new(),
            wipe: None,
            timeline: Vec::new(),
            watch: tx,
            key: Some(client_key),
            key_locked: false,
            answered: false,
        };
        timeline::record(
            &mut lease.timeline,
            &id,
            Step::Requested,
            now.wall,
            format!("build {build_id}"),
        );
        timeline::record(&mut lease.timeline, &id, Step::Queued, now.wall, "");
        g.leases.insert(id.clone(), lease);
        g.live_by_build.insert(key, id.clone());
        g.dirty.insert(id.clone());
        g.enqueue(&self.cfg, tenant, &id, false);
        info!(lease_id = %id, tenant, build_id, ttl = ?ttl, wait = ?wait, "lease requested");
        g.try_assign(&self.cfg, now);
        let still_queued = g.leases.get(&id).map(|l| l.state) == Some(LeaseState::Queued);
        if let Some(refusal) = still_queued
            .then(|| g.queue_limit(&self.cfg, tenant))
            .flatten()
        {
            // Beyond a limit: the request may not wait (RESOURCE_EXHAUSTED
            // with the limit named), though it would have taken a free host.
            info!(lease_id = %id, tenant, build_id, %refusal, "lease refused");
            g.metrics.limit_refusals.inc();
            g.set_message(&id, refusal);
            g.apply(&self.cfg, &id, LeaseEvent::WaitExpired, now);
        } else if wait.is_zero() && still_queued {
            let msg = g.no_host_message(&self.cfg, &id, wait);
            g.set_message(&id, msg);
            g.apply(&self.cfg, &id, LeaseEvent::WaitExpired, now);
        }
        Ok(Pending {
            lease_id: id,
            state: rx,
        })
    }

    /// Moves the lease's deadline. `client_key` is the key of the CSR a
    /// new certificate is to be issued for, if one is asked for: only the
    /// lease's own key gets one (a lease id is not a capability).
    pub fn renew(
        &self,
        tenant: &str,
        lease_id: &str,
        client_key: Option<KeyId>,
        ttl: Duration,
        now: Now,
    ) -> Result<pb::Lease, Error> {
        let mut g = self.lock();
        let max_lease = self.cfg.max_lease;
        let l = g
            .leases
            .get_mut(lease_id)
            .filter(|l| l.tenant == tenant)
            .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))?;
        if l.state.is_ended() {
            return Err(ended_error(l));
        }
        if let Some(k) = client_key
            && l.key.is_some_and(|pinned| pinned != k)
        {
            return Err(Error::KeyPinned {
                lease_id: lease_id.to_owned(),
                why: "renew certifies only the key the lease was acquired with",
            });
        }
        l.ttl = ttl;
        let lid = l.id.clone();
        if l.state.holds_host() {
            let latest = l.created + max_lease;
            let deadline = (now.mono + ttl).min(latest);
            let deadline_at = now.wall + deadline.saturating_duration_since(now.mono);
            l.deadline = Some(deadline);
            l.deadline_at = Some(deadline_at);
            let msg = pb::coordinator_message::Msg::RenewLease(pb::RenewLease {
                lease_id: l.id.clone(),
                deadline: Some(from_system_time(deadline_at)),
            });
            info!(lease_id, ttl = ?ttl, capped = deadline < now.mono + ttl, "lease renewed");
            timeline::record(
                &mut l.timeline,
                lease_id,
                Step::Renewed,
                now.wall,
                format!(
                    "deadline {}",
                    humantime::format_rfc3339_seconds(deadline_at)
                ),
            );
            if let Some(hid) = l.host.clone() {
                g.send(&hid, msg, now);
            }
        }
        g.dirty.insert(lid);
        g.lease_view(lease_id)
            .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))
    }

    pub fn release(&self, tenant: &str, lease_id: &str, now: Now) -> Result<pb::Lease, Error> {
        let mut g = self.lock();
        match g.leases.get(lease_id).filter(|l| l.tenant == tenant) {
            None => return Err(Error::LeaseNotFound(lease_id.to_owned())),
            // The build must learn that its host is gone, not that all went well.
            Some(l) if l.state == LeaseState::HostLost => return Err(ended_error(l)),
            Some(_) => {}
        }
        g.apply(&self.cfg, lease_id, LeaseEvent::Release, now);
        g.try_assign(&self.cfg, now);
        g.lease_view(lease_id)
            .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))
    }

    /// Reports a lease of `tenant`. Another tenant's lease is not found,
    /// exactly as if it did not exist, so lease ids of others cannot even be
    /// probed. A lease whose host was lost is an error (FAILED_PRECONDITION
    /// with the reason), so a build's next call learns its host is gone.
    /// While the lease waits, the answer says where it stands in its
    /// tenant's queue.
    pub fn get(&self, tenant: &str, lease_id: &str) -> Result<pb::Lease, Error> {
        get_in(&mut self.lock(), tenant, lease_id)
    }

    /// Reports `tenant`'s lease of `build_id` that has not ended (what a
    /// waiting acquire polls for its place in the queue), as [`Pool::get`].
    pub fn find(&self, tenant: &str, build_id: &str) -> Result<pb::Lease, Error> {
        let mut g = self.lock();
        let lid = g
            .live_by_build
            .get(&(tenant.to_owned(), build_id.to_owned()))
            .cloned()
            .ok_or_else(|| Error::BuildNotFound(build_id.to_owned()))?;
        get_in(&mut g, tenant, &lid)
    }

    /// Fails unless `key` is the key lease `lease_id` is pinned to now.
    pub fn check_key(&self, lease_id: &str, key: KeyId) -> Result<(), Error> {
        let g = self.lock();
        match g.leases.get(lease_id).and_then(|l| l.key) {
            Some(k) if k != key => Err(Error::KeyPinned {
                lease_id: lease_id.to_owned(),
                why: "a retried acquire with another key took the lease over before it was used",
            }),
            _ => Ok(()),
        }
    }

    /// Called once an Acquire answer's changes are durable, before it
    /// leaves: from now on a failed commit no longer ends the lease, and
    /// the lease no longer moves to another host (see
    /// [`crate::lease::answered`]). `Ok(false)` if the lease went back to
    /// the queue or to another host than `host_id` meanwhile (the answer
    /// must wait for its next host); an error if it ended (e.g. another
    /// call for the same build found the store failing and ended it).
    pub fn answering(&self, lease_id: &str, host_id: &str) -> Result<bool, Error> {
        let mut g = self.lock();
        let l = g
            .leases
            .get_mut(lease_id)
            .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))?;
        if l.state.is_ended() {
            return Err(ended_error(l));
        }
        if !l.state.holds_host() || l.host.as_deref() != Some(host_id) {
            return Ok(false);
        }
        l.answered = true;
        Ok(true)
    }

    /// An Acquire answer for `lease_id` could not be made durable (`why`).
    /// Unless an answer for the lease may have left before, the lease ends
    /// now: no host stays held by a lease whose certificate nobody got. Its
    /// host is wiped and not offered again, as after any lease; the build's
    /// retry with the same build id starts a new lease.
    pub fn undo_unanswered(&self, lease_id: &str, why: &str, now: Now) {
        let mut g = self.lock();
        let Some(l) = g.leases.get(lease_id) else {
            return;
        };
        if l.answered || !l.state.holds_host() {
            return;
        }
        warn!(lease_id, build_id = %l.build_id, %why, "acquire not answered: its lease could not be recorded; ending it");
        g.metrics.unanswered_leases_ended.inc();
        g.set_message(
            lease_id,
            format!("ended before its certificate was delivered: the lease store could not record it ({why}); retry the acquire"),
        );
        g.apply(&self.cfg, lease_id, LeaseEvent::Release, now);
    }

    /// Turns a settled lease state into the Acquire answer; `None` while
    /// the lease is (again) queued.
    pub fn outcome(&self, lease_id: &str) -> Result<Option<pb::Lease>, Error> {
        let g = self.lock();
        let l = g
            .leases
            .get(lease_id)
            .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))?;
        match l.state {
            LeaseState::Queued => Ok(None),
            LeaseState::Assigned | LeaseState::Active => g
                .lease_view(lease_id)
                .map(Some)
                .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned())),
            LeaseState::Failed => Err(Error::NoHost(l.message.clone())),
            _ => Err(ended_error(l)),
        }
    }
}

/// [`Pool::get`] under the lock.
fn get_in(g: &mut Inner, tenant: &str, lease_id: &str) -> Result<pb::Lease, Error> {
    let l = g
        .leases
        .get(lease_id)
        .filter(|l| l.tenant == tenant)
        .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))?;
    if l.state == LeaseState::HostLost {
        return Err(ended_error(l));
    }
    g.lease_view_placed(lease_id)
        .ok_or_else(|| Error::LeaseNotFound(lease_id.to_owned()))
}

fn ended_error(l: &Lease) -> Error {
    Error::LeaseEnded {
        lease_id: l.id.clone(),
        state: l.state.name(),
        detail: if l.message.is_empty() {
            String::new()
        } else {
            format!(": {}", l.message)
        },
    }
}
