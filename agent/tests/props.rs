//! Property tests of the host state machine: random event sequences (from
//! the coordinator, timers, the front, the wipe, dockerd, a restart) never
//! reach an invalid state, never hold two leases, never accept a lease the
//! host does not hold, and never make a host that served a lease Ready again
//! without a verified wipe in between.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_agent::host::state::{self, Action, Event, Host, HostState, Lease};
use berth_proto::v1::{EndReason, WipeReport, agent_message::Msg};
use proptest::prelude::*;

const LEASES: [&str; 3] = ["l1", "l2", ""];

fn t(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
}

fn state() -> impl Strategy<Value = HostState> {
    prop_oneof![
        Just(HostState::Booting),
        Just(HostState::Warming),
        Just(HostState::Ready),
        Just(HostState::Leased),
        Just(HostState::Wiping),
        Just(HostState::Terminating),
        Just(HostState::Unhealthy),
    ]
}

fn lease_id() -> impl Strategy<Value = String> {
    (0usize..LEASES.len()).prop_map(|i| LEASES[i].to_owned())
}

fn lease() -> impl Strategy<Value = Lease> {
    (lease_id(), 0u64..100, any::<bool>(), any::<bool>()).prop_map(|(id, d, accepted, in_use)| {
        Lease {
            id,
            build_id: "b".into(),
            deadline: t(d),
            accepted,
            key: Some(berth_tls::KeyId([7; 32])),
            in_use,
        }
    })
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        Just(Event::Booted),
        (
            lease_id(),
            proptest::option::of(0u64..100),
            proptest::option::of(any::<u8>())
        )
            .prop_map(|(l, d, k)| Event::Assign {
                lease_id: l,
                build_id: "b".into(),
                deadline: d.map(t),
                key: k.map(|k| berth_tls::KeyId([k; 32])),
            }),
        (lease_id(), proptest::option::of(any::<u8>())).prop_map(|(l, k)| Event::LeaseKey {
            lease_id: l,
            key: k.map(|k| berth_tls::KeyId([k; 32])),
        }),
        (lease_id(), any::<u8>()).prop_map(|(l, k)| Event::FrontInUse {
            lease_id: l,
            key: berth_tls::KeyId([k; 32]),
        }),
        (lease_id(), proptest::option::of(0u64..100)).prop_map(|(l, d)| Event::Renew {
            lease_id: l,
            deadline: d.map(t),
        }),
        (lease_id(), 0i32..6).prop_map(|(l, r)| Event::End {
            lease_id: l,
            reason: EndReason::try_from(r).unwrap_or(EndReason::Unspecified),
        }),
        Just(Event::Drain { reason: "r".into() }),
        lease_id().prop_map(|l| Event::FrontOpened { lease_id: l }),
        lease_id().prop_map(|l| Event::FrontFailed {
            lease_id: l,
            error: "e".into()
        }),
        lease_id().prop_map(|l| Event::DeadlinePassed { lease_id: l }),
        (lease_id(), any::<bool>()).prop_map(|(l, v)| Event::WipeDone(WipeReport {
            lease_id: l,
            verified: v,
            ..WipeReport::default()
        })),
        Just(Event::DaemonExited { detail: "d".into() }),
        state().prop_map(Event::Timeout),
        Just(Event::Shutdown),
        (
            proptest::option::of(state()),
            proptest::option::of(lease()),
            any::<bool>(),
            0u64..100
        )
            .prop_map(|(saved, lease, draining, now)| Event::Resumed {
                saved,
                lease,
                draining,
                now: t(now),
            }),
        (1u64..1000).prop_map(|s| Event::Isolated {
            for_: Duration::from_secs(s)
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn random_event_sequences_keep_the_host_valid(
        recycle in any::<bool>(),
        events in proptest::collection::vec(event(), 0..60),
    ) {
        let mut host = Host::booting(recycle);
        // Whether the host served a lease since it was last verified clean.
        let mut dirty = false;
        let mut terminated = false;
        for e in events {
            let before = host.clone();
            let (after, actions) = state::next(host, e.clone());
            let ctx = format!("{before:?} + {e:?} -> {after:?} {actions:?}");

            // Terminating is final; Unhealthy only passes on to Terminating.
            if before.state == HostState::Terminating {
                prop_assert_eq!(after.state, HostState::Terminating, "{}", ctx);
            }
            prop_assert!(after.state != HostState::Unhealthy, "stuck unhealthy: {}", ctx);
            // A lease exactly when leased or wiping after one.
            match after.state {
                HostState::Leased => prop_assert!(after.lease.is_some(), "{}", ctx),
                HostState::Ready | HostState::Booting | HostState::Warming => {
                    prop_assert!(after.lease.is_none(), "{}", ctx)
                }
                _ => {}
            }
            // Never two leases: a held lease is only replaced after it ended.
            if let (Some(b), Some(a)) = (&before.lease, &after.lease) {
                prop_assert!(b.id == a.id || before.state == HostState::Booting, "{}", ctx);
                // One lease, one key in use: once its certificate was
                // admitted, no event moves the key or forgets the use.
                if b.id == a.id && b.in_use {
                    prop_assert!(a.in_use, "{}", ctx);
                    prop_assert_eq!(a.key, b.key, "{}", ctx);
                }
            }
            for a in &actions {
                match a {
                    // Acceptance only for the lease held, once its front is open.
                    Action::Send(Msg::LeaseAccepted(acc)) => {
                        prop_assert_eq!(after.lease_id(), Some(acc.lease_id.as_str()), "{}", ctx);
                        prop_assert!(after.lease.as_ref().is_some_and(|l| l.accepted), "{}", ctx);
                    }
                    Action::OpenFront { lease_id, key, .. } => {
                        prop_assert_eq!(after.lease.as_ref().and_then(|l| l.key), Some(*key), "{}", ctx);
                        prop_assert_eq!(after.lease_id(), Some(lease_id.as_str()), "{}", ctx);
                        prop_assert_eq!(after.state, HostState::Leased, "{}", ctx);
                    }
                    Action::Terminate { .. } => {
                        prop_assert!(!terminated, "terminated twice: {}", ctx);
                        terminated = true;
                        prop_assert_eq!(after.state, HostState::Terminating, "{}", ctx);
                    }
                    _ => {}
                }
            }
            if after.state == HostState::Leased {
                dirty = true;
            }
            if let Event::Resumed { .. } = e
                && before.state == HostState::Booting
            {
                // An unknown host counts as dirty until verified.
                dirty = true;
            }
            if let Event::WipeDone(r) = &e
                && before.state == HostState::Wiping
                && r.verified
            {
                dirty = false;
            }
            // Never offered dirty.
            if after.state == HostState::Ready && before.state != HostState::Ready {
                prop_assert!(!dirty, "Ready without a verified wipe: {}", ctx);
            }
            host = after;
        }
    }
}
