//! The host lifecycle as data: the [`HostState`] enum, what can happen to a
//! host ([`Event`]), what the agent must do about it ([`Action`]) and the pure
//! transition function [`next`]. Nothing here does I/O or reads a clock; the
//! driver (`driver.rs`) feeds events in and carries the actions out, so every
//! protocol rule the coordinator relies on is pinned down by the table tests at
//! the bottom of this file.

use std::time::{Duration, SystemTime};

use berth_proto::v1::{
    self as pb, CoordinatorMessage, EndReason, LeaseAccepted, LeaseEnded, LeaseInUse,
    LeaseRejected, StateChanged, WipeReport, agent_message::Msg, coordinator_message,
};
use berth_tls::KeyId;

/// Longest a wipe may take before the host is declared unhealthy. Generous:
/// removing many large images on a slow disk takes a while, but a stuck
/// dockerd must not hold a host forever.
pub const WIPE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest tearing a host down (stop dockerd, unmount, delete netns and
/// directories) may take before the agent gives up and exits anyway.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a host is in its life. The agent owns this; the coordinator mirrors
/// what the agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostState {
    /// Learning identity, starting dockerd, self-checking. Bounded by the
    /// configured boot timeout; failing it ends the agent with an error.
    Booting,
    /// Bootstrapped (dockerd up, self-check passed) for an EC2 warm pool:
    /// not registered and not offered to builds. Auto Scaling stops the
    /// instance in this state; a stop is not a lease end and does not end
    /// the instance. Left when IMDS says `InService` (-> Ready). No timeout:
    /// a warm instance waits as long as the pool keeps it. Only the EC2
    /// provider reports warm-pool lifecycles, so local hosts never get here.
    Warming,
    /// Registered (or trying to be) and idle: can be assigned a lease. No
    /// timeout: an idle host waits for work or a drain.
    Ready,
    /// Serving exactly one lease through the Docker front. Bounded by the
    /// lease's own deadline, which the agent enforces itself.
    Leased,
    /// Lease over: front closed, Docker state being removed and verified.
    /// Bounded by [`WIPE_TIMEOUT`].
    Wiping,
    /// Being destroyed through the provider; never offered again. Bounded by
    /// [`TERMINATE_TIMEOUT`].
    Terminating,
    /// Something is wrong (dockerd died, wipe failed or timed out, the front
    /// could not open). Reported, then the host goes straight on to
    /// Terminating: a broken host is replaced, never repaired.
    Unhealthy,
}

impl HostState {
    /// The lowercase name of the state, as logs, the status page and the
    /// coordinator's CLI print it.
    pub fn name(self) -> &'static str {
        match self {
            HostState::Booting => "booting",
            HostState::Warming => "warming",
            HostState::Ready => "ready",
            HostState::Leased => "leased",
            HostState::Wiping => "wiping",
            HostState::Terminating => "terminating",
            HostState::Unhealthy => "unhealthy",
        }
    }

    /// The wire value of this state.
    pub fn to_proto(self) -> pb::HostState {
        match self {
            HostState::Booting => pb::HostState::Booting,
            HostState::Warming => pb::HostState::Warming,
            HostState::Ready => pb::HostState::Ready,
            HostState::Leased => pb::HostState::Leased,
            HostState::Wiping => pb::HostState::Wiping,
            HostState::Terminating => pb::HostState::Terminating,
            HostState::Unhealthy => pb::HostState::Unhealthy,
        }
    }

    /// How long the host may stay in this state before the driver feeds
    /// [`Event::Timeout`]. `None`: no limit of its own (Ready waits for work;
    /// Leased is bounded by the lease deadline; Booting by the configured boot
    /// timeout, applied by the bootstrap code before the machine runs).
    pub fn timeout(self) -> Option<Duration> {
        match self {
            HostState::Wiping => Some(WIPE_TIMEOUT),
            HostState::Terminating | HostState::Unhealthy => Some(TERMINATE_TIMEOUT),
            HostState::Booting | HostState::Warming | HostState::Ready | HostState::Leased => None,
        }
    }
}

/// The lease a host is serving (or wiping after).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub build_id: String,
    /// Wall-clock deadline as the coordinator set it.
    pub deadline: SystemTime,
    /// The front is open and `LeaseAccepted` was sent.
    pub accepted: bool,
    /// The key the lease's client certificates must carry; the front
    /// admits no other. `None` only for a lease read from a state file of
    /// an agent that did not record it, which is never resumed.
    pub key: Option<KeyId>,
    /// The front admitted the lease's certificate once (`LeaseInUse` was
    /// sent): the key is fixed from then on.
    pub in_use: bool,
}

/// Everything the transition function needs to know about a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub state: HostState,
    pub lease: Option<Lease>,
    /// No new leases; terminate once idle.
    pub draining: bool,
    /// After a verified wipe go back to Ready instead of terminating.
    pub recycle: bool,
    /// Auto Scaling is taking the instance to the warm pool (IMDS said
    /// `Warmed:*` last): after booting, warm instead of registering.
    pub warm: bool,
    /// A shutdown signal while idle (Booting, Warming, Ready) stops the
    /// agent without ending the machine. On EC2 such a signal means the
    /// instance is being stopped (into the warm pool) or the agent is being
    /// restarted, and the instance must survive both; once a lease touched
    /// the host, a shutdown ends it as always. Locally a host cannot outlive
    /// its agent, so this is off.
    pub keep_on_shutdown: bool,
}

impl Host {
    /// A host that has just started booting.
    pub fn booting(recycle: bool) -> Self {
        Host {
            state: HostState::Booting,
            lease: None,
            draining: false,
            recycle,
            warm: false,
            keep_on_shutdown: false,
        }
    }

    /// The same host, with `keep_on_shutdown` set as the provider wants.
    pub fn keeping_on_shutdown(self, keep: bool) -> Self {
        Host {
            keep_on_shutdown: keep,
            ..self
        }
    }

    /// The current lease id, if any.
    pub fn lease_id(&self) -> Option<&str> {
        self.lease.as_ref().map(|l| l.id.as_str())
    }
}

/// Something that happened to the host.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// dockerd answers and passed its self-check.
    Booted,
    /// The coordinator assigns a lease. `deadline` is `None` when the message
    /// carried none or an invalid one.
    Assign {
        lease_id: String,
        build_id: String,
        deadline: Option<SystemTime>,
        /// The key the lease is pinned to; `None` if the message carried no
        /// valid one (the lease is rejected).
        key: Option<KeyId>,
    },
    /// The coordinator moved the lease's key (an acquire retried with a new
    /// key before the lease was first used).
    LeaseKey {
        lease_id: String,
        key: Option<KeyId>,
    },
    /// The front admitted this lease's certificate for the first time and
    /// fixed `key`, the key it carried (a move that crossed that connection
    /// was refused by the front).
    FrontInUse { lease_id: String, key: KeyId },
    /// The coordinator refuses this host for good (it served a lease, or is
    /// not the host its id was bound to): it can never serve, so it ends.
    Refused { reason: String },
    /// The coordinator moves a lease's deadline.
    Renew {
        lease_id: String,
        deadline: Option<SystemTime>,
    },
    /// The coordinator ends a lease.
    End { lease_id: String, reason: EndReason },
    /// The coordinator asks the host to stop taking leases and go away.
    Drain { reason: String },
    /// The Docker front is listening for this lease.
    FrontOpened { lease_id: String },
    /// The Docker front could not be opened for this lease.
    FrontFailed { lease_id: String, error: String },
    /// The lease's deadline passed (measured by the agent's own clock).
    DeadlinePassed { lease_id: String },
    /// The wipe finished (successfully or not; the report says).
    WipeDone(WipeReport),
    /// dockerd exited on its own.
    DaemonExited { detail: String },
    /// The host stayed in this state longer than [`HostState::timeout`].
    Timeout(HostState),
    /// SIGTERM/SIGINT: clean up and exit.
    Shutdown,
    /// Instead of `Booted`: the agent restarted and took over a host that
    /// outlived its previous agent. `saved` is what the state file said the
    /// host was doing (`None`: no readable state file, so unknown), `lease`
    /// the lease it held, `now` the wall clock when the agent read it.
    Resumed {
        saved: Option<HostState>,
        lease: Option<Lease>,
        draining: bool,
        now: SystemTime,
    },
    /// The coordinator has been unreachable for `for_` (longer than the
    /// configured limit). An idle host terminates: it cannot be handed out
    /// and nobody could tell it to go. A leased host keeps its lease to the
    /// deadline.
    Isolated { for_: Duration },
    /// IMDS says Auto Scaling is taking the instance to the warm pool
    /// (`Warmed:TARGET`).
    Warmed { target: String },
    /// IMDS says the instance is in service (or in no Auto Scaling group).
    InService,
}

impl Event {
    /// The event a coordinator message means, or `None` for messages that are
    /// the link's business (`Registered`) or empty.
    pub fn from_coordinator(msg: CoordinatorMessage) -> Option<Event> {
        let deadline =
            |t: Option<prost_types::Timestamp>| t.as_ref().and_then(berth_proto::to_system_time);
        match msg.msg? {
            coordinator_message::Msg::Registered(_) => None,
            coordinator_message::Msg::AssignLease(a) => Some(Event::Assign {
                lease_id: a.lease_id,
                build_id: a.build_id,
                deadline: deadline(a.deadline),
                key: KeyId::from_slice(&a.client_key_sha256),
            }),
            coordinator_message::Msg::LeaseKey(k) => Some(Event::LeaseKey {
                lease_id: k.lease_id,
                key: KeyId::from_slice(&k.client_key_sha256),
            }),
            coordinator_message::Msg::RenewLease(r) => Some(Event::Renew {
                lease_id: r.lease_id,
                deadline: deadline(r.deadline),
            }),
            coordinator_message::Msg::EndLease(e) => Some(Event::End {
                lease_id: e.lease_id,
                // An unknown enum value from a newer coordinator still ends the lease.
                reason: EndReason::try_from(e.reason).unwrap_or(EndReason::Unspecified),
            }),
            coordinator_message::Msg::Drain(d) => Some(Event::Drain { reason: d.reason }),
        }
    }
}

/// Something the driver must do.
// `Send` carries a whole message (a wipe report is the largest); actions live
// for one transition, a handful at a time, so boxing would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Bind the Docker front for this lease, admitting only certificates
    /// that carry `key` (fixed when `in_use`: the lease was used before the
    /// agent restarted); answer with `FrontOpened` or `FrontFailed`.
    OpenFront {
        lease_id: String,
        key: KeyId,
        in_use: bool,
    },
    /// The open front admits only certificates that carry `key` from now on,
    /// unless its first connection fixed the key (then `FrontInUse` follows
    /// with the key that stays).
    SetFrontKey { key: KeyId },
    /// Drop the front's listener and cut every open connection.
    CloseFront,
    /// (Re)arm the lease deadline timer.
    ArmDeadline {
        lease_id: String,
        deadline: SystemTime,
    },
    /// Stop the lease deadline timer.
    DisarmDeadline,
    /// Start wiping; answer with `WipeDone`.
    StartWipe { lease_id: String },
    /// Send this to the coordinator (queued if disconnected).
    Send(Msg),
    /// Destroy the host through the provider; the agent then exits.
    Terminate { reason: String },
    /// Stop this agent's host (dockerd, directories) but leave the machine
    /// alone; the agent then exits. See [`Host::keep_on_shutdown`].
    Stop { reason: String },
}

/// The pure transition function: given where the host is and what happened,
/// where it goes and what must be done, in order.
pub fn next(host: Host, event: Event) -> (Host, Vec<Action>) {
    use HostState as S;

    // Shutdown, a dead dockerd and exhausted timeouts end the host from any
    // live state; handle them once here instead of in every arm.
    match (&host.state, &event) {
        (S::Terminating | S::Unhealthy, Event::Assign { lease_id, .. }) => {
            return (host, vec![reject(lease_id, "host is terminating")]);
        }
        (S::Terminating | S::Unhealthy, _) => return (host, vec![]),
        (S::Booting | S::Warming | S::Ready, Event::Shutdown) if host.keep_on_shutdown => {
            return stop(host, "agent shutting down; the machine stays");
        }
        (_, Event::Shutdown) => return terminate(host, "agent shutting down", false),
        (_, Event::Refused { reason }) => {
            let why = format!("the coordinator refuses this host: {reason}");
            return terminate(host, &why, true);
        }
        (_, Event::DaemonExited { detail }) => {
            let reason = format!("dockerd exited: {detail}");
            return terminate(host, &reason, true);
        }
        (state, Event::Timeout(timed_out)) if state == timed_out => {
            let reason = format!(
                "{state:?} took longer than {:?}",
                state.timeout().unwrap_or_default()
            );
            return terminate(host, &reason, true);
        }
        _ => {}
    }

    match (host.state, event) {
        (
            S::Booting,
            Event::Resumed {
                saved,
                lease,
                draining,
                now,
            },
        ) => resume(
            Host {
                draining: host.draining || draining,
                ..host
            },
            saved,
            lease,
            now,
        ),
        (S::Ready, Event::Isolated { for_ }) => terminate(
            host,
            &format!(
                "coordinator unreachable for {} while idle",
                humantime::format_duration(Duration::from_secs(for_.as_secs()))
            ),
            true,
        ),
        (S::Booting, Event::Booted) if host.draining => {
            terminate(host, "drained while booting", false)
        }
        (S::Booting, Event::Booted) => {
            let state = if host.warm { S::Warming } else { S::Ready };
            // Nothing to send: the link registers only once the host has
            // booted and is not warming, and `Register` carries the state.
            (Host { state, ..host }, vec![])
        }

        // Warm pool. Before booting only remember where the instance is
        // going; a Ready host that Auto Scaling returns to the pool (scale
        // in with instance reuse) stops being offered; Leased and later
        // states carry on, the instance ends with its lease anyway.
        (S::Booting, Event::Warmed { .. }) => (Host { warm: true, ..host }, vec![]),
        (S::Booting, Event::InService) => (
            Host {
                warm: false,
                ..host
            },
            vec![],
        ),
        (S::Ready, Event::Warmed { target }) => {
            let host = Host {
                state: S::Warming,
                warm: true,
                ..host
            };
            let reason = format!("returned to the warm pool (Warmed:{target})");
            let actions = vec![state_changed(&host, &reason)];
            (host, actions)
        }
        (S::Warming, Event::InService) => {
            let host = Host {
                state: S::Ready,
                warm: false,
                ..host
            };
            let actions = vec![state_changed(&host, "in service")];
            (host, actions)
        }

        // Leases: only an idle, non-draining host takes one; the same lease
        // again is acknowledged again (the coordinator may retry).
        (S::Ready, Event::Assign { lease_id, .. }) if host.draining => {
            (host, vec![reject(&lease_id, "host is draining")])
        }
        (
            S::Ready,
            Event::Assign {
                lease_id,
                build_id,
                deadline,
                key,
            },
        ) => {
            if lease_id.is_empty() {
                return (host, vec![reject(&lease_id, "empty lease id")]);
            }
            let Some(deadline) = deadline else {
                return (host, vec![reject(&lease_id, "lease has no valid deadline")]);
            };
            // Fail closed: a lease nobody's key is pinned to opens nothing.
            let Some(key) = key else {
                return (host, vec![reject(&lease_id, "lease has no client key")]);
            };
            let lease = Lease {
                id: lease_id.clone(),
                build_id,
                deadline,
                accepted: false,
                key: Some(key),
                in_use: false,
            };
            let host = Host {
                state: S::Leased,
                lease: Some(lease),
                ..host
            };
            (
                host,
                vec![Action::OpenFront {
                    lease_id,
                    key,
                    in_use: false,
                }],
            )
        }
        (S::Leased, Event::LeaseKey { lease_id, key }) if holds(&host, &lease_id) => {
            let mut host = host;
            match (host.lease.as_mut(), key) {
                // Once the certificate was used, the key is fixed: a
                // coordinator that asks otherwise is not followed.
                (Some(lease), Some(key)) if !lease.in_use => {
                    lease.key = Some(key);
                    (host, vec![Action::SetFrontKey { key }])
                }
                _ => (host, vec![]),
            }
        }
        (S::Leased, Event::FrontInUse { lease_id, key }) if holds(&host, &lease_id) => {
            let mut host = host;
            match host.lease.as_mut() {
                Some(lease) if !lease.in_use => {
                    lease.in_use = true;
                    // The key the front fixed, which is the one a move that
                    // crossed the first connection did not get to replace.
                    lease.key = Some(key);
                    (
                        host,
                        vec![Action::Send(Msg::LeaseInUse(LeaseInUse {
                            lease_id,
                            client_key_sha256: key.0.to_vec(),
                        }))],
                    )
                }
                _ => (host, vec![]),
            }
        }
        (S::Leased, Event::Assign { lease_id, .. }) => {
            let (same, accepted) = match &host.lease {
                Some(l) => (l.id == lease_id, l.accepted),
                None => (false, false),
            };
            match (same, accepted) {
                (true, true) => (
                    host,
                    vec![Action::Send(Msg::LeaseAccepted(LeaseAccepted { lease_id }))],
                ),
                // Acceptance of this very lease is under way.
                (true, false) => (host, vec![]),
                (false, _) => (
                    host,
                    vec![reject(&lease_id, "host is serving another lease")],
                ),
            }
        }
        (state, Event::Assign { lease_id, .. }) => {
            let reason = format!("host is {}", state.name());
            (host, vec![reject(&lease_id, &reason)])
        }

        (S::Leased, Event::FrontOpened { lease_id }) if holds(&host, &lease_id) => {
            let mut host = host;
            let mut actions = Vec::with_capacity(3);
            if let Some(lease) = host.lease.as_mut() {
                lease.accepted = true;
                actions.push(Action::ArmDeadline {
                    lease_id: lease_id.clone(),
                    deadline: lease.deadline,
                });
            }
            actions.push(state_changed(&host, "lease accepted"));
            actions.push(Action::Send(Msg::LeaseAccepted(LeaseAccepted { lease_id })));
            (host, actions)
        }
        (S::Leased, Event::FrontFailed { lease_id, error }) if holds(&host, &lease_id) => {
            let reason = format!("docker front failed to open: {error}");
            let mut host = host;
            host.lease = None;
            let (host, mut actions) = terminate(host, &reason, true);
            actions.insert(0, reject(&lease_id, &reason));
            (host, actions)
        }

        (
            S::Leased,
            Event::Renew {
                lease_id,
                deadline: Some(deadline),
            },
        ) if holds(&host, &lease_id) => {
            let mut host = host;
            let mut actions = vec![];
            if let Some(lease) = host.lease.as_mut() {
                lease.deadline = deadline;
                // Before acceptance the deadline is armed by FrontOpened.
                if lease.accepted {
                    actions.push(Action::ArmDeadline { lease_id, deadline });
                }
            }
            (host, actions)
        }

        (S::Leased, Event::End { lease_id, reason }) if holds(&host, &lease_id) => {
            let why = format!("lease ended by coordinator ({})", reason.as_str_name());
            begin_wipe(host, &why, None)
        }
        (S::Leased, Event::DeadlinePassed { lease_id }) if holds(&host, &lease_id) => {
            let ended = LeaseEnded {
                lease_id,
                reason: EndReason::Expired as i32,
            };
            begin_wipe(
                host,
                "lease deadline passed",
                Some(Action::Send(Msg::LeaseEnded(ended))),
            )
        }

        (S::Wiping, Event::WipeDone(report)) => {
            let mut actions = vec![Action::Send(Msg::WipeReport(report.clone()))];
            // A wipe that ended no lease is the check of a host whose state
            // was unknown after a restart: verified, it is as good as new.
            let checked = host.lease.is_none();
            let mut host = Host {
                lease: None,
                ..host
            };
            if !report.verified {
                let reason = if report.error.is_empty() {
                    "wipe left Docker objects behind".to_owned()
                } else {
                    format!("wipe not verified: {}", report.error)
                };
                let (host, more) = terminate(host, &reason, true);
                actions.extend(more);
                return (host, actions);
            }
            if (host.recycle || checked) && !host.draining {
                host.state = S::Ready;
                let why = if checked {
                    "restarted; wiped and verified"
                } else {
                    "wiped and verified; recycled"
                };
                actions.push(state_changed(&host, why));
                return (host, actions);
            }
            let reason = if host.draining {
                "drained"
            } else {
                "lease over; single-use host"
            };
            let (host, more) = terminate(host, reason, false);
            actions.extend(more);
            (host, actions)
        }

        (S::Ready | S::Warming, Event::Drain { reason }) => {
            terminate(host, &format!("drained: {reason}"), false)
        }
        (_, Event::Drain { .. }) => (
            Host {
                draining: true,
                ..host
            },
            vec![],
        ),

        // Everything else (stale lease ids, renewals for leases not held,
        // front events that raced a state change) is ignored on purpose.
        (_, _) => (host, vec![]),
    }
}

/// Booting -> wherever a host that outlived its agent must go. Nothing is
/// trusted that the state file does not vouch for: a live, accepted lease
/// resumes (front opened again, same deadline); a lease past its deadline or
/// one being wiped is wiped; an idle or unknown host is wiped and verified
/// before it can be Ready; a host that was ending ends.
fn resume(
    host: Host,
    saved: Option<HostState>,
    lease: Option<Lease>,
    now: SystemTime,
) -> (Host, Vec<Action>) {
    use HostState as S;
    match (saved, lease) {
        (Some(S::Terminating | S::Unhealthy), _) => {
            terminate(host, "restarted while the host was ending", true)
        }
        (Some(S::Leased), Some(lease)) if lease.deadline > now => {
            // Without its key the front could not tell the lease holder
            // from anyone else the CA gave a certificate of this lease.
            let Some(key) = lease.key else {
                return terminate(
                    host,
                    "restarted with a lease whose key was not recorded",
                    true,
                );
            };
            let lease_id = lease.id.clone();
            let in_use = lease.in_use;
            let host = Host {
                state: S::Leased,
                lease: Some(Lease {
                    accepted: false,
                    ..lease
                }),
                ..host
            };
            (
                host,
                vec![Action::OpenFront {
                    lease_id,
                    key,
                    in_use,
                }],
            )
        }
        (Some(S::Leased), Some(lease)) => {
            let ended = LeaseEnded {
                lease_id: lease.id.clone(),
                reason: EndReason::Expired as i32,
            };
            let host = Host {
                state: S::Leased,
                lease: Some(lease),
                ..host
            };
            begin_wipe(
                host,
                "restarted after the lease deadline",
                Some(Action::Send(Msg::LeaseEnded(ended))),
            )
        }
        (Some(S::Wiping), Some(lease)) => {
            let host = Host {
                state: S::Leased,
                lease: Some(lease),
                ..host
            };
            begin_wipe(host, "restarted while wiping", None)
        }
        // Ready, Booting, Warming, or no state file at all: the host may
        // have been handed a lease we never recorded. Wipe and verify.
        _ => {
            let host = Host {
                state: S::Wiping,
                lease: None,
                ..host
            };
            let actions = vec![
                state_changed(&host, "restarted; checking the host is clean"),
                Action::StartWipe {
                    lease_id: String::new(),
                },
            ];
            (host, actions)
        }
    }
}

fn holds(host: &Host, lease_id: &str) -> bool {
    host.lease_id() == Some(lease_id)
}

fn reject(lease_id: &str, reason: &str) -> Action {
    Action::Send(Msg::LeaseRejected(LeaseRejected {
        lease_id: lease_id.to_owned(),
        reason: reason.to_owned(),
    }))
}

fn state_changed(host: &Host, reason: &str) -> Action {
    Action::Send(Msg::StateChanged(StateChanged {
        state: host.state.to_proto() as i32,
        lease_id: host.lease_id().unwrap_or_default().to_owned(),
        reason: reason.to_owned(),
    }))
}

/// Leased -> Wiping: stop the deadline, cut the front, report, wipe.
fn begin_wipe(host: Host, reason: &str, first: Option<Action>) -> (Host, Vec<Action>) {
    let host = Host {
        state: HostState::Wiping,
        ..host
    };
    let lease_id = host.lease_id().unwrap_or_default().to_owned();
    let mut actions: Vec<Action> = vec![Action::DisarmDeadline];
    actions.extend(first);
    actions.push(Action::CloseFront);
    actions.push(state_changed(&host, reason));
    actions.push(Action::StartWipe { lease_id });
    (host, actions)
}

/// An idle host -> Terminating, keeping the machine.
fn stop(host: Host, reason: &str) -> (Host, Vec<Action>) {
    let host = Host {
        state: HostState::Terminating,
        ..host
    };
    let actions = vec![
        state_changed(&host, reason),
        Action::Stop {
            reason: reason.to_owned(),
        },
    ];
    (host, actions)
}

/// Any state -> (Unhealthy ->) Terminating.
fn terminate(host: Host, reason: &str, unhealthy: bool) -> (Host, Vec<Action>) {
    let mut actions = vec![];
    if host.state == HostState::Leased {
        actions.push(Action::DisarmDeadline);
        actions.push(Action::CloseFront);
    }
    let mut host = host;
    if unhealthy {
        host.state = HostState::Unhealthy;
        actions.push(state_changed(&host, reason));
    }
    host.state = HostState::Terminating;
    actions.push(state_changed(&host, reason));
    actions.push(Action::Terminate {
        reason: reason.to_owned(),
    });
    (host, actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const L: &str = "lease-1";
    /// The key leases of these tests are pinned to.
    const K: KeyId = KeyId([7; 32]);
    const K2: KeyId = KeyId([9; 32]);

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn host(state: HostState) -> Host {
        let lease = match state {
            HostState::Leased | HostState::Wiping => Some(Lease {
                id: L.into(),
                build_id: "b".into(),
                deadline: t(60),
                accepted: true,
                key: Some(K),
                in_use: false,
            }),
            _ => None,
        };
        Host {
            state,
            lease,
            draining: false,
            recycle: false,
            warm: false,
            keep_on_shutdown: false,
        }
    }

    fn sc(state: pb::HostState, lease: &str, reason: &str) -> Action {
        Action::Send(Msg::StateChanged(StateChanged {
            state: state as i32,
            lease_id: lease.into(),
            reason: reason.into(),
        }))
    }

    fn rej(lease: &str, reason: &str) -> Action {
        reject(lease, reason)
    }

    fn accepted(lease: &str) -> Action {
        Action::Send(Msg::LeaseAccepted(LeaseAccepted {
            lease_id: lease.into(),
        }))
    }

    fn assign(lease: &str, deadline: Option<SystemTime>) -> Event {
        Event::Assign {
            lease_id: lease.into(),
            build_id: "b".into(),
            deadline,
            key: Some(K),
        }
    }

    fn report(verified: bool, error: &str) -> WipeReport {
        WipeReport {
            lease_id: L.into(),
            verified,
            containers_removed: 1,
            error: error.into(),
            ..WipeReport::default()
        }
    }

    fn term(reason: &str) -> Action {
        Action::Terminate {
            reason: reason.into(),
        }
    }

    /// (name, start, event, expected state, expected actions)
    type Row = (&'static str, Host, Event, HostState, Vec<Action>);

    fn table() -> Vec<Row> {
        use HostState as S;
        use pb::HostState as P;
        let leased_unaccepted = Host {
            lease: Some(Lease {
                id: L.into(),
                build_id: "b".into(),
                deadline: t(60),
                accepted: false,
                key: Some(K),
                in_use: false,
            }),
            ..host(S::Leased)
        };
        let warm = |state| Host {
            warm: true,
            ..host(state)
        };
        let keeps = |state| Host {
            keep_on_shutdown: true,
            ..host(state)
        };
        let stopped = |lease: &str| {
            vec![
                sc(
                    P::Terminating,
                    lease,
                    "agent shutting down; the machine stays",
                ),
                Action::Stop {
                    reason: "agent shutting down; the machine stays".into(),
                },
            ]
        };
        vec![
            (
                "boot -> ready",
                host(S::Booting),
                Event::Booted,
                S::Ready,
                vec![],
            ),
            // Warm pool.
            (
                "warmed while booting is remembered",
                host(S::Booting),
                Event::Warmed {
                    target: "Pending".into(),
                },
                S::Booting,
                vec![],
            ),
            (
                "in service while booting clears it",
                warm(S::Booting),
                Event::InService,
                S::Booting,
                vec![],
            ),
            (
                "boot of a warm instance -> warming, nothing sent",
                warm(S::Booting),
                Event::Booted,
                S::Warming,
                vec![],
            ),
            (
                "warming stays warming while the pool keeps it",
                warm(S::Warming),
                Event::Warmed {
                    target: "Stopped".into(),
                },
                S::Warming,
                vec![],
            ),
            (
                "warming -> ready when in service",
                warm(S::Warming),
                Event::InService,
                S::Ready,
                vec![sc(P::Ready, "", "in service")],
            ),
            (
                "assign while warming is rejected",
                warm(S::Warming),
                assign(L, Some(t(60))),
                S::Warming,
                vec![rej(L, "host is warming")],
            ),
            (
                "ready host returned to the warm pool is no longer offered",
                host(S::Ready),
                Event::Warmed {
                    target: "Stopped".into(),
                },
                S::Warming,
                vec![sc(
                    P::Warming,
                    "",
                    "returned to the warm pool (Warmed:Stopped)",
                )],
            ),
            (
                "leased host ignores the warm pool",
                host(S::Leased),
                Event::Warmed {
                    target: "Stopped".into(),
                },
                S::Leased,
                vec![],
            ),
            (
                "in service while ready is nothing new",
                host(S::Ready),
                Event::InService,
                S::Ready,
                vec![],
            ),
            (
                "drain while warming -> terminate",
                warm(S::Warming),
                Event::Drain { reason: "x".into() },
                S::Terminating,
                vec![sc(P::Terminating, "", "drained: x"), term("drained: x")],
            ),
            (
                "dockerd died while warming -> unhealthy, terminate",
                warm(S::Warming),
                Event::DaemonExited {
                    detail: "signal: 9".into(),
                },
                S::Terminating,
                vec![
                    sc(P::Unhealthy, "", "dockerd exited: signal: 9"),
                    sc(P::Terminating, "", "dockerd exited: signal: 9"),
                    term("dockerd exited: signal: 9"),
                ],
            ),
            // Shutdown signals on a provider whose machine outlives the agent.
            (
                "stopped while warming: the machine stays (a stop into the warm pool is no lease end)",
                Host {
                    keep_on_shutdown: true,
                    ..warm(S::Warming)
                },
                Event::Shutdown,
                S::Terminating,
                stopped(""),
            ),
            (
                "stopped while booting: the machine stays",
                keeps(S::Booting),
                Event::Shutdown,
                S::Terminating,
                stopped(""),
            ),
            (
                "stopped while ready: the machine stays",
                keeps(S::Ready),
                Event::Shutdown,
                S::Terminating,
                stopped(""),
            ),
            (
                "stopped while leased: the used host ends",
                keeps(S::Leased),
                Event::Shutdown,
                S::Terminating,
                vec![
                    Action::DisarmDeadline,
                    Action::CloseFront,
                    sc(P::Terminating, L, "agent shutting down"),
                    term("agent shutting down"),
                ],
            ),
            (
                "stopped while wiping: the used host ends",
                keeps(S::Wiping),
                Event::Shutdown,
                S::Terminating,
                vec![
                    sc(P::Terminating, L, "agent shutting down"),
                    term("agent shutting down"),
                ],
            ),
            (
                "local host: shutdown while warming still terminates",
                warm(S::Warming),
                Event::Shutdown,
                S::Terminating,
                vec![
                    sc(P::Terminating, "", "agent shutting down"),
                    term("agent shutting down"),
                ],
            ),
            (
                "boot while draining -> terminate",
                Host {
                    draining: true,
                    ..host(S::Booting)
                },
                Event::Booted,
                S::Terminating,
                vec![
                    sc(P::Terminating, "", "drained while booting"),
                    term("drained while booting"),
                ],
            ),
            (
                "assign while booting",
                host(S::Booting),
                assign(L, Some(t(60))),
                S::Booting,
                vec![rej(L, "host is booting")],
            ),
            (
                "assign while ready opens front",
                host(S::Ready),
                assign(L, Some(t(60))),
                S::Leased,
                vec![Action::OpenFront {
                    lease_id: L.into(),
                    key: K,
                    in_use: false,
                }],
            ),
            (
                "assign without deadline",
                host(S::Ready),
                assign(L, None),
                S::Ready,
                vec![rej(L, "lease has no valid deadline")],
            ),
            (
                "assign without a client key: nothing would tell its holder from others",
                host(S::Ready),
                Event::Assign {
                    lease_id: L.into(),
                    build_id: "b".into(),
                    deadline: Some(t(60)),
                    key: None,
                },
                S::Ready,
                vec![rej(L, "lease has no client key")],
            ),
            (
                "the lease's key moves before first use",
                host(S::Leased),
                Event::LeaseKey {
                    lease_id: L.into(),
                    key: Some(K2),
                },
                S::Leased,
                vec![Action::SetFrontKey { key: K2 }],
            ),
            (
                "the key of another lease does not move",
                host(S::Leased),
                Event::LeaseKey {
                    lease_id: "other".into(),
                    key: Some(K2),
                },
                S::Leased,
                vec![],
            ),
            (
                "first admitted connection: the lease is in use",
                host(S::Leased),
                Event::FrontInUse {
                    lease_id: L.into(),
                    key: K,
                },
                S::Leased,
                vec![Action::Send(Msg::LeaseInUse(LeaseInUse {
                    lease_id: L.into(),
                    client_key_sha256: K.0.to_vec(),
                }))],
            ),
            (
                "first use with the key the front fixed, though a move crossed it",
                host(S::Leased),
                Event::FrontInUse {
                    lease_id: L.into(),
                    key: K2,
                },
                S::Leased,
                vec![Action::Send(Msg::LeaseInUse(LeaseInUse {
                    lease_id: L.into(),
                    client_key_sha256: K2.0.to_vec(),
                }))],
            ),
            (
                "once in use, the key no longer moves",
                Host {
                    lease: host(S::Leased).lease.map(|l| Lease { in_use: true, ..l }),
                    ..host(S::Leased)
                },
                Event::LeaseKey {
                    lease_id: L.into(),
                    key: Some(K2),
                },
                S::Leased,
                vec![],
            ),
            (
                "refused by the coordinator: ended, never to serve",
                host(S::Ready),
                Event::Refused {
                    reason: "host h has held a lease".into(),
                },
                S::Terminating,
                vec![
                    sc(
                        P::Unhealthy,
                        "",
                        "the coordinator refuses this host: host h has held a lease",
                    ),
                    sc(
                        P::Terminating,
                        "",
                        "the coordinator refuses this host: host h has held a lease",
                    ),
                    term("the coordinator refuses this host: host h has held a lease"),
                ],
            ),
            (
                "in use is reported once",
                Host {
                    lease: host(S::Leased).lease.map(|l| Lease { in_use: true, ..l }),
                    ..host(S::Leased)
                },
                Event::FrontInUse {
                    lease_id: L.into(),
                    key: K,
                },
                S::Leased,
                vec![],
            ),
            (
                "assign with empty id",
                host(S::Ready),
                assign("", Some(t(60))),
                S::Ready,
                vec![rej("", "empty lease id")],
            ),
            (
                "assign while draining",
                Host {
                    draining: true,
                    ..host(S::Ready)
                },
                assign(L, Some(t(60))),
                S::Ready,
                vec![rej(L, "host is draining")],
            ),
            (
                "front opened -> leased, accepted",
                leased_unaccepted.clone(),
                Event::FrontOpened { lease_id: L.into() },
                S::Leased,
                vec![
                    Action::ArmDeadline {
                        lease_id: L.into(),
                        deadline: t(60),
                    },
                    sc(P::Leased, L, "lease accepted"),
                    accepted(L),
                ],
            ),
            (
                "front failed -> reject, unhealthy, terminate",
                leased_unaccepted.clone(),
                Event::FrontFailed {
                    lease_id: L.into(),
                    error: "EADDRINUSE".into(),
                },
                S::Terminating,
                vec![
                    rej(L, "docker front failed to open: EADDRINUSE"),
                    Action::DisarmDeadline,
                    Action::CloseFront,
                    sc(P::Unhealthy, "", "docker front failed to open: EADDRINUSE"),
                    sc(
                        P::Terminating,
                        "",
                        "docker front failed to open: EADDRINUSE",
                    ),
                    term("docker front failed to open: EADDRINUSE"),
                ],
            ),
            (
                "same assign again is idempotent",
                host(S::Leased),
                assign(L, Some(t(60))),
                S::Leased,
                vec![accepted(L)],
            ),
            (
                "same assign before acceptance is quiet",
                leased_unaccepted.clone(),
                assign(L, Some(t(60))),
                S::Leased,
                vec![],
            ),
            (
                "other assign while leased",
                host(S::Leased),
                assign("other", Some(t(60))),
                S::Leased,
                vec![rej("other", "host is serving another lease")],
            ),
            (
                "assign while wiping",
                host(S::Wiping),
                assign("other", Some(t(60))),
                S::Wiping,
                vec![rej("other", "host is wiping")],
            ),
            (
                "assign while terminating",
                host(S::Terminating),
                assign("x", Some(t(60))),
                S::Terminating,
                vec![rej("x", "host is terminating")],
            ),
            (
                "renew current lease re-arms",
                host(S::Leased),
                Event::Renew {
                    lease_id: L.into(),
                    deadline: Some(t(120)),
                },
                S::Leased,
                vec![Action::ArmDeadline {
                    lease_id: L.into(),
                    deadline: t(120),
                }],
            ),
            (
                "renew other lease ignored",
                host(S::Leased),
                Event::Renew {
                    lease_id: "x".into(),
                    deadline: Some(t(120)),
                },
                S::Leased,
                vec![],
            ),
            (
                "renew without deadline ignored",
                host(S::Leased),
                Event::Renew {
                    lease_id: L.into(),
                    deadline: None,
                },
                S::Leased,
                vec![],
            ),
            (
                "renew while ready ignored",
                host(S::Ready),
                Event::Renew {
                    lease_id: L.into(),
                    deadline: Some(t(1)),
                },
                S::Ready,
                vec![],
            ),
            (
                "end current lease -> wipe",
                host(S::Leased),
                Event::End {
                    lease_id: L.into(),
                    reason: EndReason::Released,
                },
                S::Wiping,
                vec![
                    Action::DisarmDeadline,
                    Action::CloseFront,
                    sc(
                        P::Wiping,
                        L,
                        "lease ended by coordinator (END_REASON_RELEASED)",
                    ),
                    Action::StartWipe { lease_id: L.into() },
                ],
            ),
            (
                "end other lease ignored",
                host(S::Leased),
                Event::End {
                    lease_id: "x".into(),
                    reason: EndReason::Released,
                },
                S::Leased,
                vec![],
            ),
            (
                "end while wiping ignored",
                host(S::Wiping),
                Event::End {
                    lease_id: L.into(),
                    reason: EndReason::Released,
                },
                S::Wiping,
                vec![],
            ),
            (
                "deadline -> lease ended expired, wipe",
                host(S::Leased),
                Event::DeadlinePassed { lease_id: L.into() },
                S::Wiping,
                vec![
                    Action::DisarmDeadline,
                    Action::Send(Msg::LeaseEnded(LeaseEnded {
                        lease_id: L.into(),
                        reason: EndReason::Expired as i32,
                    })),
                    Action::CloseFront,
                    sc(P::Wiping, L, "lease deadline passed"),
                    Action::StartWipe { lease_id: L.into() },
                ],
            ),
            (
                "stale deadline ignored",
                host(S::Leased),
                Event::DeadlinePassed {
                    lease_id: "old".into(),
                },
                S::Leased,
                vec![],
            ),
            (
                "verified wipe, single-use -> terminate",
                host(S::Wiping),
                Event::WipeDone(report(true, "")),
                S::Terminating,
                vec![
                    Action::Send(Msg::WipeReport(report(true, ""))),
                    sc(P::Terminating, "", "lease over; single-use host"),
                    term("lease over; single-use host"),
                ],
            ),
            (
                "verified wipe, recycle -> ready",
                Host {
                    recycle: true,
                    ..host(S::Wiping)
                },
                Event::WipeDone(report(true, "")),
                S::Ready,
                vec![
                    Action::Send(Msg::WipeReport(report(true, ""))),
                    sc(P::Ready, "", "wiped and verified; recycled"),
                ],
            ),
            (
                "verified wipe, recycle but draining -> terminate",
                Host {
                    recycle: true,
                    draining: true,
                    ..host(S::Wiping)
                },
                Event::WipeDone(report(true, "")),
                S::Terminating,
                vec![
                    Action::Send(Msg::WipeReport(report(true, ""))),
                    sc(P::Terminating, "", "drained"),
                    term("drained"),
                ],
            ),
            (
                "unverified wipe -> unhealthy -> terminate even in recycle mode",
                Host {
                    recycle: true,
                    ..host(S::Wiping)
                },
                Event::WipeDone(report(false, "1 image left")),
                S::Terminating,
                vec![
                    Action::Send(Msg::WipeReport(report(false, "1 image left"))),
                    sc(P::Unhealthy, "", "wipe not verified: 1 image left"),
                    sc(P::Terminating, "", "wipe not verified: 1 image left"),
                    term("wipe not verified: 1 image left"),
                ],
            ),
            (
                "drain while ready -> terminate now",
                host(S::Ready),
                Event::Drain {
                    reason: "scale in".into(),
                },
                S::Terminating,
                vec![
                    sc(P::Terminating, "", "drained: scale in"),
                    term("drained: scale in"),
                ],
            ),
            (
                "drain while leased waits",
                host(S::Leased),
                Event::Drain { reason: "x".into() },
                S::Leased,
                vec![],
            ),
            (
                "drain while wiping waits",
                host(S::Wiping),
                Event::Drain { reason: "x".into() },
                S::Wiping,
                vec![],
            ),
            (
                "shutdown while leased closes front and terminates",
                host(S::Leased),
                Event::Shutdown,
                S::Terminating,
                vec![
                    Action::DisarmDeadline,
                    Action::CloseFront,
                    sc(P::Terminating, L, "agent shutting down"),
                    term("agent shutting down"),
                ],
            ),
            (
                "shutdown while terminating ignored",
                host(S::Terminating),
                Event::Shutdown,
                S::Terminating,
                vec![],
            ),
            (
                "dockerd died while ready -> unhealthy",
                host(S::Ready),
                Event::DaemonExited {
                    detail: "exit status: 1".into(),
                },
                S::Terminating,
                vec![
                    sc(P::Unhealthy, "", "dockerd exited: exit status: 1"),
                    sc(P::Terminating, "", "dockerd exited: exit status: 1"),
                    term("dockerd exited: exit status: 1"),
                ],
            ),
            (
                "wipe timeout -> unhealthy",
                host(S::Wiping),
                Event::Timeout(S::Wiping),
                S::Terminating,
                vec![
                    sc(P::Unhealthy, L, "Wiping took longer than 300s"),
                    sc(P::Terminating, L, "Wiping took longer than 300s"),
                    term("Wiping took longer than 300s"),
                ],
            ),
            (
                "timeout of a state already left is ignored",
                host(S::Ready),
                Event::Timeout(S::Wiping),
                S::Ready,
                vec![],
            ),
            (
                "wipe done outside wiping ignored",
                host(S::Ready),
                Event::WipeDone(report(true, "")),
                S::Ready,
                vec![],
            ),
        ]
    }

    #[test]
    fn transition_table() {
        for (name, start, event, want_state, want_actions) in table() {
            let (got, actions) = next(start, event);
            assert_eq!(got.state, want_state, "{name}: state");
            assert_eq!(actions, want_actions, "{name}: actions");
        }
    }

    #[test]
    fn resumed_and_isolated_hosts() {
        use HostState as S;
        use pb::HostState as P;
        let held = Lease {
            id: L.into(),
            build_id: "b".into(),
            deadline: t(60),
            accepted: true,
            key: Some(K),
            in_use: false,
        };
        let resumed = |saved, lease, now| Event::Resumed {
            saved,
            lease,
            draining: false,
            now,
        };
        let rows: Vec<Row> = vec![
            (
                "leased, deadline ahead: the lease resumes behind a new front",
                host(S::Booting),
                resumed(Some(S::Leased), Some(held.clone()), t(10)),
                S::Leased,
                vec![Action::OpenFront {
                    lease_id: L.into(),
                    key: K,
                    in_use: false,
                }],
            ),
            (
                "leased, deadline passed: ended as expired, wiped",
                host(S::Booting),
                resumed(Some(S::Leased), Some(held.clone()), t(61)),
                S::Wiping,
                vec![
                    Action::DisarmDeadline,
                    Action::Send(Msg::LeaseEnded(LeaseEnded {
                        lease_id: L.into(),
                        reason: EndReason::Expired as i32,
                    })),
                    Action::CloseFront,
                    sc(P::Wiping, L, "restarted after the lease deadline"),
                    Action::StartWipe { lease_id: L.into() },
                ],
            ),
            (
                "wiping: wiped again",
                host(S::Booting),
                resumed(Some(S::Wiping), Some(held.clone()), t(10)),
                S::Wiping,
                vec![
                    Action::DisarmDeadline,
                    Action::CloseFront,
                    sc(P::Wiping, L, "restarted while wiping"),
                    Action::StartWipe { lease_id: L.into() },
                ],
            ),
            (
                "ready or unknown: checked by a wipe before Ready",
                host(S::Booting),
                resumed(None, None, t(10)),
                S::Wiping,
                vec![
                    sc(P::Wiping, "", "restarted; checking the host is clean"),
                    Action::StartWipe {
                        lease_id: String::new(),
                    },
                ],
            ),
            (
                "terminating: ends",
                host(S::Booting),
                resumed(Some(S::Terminating), None, t(10)),
                S::Terminating,
                vec![
                    sc(P::Unhealthy, "", "restarted while the host was ending"),
                    sc(P::Terminating, "", "restarted while the host was ending"),
                    term("restarted while the host was ending"),
                ],
            ),
            (
                "verified check wipe: Ready even single-use",
                Host {
                    lease: None,
                    ..host(S::Wiping)
                },
                Event::WipeDone(report(true, "")),
                S::Ready,
                vec![
                    Action::Send(Msg::WipeReport(report(true, ""))),
                    sc(P::Ready, "", "restarted; wiped and verified"),
                ],
            ),
            (
                "unverified check wipe: terminates",
                Host {
                    lease: None,
                    ..host(S::Wiping)
                },
                Event::WipeDone(report(false, "1 volume left")),
                S::Terminating,
                vec![
                    Action::Send(Msg::WipeReport(report(false, "1 volume left"))),
                    sc(P::Unhealthy, "", "wipe not verified: 1 volume left"),
                    sc(P::Terminating, "", "wipe not verified: 1 volume left"),
                    term("wipe not verified: 1 volume left"),
                ],
            ),
            (
                "isolated while idle: ends",
                host(S::Ready),
                Event::Isolated {
                    for_: Duration::from_secs(301),
                },
                S::Terminating,
                vec![
                    sc(
                        P::Unhealthy,
                        "",
                        "coordinator unreachable for 5m 1s while idle",
                    ),
                    sc(
                        P::Terminating,
                        "",
                        "coordinator unreachable for 5m 1s while idle",
                    ),
                    term("coordinator unreachable for 5m 1s while idle"),
                ],
            ),
            (
                "isolated while leased: keeps the lease",
                host(S::Leased),
                Event::Isolated {
                    for_: Duration::from_secs(301),
                },
                S::Leased,
                vec![],
            ),
            (
                "resumed outside booting is ignored",
                host(S::Ready),
                resumed(None, None, t(10)),
                S::Ready,
                vec![],
            ),
        ];
        for (name, start, event, want_state, want_actions) in rows {
            let (got, actions) = next(start, event);
            assert_eq!(got.state, want_state, "{name}: state");
            assert_eq!(actions, want_actions, "{name}: actions");
        }
    }

    #[test]
    fn lease_bookkeeping() {
        // Assign records the lease unaccepted; FrontOpened accepts it; renew
        // moves the deadline; the wipe result clears it.
        let (h, _) = next(host(HostState::Ready), assign(L, Some(t(60))));
        let lease = h.lease.clone().unwrap();
        assert_eq!(
            (lease.id.as_str(), lease.accepted, lease.deadline),
            (L, false, t(60))
        );
        let (h, _) = next(h, Event::FrontOpened { lease_id: L.into() });
        assert!(h.lease.as_ref().unwrap().accepted);
        let (h, _) = next(
            h,
            Event::Renew {
                lease_id: L.into(),
                deadline: Some(t(90)),
            },
        );
        assert_eq!(h.lease.as_ref().unwrap().deadline, t(90));
        let (h, _) = next(
            h,
            Event::End {
                lease_id: L.into(),
                reason: EndReason::Released,
            },
        );
        assert_eq!(
            h.lease_id(),
            Some(L),
            "lease id kept while wiping for the report"
        );
        let (h, _) = next(
            Host { recycle: true, ..h },
            Event::WipeDone(report(true, "")),
        );
        assert_eq!((h.state, h.lease_id()), (HostState::Ready, None));
        // Drain while leased is remembered and honoured after the lease.
        let (h, _) = next(h, assign("l2", Some(t(100))));
        let (h, _) = next(h, Event::Drain { reason: "x".into() });
        assert!(h.draining);
        let (h, _) = next(
            h,
            Event::End {
                lease_id: "l2".into(),
                reason: EndReason::Released,
            },
        );
        let (h, actions) = next(h, Event::WipeDone(report(true, "")));
        assert_eq!(h.state, HostState::Terminating);
        assert!(actions.contains(&term("drained")));
    }

    #[test]
    fn every_state_has_a_wire_value_and_documented_timeout() {
        use HostState as S;
        let all = [
            S::Booting,
            S::Warming,
            S::Ready,
            S::Leased,
            S::Wiping,
            S::Terminating,
            S::Unhealthy,
        ];
        for s in all {
            assert_ne!(s.to_proto(), pb::HostState::Unspecified);
        }
        assert_eq!(S::Wiping.timeout(), Some(WIPE_TIMEOUT));
        assert_eq!(S::Ready.timeout(), None);
        assert_eq!(S::Leased.timeout(), None);
    }

    #[test]
    fn coordinator_messages_become_events() {
        use pb::{AssignLease, Drain, EndLease, Registered, RenewLease};
        let ts = berth_proto::from_system_time(t(5));
        let m = |msg| CoordinatorMessage { msg: Some(msg) };
        assert_eq!(
            Event::from_coordinator(m(coordinator_message::Msg::AssignLease(AssignLease {
                lease_id: L.into(),
                build_id: "b".into(),
                deadline: Some(ts),
                client_key_sha256: K.0.to_vec(),
            }))),
            Some(assign(L, Some(t(5))))
        );
        // A negative timestamp is not a deadline.
        let bad = prost_types::Timestamp {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(
            Event::from_coordinator(m(coordinator_message::Msg::RenewLease(RenewLease {
                lease_id: L.into(),
                deadline: Some(bad),
            }))),
            Some(Event::Renew {
                lease_id: L.into(),
                deadline: None
            })
        );
        assert_eq!(
            Event::from_coordinator(m(coordinator_message::Msg::EndLease(EndLease {
                lease_id: L.into(),
                reason: 99
            }))),
            Some(Event::End {
                lease_id: L.into(),
                reason: EndReason::Unspecified
            })
        );
        assert_eq!(
            Event::from_coordinator(m(coordinator_message::Msg::LeaseKey(pb::LeaseKey {
                lease_id: L.into(),
                client_key_sha256: K2.0.to_vec(),
            }))),
            Some(Event::LeaseKey {
                lease_id: L.into(),
                key: Some(K2),
            })
        );
        // A key of the wrong length is no key.
        assert_eq!(
            Event::from_coordinator(m(coordinator_message::Msg::AssignLease(AssignLease {
                lease_id: L.into(),
                build_id: "b".into(),
                deadline: Some(ts),
                client_key_sha256: vec![1, 2, 3],
            }))),
            Some(Event::Assign {
                lease_id: L.into(),
                build_id: "b".into(),
                deadline: Some(t(5)),
                key: None,
            })
        );
        assert_eq!(
            Event::from_coordinator(m(coordinator_message::Msg::Drain(Drain {
                reason: "r".into()
            }))),
            Some(Event::Drain { reason: "r".into() })
        );
        assert_eq!(
            Event::from_coordinator(m(coordinator_message::Msg::Registered(Registered {
                heartbeat_interval_ms: 5,
                ..Registered::default()
            }))),
            None
        );
        assert_eq!(
            Event::from_coordinator(CoordinatorMessage { msg: None }),
            None
        );
    }
}
