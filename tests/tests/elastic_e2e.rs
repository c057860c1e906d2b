//! The elastic local pool: `berth up --min-hosts 1 --max-hosts 4
//! --idle-hosts 1` grows under concurrent builds up to its max (never
//! beyond), and once they are done shrinks back to the idle target, while
//! a leased host is never taken from its build. The coordinator decides the
//! capacity; `berth up` only starts hosts and leaves ended ones unreplaced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_testkit::*;

const BUILDS: usize = 6;
const MAX: usize = 4;

fn active(pool: &Pool) -> usize {
    pool.all_leases()
        .iter()
        .filter(|l| l.state == pb::LeaseState::Active as i32)
        .count()
}

#[test]
fn grows_to_max_under_concurrent_builds_then_shrinks_to_the_idle_target() {
    if !preflight() {
        return;
    }
    let pool = Pool::start(
        "btel-",
        1,
        &[
            "--max-hosts",
            "4",
            "--min-hosts",
            "1",
            "--idle-hosts",
            "1",
            "--scale-in-after",
            "3s",
        ],
    );
    let stats = pool.pool_stats();
    assert!(stats.elastic);
    assert_eq!(stats.desired_hosts, 1, "{stats:?}");
    assert_eq!(pool.agent_pids().len(), 1, "an idle pool starts one host");

    // A build that holds its host through everything below.
    let hold = pool.acquire("hold", "10m", "2m");

    let go = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let most_agents = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for i in 0..BUILDS {
            let (pool, go, done) = (&pool, &go, &done);
            s.spawn(move || {
                let lease = pool.acquire(&format!("burst-{i}"), "5m", "3m");
                ok(run(lease.docker().arg("version")), "docker version");
                while !go.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                ok(
                    pool.berth(&["release", "--lease", lease.lease_id()]),
                    "release",
                );
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        // Grown to the max: the hold and three builds on four hosts at
        // once, the other builds waiting.
        wait_for(
            "four leases active at once",
            Duration::from_secs(90),
            || {
                most_agents.fetch_max(pool.agent_pids().len(), Ordering::SeqCst);
                (active(&pool) == MAX).then_some(())
            },
        );
        let stats = pool.pool_stats();
        assert_eq!(stats.desired_hosts as usize, MAX, "{stats:?}");
        assert_eq!(stats.queue_length as usize, BUILDS + 1 - MAX, "{stats:?}");
        go.store(true, Ordering::SeqCst);
        while done.load(Ordering::SeqCst) < BUILDS {
            most_agents.fetch_max(pool.agent_pids().len(), Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    assert!(
        most_agents.load(Ordering::SeqCst) <= MAX,
        "more than {MAX} hosts at once: {}",
        most_agents.load(Ordering::SeqCst)
    );

    // Back to the idle target beside the held host: desired 2, and only
    // hosts nobody holds went.
    wait_for("the pool to shrink", Duration::from_secs(90), || {
        let stats = pool.pool_stats();
        (stats.desired_hosts == 2 && pool.agent_pids().len() == 2 && pool.ready_hosts().len() == 1)
            .then_some(())
    });
    let held = pool.lease(hold.lease_id());
    assert_eq!(held.state, pb::LeaseState::Active as i32);
    ok(
        run(hold.docker().arg("version")),
        "the held host still serves",
    );

    // The hold ends: its host is not replaced, the pool keeps its minimum.
    ok(
        pool.berth(&["release", "--lease", hold.lease_id()]),
        "release the hold",
    );
    wait_for("the pool at its minimum", Duration::from_secs(90), || {
        let stats = pool.pool_stats();
        (stats.desired_hosts == 1 && pool.agent_pids().len() == 1 && pool.ready_hosts().len() == 1)
            .then_some(())
    });
    let log = pool.log();
    assert!(log.contains("desired capacity 4: starting slot"), "{log}");
    assert!(log.contains("not replaced (desired capacity"), "{log}");
    // Every lease the pool served ran to its release: no build lost its host.
    for l in pool.all_leases() {
        assert_eq!(
            l.state,
            pb::LeaseState::Released as i32,
            "{} {:?}",
            l.build_id,
            l.message
        );
    }
}
