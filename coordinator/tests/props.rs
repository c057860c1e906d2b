//! Property tests: request validation on arbitrary input, the lease state
//! machine on random event sequences, and the whole pool driven by random
//! operations against simulated honest agents. After every step the pool's
//! invariants hold (a host is in at most one lease, host and lease agree)
//! and no agent is ever assigned a lease while it is not Ready.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

/// The tenant every simulated build belongs to.
const TENANT: &str = "t";

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
            let p = sim.pool.acquire(TENANT, &format!("w{i}"), Duration::from_secs(600), Duration::from_secs(600), sim.now).unwrap();
            order.push(p.lease_id.clone());
            sim.pending.push(p);
        }
        let mut served = Vec::new();
        for k in 0..n {
            sim.step(Op::Join(k as u8));
            sim.step(Op::AgentStep(k as u8));
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
    /// Host k's agent handles what the coordinator sent it, honestly.
    AgentStep(u8),
    /// Host k's stream breaks.
    Disconnect(u8),
    /// Host k's dockerd dies: it reports Unhealthy.
    Unhealthy(u8),
    /// A build asks for a host.
    Acquire(u8, u8),
    /// The build of the n-th lease seen releases it.
    Release(u8),
    /// ... or renews it.
    Renew(u8),
    /// An operator drains host k.
    Drain(u8),
    /// Time passes.
    Tick(u8),
    /// An acquire caller gives up waiting.
    Abandon(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let host = 0u8..4;
    prop_oneof![
        1 => host.clone().prop_map(Op::Join),
        4 => host.clone().prop_map(Op::AgentStep),
        1 => host.clone().prop_map(Op::Disconnect),
        1 => host.clone().prop_map(Op::Unhealthy),
        3 => (0u8..6, 0u8..3).prop_map(|(b, w)| Op::Acquire(b, w)),
        1 => any::<u8>().prop_map(Op::Release),
        1 => any::<u8>().prop_map(Op::Renew),
        1 => host.clone().prop_map(Op::Drain),
        1 => (0u8..40).prop_map(Op::Tick),
        1 => any::<u8>().prop_map(Op::Abandon),
    ]
}

/// A simulated agent: it does what the real one does with each message.
struct Agent {
    conn: u64,
    rx: mpsc::Receiver<Result<pb::CoordinatorMessage, tonic::Status>>,
    state: pb::HostState,
    lease: Option<String>,
    gone: bool,
    /// Messages that were already queued when the agent last left Ready:
    /// they were sent while it was Ready, so an assignment among them is a
    /// race the agent answers by rejecting, not a coordinator bug.
    in_flight: usize,
}

struct Sim {
    pool: Pool,
    now: Instant,
    agents: HashMap<u8, Agent>,
    leases: Vec<String>,
    pending: Vec<berth_coordinator::pool::Pending>,
    violation: Option<String>,
}

impl Sim {
    fn new() -> Self {
        Self {
            pool: Pool::new(PoolConfig::default()),
            now: Instant::now(),
            agents: HashMap::new(),
            leases: Vec::new(),
            pending: Vec::new(),
            violation: None,
        }
    }

    fn register(&mut self, k: u8) {
        let (tx, rx): (AgentTx, _) = mpsc::channel(256);
        let (state, lease) = match self.agents.get(&k) {
            Some(a) if !a.gone => (a.state, a.lease.clone()),
            _ => (pb::HostState::Ready, None),
        };
        let reg = Registration {
            tls: Default::default(),
            host_id: format!("h{k}"),
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
                .map(|_| std::time::SystemTime::now() + Duration::from_secs(600)),
        };
        let conn = self.pool.register(reg, tx, self.now);
        self.agents.insert(
            k,
            Agent {
                conn,
                rx,
                state,
                lease,
                gone: false,
                in_flight: 0,
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
            .agent_message(&format!("h{k}"), a.conn, msg, self.now);
    }

    fn state(&mut self, k: u8, state: pb::HostState, lease: Option<String>) {
        if let Some(a) = self.agents.get_mut(&k) {
            if a.state == pb::HostState::Ready && state != pb::HostState::Ready {
                a.in_flight = a.rx.len();
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
                if let Some(a) = self.agents.get_mut(&k) {
                    while let Ok(m) = a.rx.try_recv() {
                        if let Ok(pb::CoordinatorMessage { msg: Some(m) }) = m {
                            inbox.push(m);
                        }
                    }
                }
                for m in inbox {
                    self.handle(k, m);
                    if let Some(a) = self.agents.get_mut(&k) {
                        a.in_flight = a.in_flight.saturating_sub(1);
                    }
                }
            }
            Op::Disconnect(k) => {
                if let Some(a) = self.agents.get(&k) {
                    let conn = a.conn;
                    self.pool.disconnect(&format!("h{k}"), conn, self.now);
                }
            }
            Op::Unhealthy(k) => {
                if self.agents.get(&k).is_some_and(|a| !a.gone) {
                    self.state(k, pb::HostState::Unhealthy, None);
                    self.state(k, pb::HostState::Terminating, None);
                    if let Some(a) = self.agents.get_mut(&k) {
                        a.gone = true;
                        let conn = a.conn;
                        self.pool.disconnect(&format!("h{k}"), conn, self.now);
                    }
                }
            }
            Op::Acquire(b, w) => {
                let wait = Duration::from_secs(u64::from(w) * 10);
                if let Ok(p) = self.pool.acquire(
                    TENANT,
                    &format!("b{b}"),
                    Duration::from_secs(60),
                    wait,
                    self.now,
                ) {
                    if !self.leases.contains(&p.lease_id) {
                        self.leases.push(p.lease_id.clone());
                    }
                    self.pending.push(p);
                }
            }
            Op::Release(n) => {
                if let Some(l) = self.pick(n) {
                    let _ = self.pool.release(TENANT, &l, self.now);
                }
            }
            Op::Renew(n) => {
                if let Some(l) = self.pick(n) {
                    let _ = self
                        .pool
                        .renew(TENANT, &l, Duration::from_secs(30), self.now);
                }
            }
            Op::Drain(k) => {
                let _ = self.pool.drain(&format!("h{k}"), "prop");
            }
            Op::Tick(s) => {
                self.now += Duration::from_secs(u64::from(s));
                self.pool.tick(self.now);
            }
            Op::Abandon(n) => {
                if !self.pending.is_empty() {
                    let i = usize::from(n) % self.pending.len();
                    self.pending.swap_remove(i);
                }
            }
        }
    }

    fn pick(&self, n: u8) -> Option<String> {
        (!self.leases.is_empty()).then(|| self.leases[usize::from(n) % self.leases.len()].clone())
    }

    /// What the real agent does with each coordinator message.
    fn handle(&mut self, k: u8, m: Out) {
        let Some(a) = self.agents.get(&k) else { return };
        let (state, held) = (a.state, a.lease.clone());
        match m {
            Out::AssignLease(assign) => {
                if state != pb::HostState::Ready {
                    if held.as_deref() == Some(assign.lease_id.as_str()) {
                        return;
                    }
                    if a.in_flight == 0 {
                        self.violation = Some(format!(
                            "h{k} was assigned {} while {:?} with {:?}",
                            assign.lease_id, state, held
                        ));
                    }
                    self.say(
                        k,
                        In::LeaseRejected(pb::LeaseRejected {
                            lease_id: assign.lease_id,
                            reason: format!("host is {state:?}"),
                        }),
                    );
                    return;
                }
                self.state(k, pb::HostState::Leased, Some(assign.lease_id.clone()));
                self.say(
                    k,
                    In::LeaseAccepted(pb::LeaseAccepted {
                        lease_id: assign.lease_id,
                    }),
                );
            }
            Out::EndLease(end) => {
                if held.as_deref() == Some(end.lease_id.as_str()) {
                    self.state(k, pb::HostState::Wiping, Some(end.lease_id.clone()));
                    self.say(
                        k,
                        In::WipeReport(pb::WipeReport {
                            lease_id: end.lease_id,
                            verified: true,
                            ..Default::default()
                        }),
                    );
                    // Recycle mode: back to Ready after a verified wipe.
                    self.state(k, pb::HostState::Ready, None);
                }
            }
            Out::Drain(_) => {
                if state == pb::HostState::Ready {
                    self.state(k, pb::HostState::Terminating, None);
                    if let Some(a) = self.agents.get_mut(&k) {
                        a.gone = true;
                        let conn = a.conn;
                        self.pool.disconnect(&format!("h{k}"), conn, self.now);
                    }
                }
            }
            Out::Registered(_) | Out::RenewLease(_) => {}
        }
    }
}
