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
    /// The scheduler gave it `lease`. Taken only while offerable (the
    /// scheduler has checked the silence limit, which needs a clock).
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use Agent as A;
    use HostState as S;
    use proptest::prelude::*;

    const L: &str = "lease-1";
    const OTHER: &str = "lease-2";
    const SILENCE: Duration = Duration::from_secs(6);

    fn t(secs: u64) -> Instant {
        // One base for every test in the process: tables compare instants.
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(Instant::now) + Duration::from_secs(secs)
    }

    fn on(agent: Agent) -> Host {
        Host {
            state: S::Connected {
                conn: 1,
                heard: t(0),
                agent,
            },
            lease: None,
            draining: false,
        }
    }

    fn off(agent: Agent) -> Host {
        Host {
            state: S::Disconnected { since: t(0), agent },
            ..on(agent)
        }
    }

    fn condemned(agent: Agent) -> Host {
        Host {
            state: S::Condemned { since: t(0), agent },
            ..on(agent)
        }
    }

    fn holding(host: Host, lease: &str) -> Host {
        Host {
            lease: Some(lease.into()),
            ..host
        }
    }

    fn draining(host: Host) -> Host {
        Host {
            draining: true,
            ..host
        }
    }

    fn with_agent(host: Host, agent: Agent) -> Host {
        Host {
            state: map_agent(host.state, |_| agent),
            ..host
        }
    }

    fn said(state: pb::HostState, reason: &str) -> Event {
        Event::Said {
            state,
            reason: reason.into(),
        }
    }

    fn lose(lease: &str, why: Lost) -> Action {
        Action::LoseLease {
            lease: lease.into(),
            why,
        }
    }

    fn became(state: pb::HostState, reason: &str) -> Lost {
        Lost::Became {
            state,
            reason: reason.into(),
        }
    }

    /// (name, start, event, expected host, expected actions)
    type Row = (&'static str, Host, Event, Host, Vec<Action>);

    fn table() -> Vec<Row> {
        use pb::HostState as P;
        let registered = |conn, said| Event::Registered {
            conn,
            at: t(5),
            said,
        };
        let on_at = |conn, heard, agent| S::Connected { conn, heard, agent };
        vec![
            // Registration.
            (
                "a registration that says Ready makes the host offerable",
                off(A::Other(P::Unspecified)),
                registered(2, P::Ready),
                Host {
                    state: on_at(2, t(5), A::Ready),
                    ..off(A::Ready)
                },
                vec![],
            ),
            (
                "the newest stream wins and the lease stays for the pool to reconcile",
                holding(on(A::Leased), L),
                registered(2, P::Leased),
                Host {
                    state: on_at(2, t(5), A::Leased),
                    ..holding(on(A::Leased), L)
                },
                vec![],
            ),
            (
                "a drained host is told again on every registration",
                draining(off(A::Ready)),
                registered(2, P::Ready),
                Host {
                    state: on_at(2, t(5), A::Ready),
                    ..draining(off(A::Ready))
                },
                vec![Action::SendDrain {
                    reason: "draining".into(),
                }],
            ),
            (
                "a condemned host's agent is refused",
                condemned(A::Ready),
                registered(2, P::Ready),
                condemned(A::Ready),
                vec![Action::Refuse],
            ),
            (
                "so is one the pool only knows by id",
                Host::barred(),
                registered(2, P::Ready),
                Host::barred(),
                vec![Action::Refuse],
            ),
            // What the agent says.
            (
                "any message keeps it fresh",
                on(A::Ready),
                Event::Heard { at: t(9) },
                Host {
                    state: on_at(1, t(9), A::Ready),
                    ..on(A::Ready)
                },
                vec![],
            ),
            (
                "saying Ready ends the wait after a refused assignment",
                on(A::AwaitingReady),
                said(P::Ready, ""),
                on(A::Ready),
                vec![],
            ),
            (
                "saying Ready after a wipe makes a recycled host offerable",
                on(A::Wiping),
                said(P::Ready, ""),
                on(A::Ready),
                vec![],
            ),
            (
                "unhealthy under a lease: the lease is lost, with the reason",
                holding(on(A::Leased), L),
                said(P::Unhealthy, "dockerd exited"),
                holding(on(A::Other(P::Unhealthy)), L),
                vec![lose(L, became(P::Unhealthy, "dockerd exited"))],
            ),
            (
                "terminating under a lease: the lease is lost, then the step recorded",
                holding(on(A::Leased), L),
                said(P::Terminating, "drained"),
                holding(on(A::Terminating), L),
                vec![
                    lose(L, became(P::Terminating, "drained")),
                    Action::RecordTerminated {
                        reason: "drained".into(),
                    },
                ],
            ),
            (
                "terminating without a lease: recorded",
                on(A::Wiping),
                said(P::Terminating, "single use"),
                on(A::Terminating),
                vec![Action::RecordTerminated {
                    reason: "single use".into(),
                }],
            ),
            (
                "terminating said twice is recorded once",
                on(A::Terminating),
                said(P::Terminating, "again"),
                on(A::Terminating),
                vec![],
            ),
            (
                "wiping under a lease the agent ended itself keeps the lease for the lease machine",
                holding(on(A::Leased), L),
                said(P::Wiping, ""),
                holding(on(A::Wiping), L),
                vec![],
            ),
            (
                "nothing is heard from a disconnected host",
                off(A::Ready),
                said(P::Unhealthy, ""),
                off(A::Ready),
                vec![],
            ),
            // The stream.
            (
                "a stream that ends under a lease strands it (an assigned one moves on)",
                holding(on(A::Leased), L),
                Event::StreamEnded { conn: 1, at: t(3) },
                Host {
                    state: S::Disconnected {
                        since: t(3),
                        agent: A::Leased,
                    },
                    ..holding(on(A::Leased), L)
                },
                vec![Action::StreamLostUnder { lease: L.into() }],
            ),
            (
                "the end of a replaced stream changes nothing",
                on(A::Ready),
                Event::StreamEnded { conn: 7, at: t(3) },
                on(A::Ready),
                vec![],
            ),
            (
                "a terminating host whose stream ends is forgotten, its lease lost",
                holding(on(A::Terminating), L),
                Event::StreamEnded { conn: 1, at: t(3) },
                Host {
                    state: S::Disconnected {
                        since: t(3),
                        agent: A::Terminating,
                    },
                    ..holding(on(A::Terminating), L)
                },
                vec![lose(L, Lost::WentAway), Action::Forget],
            ),
            (
                "a stream that takes no more messages counts as down, nothing more",
                holding(on(A::Leased), L),
                Event::SendFailed { at: t(3) },
                Host {
                    state: S::Disconnected {
                        since: t(3),
                        agent: A::Leased,
                    },
                    ..holding(on(A::Leased), L)
                },
                vec![],
            ),
            // Leases.
            (
                "an offerable host takes a lease",
                on(A::Ready),
                Event::LeaseAssigned(L.into()),
                holding(on(A::Ready), L),
                vec![],
            ),
            (
                "a host is never in two leases",
                holding(on(A::Ready), L),
                Event::LeaseAssigned(OTHER.into()),
                holding(on(A::Ready), L),
                vec![],
            ),
            (
                "a draining host takes no lease",
                draining(on(A::Ready)),
                Event::LeaseAssigned(L.into()),
                draining(on(A::Ready)),
                vec![],
            ),
            (
                "a host that refused one takes no lease until it says Ready",
                on(A::AwaitingReady),
                Event::LeaseAssigned(L.into()),
                on(A::AwaitingReady),
                vec![],
            ),
            (
                "a disconnected host takes no lease",
                off(A::Ready),
                Event::LeaseAssigned(L.into()),
                off(A::Ready),
                vec![],
            ),
            (
                "the lease an agent reports is adopted",
                on(A::Leased),
                Event::LeaseAdopted(L.into()),
                holding(on(A::Leased), L),
                vec![],
            ),
            (
                "adopting a second lease is refused",
                holding(on(A::Leased), L),
                Event::LeaseAdopted(OTHER.into()),
                holding(on(A::Leased), L),
                vec![],
            ),
            (
                "a requeued lease leaves the host as it was",
                holding(on(A::Ready), L),
                Event::LeaseRequeued(L.into()),
                on(A::Ready),
                vec![],
            ),
            (
                "only the lease it holds can let go of it",
                holding(on(A::Leased), L),
                Event::LeaseRequeued(OTHER.into()),
                holding(on(A::Leased), L),
                vec![],
            ),
            (
                "a used host wipes next and is not offered",
                holding(on(A::Leased), L),
                Event::LeaseEnded(L.into()),
                on(A::Wiping),
                vec![],
            ),
            (
                "so does one that had not said Leased yet",
                holding(on(A::Ready), L),
                Event::LeaseEnded(L.into()),
                on(A::Wiping),
                vec![],
            ),
            (
                "an unhealthy host stays unhealthy when its lease ends",
                holding(on(A::Other(P::Unhealthy)), L),
                Event::LeaseEnded(L.into()),
                on(A::Other(P::Unhealthy)),
                vec![],
            ),
            (
                "a refused or unanswered assignment: awaiting Ready",
                holding(on(A::Ready), L),
                Event::AssignmentFailed,
                holding(on(A::AwaitingReady), L),
                vec![],
            ),
            // Operators and the sweeper.
            (
                "drained: told, and never offered again",
                on(A::Ready),
                Event::Drained {
                    reason: "maintenance".into(),
                },
                draining(on(A::Ready)),
                vec![Action::SendDrain {
                    reason: "maintenance".into(),
                }],
            ),
            (
                "an id the pool keeps only to refuse cannot be drained",
                Host::barred(),
                Event::Drained { reason: "x".into() },
                Host::barred(),
                vec![],
            ),
            (
                "a disconnected idle host can be condemned",
                off(A::Ready),
                Event::Condemn,
                condemned(A::Ready),
                vec![],
            ),
            (
                "a connected host cannot",
                on(A::Ready),
                Event::Condemn,
                on(A::Ready),
                vec![],
            ),
            (
                "nor one holding a lease, connected or not",
                holding(off(A::Leased), L),
                Event::Condemn,
                holding(off(A::Leased), L),
                vec![],
            ),
            (
                "an instance EC2 no longer lists is no longer refused",
                condemned(A::Ready),
                Event::InstanceGone,
                off(A::Ready),
                vec![],
            ),
            (
                "and one kept only by id is dropped",
                Host::barred(),
                Event::InstanceGone,
                Host::barred(),
                vec![Action::Forget],
            ),
            // Timeouts.
            (
                "gone past the grace: forgotten, its lease lost",
                holding(off(A::Leased), L),
                Event::LostGracePassed,
                holding(off(A::Leased), L),
                vec![lose(L, Lost::WentAway), Action::Forget],
            ),
            (
                "a condemned host past the grace is kept by id only",
                condemned(A::Ready),
                Event::LostGracePassed,
                Host::barred(),
                vec![],
            ),
            (
                "a connected host has no grace to pass",
                on(A::Ready),
                Event::LostGracePassed,
                on(A::Ready),
                vec![],
            ),
        ]
    }

    #[test]
    fn transition_table() {
        for (name, from, event, to, actions) in table() {
            let (got, got_actions) = next(from.clone(), event.clone());
            assert_eq!(got, to, "{name}: {from:?} + {event:?}");
            assert_eq!(got_actions, actions, "{name}: {from:?} + {event:?}");
        }
    }

    #[test]
    fn only_a_connected_ready_idle_undrained_fresh_host_is_offerable() {
        assert!(on(A::Ready).offerable(t(0), SILENCE));
        assert!(on(A::Ready).offerable(t(5), SILENCE));
        assert!(!on(A::Ready).offerable(t(6), SILENCE), "gone quiet");
        assert!(!holding(on(A::Ready), L).offerable(t(0), SILENCE));
        assert!(!draining(on(A::Ready)).offerable(t(0), SILENCE));
        assert!(!off(A::Ready).offerable(t(0), SILENCE));
        assert!(!condemned(A::Ready).offerable(t(0), SILENCE));
        assert!(!Host::barred().offerable(t(0), SILENCE));
        for agent in [
            A::Leased,
            A::Wiping,
            A::Terminating,
            A::AwaitingReady,
            A::Other(pb::HostState::Booting),
            A::Other(pb::HostState::Warming),
            A::Other(pb::HostState::Unhealthy),
            A::Other(pb::HostState::Unspecified),
        ] {
            assert!(!on(agent).offerable(t(0), SILENCE), "{agent:?}");
        }
    }

    #[test]
    fn views_list_what_the_agent_said_and_hide_barred_ids() {
        assert_eq!(
            on(A::AwaitingReady).listed_state(),
            pb::HostState::Unspecified
        );
        assert_eq!(
            with_agent(on(A::Ready), A::Wiping).listed_state(),
            pb::HostState::Wiping
        );
        assert!(condemned(A::Ready).listed() && !Host::barred().listed());
        assert_eq!(off(A::Ready).lost_at(SILENCE), Some(t(6)));
        assert_eq!(condemned(A::Ready).lost_at(SILENCE), Some(t(6)));
        assert_eq!(on(A::Ready).lost_at(SILENCE), None);
        assert_eq!(
            Host::restored(L.into(), t(2)).listed_state(),
            pb::HostState::Unspecified
        );
        for s in [
            pb::HostState::Unspecified,
            pb::HostState::Booting,
            pb::HostState::Warming,
            pb::HostState::Ready,
            pb::HostState::Leased,
            pb::HostState::Wiping,
            pb::HostState::Terminating,
            pb::HostState::Unhealthy,
        ] {
            assert_eq!(Agent::said(s).listed(), s, "listed as said");
        }
    }

    fn host_state() -> impl Strategy<Value = pb::HostState> {
        (0i32..8).prop_map(|v| pb::HostState::try_from(v).unwrap_or(pb::HostState::Unspecified))
    }

    fn event() -> impl Strategy<Value = Event> {
        let lease = prop_oneof![Just(L.to_owned()), Just(OTHER.to_owned())];
        prop_oneof![
            (1u64..4, host_state()).prop_map(|(conn, said)| Event::Registered {
                conn,
                at: t(0),
                said
            }),
            Just(Event::Heard { at: t(0) }),
            host_state().prop_map(|state| Event::Said {
                state,
                reason: String::new()
            }),
            (1u64..4).prop_map(|conn| Event::StreamEnded { conn, at: t(0) }),
            Just(Event::SendFailed { at: t(0) }),
            lease.clone().prop_map(Event::LeaseAssigned),
            lease.clone().prop_map(Event::LeaseAdopted),
            lease.clone().prop_map(Event::LeaseRequeued),
            lease.prop_map(Event::LeaseEnded),
            Just(Event::AssignmentFailed),
            Just(Event::Drained {
                reason: String::new()
            }),
            Just(Event::Condemn),
            Just(Event::InstanceGone),
            Just(Event::LostGracePassed),
        ]
    }

    /// The offer rule, kept as plainly as it is stated: what the agent last
    /// said, whether its stream is up, the drain, the sweeper, the lease.
    #[derive(Debug, Default)]
    struct Rule {
        said_ready: bool,
        stream: Option<u64>,
        drained: bool,
        condemned: bool,
        lease: Option<String>,
    }

    impl Rule {
        fn offerable(&self) -> bool {
            self.said_ready
                && self.stream.is_some()
                && !self.drained
                && !self.condemned
                && self.lease.is_none()
        }

        /// What `event` does to the rule's inputs (`barred`: the host was
        /// kept by id only, so nothing but the sweeper reaches it).
        fn see(&mut self, event: &Event, barred: bool) {
            match event {
                Event::Registered { conn, said, .. } if !self.condemned => {
                    self.stream = Some(*conn);
                    self.said_ready = *said == pb::HostState::Ready;
                }
                Event::Said { state, .. } if self.stream.is_some() => {
                    self.said_ready = *state == pb::HostState::Ready;
                }
                Event::StreamEnded { conn, .. } if self.stream == Some(*conn) => {
                    self.stream = None;
                }
                Event::SendFailed { .. } => self.stream = None,
                Event::LeaseAssigned(l) if self.offerable() => self.lease = Some(l.clone()),
                Event::LeaseAdopted(l)
                    if !self.condemned && self.lease.as_ref().is_none_or(|h| h == l) =>
                {
                    self.lease = Some(l.clone());
                }
                Event::LeaseRequeued(l) if self.lease.as_ref() == Some(l) => self.lease = None,
                Event::LeaseEnded(l) if self.lease.as_ref() == Some(l) => {
                    self.lease = None;
                    self.said_ready = false;
                }
                Event::AssignmentFailed if !barred => self.said_ready = false,
                Event::Drained { .. } if !barred => self.drained = true,
                Event::Condemn if self.stream.is_none() && self.lease.is_none() => {
                    self.condemned = true;
                }
                Event::InstanceGone => self.condemned = false,
                _ => {}
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// From a fresh registration, any sequence of events: the host is
        /// offerable exactly when the agent last said Ready on the stream
        /// that is up, and it is not draining, not condemned and holds no
        /// lease. It holds at most one lease and never lets go of one on
        /// its own (it asks the lease machine with `LoseLease`); only a
        /// condemned host is refused, and a condemned host has no stream
        /// and no lease.
        #[test]
        fn the_offer_rule_holds_on_any_event_sequence(
            said in host_state(),
            events in proptest::collection::vec(event(), 0..64),
        ) {
            let mut host = Host::registered(1, t(0), said);
            let mut rule = Rule { said_ready: said == pb::HostState::Ready, stream: Some(1), ..Rule::default() };
            for event in events {
                let before = host.clone();
                let barred = host.state == HostState::Barred;
                let (after, actions) = next(host, event.clone());
                rule.see(&event, barred);
                prop_assert_eq!(after.offerable(t(0), SILENCE), rule.offerable(), "{:?} + {:?} -> {:?}", before, event, after);
                prop_assert_eq!(&after.lease, &rule.lease, "{:?} + {:?}", before, event);
                if let (Some(a), Some(b)) = (&before.lease, &after.lease) {
                    prop_assert_eq!(a, b, "moved from one lease to another");
                }
                if before.lease.is_some() && after.lease.is_none() {
                    prop_assert!(
                        matches!(&event, Event::LeaseRequeued(_) | Event::LeaseEnded(_)),
                        "{:?} dropped its lease on {:?}", before, event
                    );
                }
                for a in &actions {
                    if let Action::LoseLease { lease, .. } | Action::StreamLostUnder { lease } = a {
                        prop_assert_eq!(Some(lease), before.lease.as_ref(), "{:?}", a);
                    }
                }
                prop_assert_eq!(actions.contains(&Action::Refuse), before.condemned() && matches!(event, Event::Registered { .. }));
                if after.condemned() {
                    prop_assert!(after.lease.is_none() && !after.connected(), "{:?}", after);
                }
                if actions.contains(&Action::Forget) {
                    prop_assert_eq!(actions.last(), Some(&Action::Forget));
                    break;
                }
                host = after;
            }
        }
    }
}
