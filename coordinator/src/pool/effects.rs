//! Carrying out what the state machines decide. [`Inner::apply`] feeds an
//! event to a lease's machine (`crate::lease::next`) and does what it asks:
//! send the assignment or the end, give the host back, requeue, record the
//! step on the lease's timeline, wake the caller waiting on the lease.
//! [`Inner::host_step`] does the same for a host's machine
//! (`crate::host::next`): end leases of a host that is lost, tell drained
//! agents, forget hosts. The two meet only through events: a lease that lets
//! go of its host is a host event, a host that is lost is a lease event.
//! Nothing here decides a rule; deciding is the machines' job.

use berth_proto::from_system_time;
use berth_proto::v1 as pb;
use tracing::info;

use super::{Inner, Now, PoolConfig};
use crate::host::{self, Action as HostAction, Event as HostEvent, Lost};
use crate::lease::{self, LeaseAction, LeaseEvent, LeaseState};
use crate::timeline::{self, Step};

impl Inner {
    /// Feeds `event` to lease `lid` and carries out what the state machine
    /// asks for, including events that follow from failed sends.
    pub(super) fn apply(&mut self, cfg: &PoolConfig, lid: &str, event: LeaseEvent, now: Now) {
        let mut work = vec![(lid.to_owned(), event)];
        while let Some((lid, event)) = work.pop() {
            let Some(l) = self.leases.get_mut(&lid) else {
                continue;
            };
            let from = l.state;
            let event = if l.answered {
                let answered = lease::answered(from, event);
                if answered != event {
                    l.message = format!(
                        "its host failed before it accepted the lease ({}), after the build had the host's address; acquire again",
                        match event {
                            LeaseEvent::Rejected => "rejected",
                            LeaseEvent::AssignTimedOut => "no acceptance in time",
                            _ => "host lost",
                        }
                    );
                }
                answered
            } else {
                event
            };
            let (to, actions) = lease::next(from, event);
            l.state = to;
            let host = l.host.clone();
            if from == LeaseState::Queued && to != LeaseState::Queued {
                // Those queued behind it moved up (see `fair::FairQueue::place`).
                let tenant = l.tenant.clone();
                self.queue.touch(&tenant);
            }
            self.dirty.insert(lid.clone());
            if from != to {
                info!(
                    lease_id = %lid,
                    build_id = %l.build_id,
                    host_id = host.as_deref().unwrap_or(""),
                    from = from.name(),
                    to = to.name(),
                    event = ?event,
                    "lease transition"
                );
                self.timeline_step(&lid, from, to, event, now);
            }
            for action in actions {
                match action {
                    LeaseAction::SendAssign => {
                        let (Some(hid), Some(l)) = (host.as_deref(), self.leases.get(&lid)) else {
                            continue;
                        };
                        let msg = pb::coordinator_message::Msg::AssignLease(pb::AssignLease {
                            lease_id: lid.clone(),
                            build_id: l.build_id.clone(),
                            deadline: l.deadline_at.map(from_system_time),
                            client_key_sha256: l.key.map(|k| k.0.to_vec()).unwrap_or_default(),
                        });
                        if !self.send(hid, msg, now) {
                            work.push((lid.clone(), LeaseEvent::HostLost));
                        }
                    }
                    LeaseAction::SendEnd(reason) => {
                        if let Some(hid) = host.as_deref() {
                            self.send_end(hid, &lid, reason, now);
                        }
                    }
                    LeaseAction::Requeue => {
                        if let Some(hid) = host.as_deref() {
                            self.host_step(cfg, hid, HostEvent::LeaseRequeued(lid.clone()), now);
                        }
                        let mut tenant = None;
                        if let Some(l) = self.leases.get_mut(&lid) {
                            l.host = None;
                            l.host_addr.clear();
                            l.docker_host.clear();
                            l.assigned_at = None;
                            l.deadline = None;
                            l.deadline_at = None;
                            tenant = Some(l.tenant.clone());
                        }
                        if let Some(t) = tenant {
                            self.enqueue(cfg, &t, &lid, true);
                        }
                    }
                    LeaseAction::ReleaseHost => {
                        if let Some(hid) = host.as_deref() {
                            self.host_step(cfg, hid, HostEvent::LeaseEnded(lid.clone()), now);
                        }
                    }
                }
            }
            // A host that served a lease is never offered again (unless
            // the pool recycles hosts): whatever the lease holder did to it
            // stays on it. A lease handed back before the agent took it
            // (requeued) leaves no trace.
            if from != to
                && to.is_ended()
                && matches!(from, LeaseState::Active | LeaseState::Assigned)
                && !cfg.recycle
                && let Some(hid) = host.as_deref()
            {
                self.burn(hid, now);
            }
            if from != to
                && let Some(l) = self.leases.get(&lid)
            {
                l.watch.send_replace(to);
                if to.is_ended() {
                    let key = (l.tenant.clone(), l.build_id.clone());
                    if self.live_by_build.get(&key) == Some(&lid) {
                        self.live_by_build.remove(&key);
                    }
                    self.ended.push_back(lid.clone());
                    self.trim_history(cfg);
                }
            }
        }
    }

    /// Marks `hid` burned: its registration is refused from now on, across
    /// restarts (the mark is stored), until `burned_retention` has passed.
    pub(super) fn burn(&mut self, hid: &str, now: Now) {
        if !self.burned.contains_key(hid) {
            info!(
                host_id = hid,
                "host burned: it served a lease and is never offered again"
            );
            self.burned.insert(hid.to_owned(), now.wall);
            self.dirty_hosts.insert(hid.to_owned());
        }
    }

    /// Feeds `event` to host `hid`'s state machine and carries out what it
    /// asks for.
    pub(super) fn host_step(&mut self, cfg: &PoolConfig, hid: &str, event: HostEvent, now: Now) {
        let actions = self.host_transition(hid, event);
        self.carry_out(cfg, hid, actions, now);
    }

    /// The transition alone: the new state is stored (a host that is no
    /// longer connected loses its stream) and the actions are returned.
    pub(super) fn host_transition(&mut self, hid: &str, event: HostEvent) -> Vec<HostAction> {
        let Some(e) = self.hosts.get_mut(hid) else {
            return Vec::new();
        };
        let (next, actions) = host::next(e.host.clone(), event);
        e.host = next;
        if !e.host.connected() {
            e.tx = None;
        }
        actions
    }

    /// Does what host `hid`'s state machine asked for, in order.
    pub(super) fn carry_out(
        &mut self,
        cfg: &PoolConfig,
        hid: &str,
        actions: Vec<HostAction>,
        now: Now,
    ) {
        for action in actions {
            match action {
                // Registration answers a refusal itself, before any change.
                HostAction::Refuse => {}
                HostAction::SendDrain { reason } => {
                    self.send(
                        hid,
                        pb::coordinator_message::Msg::Drain(pb::Drain { reason }),
                        now,
                    );
                }
                HostAction::LoseLease { lease, why } => {
                    let message = match why {
                        Lost::Became { state, reason } => {
                            let what = if state == pb::HostState::Unhealthy {
                                "unhealthy"
                            } else {
                                "terminating"
                            };
                            let why = if reason.is_empty() {
                                String::new()
                            } else {
                                format!(" ({reason})")
                            };
                            format!("the host became {what}{why}")
                        }
                        Lost::WentAway => "the host went away".to_owned(),
                    };
                    self.set_message(&lease, message);
                    self.apply(cfg, &lease, LeaseEvent::HostLost, now);
                }
                HostAction::StreamLostUnder { lease } => {
                    if self.leases.get(&lease).map(|l| l.state) == Some(LeaseState::Assigned) {
                        // It cannot accept while gone; give the build another host.
                        self.apply(cfg, &lease, LeaseEvent::HostLost, now);
                    }
                }
                HostAction::RecordTerminated { reason } => self.host_terminated(hid, &reason, now),
                HostAction::Forget => {
                    self.hosts.remove(hid);
                    // A host that is gone is unbound from its key, unless it
                    // is burned (its id stays refused, key and all).
                    if !self.burned.contains_key(hid) && self.host_keys.remove(hid).is_some() {
                        self.dirty_hosts.insert(hid.to_owned());
                    }
                }
            }
        }
    }

    pub(super) fn set_message(&mut self, lid: &str, msg: String) {
        if let Some(l) = self.leases.get_mut(lid) {
            l.message = msg;
            self.dirty.insert(lid.to_owned());
        }
    }

    pub(super) fn trim_history(&mut self, cfg: &PoolConfig) {
        while self.ended.len() > cfg.history {
            if let Some(old) = self.ended.pop_front()
                && self.leases.get(&old).is_some_and(|l| l.state.is_ended())
            {
                self.leases.remove(&old);
                self.dirty.remove(&old);
                self.removed.push(old);
            }
        }
    }

    /// Records the step a transition of lease `lid` stands for, and what
    /// the metrics take from it.
    fn timeline_step(
        &mut self,
        lid: &str,
        from: LeaseState,
        to: LeaseState,
        event: LeaseEvent,
        now: Now,
    ) {
        let metrics = self.metrics.clone();
        let Some(l) = self.leases.get_mut(lid) else {
            return;
        };
        let at = now.wall;
        let (step, detail) = match (from, to) {
            (LeaseState::Assigned, LeaseState::Queued) => (Step::Requeued, format!("{event:?}")),
            (_, to) => {
                let Some(step) = Step::entering(to) else {
                    return;
                };
                let detail = match step {
                    Step::Assigned => l.host.clone().unwrap_or_default(),
                    _ if to.is_ended() => l.message.clone(),
                    _ => String::new(),
                };
                (step, detail)
            }
        };
        if step == Step::Assigned && timeline::first(&l.timeline, Step::Assigned).is_none() {
            metrics.observe_queue_wait(now.mono.saturating_duration_since(l.created));
        }
        if to.is_ended() {
            let active_for = timeline::first(&l.timeline, Step::Ready)
                .and_then(|ready| at.duration_since(ready).ok());
            metrics.lease_ended(to.name(), active_for);
        }
        timeline::record(&mut l.timeline, lid, step, at, detail);
    }

    /// The host `hid` is being destroyed: the step ends the timeline of the
    /// lease it served last (a host serves one lease, or more in recycle mode).
    fn host_terminated(&mut self, hid: &str, reason: &str, now: Now) {
        let last = self
            .leases
            .values_mut()
            .filter(|l| l.host.as_deref() == Some(hid) && l.state.is_ended())
            .filter(|l| timeline::first(&l.timeline, Step::HostTerminated).is_none())
            .max_by_key(|l| l.created_at);
        if let Some(l) = last {
            let lid = l.id.clone();
            timeline::record(
                &mut l.timeline,
                &lid,
                Step::HostTerminated,
                now.wall,
                reason,
            );
            self.dirty.insert(lid);
        }
    }
}
