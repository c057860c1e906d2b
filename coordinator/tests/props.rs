//! Property tests: request validation on arbitrary input, the lease state
//! machine on random event sequences, and the whole pool driven by random
//! operations (several tenants, renewals, drains, callers that give up)
//! against simulated agents that behave like the real one, including agents
//! that reject assignments and wipes that fail. After every step the pool's
//! invariants hold (a host is in at most one lease, host and lease agree),
//! no agent is assigned a lease while it is not Ready, after it rejected one
//! (until it says Ready again) or after it was drained, and no tenant
//! reaches another tenant's lease.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

/// The tenants the simulated builds belong to.
const TENANTS: [&str; 3] = ["t0", "t1", "t2"];

use berth_coordinator::clock::Now;
use berth_coordinator::error::Error;
use berth_coordinator::lease::{self, LeaseAction, LeaseEvent, LeaseState};
use berth_coordinator::pool::{AgentTx, Pool, PoolConfig, Registration};
use berth_coordinator::validate;
use berth_proto::v1 as pb;
use pb::agent_message::Msg as In;
use pb::coordinator_message::Msg as Out;
use proptest::prelude::*;
use tokio::sync::mpsc;
use tokio::time::Instant;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ids_are_accepted_exactly_when_short_printable_ascii(s in any::<String>()) {
        let ok = !s.is_empty() && s.len() <= validate::MAX_ID_LEN && s.chars().all(|c| c.is_ascii_graphic());
        match validate::id("build_id", &s) {
            Ok(()) => prop_assert!(ok),
            Err(e) => {
                prop_assert!(!ok);
                prop_assert_eq!(e.code(), tonic::Code::InvalidArgument);
                // The message never echoes an unbounded input.
                prop_assert!(e.to_string().len() < 200, "{}", e);
            }
        }
    }

    #[test]
    fn huge_ids_get_a_short_error(n in 129usize..200_000, c in any::<char>()) {
        let s: String = std::iter::repeat_n(c, n).collect();
        let e = validate::id("build_id", &s).unwrap_err();
        prop_assert!(e.to_string().len() < 200);
        // A lease id error quotes at most 40 characters (escaped).
        let e = validate::lease_id(&s).unwrap_err();
        prop_assert!(e.to_string().len() < 600, "{}", e.to_string().len());
    }

    #[test]
    fn lease_ids_are_uuids(s in any::<String>(), u in any::<u128>()) {
        let valid = uuid::Uuid::from_u128(u).to_string();
        prop_assert_eq!(validate::lease_id(&valid).unwrap(), valid);
        prop_assert_eq!(validate::lease_id(&s).is_ok(), uuid::Uuid::try_parse(&s).is_ok());
    }

    #[test]
    fn durations_never_panic_and_respect_bounds(secs in any::<i64>(), nanos in any::<i32>(), zero_ok in any::<bool>()) {
        let max = Duration::from_secs(3600);
        let d = prost_types::Duration { seconds: secs, nanos };
        match validate::duration("ttl", Some(&d), None, zero_ok, max) {
            Ok(v) => {
                prop_assert!(v <= max);
                prop_assert!(zero_ok || !v.is_zero());
            }
            Err(e) => prop_assert_eq!(e.code(), tonic::Code::InvalidArgument),
        }
    }

    #[test]
    fn host_addresses_never_panic(s in any::<String>()) {
        let _ = validate::host_addr(&s);
        let _ = validate::docker_host(&s);
        let _ = validate::text("reason", &s, 64);
    }

    #[test]
    fn lease_event_sequences_stay_valid(events in proptest::collection::vec(lease_event(), 0..64)) {
        let mut state = LeaseState::Queued;
        let mut was_ended = false;
        for e in events {
            let (to, actions) = lease::next(state, e);
            // Ended is final.
            if was_ended {
                prop_assert_eq!(to, state);
            }
            // Only a queued lease is given a host, and only by HostChosen.
            if actions.contains(&LeaseAction::SendAssign) {
                prop_assert_eq!(state, LeaseState::Queued);
                prop_assert_eq!(e, LeaseEvent::HostChosen);
            }
            if to == LeaseState::Assigned {
                prop_assert!(state == LeaseState::Assigned || (state == LeaseState::Queued && e == LeaseEvent::HostChosen));
            }
            if to == LeaseState::Active {
                prop_assert!(state == LeaseState::Active || state == LeaseState::Assigned);
            }
            // A lease that lets go of its host says so.
            if state.holds_host() && !to.holds_host() {
                prop_assert!(
                    actions.contains(&LeaseAction::ReleaseHost) || actions.contains(&LeaseAction::Requeue),
                    "{:?} + {:?} -> {:?} forgot its host", state, e, to
                );
            }
            was_ended = to.is_ended();
            state = to;
        }
    }

    #[test]
    fn the_pool_under_random_operations_keeps_its_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        let mut sim = Sim::new();
        for op in ops {
            sim.step(op);
            if let Err(e) = sim.pool.check_invariants() {
                prop_assert!(false, "after {:?}: {}", op, e);
            }
            if let Some(v) = sim.violation.take() {
                prop_assert!(false, "after {:?}: {}", op, v);
            }
        }
    }

    #[test]
    fn waiters_are_served_first_come_first_served(n in 1usize..12) {
        let mut sim = Sim::new();
        let mut order = Vec::new();
        for i in 0..n {
            let p = sim.pool.acquire(TENANTS[0], &format!("w{i}"), berth_tls::KeyId([0; 32]), Duration::from_secs(600), Duration::from_secs(600), sim.now).unwrap();
            order.push(p.lease_id.clone());
            sim.pending.push(p);
        }
        let mut served = Vec::new();
        for k in 0..n {
            sim.step(Op::Join(k as u8));
            sim.step(Op::AgentStep(k as u8));
            prop_assert!(sim.violation.is_none(), "{:?}", sim.violation);
            if let Some(l) = sim.agents[&(k as u8)].lease.clone() {
                served.push(l);
            }
        }
        prop_assert_eq!(served, order);
    }
}

fn lease_event() -> impl Strategy<Value = LeaseEvent> {
    prop_oneof![
        Just(LeaseEvent::HostChosen),
        Just(LeaseEvent::Accepted),
        Just(LeaseEvent::Rejected),
        Just(LeaseEvent::AssignTimedOut),
        Just(LeaseEvent::Release),
        Just(LeaseEvent::DeadlinePassed),
        Just(LeaseEvent::HostLost),
        Just(LeaseEvent::WaitExpired),
        Just(LeaseEvent::Abandoned),
        (0i32..6).prop_map(|r| LeaseEvent::EndedByAgent(
            pb::EndReason::try_from(r).unwrap_or(pb::EndReason::Unspecified)
        )),
    ]
}

/// One thing that can happen to the pool.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Host k's agent connects (or reconnects) and registers.
    Join(u8),
    /// Host k's agent handles what the coordinator sent it.
    AgentStep(u8),
    /// Host k's stream breaks.
    Disconnect(u8),
    /// Host k's dockerd dies: it reports Unhealthy.
    Unhealthy(u8),
    /// Build `build` of tenant `tenant` asks for a host.
    Acquire { build: u8, wait: u8, tenant: u8 },
    /// The build of the n-th lease seen releases it.
    Release(u8),
    /// ... or renews it.
    Renew(u8),
    /// Another tenant (the second number picks which) releases, renews or
    /// gets the n-th lease: it must not find it.
    Trespass(u8, u8),
    /// An operator drains host k.
    Drain(u8),
    /// Time passes.
    Tick(u8),
    /// An acquire caller gives up waiting.
    Abandon(u8),
    /// Host k's agent starts (or stops) rejecting assignments it could take.
    Flaky(u8),
    /// Host k's next wipe cannot be verified: it reports so, becomes
    /// unhealthy and terminates, as the real agent does.
    BreakWipe(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let host = 0u8..4;
    prop_oneof![
        1 => host.clone().prop_map(Op::Join),
        4 => host.clone().prop_map(Op::AgentStep),
        1 => host.clone().prop_map(Op::Disconnect),
        1 => host.clone().prop_map(Op::Unhealthy),
        3 => (0u8..6, 0u8..3, 0u8..3).prop_map(|(build, wait, tenant)| Op::Acquire { build, wait, tenant }),
        1 => any::<u8>().prop_map(Op::Release),
        1 => any::<u8>().prop_map(Op::Renew),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(n, t)| Op::Trespass(n, t)),
        1 => host.clone().prop_map(Op::Drain),
        1 => (0u8..40).prop_map(Op::Tick),
        1 => any::<u8>().prop_map(Op::Abandon),
        1 => host.clone().prop_map(Op::Flaky),
        1 => host.clone().prop_map(Op::BreakWipe),
    ]
}

/// A simulated agent: it does what the real one does with each message.
struct Agent {
    conn: u64,
    rx: mpsc::Receiver<Box<pb::CoordinatorMessage>>,
    state: pb::HostState,
    lease: Option<String>,
    gone: bool,
    /// Messages that were already queued when the agent last left Ready:
    /// they were sent while it was Ready, so an assignment among them is a
    /// race the agent answers by rejecting, not a coordinator bug.
    in_flight: usize,
    /// Rejects assignments even while Ready (a flaky host).
    flaky: bool,
    /// Its next wipe fails.
    wipe_fails: bool,
    /// Set when it rejected an assignment and has not said Ready since:
    /// how many more messages were queued before the rejection. Once they
    /// are handled, an assignment means the pool offered a host that had
    /// not said Ready again.
    rejected: Option<usize>,
    /// The same for a drain: no assignment may follow one.
    drained: Option<usize>,
}

struct Sim {
    pool: Pool,
    now: Now,
    agents: HashMap<u8, Agent>,
    /// (tenant, lease id) of every lease acquired.
    leases: Vec<(usize, String)>,
    pending: Vec<berth_coordinator::pool::Pending>,
    violation: Option<String>,
    /// Per host slot, how many hosts it has had: a slot whose host went
    /// away joins with a fresh host, under a fresh id (as a replacement
    /// host is a new instance).
    generation: HashMap<u8, u32>,
    /// Host ids that served a lease: never to be assigned another.
    served: std::collections::HashSet<String>,
}

impl Sim {
    fn new() -> Self {
        Self {
            pool: Pool::new(PoolConfig::default()),
            now: Now {
                mono: Instant::now(),
                wall: std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            },
            agents: HashMap::new(),
            leases: Vec::new(),
            pending: Vec::new(),
            violation: None,
            generation: HashMap::new(),
            served: std::collections::HashSet::new(),
        }
    }

    fn host_id(&self, k: u8) -> String {
        format!("h{k}-{}", self.generation.get(&k).copied().unwrap_or(0))
    }

    fn violated(&mut self, what: String) {
        self.violation.get_or_insert(what);
    }

    fn register(&mut self, k: u8) {
        let (tx, rx): (AgentTx, _) = mpsc::channel(256);
        let (state, lease, flaky, wipe_fails) = match self.agents.get(&k) {
            Some(a) if !a.gone => (a.state, a.lease.clone(), a.flaky, a.wipe_fails),
            Some(_) => {
                // A fresh host in the slot of one that went away.
                *self.generation.entry(k).or_insert(0) += 1;
                (pb::HostState::Ready, None, false, false)
            }
            None => (pb::HostState::Ready, None, false, false),
        };
        let reg = Registration {
            host_id: self.host_id(k),
            host_addr: "198.18.0.2".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            provider: "sim".into(),
            resources: None,
            agent_version: String::new(),
            docker_version: String::new(),
            state,
            lease_id: lease.clone().unwrap_or_default(),
            lease_deadline: lease
                .as_ref()
                .map(|_| self.now.wall + Duration::from_secs(600)),
            key: Some(berth_tls::KeyId([k; 32])),
            lease_key: lease.as_ref().map(|_| berth_tls::KeyId([0; 32])),
        };
        let conn = match self.pool.register(reg, Default::default(), tx, self.now) {
            Ok(conn) => conn,
            // A host that held a lease (served it, or was assigned one that
            // ended) is refused when it comes back; the real agent then
            // ends its host.
            Err(Error::Refused {
                reason: berth_coordinator::error::Refusal::Burned,
                ..
            }) => {
                if let Some(a) = self.agents.get_mut(&k) {
                    a.gone = true;
                }
                return;
            }
            Err(e) => return self.violated(format!("h{k} could not register: {e}")),
        };
        // A host the pool still knows keeps its drain: nothing may be
        // assigned on the new stream either.
        let draining = self
            .pool
            .list_hosts()
            .iter()
            .any(|h| h.host_id == self.host_id(k) && h.draining);
        self.agents.insert(
            k,
            Agent {
                conn,
                rx,
                state,
                lease,
                gone: false,
                in_flight: 0,
                flaky,
                wipe_fails,
                rejected: None,
                drained: draining.then_some(0),
            },
        );
    }

    fn say(&mut self, k: u8, msg: In) {
        let Some(a) = self.agents.get(&k) else { return };
        if a.gone {
            return;
        }
        let _ = self
            .pool
            .agent_message(&self.host_id(k), a.conn, msg, self.now);
    }

    fn state(&mut self, k: u8, state: pb::HostState, lease: Option<String>) {
        if let Some(a) = self.agents.get_mut(&k) {
            if a.state == pb::HostState::Ready && state != pb::HostState::Ready {
                a.in_flight = a.rx.len();
            }
            if state == pb::HostState::Ready {
                a.rejected = None;
            }
            a.state = state;
            a.lease = lease.clone();
        }
        self.say(
            k,
            In::StateChanged(pb::StateChanged {
                state: state as i32,
                lease_id: lease.unwrap_or_default(),
                reason: String::new(),
            }),
        );
    }

    /// The agent's host goes: it says so and its stream ends.
    fn terminate(&mut self, k: u8) {
        self.state(k, pb::HostState::Terminating, None);
        if let Some(a) = self.agents.get_mut(&k) {
            a.gone = true;
            let conn = a.conn;
            self.pool.disconnect(&self.host_id(k), conn, self.now);
        }
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Join(k) => {
                if self
                    .agents
                    .get(&k)
                    .is_none_or(|a| a.gone || a.rx.is_closed())
                {
                    self.register(k);
                }
            }
            Op::AgentStep(k) => {
                let mut inbox = Vec::new();
                let mut rejected_before = false;
                if let Some(a) = self.agents.get_mut(&k) {
                    rejected_before = a.rejected.is_some();
                    while let Ok(m) = a.rx.try_recv() {
                        if let pb::CoordinatorMessage { msg: Some(m) } = *m {
                            inbox.push(m);
                        }
                    }
                }
                let n = inbox.len();
                for (i, m) in inbox.into_iter().enumerate() {
                    self.handle(k, m, n - i - 1);
                    if let Some(a) = self.agents.get_mut(&k) {
                        a.in_flight = a.in_flight.saturating_sub(1);
                        for g in [&mut a.rejected, &mut a.drained].into_iter().flatten() {
                            *g = g.saturating_sub(1);
                        }
                    }
                }
                // A host that rejected in an earlier step says Ready again
                // (what an agent does once whatever made it refuse is over).
                if rejected_before
                    && self
                        .agents
                        .get(&k)
                        .is_some_and(|a| !a.gone && a.state == pb::HostState::Ready)
                {
                    self.state(k, pb::HostState::Ready, None);
                }
            }
            Op::Disconnect(k) => {
                if let Some(a) = self.agents.get(&k) {
                    let conn = a.conn;
                    self.pool.disconnect(&self.host_id(k), conn, self.now);
                }
            }
            Op::Unhealthy(k) => {
                if self.agents.get(&k).is_some_and(|a| !a.gone) {
                    self.state(k, pb::HostState::Unhealthy, None);
                    self.terminate(k);
                }
            }
            Op::Acquire {
                build,
                wait,
                tenant,
            } => {
                let tenant = usize::from(tenant) % TENANTS.len();
                let wait = Duration::from_secs(u64::from(wait) * 10);
                if let Ok(p) = self.pool.acquire(
                    TENANTS[tenant],
                    &format!("b{build}"),
                    berth_tls::KeyId([0; 32]),
                    Duration::from_secs(60),
                    wait,
                    self.now,
                ) {
                    if !self.leases.iter().any(|(_, id)| *id == p.lease_id) {
                        self.leases.push((tenant, p.lease_id.clone()));
                    }
                    self.pending.push(p);
                }
            }
            Op::Release(n) => {
                if let Some((t, l)) = self.pick(n) {
                    let _ = self.pool.release(TENANTS[t], &l, self.now);
                }
            }
            Op::Renew(n) => {
                if let Some((t, l)) = self.pick(n) {
                    let _ =
                        self.pool
                            .renew(TENANTS[t], &l, None, Duration::from_secs(30), self.now);
                }
            }
            Op::Trespass(n, which) => {
                if let Some((t, l)) = self.pick(n) {
                    let other = TENANTS[(t + 1 + usize::from(which % 2)) % TENANTS.len()];
                    let found = match which % 3 {
                        0 => self.pool.release(other, &l, self.now).map(|_| ()),
                        1 => self
                            .pool
                            .renew(other, &l, None, Duration::from_secs(30), self.now)
                            .map(|_| ()),
                        _ => self.pool.get(other, &l).map(|_| ()),
                    };
                    if !matches!(found, Err(Error::LeaseNotFound(_))) {
                        self.violated(format!("tenant {other} reached {l}: {found:?}"));
                    }
                }
            }
            Op::Drain(k) => {
                if self.pool.drain(&self.host_id(k), "prop", self.now).is_ok()
                    && let Some(a) = self.agents.get_mut(&k)
                    && !a.gone
                {
                    // What was queued before the drain may still assign.
                    a.drained.get_or_insert(a.rx.len());
                }
            }
            Op::Tick(s) => {
                self.now = self.now + Duration::from_secs(u64::from(s));
                self.pool.tick(self.now);
            }
            Op::Abandon(n) => {
                if !self.pending.is_empty() {
                    let i = usize::from(n) % self.pending.len();
                    self.pending.swap_remove(i);
                }
            }
            Op::Flaky(k) => {
                if let Some(a) = self.agents.get_mut(&k) {
                    a.flaky = !a.flaky;
                }
            }
            Op::BreakWipe(k) => {
                if let Some(a) = self.agents.get_mut(&k) {
                    a.wipe_fails = true;
                }
            }
        }
    }

    fn pick(&self, n: u8) -> Option<(usize, String)> {
        (!self.leases.is_empty()).then(|| self.leases[usize::from(n) % self.leases.len()].clone())
    }

    /// What the real agent does with each coordinator message; `after` is
    /// how many messages of this batch are still to come.
    fn handle(&mut self, k: u8, m: Out, after: usize) {
        let Some(a) = self.agents.get(&k) else { return };
        let (state, held, in_flight, wipe_fails) =
            (a.state, a.lease.clone(), a.in_flight, a.wipe_fails);
        let (flaky, rejected, drained) = (a.flaky, a.rejected, a.drained);
        match m {
            Out::AssignLease(assign) => {
                let lid = assign.lease_id;
                if self.served.contains(&self.host_id(k)) && held.as_deref() != Some(lid.as_str()) {
                    self.violated(format!(
                        "h{k} was assigned {lid} after it had served a lease"
                    ));
                }
                if rejected == Some(0) {
                    self.violated(format!("h{k} was assigned {lid} after it rejected one and before it said Ready again"));
                }
                if drained == Some(0) {
                    self.violated(format!("h{k} was assigned {lid} after it was drained"));
                }
                if state != pb::HostState::Ready {
                    if held.as_deref() == Some(lid.as_str()) {
                        return;
                    }
                    if in_flight == 0 {
                        self.violated(format!(
                            "h{k} was assigned {lid} while {state:?} with {held:?}"
                        ));
                    }
                    let reason = format!("host is {state:?}");
                    self.reject(k, lid, reason, after);
                    return;
                }
                if flaky || rejected.is_some() || drained.is_some() {
                    self.reject(k, lid, "flaky".into(), after);
                    return;
                }
                self.state(k, pb::HostState::Leased, Some(lid.clone()));
                self.say(
                    k,
                    In::LeaseAccepted(pb::LeaseAccepted {
                        lease_id: lid.clone(),
                    }),
                );
                // The host served the lease once the lease is active (its
                // build got a certificate); an acceptance that came too late
                // (the assignment had timed out) served nobody.
                let active = self
                    .leases
                    .iter()
                    .find(|(_, id)| *id == lid)
                    .and_then(|(t, _)| self.pool.get(TENANTS[*t], &lid).ok())
                    .is_some_and(|l| {
                        l.state == pb::LeaseState::Active as i32 && l.host_id == self.host_id(k)
                    });
                if active {
                    self.served.insert(self.host_id(k));
                }
            }
            Out::EndLease(end) => {
                if held.as_deref() == Some(end.lease_id.as_str()) {
                    let verified = !wipe_fails;
                    self.state(k, pb::HostState::Wiping, Some(end.lease_id.clone()));
                    self.say(
                        k,
                        In::WipeReport(pb::WipeReport {
                            lease_id: end.lease_id.clone(),
                            verified,
                            error: if verified {
                                String::new()
                            } else {
                                "1 volume left".into()
                            },
                            ..Default::default()
                        }),
                    );
                    // As the pool shows it, when the lease is this host's
                    // (a host told to let go of a lease it was never given
                    // reports a wipe the lease does not take).
                    let shown = self
                        .pool
                        .list_leases(true)
                        .into_iter()
                        .find(|l| l.lease_id == end.lease_id && l.host_id == self.host_id(k))
                        .and_then(|l| l.wipe)
                        .map(|w| w.verified);
                    if shown.is_some_and(|v| v != verified) {
                        self.violated(format!("{} shows wipe verified={shown:?}", end.lease_id));
                    }
                    if verified {
                        // Recycle mode: back to Ready after a verified wipe.
                        self.state(k, pb::HostState::Ready, None);
                    } else {
                        self.state(k, pb::HostState::Unhealthy, None);
                        self.terminate(k);
                    }
                }
            }
            Out::Drain(_) => {
                if state == pb::HostState::Ready {
                    self.terminate(k);
                }
            }
            Out::Registered(_) | Out::RenewLease(_) | Out::LeaseKey(_) => {}
        }
    }

    fn reject(&mut self, k: u8, lease_id: String, reason: String, after: usize) {
        let host_id = self.host_id(k);
        let ours = self
            .pool
            .list_leases(false)
            .iter()
            .any(|l| l.lease_id == lease_id && l.host_id == host_id);
        if let Some(a) = self.agents.get_mut(&k)
            && a.rejected.is_none()
        {
            // Counted with this message, which is decremented next.
            a.rejected = Some(after + a.rx.len() + 1);
        }
        self.say(k, In::LeaseRejected(pb::LeaseRejected { lease_id, reason }));
        // The pool took the rejection: what the agent said before no longer
        // counts, so the host is not listed (or offered) as Ready.
        let listed = self
            .pool
            .list_hosts()
            .into_iter()
            .find(|h| h.host_id == host_id);
        if ours
            && listed
                .as_ref()
                .is_some_and(|h| h.state == pb::HostState::Ready as i32)
        {
            self.violated(format!("{host_id} is listed Ready after rejecting a lease"));
        }
    }
}
