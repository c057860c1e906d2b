//! The lease lifecycle as the coordinator sees it: a documented state enum and
//! a pure transition function. The pool (`crate::pool`) feeds it events and
//! carries out the actions it returns; nothing here does I/O or reads a clock.

use berth_proto::v1 as pb;

/// Where a lease is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseState {
    /// Waiting in the FIFO queue for a Ready host; ends when the request's
    /// `wait` runs out (-> `Failed`).
    Queued,
    /// A host was chosen and told; waiting for its agent to accept. Bounded
    /// by `ASSIGN_TIMEOUT` in the pool, after which the lease is queued again
    /// (or, once its Acquire was answered, ends: see [`answered`]).
    Assigned,
    /// The agent accepted: its Docker endpoint is open to this lease until
    /// the deadline.
    Active,
    /// Ended by the lease holder.
    Released,
    /// Ended because its deadline passed.
    Expired,
    /// Ended because its host went away, failed, or was drained.
    HostLost,
    /// Never became active: the wait ran out or the client stopped waiting.
    Failed,
}

impl LeaseState {
    /// True once the lease can never be active again.
    pub fn is_ended(self) -> bool {
        matches!(
            self,
            Self::Released | Self::Expired | Self::HostLost | Self::Failed
        )
    }

    /// True while the lease holds (or is about to hold) a host.
    pub fn holds_host(self) -> bool {
        matches!(self, Self::Assigned | Self::Active)
    }

    pub fn to_proto(self) -> pb::LeaseState {
        match self {
            Self::Queued => pb::LeaseState::Queued,
            Self::Assigned => pb::LeaseState::Assigned,
            Self::Active => pb::LeaseState::Active,
            Self::Released => pb::LeaseState::Released,
            Self::Expired => pb::LeaseState::Expired,
            Self::HostLost => pb::LeaseState::HostLost,
            Self::Failed => pb::LeaseState::Failed,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Assigned => "assigned",
            Self::Active => "active",
            Self::Released => "released",
            Self::Expired => "expired",
            Self::HostLost => "host-lost",
            Self::Failed => "failed",
        }
    }
}

/// Something that happened to a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    /// The pool picked a Ready host for a queued lease.
    HostChosen,
    /// The host's agent accepted the lease.
    Accepted,
    /// The host's agent refused the lease (it was not Ready after all).
    Rejected,
    /// The agent did not answer the assignment in time.
    AssignTimedOut,
    /// The lease holder released it.
    Release,
    /// The lease's deadline passed.
    DeadlinePassed,
    /// The host disappeared, failed or was drained under the lease.
    HostLost,
    /// The queue wait ran out before a host was found.
    WaitExpired,
    /// Nobody is waiting for this queued lease any more.
    Abandoned,
    /// The agent ended the lease on its own (it enforces deadlines itself).
    EndedByAgent(pb::EndReason),
    /// The host rejected the lease, did not accept it in time or was lost
    /// after the build was answered with its address (see [`answered`]).
    HostFailed,
}

/// What the pool must do after a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// Send `AssignLease` to the chosen host.
    SendAssign,
    /// Send `EndLease` with this reason to the lease's host.
    SendEnd(pb::EndReason),
    /// Put the lease back at the front of the queue and forget its host.
    Requeue,
    /// The lease no longer holds its host: the host is wiping, not Ready.
    ReleaseHost,
}

/// The pure transition function: the new state and what to do.
///
/// Events that make no sense in a state leave it unchanged with no actions;
/// the one exception is an agent accepting a lease that already ended, which
/// must be told again to let go.
pub fn next(state: LeaseState, event: LeaseEvent) -> (LeaseState, Vec<LeaseAction>) {
    use LeaseAction as A;
    use LeaseEvent as E;
    use LeaseState as S;
    match (state, event) {
        (S::Queued, E::HostChosen) => (S::Assigned, vec![A::SendAssign]),
        (S::Queued, E::WaitExpired | E::Abandoned) => (S::Failed, vec![]),
        (S::Queued, E::Release) => (S::Released, vec![]),

        (S::Assigned, E::Accepted) => (S::Active, vec![]),
        (S::Assigned, E::Rejected | E::AssignTimedOut) => (S::Queued, vec![A::Requeue]),
        (S::Assigned, E::HostLost) => (S::Queued, vec![A::Requeue]),
        (S::Assigned, E::HostFailed) => (
            S::HostLost,
            vec![A::SendEnd(pb::EndReason::HostLost), A::ReleaseHost],
        ),

        (S::Assigned | S::Active, E::Release) => (
            S::Released,
            vec![A::SendEnd(pb::EndReason::Released), A::ReleaseHost],
        ),
        (S::Assigned | S::Active, E::DeadlinePassed) => (
            S::Expired,
            vec![A::SendEnd(pb::EndReason::Expired), A::ReleaseHost],
        ),
        (S::Active, E::HostLost) => (S::HostLost, vec![A::ReleaseHost]),
        (S::Assigned | S::Active, E::EndedByAgent(reason)) => {
            let state = match reason {
                pb::EndReason::Released => S::Released,
                pb::EndReason::Expired => S::Expired,
                pb::EndReason::Drained | pb::EndReason::HostLost | pb::EndReason::Unspecified => {
                    S::HostLost
                }
            };
            (state, vec![A::ReleaseHost])
        }

        (s, E::Accepted) if s.is_ended() => (s, vec![A::SendEnd(end_reason(s))]),
        (s, _) => (s, vec![]),
    }
}

/// The event a lease whose Acquire was answered sees instead of `event`.
///
/// The answer goes out once the assignment is durable, before the agent
/// accepts: the build then holds a certificate and its host's address. A
/// host that rejects the lease, does not accept it in time or is lost can
/// no longer hand it to another host (the build would be talking to the
/// wrong address), so the lease ends instead of going back to the queue.
pub fn answered(state: LeaseState, event: LeaseEvent) -> LeaseEvent {
    use LeaseEvent as E;
    match (state, event) {
        (LeaseState::Assigned, E::Rejected | E::AssignTimedOut | E::HostLost) => E::HostFailed,
        _ => event,
    }
}

/// The reason to give an agent for a lease that ended in `state`.
pub fn end_reason(state: LeaseState) -> pb::EndReason {
    match state {
        LeaseState::Expired => pb::EndReason::Expired,
        LeaseState::HostLost => pb::EndReason::HostLost,
        _ => pb::EndReason::Released,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LeaseAction as A;
    use LeaseEvent as E;
    use LeaseState as S;

    const ALL_STATES: [S; 7] = [
        S::Queued,
        S::Assigned,
        S::Active,
        S::Released,
        S::Expired,
        S::HostLost,
        S::Failed,
    ];

    const ALL_EVENTS: [E; 11] = [
        E::HostChosen,
        E::Accepted,
        E::Rejected,
        E::AssignTimedOut,
        E::Release,
        E::DeadlinePassed,
        E::HostLost,
        E::WaitExpired,
        E::Abandoned,
        E::EndedByAgent(pb::EndReason::Expired),
        E::HostFailed,
    ];

    #[test]
    fn transition_table() {
        let table: &[(S, E, S, &[A])] = &[
            (S::Queued, E::HostChosen, S::Assigned, &[A::SendAssign]),
            (S::Queued, E::WaitExpired, S::Failed, &[]),
            (S::Queued, E::Abandoned, S::Failed, &[]),
            (S::Queued, E::Release, S::Released, &[]),
            (S::Queued, E::Accepted, S::Queued, &[]),
            (S::Queued, E::DeadlinePassed, S::Queued, &[]),
            (S::Assigned, E::Accepted, S::Active, &[]),
            (S::Assigned, E::Rejected, S::Queued, &[A::Requeue]),
            (S::Assigned, E::AssignTimedOut, S::Queued, &[A::Requeue]),
            (S::Assigned, E::HostLost, S::Queued, &[A::Requeue]),
            (
                S::Assigned,
                E::HostFailed,
                S::HostLost,
                &[A::SendEnd(pb::EndReason::HostLost), A::ReleaseHost],
            ),
            (S::Active, E::HostFailed, S::Active, &[]),
            (
                S::Assigned,
                E::Release,
                S::Released,
                &[A::SendEnd(pb::EndReason::Released), A::ReleaseHost],
            ),
            (
                S::Active,
                E::Release,
                S::Released,
                &[A::SendEnd(pb::EndReason::Released), A::ReleaseHost],
            ),
            (
                S::Active,
                E::DeadlinePassed,
                S::Expired,
                &[A::SendEnd(pb::EndReason::Expired), A::ReleaseHost],
            ),
            (S::Active, E::HostLost, S::HostLost, &[A::ReleaseHost]),
            (
                S::Active,
                E::EndedByAgent(pb::EndReason::Expired),
                S::Expired,
                &[A::ReleaseHost],
            ),
            (
                S::Active,
                E::EndedByAgent(pb::EndReason::Drained),
                S::HostLost,
                &[A::ReleaseHost],
            ),
            (S::Active, E::HostChosen, S::Active, &[]),
            (S::Active, E::WaitExpired, S::Active, &[]),
            (
                S::Released,
                E::Accepted,
                S::Released,
                &[A::SendEnd(pb::EndReason::Released)],
            ),
            (
                S::Expired,
                E::Accepted,
                S::Expired,
                &[A::SendEnd(pb::EndReason::Expired)],
            ),
            (S::Released, E::Release, S::Released, &[]),
            (S::Failed, E::HostChosen, S::Failed, &[]),
        ];
        for (from, event, to, actions) in table {
            let (got, got_actions) = next(*from, *event);
            assert_eq!(
                (got, got_actions.as_slice()),
                (*to, *actions),
                "{from:?} + {event:?}"
            );
        }
    }

    #[test]
    fn ended_states_are_final() {
        for s in ALL_STATES.into_iter().filter(|s| s.is_ended()) {
            for e in ALL_EVENTS {
                let (to, _) = next(s, e);
                assert_eq!(to, s, "{s:?} + {e:?} left an ended state");
            }
        }
    }

    #[test]
    fn only_queued_leases_get_a_host() {
        for s in ALL_STATES {
            let (_, actions) = next(s, E::HostChosen);
            assert_eq!(
                actions.contains(&A::SendAssign),
                s == S::Queued,
                "{s:?} + HostChosen"
            );
        }
    }

    #[test]
    fn every_end_of_a_held_lease_frees_or_requeues_the_host() {
        for s in [S::Assigned, S::Active] {
            for e in ALL_EVENTS {
                let (to, actions) = next(s, e);
                if to.is_ended() || to == S::Queued {
                    assert!(
                        actions.contains(&A::ReleaseHost) || actions.contains(&A::Requeue),
                        "{s:?} + {e:?} -> {to:?} forgot the host: {actions:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_answered_lease_never_goes_back_to_the_queue() {
        for s in ALL_STATES {
            for e in ALL_EVENTS {
                let (to, actions) = next(s, answered(s, e));
                assert!(
                    !actions.contains(&A::Requeue) && (to != S::Queued || s == S::Queued),
                    "{s:?} + {e:?} (answered) -> {to:?} {actions:?}"
                );
            }
        }
        // Unanswered, the same failures hand the lease to another host.
        for e in [E::Rejected, E::AssignTimedOut, E::HostLost] {
            assert_eq!(next(S::Assigned, e), (S::Queued, vec![A::Requeue]));
            assert_eq!(answered(S::Assigned, e), E::HostFailed);
            assert_eq!(answered(S::Active, e), e);
        }
    }
}
