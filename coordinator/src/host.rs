//! The coordinator's view of one host as data: the [`HostState`] enum (is
//! the agent's stream up, what did the agent last say), what can happen to a
//! host ([`Event`]), what the pool must do about it ([`Action`]) and the pure
//! transition function [`next`]. Nothing here does I/O or reads a clock: the
//! pool (`crate::pool`) feeds events in, each with the time it happened, and
//! carries the actions out.
//!
//! The agent is the truth about its host (its own lifecycle is the agent's
//! `host::state`); this is what the coordinator believes of it, and the one
//! place that decides whether a host may be offered to a build
//! ([`Host::offerable`]): only while its stream is up, its agent last said
//! Ready and has been heard from lately, it holds no lease, it is not
//! draining and not condemned. A host holds at most one lease, and takes one
//! only while offerable. The table and property tests at the bottom pin
//! these rules down.

use std::time::Duration;

use berth_proto::v1 as pb;
use tokio::time::Instant;

/// What the pool takes a host's agent to be doing: what it last said, or
/// what the pool learnt since that the agent has not confirmed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Agent {
    /// Said Ready: idle, may take a lease.
    Ready,
    /// Said Leased: serving a lease (this pool's, or one it has yet to let go).
    Leased,
    /// Said Wiping, or a lease it held ended here and it has not spoken
    /// since: it wipes next. Offered again only once it says Ready itself
    /// (recycle mode); by default it terminates instead.
    Wiping,
    /// Said Terminating: being destroyed, never offered again, and forgotten
    /// as soon as its stream ends.
    Terminating,
    /// Was assigned a lease and refused it or did not answer in time: what
    /// it said before is no longer trusted, so it is not offered until it
    /// says Ready again. Listed as UNSPECIFIED.
    AwaitingReady,
    /// Said anything else: booting, warming, unhealthy, or nothing usable
    /// (UNSPECIFIED, which is also what a host known only from a restored
    /// lease record has said). Never holds Ready, Leased, Wiping or
    /// Terminating: [`Agent::said`] maps those to their own variants.
    Other(pb::HostState),
}

impl Agent {
    /// The agent said it is `state`.
    pub fn said(state: pb::HostState) -> Self {
        match state {
            pb::HostState::Ready => Self::Ready,
            pb::HostState::Leased => Self::Leased,
            pb::HostState::Wiping => Self::Wiping,
            pb::HostState::Terminating => Self::Terminating,
            other => Self::Other(other),
        }
    }

    /// The state the admin API lists (and `/metrics` counts) for it.
    pub fn listed(self) -> pb::HostState {
        match self {
            Self::Ready => pb::HostState::Ready,
            Self::Leased => pb::HostState::Leased,
            Self::Wiping => pb::HostState::Wiping,
            Self::Terminating => pb::HostState::Terminating,
            Self::AwaitingReady => pb::HostState::Unspecified,
            Self::Other(s) => s,
        }
    }
}

/// Where a host is, as the pool sees it. No state of its own has a timeout
/// except the two that wait for an agent to come back ([`Host::lost_at`]);
/// a held lease is bounded by the lease's own timers (`crate::lease`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// Its agent's stream `conn` is up and the agent was last heard from
    /// at `heard` (any message counts). The only state a host is offered
    /// from, and only while heard from within the silence limit.
    Connected {
        conn: u64,
        heard: Instant,
        agent: Agent,
    },
    /// Its stream went down (or stopped taking messages) at `since`, or it
    /// is known only from a lease record restored at start. It keeps its
    /// place and its lease for the lost-host grace: an agent that registers
    /// within it carries on, otherwise the host is forgotten and its lease
    /// ends as host-lost.
    Disconnected { since: Instant, agent: Agent },
    /// The orphan sweeper is terminating its instance. Entered only from
    /// `Disconnected` without a lease, so no lease is lost; its agent may
    /// not register again. Listed as the disconnected host it was until the
    /// lost-host grace passes, then `Barred`.
    Condemned { since: Instant, agent: Agent },
    /// An instance being terminated that the pool keeps nothing else of
    /// (its host was forgotten, or never registered): only its id, so that
    /// its agent cannot register. Not listed anywhere; dropped once EC2 no
    /// longer lists the instance.
    Barred,
}

/// Everything the transition function knows about a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub state: HostState,
    /// The lease it holds here (assigned or active): at most one.
    pub lease: Option<String>,
    /// An operator drained it: never offered again, and told so again on
    /// every registration, for as long as the pool knows it. An operator's
    /// mark rather than a stage of the host's life, so it rides along
    /// whatever state the host is in (as the agent's own `draining` does).
    pub draining: bool,
}

impl Host {
    /// A host whose agent registered for the first time, on stream `conn`.
    pub fn registered(conn: u64, at: Instant, said: pb::HostState) -> Self {
        Self {
            state: HostState::Connected {
                conn,
                heard: at,
                agent: Agent::said(said),
            },
            lease: None,
            draining: false,
        }
    }

    /// A host known only from `lease`'s record, restored at `at`: not
    /// connected, so forgotten unless its agent registers within the grace.
    pub fn restored(lease: String, at: Instant) -> Self {
        Self {
            state: HostState::Disconnected {
                since: at,
                agent: Agent::Other(pb::HostState::Unspecified),
            },
            lease: Some(lease),
            draining: false,
        }
    }

    /// An instance the orphan sweeper is terminating that the pool had no
    /// host for.
    pub fn barred() -> Self {
        Self {
            state: HostState::Barred,
            lease: None,
            draining: false,
        }
    }

    /// Whether the scheduler may hand it a lease at `now`; a host not heard
    /// from for `silence` counts as gone quiet.
    pub fn offerable(&self, now: Instant, silence: Duration) -> bool {
        match self.state {
            HostState::Connected {
                heard,
                agent: Agent::Ready,
                ..
            } => {
                self.lease.is_none()
                    && !self.draining
                    && now.saturating_duration_since(heard) < silence
            }
            _ => false,
        }
    }

    /// The stream the pool talks to it on, when it is up.
    pub fn conn(&self) -> Option<u64> {
        match self.state {
            HostState::Connected { conn, .. } => Some(conn),
            _ => None,
        }
    }

    pub fn connected(&self) -> bool {
        self.conn().is_some()
    }

    /// Whether the orphan sweeper is terminating it (its agent is refused).
    pub fn condemned(&self) -> bool {
        matches!(self.state, HostState::Condemned { .. } | HostState::Barred)
    }

    /// Whether the admin API, `/metrics` and the sweeper see it at all.
    pub fn listed(&self) -> bool {
        self.state != HostState::Barred
    }

    /// What its agent is taken to be doing, when the pool knows.
    pub fn agent(&self) -> Option<Agent> {
        match self.state {
            HostState::Connected { agent, .. }
            | HostState::Disconnected { agent, .. }
            | HostState::Condemned { agent, .. } => Some(agent),
            HostState::Barred => None,
        }
    }

    /// The state the admin API lists for it.
    pub fn listed_state(&self) -> pb::HostState {
        self.agent()
            .map_or(pb::HostState::Unspecified, Agent::listed)
    }

    /// Since when its stream has been down, if it is down.
    pub fn disconnected_since(&self) -> Option<Instant> {
        match self.state {
            HostState::Disconnected { since, .. } | HostState::Condemned { since, .. } => {
                Some(since)
            }
            HostState::Connected { .. } | HostState::Barred => None,
        }
    }

    /// When [`Event::LostGracePassed`] is due, for the states that wait for
    /// an agent to come back.
    pub fn lost_at(&self, grace: Duration) -> Option<Instant> {
        self.disconnected_since().map(|since| since + grace)
    }
}

/// Something that happened to a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Its agent registered on stream `conn` at `at`, saying it is `said`.
    Registered {
        conn: u64,
        at: Instant,
        said: pb::HostState,
    },
    /// A message arrived on its current stream at `at`.
    Heard { at: Instant },
    /// Its agent said it is now `said`, for `reason` (StateChanged).
    Said {
        state: pb::HostState,
        reason: String,
    },
    /// Stream `conn` ended at `at`; the end of a stream that a newer
    /// registration replaced changes nothing.
    StreamEnded { conn: u64, at: Instant },
    /// A message could not be queued on its stream at `at` (full or
    /// closed): the pool stops using the stream.
    SendFailed { at: Instant },
    /// The scheduler gave it `lease`.
    LeaseAssigned(String),
    /// Its agent registered holding `lease`, and the pool lets it keep it.
    LeaseAdopted(String),
    /// `lease` let go of it before it was used (the lease is queued again).
    LeaseRequeued(String),
    /// `lease` ended while it held it: it wipes next.
    LeaseEnded(String),
    /// Its agent refused an assigned lease, or did not answer in time.
    AssignmentFailed,
    /// An operator drained it, for `reason`.
    Drained { reason: String },
    /// The orphan sweeper is about to terminate its instance.
    Condemn,
    /// EC2 no longer lists its instance (terminated for good).
    InstanceGone,
    /// It has been disconnected for the whole lost-host grace.
    LostGracePassed,
}

/// Why a lease ends as host-lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// Its agent said the host became `state` (Unhealthy or Terminating),
    /// for `reason`.
    Became {
        state: pb::HostState,
        reason: String,
    },
    /// The host is being forgotten: gone past its grace, or terminated.
    WentAway,
}

/// What the pool must do after a transition, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Refuse the registration: the instance is being terminated as an orphan.
    Refuse,
    /// Tell the agent to drain, for `reason`.
    SendDrain { reason: String },
    /// End `lease` as host-lost.
    LoseLease { lease: String, why: Lost },
    /// The stream under `lease` ended: a lease not accepted yet never will
    /// be (it goes to another host); an active one waits out the grace.
    StreamLostUnder { lease: String },
    /// The host is being destroyed: the step ends the timeline of the lease
    /// it served last.
    RecordTerminated { reason: String },
    /// Drop the host from the pool (after any `LoseLease` before it).
    Forget,
}

/// The pure transition function: where the host goes and what the pool
/// must do, in order. Events that make no sense in a state leave it
/// unchanged with no actions.
pub fn next(host: Host, event: Event) -> (Host, Vec<Action>) {
    use HostState as S;
    match (host.state, event) {
        // A condemned instance's agent may not come back.
        (S::Condemned { .. } | S::Barred, Event::Registered { .. }) => (host, vec![Action::Refuse]),
        // The newest stream wins; any lease the host holds is reconciled
        // with the agent's own report by the pool (the agent is the truth).
        (_, Event::Registered { conn, at, said }) => {
            let actions = if host.draining {
                vec![Action::SendDrain {
                    reason: "draining".into(),
                }]
            } else {
                vec![]
            };
            let state = S::Connected {
                conn,
                heard: at,
                agent: Agent::said(said),
            };
            (Host { state, ..host }, actions)
        }
        (S::Connected { conn, agent, .. }, Event::Heard { at }) => {
            let state = S::Connected {
                conn,
                heard: at,
                agent,
            };
            (Host { state, ..host }, vec![])
        }
        (
            S::Connected { conn, heard, agent },
            Event::Said {
                state: said,
                reason,
            },
        ) => {
            let mut actions = Vec::new();
            if let Some(lease) = &host.lease
                && matches!(said, pb::HostState::Unhealthy | pb::HostState::Terminating)
            {
                actions.push(Action::LoseLease {
                    lease: lease.clone(),
                    why: Lost::Became {
                        state: said,
                        reason: reason.clone(),
                    },
                });
            }
            if said == pb::HostState::Terminating && agent != Agent::Terminating {
                // After the lease it held has ended (above).
                actions.push(Action::RecordTerminated { reason });
            }
            let state = S::Connected {
                conn,
                heard,
                agent: Agent::said(said),
            };
            (Host { state, ..host }, actions)
        }
        (S::Connected { conn, agent, .. }, Event::StreamEnded { conn: ended, at })
            if conn == ended =>
        {
            let actions = if agent == Agent::Terminating {
                // It said it is going: nothing will come back under this id.
                forget(&host.lease)
            } else {
                host.lease
                    .iter()
                    .map(|lease| Action::StreamLostUnder {
                        lease: lease.clone(),
                    })
                    .collect()
            };
            let state = S::Disconnected { since: at, agent };
            (Host { state, ..host }, actions)
        }
        (S::Connected { agent, .. }, Event::SendFailed { at }) => {
            let state = S::Disconnected { since: at, agent };
            (Host { state, ..host }, vec![])
        }
        (S::Connected { .. }, Event::LeaseAssigned(lease)) if host.offerable_now() => (
            Host {
                lease: Some(lease),
                ..host
            },
            vec![],
        ),
        (S::Connected { .. } | S::Disconnected { .. }, Event::LeaseAdopted(lease))
            if host.lease.as_ref().is_none_or(|held| *held == lease) =>
        {
            (
                Host {
                    lease: Some(lease),
                    ..host
                },
                vec![],
            )
        }
        (_, Event::LeaseRequeued(lease)) if host.lease.as_ref() == Some(&lease) => (
            Host {
                lease: None,
                ..host
            },
            vec![],
        ),
        (_, Event::LeaseEnded(lease)) if host.lease.as_ref() == Some(&lease) => {
            // A used host is not offered again until its agent says Ready.
            let state = map_agent(host.state, |a| match a {
                Agent::Ready | Agent::Leased => Agent::Wiping,
                other => other,
            });
            (
                Host {
                    state,
                    lease: None,
                    ..host
                },
                vec![],
            )
        }
        (
            S::Connected { .. } | S::Disconnected { .. } | S::Condemned { .. },
            Event::AssignmentFailed,
        ) => {
            let state = map_agent(host.state, |_| Agent::AwaitingReady);
            (Host { state, ..host }, vec![])
        }
        (
            S::Connected { .. } | S::Disconnected { .. } | S::Condemned { .. },
            Event::Drained { reason },
        ) => (
            Host {
                draining: true,
                ..host
            },
            vec![Action::SendDrain { reason }],
        ),
        (S::Disconnected { since, agent }, Event::Condemn) if host.lease.is_none() => {
            let state = S::Condemned { since, agent };
            (Host { state, ..host }, vec![])
        }
        (S::Condemned { since, agent }, Event::InstanceGone) => {
            let state = S::Disconnected { since, agent };
            (Host { state, ..host }, vec![])
        }
        (S::Barred, Event::InstanceGone) => (host, vec![Action::Forget]),
        (S::Disconnected { .. }, Event::LostGracePassed) => {
            let actions = forget(&host.lease);
            (host, actions)
        }
        (S::Condemned { .. }, Event::LostGracePassed) => (
            Host {
                state: S::Barred,
                ..host
            },
            vec![],
        ),
        (_, _) => (host, vec![]),
    }
}

impl Host {
    /// [`Host::offerable`] without the silence check: what a transition can
    /// tell (it has no clock).
    fn offerable_now(&self) -> bool {
        matches!(
            self.state,
            HostState::Connected {
                agent: Agent::Ready,
                ..
            }
        ) && self.lease.is_none()
            && !self.draining
    }
}

/// Ends the lease (if any) as host-lost, then drops the host.
fn forget(lease: &Option<String>) -> Vec<Action> {
    let mut actions: Vec<Action> = lease
        .iter()
        .map(|lease| Action::LoseLease {
            lease: lease.clone(),
            why: Lost::WentAway,
        })
        .collect();
    actions.push(Action::Forget);
    actions
}

fn map_agent(state: HostState, f: impl FnOnce(Agent) -> Agent) -> HostState {
    match state {
        HostState::Connected { conn, heard, agent } => HostState::Connected {
            conn,
            heard,
            agent: f(agent),
        },
        HostState::Disconnected { since, agent } => HostState::Disconnected {
            since,
            agent: f(agent),
        },
        HostState::Condemned { since, agent } => HostState::Condemned {
            since,
            agent: f(agent),
        },
        HostState::Barred => HostState::Barred,
    }
}
