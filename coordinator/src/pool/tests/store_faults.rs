//! The pool when its store fails (a store behind the trait that fails on
//! demand, as a full disk would): an Acquire whose lease cannot be recorded
//! is answered UNAVAILABLE and its lease ended, so no host stays held by a
//! lease nobody was told of; while the store fails no host is offered and
//! new acquires are refused; the pool serves again by itself once a commit
//! succeeds. Not on a paused clock: the committer is a thread of its own
//! and `Pool::durable` waits for it in real time.

use std::sync::atomic::Ordering;

use super::*;
use crate::pool::commit::tests::{Flaky, flaky};

const KEY: berth_tls::KeyId = berth_tls::KeyId([7; 32]);

fn failing_pool() -> (Pool, Arc<Flaky>) {
    let store = flaky(0);
    let pool = Pool::with_empty_store(PoolConfig::default(), store.clone());
    (pool, store)
}

/// Waits (real time, bounded) until the store takes commits again.
async fn until_the_store_works(pool: &Pool) {
    for _ in 0..200 {
        if pool.store_failing().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the store still fails: {:?}", pool.store_failing());
}

/// Acquire as the API does it: queue, the agent accepts, wait for the
/// durable answer (undoing it if it cannot be made), mark it answered.
async fn acquire_answered(
    pool: &Pool,
    agent: &mut Agent,
    build: &str,
    now: Now,
) -> Result<pb::Lease, Error> {
    let p = pool.acquire(T, build, KEY, 600 * SECOND, 60 * SECOND, now)?;
    if state_of(&p) == LeaseState::Assigned {
        let a = agent.expect_assign();
        agent.accept(pool, &a.lease_id, now);
    }
    let lease = pool.outcome(&p.lease_id)?.expect("a host was assigned");
    if let Err(e) = pool.durable().await {
        pool.undo_unanswered(&p.lease_id, &e.to_string(), now);
        return Err(e);
    }
    assert!(pool.answering(&p.lease_id, &lease.host_id)?);
    Ok(lease)
}

fn holding(pool: &Pool) -> Vec<pb::Lease> {
    pool.list_leases(false)
        .into_iter()
        .filter(|l| !l.host_id.is_empty())
        .collect()
}

#[tokio::test]
async fn an_acquire_that_cannot_be_recorded_is_undone_and_no_host_is_offered_until_the_store_works()
{
    let (pool, store) = failing_pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    pool.durable().await.unwrap();

    store.broken.store(true, Ordering::SeqCst);
    // The host is chosen before any commit failed; the answer cannot be
    // made durable: UNAVAILABLE, and the lease ends before anyone got it.
    let err = acquire_answered(&pool, &mut h1, "b1", now)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.to_string().contains("No space left"), "{err}");
    assert!(holding(&pool).is_empty(), "{:?}", holding(&pool));
    let ended = pool.list_leases(true);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].state, pb::LeaseState::Released as i32);
    assert!(
        ended[0]
            .message
            .contains("ended before its certificate was delivered"),
        "{}",
        ended[0].message
    );
    assert!(matches!(h1.next(), Some(Out::EndLease(e)) if e.lease_id == ended[0].lease_id));
    assert_eq!(pool.metrics().unanswered_leases_ended.get(), 1);

    // While the store fails: said in the stats, no host offered, new
    // acquires refused at once (nothing is created).
    assert!(pool.store_failing().is_some());
    let mut h2 = Agent::join(&pool, "h2", now);
    let stats = pool.stats(now);
    assert!(
        stats
            .store_error
            .as_deref()
            .is_some_and(|e| e.contains("No space left")),
        "{stats:?}"
    );
    assert_eq!(stats.hosts_offerable, 0);
    let refused = pool
        .acquire(T, "b1", KEY, 600 * SECOND, 60 * SECOND, now)
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused
            .to_string()
            .contains("no host is offered while the lease store fails"),
        "{refused}"
    );
    assert!(h2.next().is_none());
    assert_eq!(pool.list_leases(true).len(), 1);

    // The store works again: the same build's retry gets a fresh lease on
    // the host that was withheld, and its answer is durable.
    store.broken.store(false, Ordering::SeqCst);
    until_the_store_works(&pool).await;
    assert_eq!(pool.stats(now).hosts_offerable, 1);
    let lease = acquire_answered(&pool, &mut h2, "b1", now).await.unwrap();
    assert_eq!(lease.host_id, "h2");
    assert_ne!(lease.lease_id, ended[0].lease_id);
    let stored = store.inner.load().unwrap().records;
    assert!(
        stored
            .iter()
            .any(|r| r.id == lease.lease_id && r.state == "active")
    );
    assert!(
        stored
            .iter()
            .any(|r| r.id == ended[0].lease_id && r.state == "released"),
        "the undone lease is recorded as ended once the store works"
    );
    pool.check_invariants().unwrap();
}

#[tokio::test]
async fn an_answered_lease_survives_a_failing_store_and_its_calls_are_unavailable_meanwhile() {
    let (pool, store) = failing_pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let lease = acquire_answered(&pool, &mut h1, "b1", now).await.unwrap();

    store.broken.store(true, Ordering::SeqCst);
    let renewed = pool
        .renew(T, &lease.lease_id, None, 900 * SECOND, now)
        .unwrap();
    assert_eq!(renewed.state, pb::LeaseState::Active as i32);
    let err = pool.durable().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    // A retried acquire of the same build joins the lease; its answer
    // fails too, but the lease was answered before: it keeps its host.
    let err = acquire_answered(&pool, &mut h1, "b1", now)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let held = holding(&pool);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].lease_id, lease.lease_id);
    assert_eq!(held[0].state, pb::LeaseState::Active as i32);
    assert!(matches!(h1.next(), Some(Out::RenewLease(_))));
    assert!(h1.next().is_none(), "the answered lease was ended");

    store.broken.store(false, Ordering::SeqCst);
    until_the_store_works(&pool).await;
    pool.durable().await.unwrap();
    let stored = store.inner.load().unwrap().records;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].deadline_ns, {
        let at = pool.get(T, &lease.lease_id).unwrap().deadline.unwrap();
        persist_ns(berth_proto::to_system_time(&at).unwrap())
    });
}

fn persist_ns(t: SystemTime) -> Option<u64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
}

#[tokio::test]
async fn a_queued_build_gets_no_host_while_the_store_fails_and_one_once_it_works() {
    let (pool, store) = failing_pool();
    let now = start();
    let mut h1 = Agent::join(&pool, "h1", now);
    let first = acquire_answered(&pool, &mut h1, "b1", now).await.unwrap();
    // b2 waits: the only host is taken.
    let waiting = pool
        .acquire(T, "b2", KEY, 600 * SECOND, 60 * SECOND, now)
        .unwrap();
    assert_eq!(state_of(&waiting), LeaseState::Queued);
    pool.durable().await.unwrap();

    store.broken.store(true, Ordering::SeqCst);
    pool.release(T, &first.lease_id, now).unwrap();
    assert_eq!(
        pool.durable().await.unwrap_err().code(),
        tonic::Code::Unavailable
    );
    // A fresh host comes while the store fails: it is not given to b2.
    let mut h2 = Agent::join(&pool, "h2", now);
    pool.tick(now);
    assert_eq!(state_of(&waiting), LeaseState::Queued);
    assert!(h2.next().is_none());

    store.broken.store(false, Ordering::SeqCst);
    until_the_store_works(&pool).await;
    pool.tick(now);
    assert_eq!(state_of(&waiting), LeaseState::Assigned);
    assert_eq!(h2.expect_assign().lease_id, waiting.lease_id);
    pool.check_invariants().unwrap();
}

#[tokio::test]
async fn start_up_on_a_store_that_cannot_write_is_bounded_and_serves_once_it_can() {
    let store = flaky(0);
    let now = start();
    let mut queued = crate::store::tests::rec("00000000-0000-4000-8000-00000000000a", "queued");
    queued.tenant = T.into();
    queued.host_id.clear();
    store.inner.commit(&[queued.clone()], &[], &[]).unwrap();
    store.broken.store(true, Ordering::SeqCst);
    // Restoring ends the queued lease as failed and must write that: the
    // store refuses, start-up goes on after its bounded wait.
    let pool = Pool::with_store(PoolConfig::default(), store.clone(), now).unwrap();
    assert!(pool.store_failing().is_some());
    assert_eq!(
        store.inner.load().unwrap().records[0].state,
        "queued",
        "nothing was written"
    );
    store.broken.store(false, Ordering::SeqCst);
    until_the_store_works(&pool).await;
    pool.durable().await.unwrap();
    assert_eq!(store.inner.load().unwrap().records[0].state, "failed");
}
