//! The agent protocol as the pool speaks it: an agent registers (and its
//! report of its own state and lease is reconciled with the pool's), sends
//! messages on its stream, and goes away; operators drain hosts, which tells
//! their agents. What each message means for the host is the host state
//! machine's (`crate::host`), for a lease the lease state machine's; this
//! file turns messages into their events and sends what agents are told.
//! Checking a `Register` is `registration.rs`'s.

use std::time::SystemTime;

use berth_proto::v1 as pb;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{AgentTx, HostEntry, Inner, Lease, Now, Pool, PoolConfig, RegisteredTls, Registration};
use crate::error::{Error, Protocol, Refusal};
use crate::host::{self, Event as HostEvent};
use crate::lease::{self, LeaseEvent, LeaseState};
use crate::timeline::{self, Step};
use crate::validate;

impl Pool {
    /// Whether `reg` may register, without registering it: the service asks
    /// before the CA signs anything, so a refused agent gets no certificate.
    /// ([`Pool::register`] checks again, under the same lock as its change.)
    pub fn admits(&self, reg: &Registration) -> Result<(), Error> {
        match self.lock().refusal(reg) {
            Some(reason) => Err(Error::Refused {
                host_id: reg.host_id.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Records a (re-)registering agent and returns its connection id; the
    /// previous stream of the same host, if any, is dropped; `tls` goes to
    /// the agent in `Registered`, the first message on `tx`. Refused when
    /// the orphan sweeper is ending this host.
    pub fn register(
        &self,
        reg: Registration,
        tls: RegisteredTls,
        tx: AgentTx,
        now: Now,
    ) -> Result<u64, Error> {
        let mut g = self.lock();
        let host_id = reg.host_id.clone();
        if let Some(reason) = g.refusal(&reg) {
            return Err(Error::Refused { host_id, reason });
        }
        if let (None, Some(k)) = (g.host_keys.get(&host_id), reg.key) {
            g.host_keys.insert(host_id.clone(), k);
            g.dirty_hosts.insert(host_id.clone());
        }
        let conn_id = g.next_conn + 1;
        let said = reg.state;
        let event = HostEvent::Registered {
            conn: conn_id,
            at: now.mono,
            said,
        };
        // Known hosts go through their state machine (which may refuse);
        // a new one starts where a registration leads.
        let (known_lease, actions) = match g.hosts.get(&host_id) {
            Some(e) => {
                let (next, actions) = host::next(e.host.clone(), event);
                if actions.contains(&host::Action::Refuse) {
                    return Err(Error::Refused {
                        host_id,
                        reason: Refusal::Orphan,
                    });
                }
                let known_lease = e.host.lease.clone();
                if let Some(e) = g.hosts.get_mut(&host_id) {
                    e.host = next;
                }
                (known_lease, actions)
            }
            None => {
                g.hosts.insert(
                    host_id.clone(),
                    HostEntry {
                        host: host::Host::registered(conn_id, now.mono, said),
                        reg: Registration::placeholder(&host_id),
                        tx: None,
                        registered_at: now.wall,
                        last_heartbeat: now.wall,
                        last_wipe: None,
                    },
                );
                (None, Vec::new())
            }
        };
        g.metrics.agent_connects.inc();
        g.next_conn = conn_id;
        let agent_lease = (!reg.lease_id.is_empty()).then(|| reg.lease_id.clone());
        let agent_deadline = reg.lease_deadline;
        let agent_lease_key = reg.lease_key;
        let registered = registered_message(&self.cfg, tls);
        if let Some(e) = g.hosts.get_mut(&host_id) {
            e.reg = reg;
            e.tx = Some(tx);
            e.last_heartbeat = now.wall;
        }
        info!(host_id, conn_id, state = ?said, lease_id = ?agent_lease, "agent registered");
        g.send(&host_id, registered, now);

        // Reconcile: the agent is the truth about what its host is doing.
        if let Some(known) = known_lease
            && agent_lease.as_deref() != Some(known.as_str())
        {
            // The agent no longer has the lease we gave it: it never got the
            // assignment, or it ended and wiped it while we were apart.
            g.set_message(&known, "the host came back without this lease".into());
            g.apply(&self.cfg, &known, LeaseEvent::HostLost, now);
        }
        if let Some(lid) = agent_lease {
            g.adopt_lease(
                &self.cfg,
                &host_id,
                &lid,
                agent_deadline,
                agent_lease_key,
                now,
            );
        }
        // A drained host is told again, after its leases are settled.
        g.carry_out(&self.cfg, &host_id, actions, now);
        g.mark_idle_if_offerable(&self.cfg, &host_id, now);
        g.try_assign(&self.cfg, now);
        Ok(conn_id)
    }

    /// Handles one message from a registered agent's stream.
    pub fn agent_message(
        &self,
        host_id: &str,
        conn_id: u64,
        msg: pb::agent_message::Msg,
        now: Now,
    ) -> Result<(), Error> {
        use pb::agent_message::Msg;
        let mut g = self.lock();
        let cfg = &self.cfg;
        let Some(e) = g.hosts.get(host_id).filter(|e| e.host.listed()) else {
            return Err(Error::HostNotFound(host_id.to_owned()));
        };
        if e.host.conn() != Some(conn_id) {
            // A stream that a newer registration replaced: ignore it.
            return Ok(());
        }
        g.host_step(cfg, host_id, HostEvent::Heard { at: now.mono }, now);
        match msg {
            Msg::Register(_) => return Err(Protocol::RegisterTwice.into()),
            Msg::Heartbeat(hb) => {
                if let Some(e) = g.hosts.get_mut(host_id) {
                    e.last_heartbeat = now.wall;
                    if let Some(r) = e.reg.resources.as_mut() {
                        r.disk_free_bytes = hb.disk_free_bytes;
                    }
                }
            }
            Msg::StateChanged(sc) => {
                let state = pb::HostState::try_from(sc.state).map_err(|_| {
                    Error::invalid("state", format!("unknown host state {}", sc.state))
                })?;
                validate::text("reason", &sc.reason, 1024)?;
                info!(host_id, state = ?state, lease_id = %sc.lease_id, reason = %sc.reason, "host state");
                let event = HostEvent::Said {
                    state,
                    reason: sc.reason,
                };
                g.host_step(cfg, host_id, event, now);
                g.mark_idle_if_offerable(cfg, host_id, now);
                g.try_assign(cfg, now);
            }
            Msg::LeaseAccepted(a) => {
                let lid = validate::lease_id(&a.lease_id)?;
                match g
                    .leases
                    .get(&lid)
                    .map(|l| l.host.as_deref() == Some(host_id))
                {
                    Some(true) => g.apply(cfg, &lid, LeaseEvent::Accepted, now),
                    // Accepting a lease we did not give this host: make it let go.
                    _ => g.send_end(host_id, &lid, pb::EndReason::HostLost, now),
                }
            }
            Msg::LeaseInUse(u) => {
                let lid = validate::lease_id(&u.lease_id)?;
                let used = validate::optional_key("client_key_sha256", &u.client_key_sha256)?;
                if let Some(l) = g
                    .leases
                    .get_mut(&lid)
                    .filter(|l| l.host.as_deref() == Some(host_id))
                    && !l.key_locked
                {
                    // From now on no retried acquire may move the key.
                    l.key_locked = true;
                    if let Some(used) = used
                        && l.key != Some(used)
                    {
                        // A retried acquire moved the key while this report
                        // was on its way; the front had fixed the key of the
                        // first connection and refused the move. The pin
                        // follows the front: the retry's certificate never
                        // opens the host, so it may not renew either.
                        warn!(host_id, lease_id = %lid, key = %used, "the lease's key moved while its first use was being reported; it stays at the key in use");
                        l.key = Some(used);
                    }
                    g.dirty.insert(lid.clone());
                    info!(host_id, lease_id = %lid, "lease certificate in use; its key is fixed");
                }
            }
            Msg::LeaseRejected(r) => {
                let lid = validate::lease_id(&r.lease_id)?;
                validate::text("reason", &r.reason, 1024)?;
                if g.leases.get(&lid).and_then(|l| l.host.as_deref()) == Some(host_id) {
                    warn!(host_id, lease_id = %lid, reason = %r.reason, "agent rejected lease");
                    g.host_step(cfg, host_id, HostEvent::AssignmentFailed, now);
                    g.apply(cfg, &lid, LeaseEvent::Rejected, now);
                    g.try_assign(cfg, now);
                }
            }
            Msg::LeaseEnded(e) => {
                let lid = validate::lease_id(&e.lease_id)?;
                let reason =
                    pb::EndReason::try_from(e.reason).unwrap_or(pb::EndReason::Unspecified);
                if g.leases.get(&lid).and_then(|l| l.host.as_deref()) == Some(host_id) {
                    g.apply(cfg, &lid, LeaseEvent::EndedByAgent(reason), now);
                }
            }
            Msg::InterruptionNotice(n) => {
                validate::text("kind", &n.kind, 64)?;
                validate::text("action", &n.action, 64)?;
                let when = n
                    .time
                    .as_ref()
                    .and_then(berth_proto::to_system_time)
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                    .unwrap_or_else(|| "an unannounced time".into());
                let what = if n.action.is_empty() {
                    n.kind.clone()
                } else {
                    format!("{} ({})", n.kind, n.action)
                };
                let detail = format!("{what} at {when}");
                warn!(host_id, kind = %n.kind, action = %n.action, time = %when, "interruption notice: the host is never offered again");
                g.metrics.interruption_notices.inc();
                // Never offered again; an idle host is ended (its agent
                // drains itself too), a leased one serves on.
                let reason = format!("interruption notice: {detail}");
                g.host_step(cfg, host_id, HostEvent::Drained { reason }, now);
                // The build on it learns of it: a step on its lease.
                if let Some(lid) = g.hosts.get(host_id).and_then(|e| e.host.lease.clone())
                    && let Some(l) = g.leases.get_mut(&lid)
                {
                    timeline::record(
                        &mut l.timeline,
                        &lid,
                        Step::InterruptionNotice,
                        now.wall,
                        detail,
                    );
                    g.dirty.insert(lid);
                }
            }
            Msg::WipeReport(w) => {
                validate::text("error", &w.error, 4096)?;
                info!(
                    host_id,
                    lease_id = %w.lease_id,
                    verified = w.verified,
                    containers = w.containers_removed,
                    images = w.images_removed,
                    volumes = w.volumes_removed,
                    networks = w.networks_removed,
                    duration_ms = w.duration_ms,
                    error = %w.error,
                    "wipe report"
                );
                g.metrics.wipe(w.verified);
                if let Some(l) = g.leases.get_mut(&w.lease_id)
                    && l.host.as_deref() == Some(host_id)
                {
                    let detail = format!(
                        "{} in {} ms",
                        if w.verified {
                            "verified"
                        } else {
                            "NOT verified"
                        },
                        w.duration_ms
                    );
                    timeline::record(&mut l.timeline, &w.lease_id, Step::Wiped, now.wall, detail);
                    l.wipe = Some(w.clone());
                    let lid = l.id.clone();
                    g.dirty.insert(lid);
                }
                if let Some(e) = g.hosts.get_mut(host_id) {
                    e.last_wipe = Some(w);
                }
            }
        }
        Ok(())
    }

    /// Hands the agent on stream `conn_id` a fresh server certificate (a
    /// `Registered` on the live stream; the agent's front takes it without
    /// reconnecting). False when that stream is no longer the host's.
    pub fn renew_host_cert(
        &self,
        host_id: &str,
        conn_id: u64,
        tls: RegisteredTls,
        now: Now,
    ) -> bool {
        let mut g = self.lock();
        let Some(e) = g.hosts.get_mut(host_id) else {
            return false;
        };
        if e.host.conn() != Some(conn_id) {
            return false;
        }
        let msg = registered_message(&self.cfg, tls);
        info!(host_id, conn_id, "agent's server certificate re-issued");
        g.send(host_id, msg, now);
        true
    }

    /// The agent's stream `conn_id` ended.
    pub fn disconnect(&self, host_id: &str, conn_id: u64, now: Now) {
        let mut g = self.lock();
        let Some(e) = g.hosts.get(host_id) else {
            return;
        };
        if e.host.conn() != Some(conn_id) {
            return;
        }
        let terminating = e.host.agent() == Some(host::Agent::Terminating);
        g.metrics.agent_disconnects.inc();
        info!(host_id, conn_id, terminating, "agent disconnected");
        let event = HostEvent::StreamEnded {
            conn: conn_id,
            at: now.mono,
        };
        g.host_step(&self.cfg, host_id, event, now);
        g.try_assign(&self.cfg, now);
    }

    /// Drains a host: it is never offered again and its agent is told to
    /// finish what it is doing and go.
    pub fn drain(&self, host_id: &str, reason: &str, now: Now) -> Result<pb::Host, Error> {
        let mut g = self.lock();
        if !g.hosts.get(host_id).is_some_and(|e| e.host.listed()) {
            return Err(Error::HostNotFound(host_id.to_owned()));
        }
        info!(host_id, reason, "host draining");
        let event = HostEvent::Drained {
            reason: reason.to_owned(),
        };
        g.host_step(&self.cfg, host_id, event, now);
        g.hosts
            .get(host_id)
            .map(super::views::host_view)
            .ok_or_else(|| Error::HostNotFound(host_id.to_owned()))
    }
}

impl Inner {
    /// Sends to a host's agent; on a full or closed channel the host counts
    /// as disconnected. Returns whether the message was queued.
    pub(super) fn send(&mut self, hid: &str, msg: pb::coordinator_message::Msg, now: Now) -> bool {
        let Some(e) = self.hosts.get(hid) else {
            return false;
        };
        let Some(tx) = e.tx.as_ref().filter(|_| e.host.connected()) else {
            return false;
        };
        let out = pb::CoordinatorMessage { msg: Some(msg) };
        match tx.try_send(Box::new(out)) {
            Ok(()) => true,
            Err(err) => {
                warn!(host_id = hid, error = %err, "agent stream not accepting messages; dropping it");
                self.host_transition(hid, HostEvent::SendFailed { at: now.mono });
                false
            }
        }
    }

    pub(super) fn send_end(&mut self, hid: &str, lid: &str, reason: pb::EndReason, now: Now) {
        self.send(
            hid,
            pb::coordinator_message::Msg::EndLease(pb::EndLease {
                lease_id: lid.to_owned(),
                reason: reason as i32,
            }),
            now,
        );
    }

    /// Takes note of a lease an agent says it holds.
    fn adopt_lease(
        &mut self,
        cfg: &PoolConfig,
        hid: &str,
        lid: &str,
        deadline_at: Option<SystemTime>,
        key: Option<berth_tls::KeyId>,
        now: Now,
    ) {
        match self.leases.get(lid) {
            Some(l) if l.host.as_deref() == Some(hid) => {
                if l.state.holds_host() {
                    self.host_step(cfg, hid, HostEvent::LeaseAdopted(lid.to_owned()), now);
                }
                let Some(l) = self.leases.get(lid) else {
                    return;
                };
                if l.state == LeaseState::Assigned {
                    self.apply(cfg, lid, LeaseEvent::Accepted, now);
                } else if l.state.is_ended() {
                    let reason = lease::end_reason(l.state);
                    self.send_end(hid, lid, reason, now);
                }
                // Active: nothing to do, the host carries on.
            }
            Some(_) => {
                // The lease belongs elsewhere (or was requeued): let go.
                self.send_end(hid, lid, pb::EndReason::HostLost, now);
            }
            None => {
                // A lease from before this coordinator started: the agent is
                // the truth, so keep it until its deadline, if the host can
                // take it (it holds no other).
                self.host_step(cfg, hid, HostEvent::LeaseAdopted(lid.to_owned()), now);
                let Some(e) = self
                    .hosts
                    .get(hid)
                    .filter(|e| e.host.lease.as_deref() == Some(lid))
                else {
                    self.send_end(hid, lid, pb::EndReason::HostLost, now);
                    return;
                };
                let remaining = deadline_at
                    .and_then(|d| d.duration_since(now.wall).ok())
                    .unwrap_or_default();
                let (tx, _) = watch::channel(LeaseState::Active);
                let lease = Lease {
                    id: lid.to_owned(),
                    tenant: String::new(),
                    build_id: String::new(),
                    state: LeaseState::Active,
                    host: Some(hid.to_owned()),
                    host_addr: e.reg.host_addr.clone(),
                    docker_host: e.reg.docker_host.clone(),
                    ttl: remaining,
                    created: now.mono,
                    created_at: now.wall,
                    queued_until: now.mono,
                    assigned_at: Some(now.mono),
                    deadline: Some(now.mono + remaining),
                    deadline_at: Some(now.wall + remaining),
                    message: "adopted from the host after a coordinator restart".into(),
                    wipe: None,
                    timeline: Vec::new(),
                    watch: tx,
                    key,
                    // The agent knows whether it was used; the coordinator
                    // does not, so no retry may move it.
                    key_locked: true,
                    // It may have been answered before the restart.
                    answered: true,
                };
                self.leases.insert(lid.to_owned(), lease);
                self.dirty.insert(lid.to_owned());
                info!(
                    host_id = hid,
                    lease_id = lid,
                    "adopted lease reported by agent"
                );
            }
        }
    }
}

/// What tells an agent it is registered: the heartbeat interval and its
/// TLS material (sent again, mid-stream, when its certificate is renewed).
fn registered_message(cfg: &PoolConfig, tls: RegisteredTls) -> pb::coordinator_message::Msg {
    let hb = cfg.heartbeat_interval;
    pb::coordinator_message::Msg::Registered(pb::Registered {
        heartbeat_interval_ms: u32::try_from(hb.as_millis()).unwrap_or(u32::MAX),
        server_cert_pem: tls.server_cert_pem,
        ca_pem: tls.ca_pem,
    })
}

impl Inner {
    /// Why the pool refuses `reg`, if it does: a used host never serves
    /// again, whatever its agent says (it may still register while it says
    /// it is wiping or terminating, to report how its lease's wipe went; it
    /// is never offered, `Inner::offerable`); a host id is bound to the key
    /// it first registered with, and a registration must prove it holds
    /// that key (its CSR's signature).
    fn refusal(&self, reg: &Registration) -> Option<Refusal> {
        let host_id = &reg.host_id;
        let ending = matches!(
            reg.state,
            pb::HostState::Wiping | pb::HostState::Terminating
        );
        if self.burned.contains_key(host_id) && !ending {
            warn!(host_id, "registration refused: the host has held a lease");
            return Some(Refusal::Burned);
        }
        match (self.host_keys.get(host_id), reg.key) {
            (Some(pinned), Some(k)) if *pinned == k => None,
            (Some(_), _) => {
                warn!(
                    host_id,
                    "registration refused: the host id is bound to the key it first registered with, and this one is another"
                );
                Some(Refusal::KeyMismatch)
            }
            (None, _) => None,
        }
    }
}
