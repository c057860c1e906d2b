//! The pool's unit tests: whole scenarios through its public calls, with
//! simulated agents on in-memory channels and a clock the tests move.

#![allow(clippy::unwrap_used)]

use super::*;
use berth_proto::to_system_time;
use pb::coordinator_message::Msg as Out;

mod store_faults;

const SECOND: Duration = Duration::from_secs(1);
/// The tenant of every lease in these tests.
const T: &str = "t1";

struct Agent {
    id: String,
    conn: u64,
    rx: mpsc::Receiver<Box<pb::CoordinatorMessage>>,
}

impl Agent {
    fn join(pool: &Pool, id: &str, now: Now) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let reg = Registration {
            host_id: id.into(),
            host_addr: "198.18.0.2".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            provider: "test".into(),
            resources: None,
            agent_version: "t".into(),
            docker_version: "t".into(),
            state: pb::HostState::Ready,
            lease_id: String::new(),
            lease_deadline: None,
            key: None,
            lease_key: None,
        };
        let conn = pool.register(reg, Default::default(), tx, now).unwrap();
        let mut a = Self {
            id: id.into(),
            conn,
            rx,
        };
        assert!(matches!(a.next(), Some(Out::Registered(_))));
        a
    }

    fn next(&mut self) -> Option<Out> {
        self.rx.try_recv().ok().and_then(|m| m.msg)
    }

    fn expect_assign(&mut self) -> pb::AssignLease {
        match self.next() {
            Some(Out::AssignLease(a)) => a,
            other => panic!("{}: expected AssignLease, got {other:?}", self.id),
        }
    }

    fn say(&self, pool: &Pool, msg: pb::agent_message::Msg, now: Now) {
        pool.agent_message(&self.id, self.conn, msg, now).unwrap();
    }

    /// The front's report that the lease's certificate got in with `key`.
    fn in_use(&self, pool: &Pool, lease_id: &str, key: berth_tls::KeyId, now: Now) {
        self.say(
            pool,
            pb::agent_message::Msg::LeaseInUse(pb::LeaseInUse {
                lease_id: lease_id.into(),
                client_key_sha256: key.0.to_vec(),
            }),
            now,
        );
    }

    fn accept(&self, pool: &Pool, lease_id: &str, now: Now) {
        self.say(
            pool,
            pb::agent_message::Msg::LeaseAccepted(pb::LeaseAccepted {
                lease_id: lease_id.into(),
            }),
            now,
        );
    }

    fn state(&self, pool: &Pool, state: pb::HostState, now: Now) {
        self.say(
            pool,
            pb::agent_message::Msg::StateChanged(pb::StateChanged {
                state: state as i32,
                lease_id: String::new(),
                reason: String::new(),
            }),
            now,
        );
    }
}

/// A fixed moment to start from: the wall clock is not the machine's, so
/// every deadline a test sees follows from the time it passed in.
fn start() -> Now {
    Now {
        mono: Instant::now(),
        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    }
}

fn pool() -> Pool {
    Pool::new(PoolConfig::default())
}

/// A pool whose hosts serve again after a verified wipe (`--recycle`).
fn recycling_pool() -> Pool {
    Pool::new(PoolConfig {
        recycle: true,
        ..PoolConfig::default()
    })
}

fn state_of(p: &Pending) -> LeaseState {
    *p.state.borrow()
}

#[tokio::test(start_paused = true)]
async fn two_builds_get_two_different_hosts() {
    let pool = pool();
    let now = start();
    let mut a = Agent::join(&pool, "h1", now);
    let mut b = Agent::join(&pool, "h2", now);
    let p1 = pool
        .acquire(T, "b1", berth_tls::KeyId([0; 32]), 60 * SECOND, SECOND, now)
        .unwrap();
    let p2 = pool
        .acquire(T, "b2", berth_tls::KeyId([0; 32]), 60 * SECOND, SECOND, now)
        .unwrap();
    let l1 = a.expect_assign();
    let l2 = b.expect_assign();
    assert_eq!(l1.lease_id, p1.lease_id);
    assert_eq!(l2.lease_id, p2.lease_id);
    assert!(l1.deadline.is_some());
    a.accept(&pool, &l1.lease_id, now);
    b.accept(&pool, &l2.lease_id, now);
    let o1 = pool.outcome(&p1.lease_id).unwrap().unwrap();
    let o2 = pool.outcome(&p2.lease_id).unwrap().unwrap();
    assert_eq!(o1.state, pb::LeaseState::Active as i32);
    assert_ne!(o1.host_id, o2.host_id);
    assert_eq!(o1.docker_host, "tcp://198.18.0.2:2376");
}

#[tokio::test(start_paused = true)]
async fn acquire_is_idempotent_per_build() {
    let pool = pool();
    let now = start();
    let mut a = Agent::join(&pool, "h1", now);
    let mut b = Agent::join(&pool, "h2", now);
    let p1 = pool
        .acquire(T, "b1", berth_tls::KeyId([0; 32]), 60 * SECOND, SECOND, now)
        .unwrap();
    let retry = pool
        .acquire(T, "b1", berth_tls::KeyId([0; 32]), 60 * SECOND, SECOND, now)
        .unwrap();
    assert_eq!(p1.lease_id, retry.lease_id);
    let assigned = a.next().or_else(|| b.next());
    assert!(matches!(assigned, Some(Out::AssignLease(_))));
    assert!(
        a.next().is_none() && b.next().is_none(),
        "a second host was assigned"
    );
}

#[tokio::test(start_paused = true)]
async fn empty_pool_with_no_wait_fails_at_once() {
    let pool = pool();
    let p = pool
        .acquire(
            T,
            "b1",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            Duration::ZERO,
            start(),
        )
        .unwrap();
    assert_eq!(state_of(&p), LeaseState::Failed);
    let err = pool.outcome(&p.lease_id).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.to_string().contains("no host became ready"), "{err}");
    // The failed lease does not block a new attempt with the same build id.
    let again = pool
        .acquire(
            T,
            "b1",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            SECOND,
            start(),
        )
        .unwrap();
    assert_ne!(again.lease_id, p.lease_id);
}

#[tokio::test(start_paused = true)]
async fn queue_wait_runs_out() {
    let pool = pool();
    let now = start();
    let p = pool
        .acquire(
            T,
            "b1",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            2 * SECOND,
            now,
        )
        .unwrap();
    pool.tick(now + SECOND);
    assert_eq!(state_of(&p), LeaseState::Queued);
    pool.tick(now + 2 * SECOND);
    assert_eq!(state_of(&p), LeaseState::Failed);
    assert_eq!(
        pool.outcome(&p.lease_id).unwrap_err().code(),
        tonic::Code::ResourceExhausted
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_order_and_released_hosts_are_not_reused() {
    let pool = pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let first = pool
        .acquire(T, "b1", berth_tls::KeyId([0; 32]), 60 * SECOND, SECOND, now)
        .unwrap();
    let l1 = h1.expect_assign();
    h1.accept(&pool, &l1.lease_id, now);
    let second = pool
        .acquire(
            T,
            "b2",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            30 * SECOND,
            now,
        )
        .unwrap();
    let third = pool
        .acquire(
            T,
            "b3",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            30 * SECOND,
            now,
        )
        .unwrap();
    assert_eq!(pool.queue_len(), 2);

    pool.release(T, &first.lease_id, now).unwrap();
    match h1.next() {
        Some(Out::EndLease(e)) => {
            assert_eq!(e.lease_id, first.lease_id);
            assert_eq!(e.reason, pb::EndReason::Released as i32);
        }
        other => panic!("expected EndLease, got {other:?}"),
    }
    // The released host is wiping: nobody gets it.
    pool.tick(now);
    assert!(h1.next().is_none());
    assert_eq!(state_of(&second), LeaseState::Queued);

    // Its replacement registers and goes to the oldest waiter.
    let mut h2 = Agent::join(&pool, "h2", now);
    let l2 = h2.expect_assign();
    assert_eq!(l2.lease_id, second.lease_id);
    assert_eq!(state_of(&third), LeaseState::Queued);
}

#[tokio::test(start_paused = true)]
async fn recycled_host_returns_only_after_reporting_ready() {
    let pool = recycling_pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let first = pool
        .acquire(T, "b1", berth_tls::KeyId([0; 32]), 60 * SECOND, SECOND, now)
        .unwrap();
    h1.expect_assign();
    h1.accept(&pool, &first.lease_id, now);
    h1.state(&pool, pb::HostState::Leased, now);
    let second = pool
        .acquire(
            T,
            "b2",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            30 * SECOND,
            now,
        )
        .unwrap();
    pool.release(T, &first.lease_id, now).unwrap();
    assert!(matches!(h1.next(), Some(Out::EndLease(_))));
    h1.state(&pool, pb::HostState::Wiping, now);
    assert!(h1.next().is_none());
    h1.state(&pool, pb::HostState::Ready, now);
    assert_eq!(h1.expect_assign().lease_id, second.lease_id);
}

#[tokio::test(start_paused = true)]
async fn rejected_or_unanswered_assignments_go_to_another_host() {
    let pool = pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let p = pool
        .acquire(
            T,
            "b1",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            30 * SECOND,
            now,
        )
        .unwrap();
    let l = h1.expect_assign();
    h1.say(
        &pool,
        pb::agent_message::Msg::LeaseRejected(pb::LeaseRejected {
            lease_id: l.lease_id.clone(),
            reason: "busy".into(),
        }),
        now,
    );
    assert_eq!(state_of(&p), LeaseState::Queued);
    let mut h2 = Agent::join(&pool, "h2", now);
    assert_eq!(h2.expect_assign().lease_id, p.lease_id);
    assert!(
        h1.next().is_none(),
        "the host that rejected was offered again"
    );

    // h2 never answers: after the timeout the lease goes to h3.
    pool.tick(now + 6 * SECOND);
    assert_eq!(state_of(&p), LeaseState::Queued);
    let later = now + 6 * SECOND;
    let mut h3 = Agent::join(&pool, "h3", later);
    assert_eq!(h3.expect_assign().lease_id, p.lease_id);
    h3.accept(&pool, &p.lease_id, later);
    assert_eq!(state_of(&p), LeaseState::Active);
}

#[tokio::test(start_paused = true)]
async fn an_answered_lease_whose_host_fails_before_accepting_ends_instead_of_moving() {
    let pool = pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let mut h2 = Agent::join(&pool, "h2", now);
    let key = berth_tls::KeyId([0; 32]);
    let rejected = pool
        .acquire(T, "b1", key, 60 * SECOND, 30 * SECOND, now)
        .unwrap();
    let timed_out = pool
        .acquire(T, "b2", key, 60 * SECOND, 30 * SECOND, now)
        .unwrap();
    let l1 = h1.expect_assign();
    let l2 = h2.expect_assign();
    assert_eq!(
        (l1.lease_id.as_str(), l2.lease_id.as_str()),
        (rejected.lease_id.as_str(), timed_out.lease_id.as_str())
    );
    // Both builds are answered with their hosts before the agents accept.
    for (p, host) in [(&rejected, "h1"), (&timed_out, "h2")] {
        let lease = pool.outcome(&p.lease_id).unwrap().unwrap();
        assert_eq!(lease.state, pb::LeaseState::Assigned as i32);
        assert_eq!(lease.host_id, host);
        assert!(pool.answering(&p.lease_id, host).unwrap());
        // An answer for another host than the one assigned is not given.
        assert!(!pool.answering(&p.lease_id, "h9").unwrap());
    }
    h1.say(
        &pool,
        pb::agent_message::Msg::LeaseRejected(pb::LeaseRejected {
            lease_id: l1.lease_id.clone(),
            reason: "busy".into(),
        }),
        now,
    );
    pool.tick(now + 6 * SECOND);
    let later = now + 6 * SECOND;
    for (p, why) in [
        (&rejected, "rejected"),
        (&timed_out, "no acceptance in time"),
    ] {
        assert_eq!(state_of(p), LeaseState::HostLost, "{why}");
        let err = pool.outcome(&p.lease_id).unwrap_err().to_string();
        assert!(err.contains(why) && err.contains("acquire again"), "{err}");
    }
    // Neither lease went to another host, and the hosts that knew of them
    // are not offered again.
    let mut h3 = Agent::join(&pool, "h3", later);
    assert!(
        h3.next().is_none(),
        "an answered lease moved to another host"
    );
    pool.check_invariants().unwrap();
    let stats = pool.stats(later);
    assert_eq!(stats.hosts_offerable, 1, "only h3: {stats:?}");
    // The same build acquiring again gets a new lease on a fresh host.
    let again = pool
        .acquire(T, "b1", key, 60 * SECOND, 30 * SECOND, later)
        .unwrap();
    assert_ne!(again.lease_id, rejected.lease_id);
    assert_eq!(h3.expect_assign().lease_id, again.lease_id);
}

#[tokio::test(start_paused = true)]
async fn deadlines_end_leases_and_renew_is_capped() {
    let cfg = PoolConfig {
        max_lease: 100 * SECOND,
        ..PoolConfig::default()
    };
    let pool = Pool::new(cfg);
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let p = pool
        .acquire(T, "b1", berth_tls::KeyId([0; 32]), 10 * SECOND, SECOND, now)
        .unwrap();
    h1.expect_assign();
    h1.accept(&pool, &p.lease_id, now);

    let renewed = pool.renew(T, &p.lease_id, None, 500 * SECOND, now).unwrap();
    let Some(Out::RenewLease(r)) = h1.next() else {
        panic!("no RenewLease sent")
    };
    assert_eq!(r.deadline, renewed.deadline);
    let remaining = to_system_time(&renewed.deadline.unwrap())
        .unwrap()
        .duration_since(now.wall)
        .unwrap();
    assert_eq!(remaining, 100 * SECOND, "renew is capped at max_lease");

    pool.tick(now + 99 * SECOND);
    assert_eq!(state_of(&p), LeaseState::Active);
    pool.tick(now + 100 * SECOND);
    assert_eq!(state_of(&p), LeaseState::Expired);
    assert!(
        matches!(h1.next(), Some(Out::EndLease(e)) if e.reason == pb::EndReason::Expired as i32)
    );
    let err = pool
        .renew(T, &p.lease_id, None, 10 * SECOND, now)
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.to_string().contains("expired"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn unknown_leases_are_not_found() {
    let pool = pool();
    let id = uuid::Uuid::new_v4().to_string();
    assert_eq!(pool.get(T, &id).unwrap_err().code(), tonic::Code::NotFound);
    assert_eq!(
        pool.release(T, &id, start()).unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        pool.renew(T, &id, None, SECOND, start())
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
}

#[tokio::test(start_paused = true)]
async fn abandoned_waiters_are_skipped() {
    let pool = pool();
    let now = start();
    let gone = pool
        .acquire(
            T,
            "gone",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            30 * SECOND,
            now,
        )
        .unwrap();
    let gone_id = gone.lease_id.clone();
    drop(gone);
    let waiting = pool
        .acquire(
            T,
            "waiting",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            30 * SECOND,
            now,
        )
        .unwrap();
    let mut h1 = Agent::join(&pool, "h1", now);
    assert_eq!(h1.expect_assign().lease_id, waiting.lease_id);
    let l = pool.get(T, &gone_id).unwrap();
    assert_eq!(l.state, pb::LeaseState::Failed as i32);
}

#[tokio::test(start_paused = true)]
async fn a_terminating_host_that_disconnects_is_forgotten_and_its_lease_lost() {
    let pool = pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let p = pool
        .acquire(T, "b1", berth_tls::KeyId([0; 32]), 60 * SECOND, SECOND, now)
        .unwrap();
    h1.expect_assign();
    h1.accept(&pool, &p.lease_id, now);
    h1.state(&pool, pb::HostState::Terminating, now);
    assert_eq!(state_of(&p), LeaseState::HostLost);
    pool.disconnect("h1", h1.conn, now);
    assert!(pool.list_hosts().is_empty());
    // A stale message on the old stream is refused, not applied.
    assert!(
        pool.agent_message(
            "h1",
            h1.conn,
            pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default()),
            now
        )
        .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn silent_hosts_are_not_offered() {
    let pool = pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let later = now + 10 * SECOND;
    let p = pool
        .acquire(
            T,
            "b1",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            30 * SECOND,
            later,
        )
        .unwrap();
    assert!(h1.next().is_none());
    assert_eq!(state_of(&p), LeaseState::Queued);
    h1.say(
        &pool,
        pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default()),
        later,
    );
    h1.state(&pool, pb::HostState::Ready, later);
    assert_eq!(h1.expect_assign().lease_id, p.lease_id);
}

#[tokio::test(start_paused = true)]
async fn repeated_ready_reports_queue_a_host_once() {
    let pool = recycling_pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let _h2 = Agent::join(&pool, "h2", now);
    for _ in 0..100 {
        h1.state(&pool, pb::HostState::Ready, now);
    }
    assert_eq!(pool.lock().idle.len(), 2, "one entry per idle host");
    // The oldest idle host is offered first, once.
    let p = pool
        .acquire(T, "b1", berth_tls::KeyId([0; 32]), 60 * SECOND, SECOND, now)
        .unwrap();
    assert_eq!(h1.expect_assign().lease_id, p.lease_id);
    assert_eq!(pool.lock().idle.len(), 1);

    // A host forgotten with an entry still queued, then back under the
    // same id: it is offered (once), never twice at the same time.
    h1.accept(&pool, &p.lease_id, now);
    pool.release(T, &p.lease_id, now).unwrap();
    h1.state(&pool, pb::HostState::Terminating, now);
    pool.disconnect("h1", h1.conn, now);
    let mut h1 = Agent::join(&pool, "h1", now);
    let a = pool
        .acquire(T, "b2", berth_tls::KeyId([0; 32]), 60 * SECOND, SECOND, now)
        .unwrap();
    let b = pool
        .acquire(T, "b3", berth_tls::KeyId([0; 32]), 60 * SECOND, SECOND, now)
        .unwrap();
    let c = pool
        .acquire(
            T,
            "b4",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            10 * SECOND,
            now,
        )
        .unwrap();
    let got = h1.expect_assign();
    assert!(got.lease_id == a.lease_id || got.lease_id == b.lease_id);
    assert!(h1.next().is_none(), "a host was assigned twice");
    assert_eq!(state_of(&c), LeaseState::Queued);
}

#[tokio::test(start_paused = true)]
async fn a_reconnecting_agent_keeps_its_lease() {
    let pool = pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let p = pool
        .acquire(T, "b1", berth_tls::KeyId([0; 32]), 60 * SECOND, SECOND, now)
        .unwrap();
    let assign = h1.expect_assign();
    h1.accept(&pool, &p.lease_id, now);
    pool.disconnect("h1", h1.conn, now);
    let (tx, _rx) = mpsc::channel(16);
    pool.register(
        Registration {
            host_id: "h1".into(),
            host_addr: "198.18.0.2".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            provider: "test".into(),
            resources: None,
            agent_version: String::new(),
            docker_version: String::new(),
            state: pb::HostState::Leased,
            lease_id: p.lease_id.clone(),
            lease_deadline: assign.deadline.as_ref().and_then(to_system_time),
            key: None,
            lease_key: None,
        },
        Default::default(),
        tx,
        now + SECOND,
    )
    .unwrap();
    assert_eq!(state_of(&p), LeaseState::Active);
    pool.tick(now + 40 * SECOND);
    assert_eq!(
        state_of(&p),
        LeaseState::Active,
        "lost grace applied to a connected host"
    );
}

#[tokio::test(start_paused = true)]
async fn leases_belong_to_their_tenant() {
    let pool = pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let mut h2 = Agent::join(&pool, "h2", now);
    let mine = pool
        .acquire(
            "a",
            "ci-1",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            SECOND,
            now,
        )
        .unwrap();
    // The same build id under another tenant is another build.
    let theirs = pool
        .acquire(
            "b",
            "ci-1",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            SECOND,
            now,
        )
        .unwrap();
    assert_ne!(mine.lease_id, theirs.lease_id);
    let (l1, l2) = (h1.expect_assign(), h2.expect_assign());
    h1.accept(&pool, &l1.lease_id, now);
    h2.accept(&pool, &l2.lease_id, now);
    let id = &mine.lease_id;
    assert_eq!(pool.get("a", id).unwrap().tenant, "a");
    assert_eq!(pool.get("b", id).unwrap_err().code(), tonic::Code::NotFound);
    assert_eq!(
        pool.renew("b", id, None, SECOND, now).unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        pool.release("b", id, now).unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        state_of(&mine),
        LeaseState::Active,
        "another tenant ended it"
    );
    pool.release("a", id, now).unwrap();
    assert_eq!(state_of(&mine), LeaseState::Released);
}

#[tokio::test(start_paused = true)]
async fn a_condemned_host_is_listed_until_its_grace_passes_and_refused_until_ec2_drops_it() {
    let pool = pool();
    let now = start();
    let grace = PoolConfig::default().lost_grace;
    let h1 = Agent::join(&pool, "h1", now);
    assert!(!pool.condemn("h1", now), "a connected host was condemned");
    pool.disconnect("h1", h1.conn, now);
    assert!(pool.condemn("h1", now));
    // An instance the pool never knew is condemned too, and not listed.
    assert!(pool.condemn("h9", now));
    let listed =
        |pool: &Pool| -> Vec<String> { pool.list_hosts().into_iter().map(|h| h.host_id).collect() };
    assert_eq!(listed(&pool), ["h1"]);
    assert_eq!(
        pool.presences().get("h1"),
        Some(&Presence::Disconnected { since: now.mono })
    );
    let refused = |pool: &Pool, id: &str, at: Now| {
        let (tx, _rx) = mpsc::channel(16);
        let mut reg = Registration::placeholder(id);
        reg.host_addr = "198.18.0.2".into();
        pool.register(reg, Default::default(), tx, at).unwrap_err()
    };
    let err = refused(&pool, "h1", now + SECOND);
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        err.to_string(),
        "agent refused: host h1 is being terminated as an orphan"
    );
    assert_eq!(
        refused(&pool, "h9", now).code(),
        tonic::Code::PermissionDenied
    );

    pool.tick(now + grace);
    assert!(listed(&pool).is_empty(), "listed past its grace");
    assert!(pool.presences().is_empty());
    assert_eq!(
        pool.drain("h1", "x", now + grace).unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        refused(&pool, "h1", now + grace).code(),
        tonic::Code::PermissionDenied
    );
    pool.check_invariants().unwrap();

    // EC2 still lists h1 but no longer h9: h9 may register again.
    pool.retain_condemned(|id| id == "h1", now + grace);
    let back = Agent::join(&pool, "h9", now + grace);
    assert_eq!(listed(&pool), ["h9"]);
    assert_eq!(
        refused(&pool, "h1", now + grace).code(),
        tonic::Code::PermissionDenied
    );
    drop(back);
    pool.check_invariants().unwrap();
}

const K1: berth_tls::KeyId = berth_tls::KeyId([1; 32]);
const K2: berth_tls::KeyId = berth_tls::KeyId([2; 32]);

/// A registration of `id` carrying `key`, reporting `state`.
fn registration(id: &str, key: berth_tls::KeyId, state: pb::HostState) -> Registration {
    Registration {
        host_id: id.into(),
        host_addr: "198.18.0.2".into(),
        docker_host: "tcp://198.18.0.2:2376".into(),
        provider: "test".into(),
        resources: None,
        agent_version: "t".into(),
        docker_version: "t".into(),
        state,
        lease_id: String::new(),
        lease_deadline: None,
        key: Some(key),
        lease_key: None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_host_that_served_a_lease_is_never_offered_again_across_a_restart() {
    let store: std::sync::Arc<dyn crate::store::LeaseStore> =
        std::sync::Arc::new(crate::store::MemStore::default());
    let now = start();
    let pool = Pool::with_store(PoolConfig::default(), store.clone(), now).unwrap();
    let (tx, rx) = mpsc::channel(16);
    let conn = pool
        .register(
            registration("h1", K1, pb::HostState::Ready),
            Default::default(),
            tx,
            now,
        )
        .unwrap();
    let mut h1 = Agent {
        id: "h1".into(),
        conn,
        rx,
    };
    assert!(matches!(h1.next(), Some(Out::Registered(_))));
    let p = pool.acquire(T, "b1", K1, 60 * SECOND, SECOND, now).unwrap();
    h1.expect_assign();
    h1.accept(&pool, &p.lease_id, now);
    pool.release(T, &p.lease_id, now).unwrap();
    // The agent (or whatever holds its stream now) says Ready again: the
    // host is not offered.
    h1.state(&pool, pb::HostState::Ready, now);
    let waiting = pool
        .acquire(T, "b2", K2, 60 * SECOND, 30 * SECOND, now)
        .unwrap();
    while let Some(m) = h1.next() {
        assert!(
            !matches!(m, Out::AssignLease(_)),
            "a used host was offered: {m:?}"
        );
    }
    assert_eq!(state_of(&waiting), LeaseState::Queued);
    // Its registration is refused from now on, also by a restarted pool.
    pool.disconnect("h1", h1.conn, now);
    let (tx, _rx) = mpsc::channel(16);
    let e = pool
        .register(
            registration("h1", K1, pb::HostState::Ready),
            Default::default(),
            tx,
            now,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Refused {
                reason: crate::error::Refusal::Burned,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // Dropping the pool writes what is pending (the committer's last batch).
    drop(pool);
    let pool = Pool::with_store(PoolConfig::default(), store, now).unwrap();
    let (tx, _rx) = mpsc::channel(16);
    let e = pool
        .register(
            registration("h1", K1, pb::HostState::Ready),
            Default::default(),
            tx,
            now,
        )
        .unwrap_err();
    assert!(e.to_string().contains("has held a lease"), "{e}");
    // After the retention the id is let go (a local id may be a new host).
    let later = now + PoolConfig::default().burned_retention;
    pool.tick(later);
    let (tx, _rx) = mpsc::channel(16);
    pool.register(
        registration("h1", K2, pb::HostState::Ready),
        Default::default(),
        tx,
        later,
    )
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_second_registration_without_the_hosts_key_is_refused_and_the_host_keeps_serving() {
    let pool = pool();
    let now = start();
    let (tx, rx) = mpsc::channel(16);
    let conn = pool
        .register(
            registration("h1", K1, pb::HostState::Ready),
            Default::default(),
            tx,
            now,
        )
        .unwrap();
    let mut h1 = Agent {
        id: "h1".into(),
        conn,
        rx,
    };
    assert!(matches!(h1.next(), Some(Out::Registered(_))));
    // Someone with the join token claims to be h1, with another key.
    let (tx, mut intruder) = mpsc::channel(16);
    let e = pool
        .register(
            registration("h1", K2, pb::HostState::Ready),
            Default::default(),
            tx,
            now,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Refused {
                reason: crate::error::Refusal::KeyMismatch,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        intruder.try_recv().is_err(),
        "the intruder was told something"
    );
    // The real h1 still holds its stream and gets the next lease.
    let p = pool.acquire(T, "b1", K1, 60 * SECOND, SECOND, now).unwrap();
    assert_eq!(h1.expect_assign().lease_id, p.lease_id);
    // The real h1 may come back with its own key.
    pool.disconnect("h1", h1.conn, now);
    let (tx, _rx) = mpsc::channel(16);
    let mut back = registration("h1", K1, pb::HostState::Leased);
    back.lease_id = p.lease_id.clone();
    pool.register(back, Default::default(), tx, now).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_leases_key_is_pinned_renewals_and_retries_with_another_key_are_refused() {
    let pool = pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let p = pool.acquire(T, "b1", K1, 60 * SECOND, SECOND, now).unwrap();
    let assign = h1.expect_assign();
    assert_eq!(assign.client_key_sha256, K1.0.to_vec());
    h1.accept(&pool, &p.lease_id, now);
    // Renew certifies only the lease's key.
    let e = pool
        .renew(T, &p.lease_id, Some(K2), 60 * SECOND, now)
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.to_string().contains("bound to the key"), "{e}");
    pool.renew(T, &p.lease_id, Some(K1), 60 * SECOND, now)
        .unwrap();
    assert!(matches!(h1.next(), Some(Out::RenewLease(_))));
    // Before the certificate is used, a retried acquire may bring a new key;
    // the host is told.
    let again = pool.acquire(T, "b1", K2, 60 * SECOND, SECOND, now).unwrap();
    assert_eq!(again.lease_id, p.lease_id);
    match h1.next() {
        Some(Out::LeaseKey(k)) => assert_eq!(k.client_key_sha256, K2.0.to_vec()),
        other => panic!("expected LeaseKey, got {other:?}"),
    }
    assert!(pool.check_key(&p.lease_id, K1).is_err());
    pool.check_key(&p.lease_id, K2).unwrap();
    // Once the front admitted it, the key no longer moves.
    h1.in_use(&pool, &p.lease_id, K2, now);
    let e = pool
        .acquire(T, "b1", K1, 60 * SECOND, SECOND, now)
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.to_string().contains("in use"), "{e}");
    assert!(h1.next().is_none(), "the host was told to move the key");
    // The same key joins the lease as any retry does.
    pool.acquire(T, "b1", K2, 60 * SECOND, SECOND, now).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_key_move_that_crossed_the_first_use_report_gives_way_to_the_key_in_use() {
    let pool = pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let p = pool.acquire(T, "b1", K1, 60 * SECOND, SECOND, now).unwrap();
    h1.expect_assign();
    h1.accept(&pool, &p.lease_id, now);
    // The front admits K1's certificate and fixes K1; before its report
    // arrives, a retried acquire brings K2: the coordinator, not knowing
    // of the use, moves the key (the front will refuse the move).
    pool.acquire(T, "b1", K2, 60 * SECOND, SECOND, now).unwrap();
    assert!(matches!(h1.next(), Some(Out::LeaseKey(_))));
    pool.check_key(&p.lease_id, K2).unwrap();
    // The report names the key the front fixed: the pin follows it.
    h1.in_use(&pool, &p.lease_id, K1, now);
    pool.check_key(&p.lease_id, K1).unwrap();
    assert!(pool.check_key(&p.lease_id, K2).is_err());
    // The holder of the key in use renews; the retry's key may neither
    // renew nor move the key again.
    pool.renew(T, &p.lease_id, Some(K1), 60 * SECOND, now)
        .unwrap();
    let e = pool
        .renew(T, &p.lease_id, Some(K2), 60 * SECOND, now)
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = pool
        .acquire(T, "b1", K2, 60 * SECOND, SECOND, now)
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // A second report (it cannot come from an honest agent) moves nothing.
    h1.in_use(&pool, &p.lease_id, K2, now);
    pool.check_key(&p.lease_id, K1).unwrap();
    pool.check_invariants().unwrap();
}

/// A pool with these tenants' shares.
fn pool_with_tenants(tenants: &[(&str, TenantLimits)]) -> Pool {
    Pool::new(PoolConfig {
        tenants: tenants.iter().map(|(t, l)| ((*t).to_owned(), *l)).collect(),
        ..PoolConfig::default()
    })
}

fn ask(pool: &Pool, tenant: &str, build: &str, now: Now) -> Pending {
    pool.acquire(
        tenant,
        build,
        berth_tls::KeyId([0; 32]),
        60 * SECOND,
        3600 * SECOND,
        now,
    )
    .unwrap()
}

/// Joins a fresh host and returns the tenant of the lease it was given
/// (accepted), if any.
fn next_served(pool: &Pool, n: usize, now: Now) -> Option<String> {
    let mut a = Agent::join(pool, &format!("h{n}"), now);
    let assign = match a.next() {
        Some(Out::AssignLease(x)) => x,
        _ => return None,
    };
    a.accept(pool, &assign.lease_id, now);
    pool.check_invariants().unwrap();
    Some(pool.outcome(&assign.lease_id).unwrap()?.tenant)
}

#[tokio::test(start_paused = true)]
async fn a_tenant_that_queued_later_is_served_within_the_next_turns_not_after_the_burst() {
    let pool = pool();
    let now = start();
    let mut waiting = vec![];
    for i in 0..50 {
        waiting.push(ask(&pool, "a", &format!("a{i}"), now));
    }
    for i in 0..5 {
        waiting.push(ask(&pool, "b", &format!("b{i}"), now));
    }
    assert_eq!(pool.queue_len(), 55);
    let served: Vec<String> = (0..10)
        .map(|n| next_served(&pool, n, now).unwrap())
        .collect();
    assert_eq!(served.iter().filter(|t| *t == "b").count(), 5, "{served:?}");
    // Within a tenant, first come first served.
    let first_a = waiting.iter().find(|p| state_of(p) == LeaseState::Active);
    assert_eq!(
        pool.outcome(&first_a.unwrap().lease_id)
            .unwrap()
            .unwrap()
            .build_id,
        "a0"
    );
    assert_eq!(state_of(&waiting[5]), LeaseState::Queued); // a5
    // Then a alone.
    assert_eq!(next_served(&pool, 10, now).as_deref(), Some("a"));
    assert_eq!(pool.queue_len(), 44);
}

#[tokio::test(start_paused = true)]
async fn turns_follow_the_weights() {
    let heavy = TenantLimits {
        weight: 3,
        ..TenantLimits::default()
    };
    let pool = pool_with_tenants(&[("a", heavy)]);
    let now = start();
    let mut waiting = vec![];
    for i in 0..8 {
        waiting.push(ask(&pool, "a", &format!("a{i}"), now));
        waiting.push(ask(&pool, "b", &format!("b{i}"), now));
    }
    let served: String = (0..8)
        .map(|n| next_served(&pool, n, now).unwrap())
        .collect();
    assert_eq!(served, "aaabaaab");
}

#[tokio::test(start_paused = true)]
async fn beyond_its_max_queued_a_tenant_is_refused_naming_the_limit_others_are_not() {
    let capped = TenantLimits {
        max_queued: Some(2),
        ..TenantLimits::default()
    };
    let pool = pool_with_tenants(&[("a", capped)]);
    let now = start();
    let a0 = ask(&pool, "a", "a0", now);
    let a1 = ask(&pool, "a", "a1", now);
    let a2 = ask(&pool, "a", "a2", now);
    assert_eq!(state_of(&a0), LeaseState::Queued);
    assert_eq!(state_of(&a1), LeaseState::Queued);
    assert_eq!(state_of(&a2), LeaseState::Failed);
    let e = pool.outcome(&a2.lease_id).unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    let msg = e.to_string();
    assert!(
        msg.contains("tenant a may have at most 2 builds waiting") && msg.contains("max-queued"),
        "{msg}"
    );
    // Another tenant is not held to a's limit.
    let b: Vec<_> = (0..3)
        .map(|i| ask(&pool, "b", &format!("b{i}"), now))
        .collect();
    assert!(b.iter().all(|p| state_of(p) == LeaseState::Queued));
    // Once one of a's builds got a host, a may queue one more; the refused
    // build id is free again.
    assert_eq!(next_served(&pool, 0, now).as_deref(), Some("a"));
    let again = ask(&pool, "a", "a2", now);
    assert_eq!(state_of(&again), LeaseState::Queued);
    assert_ne!(again.lease_id, a2.lease_id);
    pool.check_invariants().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_request_beyond_max_queued_may_still_take_a_free_host() {
    let never_wait = TenantLimits {
        max_queued: Some(0),
        ..TenantLimits::default()
    };
    let pool = pool_with_tenants(&[("a", never_wait)]);
    let now = start();
    let mut h = Agent::join(&pool, "h1", now);
    let a0 = ask(&pool, "a", "a0", now);
    assert_eq!(h.expect_assign().lease_id, a0.lease_id);
    let a1 = ask(&pool, "a", "a1", now);
    assert_eq!(state_of(&a1), LeaseState::Failed);
    assert!(
        pool.outcome(&a1.lease_id)
            .unwrap_err()
            .to_string()
            .contains("at most 0 builds waiting")
    );
}

#[tokio::test(start_paused = true)]
async fn the_pools_queue_cap_refuses_every_tenant_once_full() {
    let pool = Pool::new(PoolConfig {
        max_queued: 3,
        ..PoolConfig::default()
    });
    let now = start();
    let queued: Vec<_> = (0..3)
        .map(|i| ask(&pool, if i == 0 { "a" } else { "b" }, &format!("x{i}"), now))
        .collect();
    assert!(queued.iter().all(|p| state_of(p) == LeaseState::Queued));
    let refused = ask(&pool, "c", "c0", now);
    assert_eq!(state_of(&refused), LeaseState::Failed);
    let e = pool.outcome(&refused.lease_id).unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.to_string().contains("--max-queued"), "{e}");
    // A place freed (a build got a host): the next request waits again.
    assert!(next_served(&pool, 0, now).is_some());
    assert_eq!(state_of(&ask(&pool, "c", "c1", now)), LeaseState::Queued);
}

#[tokio::test(start_paused = true)]
async fn a_tenant_at_its_max_active_waits_while_others_are_served() {
    let one = TenantLimits {
        max_active: Some(1),
        ..TenantLimits::default()
    };
    let pool = pool_with_tenants(&[("a", one)]);
    let now = start();
    let a0 = ask(&pool, "a", "a0", now);
    let a1 = ask(&pool, "a", "a1", now);
    let b0 = ask(&pool, "b", "b0", now);
    assert_eq!(next_served(&pool, 0, now).as_deref(), Some("a"));
    // a holds its one host: the next host goes to b although a1 is older.
    assert_eq!(next_served(&pool, 1, now).as_deref(), Some("b"));
    assert_eq!(state_of(&b0), LeaseState::Active);
    // Nobody else waits: a third host stays idle rather than exceed a's cap.
    let mut idle = Agent::join(&pool, "h2", now);
    assert!(idle.next().is_none());
    assert_eq!(state_of(&a1), LeaseState::Queued);
    // a's lease ends: a1 gets the idle host.
    pool.release("a", &a0.lease_id, now).unwrap();
    assert_eq!(idle.expect_assign().lease_id, a1.lease_id);
    pool.check_invariants().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_build_that_finds_no_host_hears_of_its_tenants_cap() {
    let one = TenantLimits {
        max_active: Some(1),
        ..TenantLimits::default()
    };
    let pool = pool_with_tenants(&[("a", one)]);
    let now = start();
    let _a0 = ask(&pool, "a", "a0", now);
    assert_eq!(next_served(&pool, 0, now).as_deref(), Some("a"));
    let _h = Agent::join(&pool, "h1", now);
    let a1 = pool
        .acquire(
            "a",
            "a1",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            Duration::ZERO,
            now,
        )
        .unwrap();
    let msg = pool.outcome(&a1.lease_id).unwrap_err().to_string();
    assert!(
        msg.contains("tenant a holds its max-active 1 hosts"),
        "{msg}"
    );
}

fn elastic_pool(min: u32, max: u32, idle: u32) -> Pool {
    Pool::new(PoolConfig {
        capacity: Some(crate::capacity::CapacityConfig {
            min,
            max,
            idle_target: idle,
            scale_in_after: 2 * SECOND,
        }),
        ..PoolConfig::default()
    })
}

#[tokio::test(start_paused = true)]
async fn an_elastic_pool_wants_a_host_per_build_and_retires_only_idle_excess_hosts() {
    let pool = elastic_pool(1, 4, 1);
    let now = start();
    assert_eq!(pool.desired_hosts(now), Some(1));
    assert_eq!(pool.stats(now).desired_hosts, Some(1));
    // A fixed pool wants nothing.
    assert_eq!(self::pool().desired_hosts(now), None);

    // Six builds on one host: one leased, five waiting -> the max.
    let mut h0 = Agent::join(&pool, "h0", now);
    let builds: Vec<_> = (0..6)
        .map(|i| ask(&pool, T, &format!("b{i}"), now))
        .collect();
    let first = h0.expect_assign();
    h0.accept(&pool, &first.lease_id, now);
    assert_eq!(pool.desired_hosts(now), Some(4));

    // The burst is over: three idle hosts and h0 still leased.
    for b in &builds[1..] {
        pool.release(T, &b.lease_id, now).unwrap();
    }
    let mut idle: Vec<Agent> = (1..=3)
        .map(|i| Agent::join(&pool, &format!("h{i}"), now))
        .collect();
    // desired = 1 leased + 1 idle target = 2; 4 hosts: 2 idle in excess.
    assert_eq!(pool.desired_hosts(now), Some(2));
    // The first tick that sees the excess starts the delay (2 s).
    pool.tick(now + SECOND);
    pool.tick(now + 2 * SECOND);
    for a in &mut idle {
        assert!(a.next().is_none(), "{} drained before the delay", a.id);
    }
    pool.tick(now + 3 * SECOND);
    let drained: Vec<&str> = idle
        .iter_mut()
        .filter_map(|a| match a.next() {
            Some(Out::Drain(d)) => {
                assert!(d.reason.contains("scale-in"), "{}", d.reason);
                Some(a.id.as_str())
            }
            None => None,
            other => panic!("{}: {other:?}", a.id),
        })
        .collect();
    // The two registered first go; the leased host and the target stay.
    assert_eq!(drained, ["h1", "h2"]);
    assert!(h0.next().is_none());
    let stats = pool.stats(now + 3 * SECOND);
    assert_eq!(stats.hosts_draining, 2);
    assert_eq!(stats.hosts_offerable, 1);
    pool.check_invariants().unwrap();
    // Nothing more goes later: the idle host left is the target.
    pool.tick(now + 5 * SECOND);
    assert!(idle[2].next().is_none());
}

fn notice(kind: &str, action: &str, secs: u64) -> pb::agent_message::Msg {
    pb::agent_message::Msg::InterruptionNotice(pb::InterruptionNotice {
        kind: kind.into(),
        action: action.into(),
        time: Some(berth_proto::from_system_time(
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        )),
    })
}

#[tokio::test(start_paused = true)]
async fn an_interruption_notice_marks_the_lease_and_the_host_is_never_offered_again() {
    let pool = pool();
    let now = start();
    let mut a = Agent::join(&pool, "h1", now);
    let mut idle = Agent::join(&pool, "h2", now);
    let p = ask(&pool, T, "b1", now);
    let assign = a.expect_assign();
    assert_eq!(assign.lease_id, p.lease_id);
    a.accept(&pool, &p.lease_id, now);
    a.say(
        &pool,
        notice("spot-interruption", "terminate", 1_893_553_445),
        now,
    );
    let l = pool.outcome(&p.lease_id).unwrap().unwrap();
    // The build goes on, and hears of it.
    assert_eq!(l.state, pb::LeaseState::Active as i32);
    let step = l
        .timeline
        .iter()
        .find(|e| e.step == pb::TimelineStep::InterruptionNotice as i32)
        .expect("the interruption-notice step");
    assert_eq!(
        step.detail,
        "spot-interruption (terminate) at 2030-01-02T03:04:05Z"
    );
    // An idle host with a notice: drained (its agent ends it).
    idle.say(&pool, notice("rebalance-recommendation", "", 0), now);
    assert!(matches!(idle.next(), Some(Out::Drain(_))));
    // Neither is offered: a new build finds no host.
    assert_eq!(pool.stats(now).hosts_offerable, 0);
    let late = pool
        .acquire(
            T,
            "b2",
            berth_tls::KeyId([0; 32]),
            60 * SECOND,
            Duration::ZERO,
            now,
        )
        .unwrap();
    assert_eq!(state_of(&late), LeaseState::Failed);
    // The lease ends normally; the host is still not offered.
    pool.release(T, &p.lease_id, now).unwrap();
    assert_eq!(pool.stats(now).hosts_offerable, 0);
    // An oversized field is refused, as every agent input.
    let e = pool
        .agent_message(&a.id, a.conn, notice(&"x".repeat(65), "", 0), now)
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    pool.check_invariants().unwrap();
}

/// (place, builds of its tenant waiting) as Find reports it for `build`.
fn place(pool: &Pool, tenant: &str, build: &str) -> (u32, u32) {
    let l = pool.find(tenant, build).unwrap();
    assert_eq!(l.build_id, build);
    (l.queue_position, l.tenant_queued)
}

#[tokio::test(start_paused = true)]
async fn a_waiting_build_sees_its_place_in_its_tenants_queue_move_up() {
    let pool = pool();
    let now = start();
    let mut waiting = vec![];
    for b in ["a0", "a1", "a2", "a3"] {
        waiting.push(ask(&pool, "a", b, now));
    }
    waiting.push(ask(&pool, "b", "b0", now));
    // Per tenant: b's build is first of its own queue, a's do not see it.
    assert_eq!(place(&pool, "a", "a0"), (1, 4));
    assert_eq!(place(&pool, "a", "a3"), (4, 4));
    assert_eq!(place(&pool, "b", "b0"), (1, 1));
    // A tenant finds only its own builds; Get agrees with Find.
    assert_eq!(
        pool.find("b", "a0").unwrap_err().code(),
        tonic::Code::NotFound
    );
    let a3 = pool.get("a", &waiting[3].lease_id).unwrap();
    assert_eq!((a3.queue_position, a3.tenant_queued), (4, 4));

    // Served: a0 gets a host, those behind it move up; a0 shows no place.
    let mut h0 = Agent::join(&pool, "h0", now);
    let assigned = h0.expect_assign();
    assert_eq!(assigned.build_id, "a0");
    assert_eq!(place(&pool, "a", "a0"), (0, 0));
    assert_eq!(place(&pool, "a", "a3"), (3, 3));
    h0.accept(&pool, &assigned.lease_id, now);
    assert_eq!(place(&pool, "a", "a0"), (0, 0));

    // Cancelled in the middle (released while queued): the one behind moves up.
    pool.release("a", &waiting[2].lease_id, now).unwrap();
    assert_eq!(place(&pool, "a", "a1"), (1, 2));
    assert_eq!(place(&pool, "a", "a3"), (2, 2));

    // b's turn: b0 is served; a's places do not move.
    let mut h1 = Agent::join(&pool, "h1", now);
    assert_eq!(h1.expect_assign().build_id, "b0");
    assert_eq!(place(&pool, "a", "a3"), (2, 2));

    // An assignment handed back keeps its place: first of its tenant again.
    let mut h2 = Agent::join(&pool, "h2", now);
    let l = h2.expect_assign();
    assert_eq!(l.build_id, "a1");
    assert_eq!(place(&pool, "a", "a3"), (1, 1));
    h2.say(
        &pool,
        pb::agent_message::Msg::LeaseRejected(pb::LeaseRejected {
            lease_id: l.lease_id.clone(),
            reason: "busy".into(),
        }),
        now,
    );
    assert_eq!(place(&pool, "a", "a1"), (1, 2));
    assert_eq!(place(&pool, "a", "a3"), (2, 2));

    // The admin list shows the same places.
    let mut listed: Vec<(String, u32, u32)> = pool
        .list_leases(false)
        .into_iter()
        .filter(|l| l.state == pb::LeaseState::Queued as i32)
        .map(|l| (l.build_id, l.queue_position, l.tenant_queued))
        .collect();
    listed.sort();
    assert_eq!(listed, [("a1".to_owned(), 1, 2), ("a3".to_owned(), 2, 2)]);

    // A wait that runs out leaves the queue: the one behind moves up.
    let key = berth_tls::KeyId([0; 32]);
    let _c0 = pool
        .acquire("c", "c0", key, 60 * SECOND, SECOND, now)
        .unwrap();
    let _c1 = ask(&pool, "c", "c1", now);
    assert_eq!(place(&pool, "c", "c1"), (2, 2));
    pool.tick(now + 2 * SECOND);
    assert_eq!(
        pool.find("c", "c0").unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(place(&pool, "c", "c1"), (1, 1));
    assert_eq!(place(&pool, "a", "a3"), (2, 2));
    drop(waiting);
    pool.check_invariants().unwrap();
}
