//! Faults an operator or a careless build causes:
//!
//! - Drain: no new lease goes to a drained host; it serves its current lease
//!   to the end and then terminates (even in recycle mode); an idle drained
//!   host terminates at once.
//! - A build that never releases: the lease expires with the coordinator
//!   running, the agent ends it, the host is wiped (verified) and destroyed.
//!
//! Both run twice: on the embedded store and, as `postgres::NAME`, with the
//! pool's state on PostgreSQL ([`berth_testkit::on_each_store`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use berth_proto::v1 as pb;
use berth_testkit::*;

on_each_store! {
    a_drained_host_takes_no_new_lease_finishes_its_current_one_and_terminates => drained_host,
    a_lease_nobody_releases_expires_and_its_host_is_wiped_and_replaced => forgotten_lease,
}

fn drained_host(store: Store) {
    if !preflight() {
        return;
    }
    let mut pool = Pool::start_on(store, "bfn1-", 2, &["--recycle"]);
    let a = pool.acquire("fn-a", "10m", "1m");
    let drained = a.get("BERTH_HOST_ID").to_owned();
    ok(pool.berth(&["drain", &drained]), "berth drain");
    let h = pool
        .hosts()
        .into_iter()
        .find(|h| h.host_id == drained)
        .unwrap();
    assert!(h.draining, "{h:?}");

    // A new build gets the other host; the drained one keeps serving.
    let b = pool.acquire("fn-b", "10m", "1m");
    assert_ne!(b.get("BERTH_HOST_ID"), drained);
    ok(
        run(a.docker().args(["volume", "create", "vv"])),
        "docker on the drained host",
    );
    // With every other host busy, a third build waits rather than get it.
    let o = pool.berth(&["acquire", "--build", "fn-c", "--wait", "3s"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));

    // After its lease the drained host is wiped and destroyed, not recycled.
    ok(
        pool.berth(&["release", "--lease", a.lease_id()]),
        "release a",
    );
    let w = wait_for("the wipe report", Duration::from_secs(60), || {
        pool.lease(a.lease_id()).wipe
    });
    assert!(w.verified, "{w:?}");
    wait_for(
        "the drained host to terminate",
        Duration::from_secs(60),
        || (!pool.host_exists(&drained)).then_some(()),
    );
    let fresh = pool.wait_ready_hosts(1, Duration::from_secs(90));
    assert!(fresh.iter().all(|h| h.host_id != drained));

    // An idle host that is drained terminates at once.
    let idle = fresh[0].host_id.clone();
    ok(pool.berth(&["drain", &idle]), "drain idle");
    wait_for(
        "the idle drained host to terminate",
        Duration::from_secs(60),
        || (!pool.host_exists(&idle)).then_some(()),
    );
    let c = pool.acquire("fn-c", "5m", "1m");
    let got = c.get("BERTH_HOST_ID");
    assert!(got != drained && got != idle);
    for l in [&b, &c] {
        ok(pool.berth(&["release", "--lease", l.lease_id()]), "release");
    }
}

fn forgotten_lease(store: Store) {
    if !preflight() {
        return;
    }
    let mut pool = Pool::start_on(store, "bfn2-", 1, &[]);
    let a = pool.acquire("fn-forgotten", "6s", "1m");
    let host = a.get("BERTH_HOST_ID").to_owned();
    ok(run(a.docker().args(["volume", "create", "left"])), "volume");
    ok(
        run(a.docker().args(["network", "create", "leftnet"])),
        "network",
    );
    let l = wait_for("the lease to expire", Duration::from_secs(30), || {
        let l = pool.lease(a.lease_id());
        (l.state != pb::LeaseState::Active as i32).then_some(l)
    });
    assert_eq!(l.state, pb::LeaseState::Expired as i32, "{l:?}");
    let w = wait_for("the wipe report", Duration::from_secs(60), || {
        pool.lease(a.lease_id()).wipe
    });
    assert!(w.verified, "{w:?}");
    assert!(w.volumes_removed >= 1 && w.networks_removed >= 1, "{w:?}");
    // The build's late calls say the lease is over.
    let o = pool.berth(&["renew", "--lease", a.lease_id()]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(stderr(&o).contains("expired"), "{}", stderr(&o));
    wait_for("the host to be destroyed", Duration::from_secs(60), || {
        (!pool.host_exists(&host)).then_some(())
    });
    let fresh = pool.wait_ready_hosts(1, Duration::from_secs(90));
    assert_ne!(fresh[0].host_id, host);
}
