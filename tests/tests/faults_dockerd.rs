//! Faults: the host's dockerd dies or hangs.
//!
//! - Idle: killed (the agent sees its child exit) or frozen (only the health
//!   pings notice): the host turns Unhealthy, is destroyed and replaced, and
//!   is never offered again.
//! - Leased: the coordinator ends the lease as host-lost, and the build's
//!   next call (Get, Renew, Release) fails with FAILED_PRECONDITION saying so.
//!
//! Both run twice: on the embedded store and, as `postgres::NAME`, with the
//! pool's state on PostgreSQL ([`berth_testkit::on_each_store`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use berth_proto::v1 as pb;
use berth_testkit::*;
use nix::sys::signal::{Signal, kill};

on_each_store! {
    dockerd_killed_during_a_lease_ends_it_as_host_lost_and_the_build_is_told => dockerd_killed_during_a_lease,
    dockerd_killed_or_hung_on_an_idle_host_gets_the_host_replaced => dockerd_killed_or_hung_when_idle,
}

fn dockerd_killed_or_hung_when_idle(store: Store) {
    if !preflight() {
        return;
    }
    let mut pool = Pool::start_on(store, "bfd1-", 2, &[]);
    let ready = pool.ready_hosts();
    let (killed, hung) = (ready[0].host_id.clone(), ready[1].host_id.clone());

    kill(pool.dockerd_pid(&killed).unwrap(), Signal::SIGKILL).unwrap();
    // SIGSTOP: dockerd still runs but answers nothing; only pings can tell.
    let hung_pid = pool.dockerd_pid(&hung).unwrap();
    kill(hung_pid, Signal::SIGSTOP).unwrap();

    for host in [&killed, &hung] {
        wait_for(
            &format!("host {host} to be destroyed"),
            Duration::from_secs(60),
            || (!pool.host_exists(host)).then_some(()),
        );
    }
    let log = pool.coordinator_log();
    assert!(log.contains("dockerd exited"), "{log}");
    assert!(log.contains("pings in a row"), "{log}");
    // Two fresh hosts take their places; the broken ones are never offered.
    let fresh = pool.wait_ready_hosts(2, Duration::from_secs(90));
    for h in &fresh {
        assert!(h.host_id != killed && h.host_id != hung, "{h:?}");
    }
    let l = pool.acquire("fd-after", "5m", "30s");
    let got = l.get("BERTH_HOST_ID");
    assert!(got != killed && got != hung);
    ok(pool.berth(&["release", "--lease", l.lease_id()]), "release");
}

fn dockerd_killed_during_a_lease(store: Store) {
    if !preflight() {
        return;
    }
    let mut pool = Pool::start_on(store, "bfd2-", 1, &[]);
    let a = pool.acquire("fd-lease", "10m", "1m");
    let host = a.get("BERTH_HOST_ID").to_owned();
    ok(run(a.docker().args(["volume", "create", "vv"])), "volume");

    kill(pool.dockerd_pid(&host).unwrap(), Signal::SIGKILL).unwrap();

    // The build's next call says what happened, with the right code.
    let status = wait_for(
        "Get to report the host as lost",
        Duration::from_secs(30),
        || pool.try_lease(a.lease_id()).err(),
    );
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
    let msg = status.message();
    assert!(
        msg.contains("host-lost") && msg.contains("dockerd exited"),
        "{msg}"
    );
    // The CLI maps it to its documented exit code and prints the reason.
    for args in [
        vec!["get", "--lease", a.lease_id()],
        vec!["renew", "--lease", a.lease_id(), "--ttl", "5m"],
        vec!["release", "--lease", a.lease_id()],
    ] {
        let o = pool.berth(&args);
        assert_eq!(o.status.code(), Some(6), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("host-lost"), "{args:?}: {}", stderr(&o));
    }
    // The host is destroyed and replaced; the lease is never handed on.
    wait_for("the host to be destroyed", Duration::from_secs(60), || {
        (!pool.host_exists(&host)).then_some(())
    });
    let fresh = pool.wait_ready_hosts(1, Duration::from_secs(90));
    assert_ne!(fresh[0].host_id, host);
    let leases = pool.all_leases();
    let l = leases
        .iter()
        .find(|l| l.lease_id == a.lease_id())
        .expect("lease listed");
    assert_eq!(l.state, pb::LeaseState::HostLost as i32);
    assert!(
        leases
            .iter()
            .filter(|l| l.state == pb::LeaseState::Active as i32)
            .all(|l| l.host_id != host)
    );
}
