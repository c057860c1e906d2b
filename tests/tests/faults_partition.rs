//! Faults: an agent cut off from the coordinator by taking its host's
//! network down (`ip -n HOST link set eth0 down`). The agents run with
//! `--link-via-host-net`, so their coordinator link goes through the host's
//! own namespace, as it does on EC2 through the instance's NIC.
//!
//! - A leased host keeps its lease (dockerd and the build's containers stay)
//!   until the deadline, then wipes and destroys itself on its own.
//! - An idle host cut off longer than the isolation limit destroys itself.
//! - The coordinator marks both hosts lost once their streams are gone past
//!   the grace period and never assigns them; fresh hosts take their place.
//!
//! It runs twice: on the embedded store and, as `postgres::NAME`, with the
//! pool's state on PostgreSQL ([`berth_testkit::on_each_store`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use berth_proto::v1 as pb;
use berth_testkit::*;

on_each_store! {
    cut_off_hosts_keep_their_lease_to_the_deadline_then_wipe_and_go_idle_ones_go_sooner => cut_off_hosts,
}

fn cut_off_hosts(store: Store) {
    if !preflight() {
        return;
    }
    let mut pool = Pool::start_on(
        store,
        "bfp1-",
        2,
        &[
            "--agent-arg=--link-via-host-net",
            "--agent-arg=--isolation-limit=4s",
            "--coordinator-arg=--lost-grace=5s",
        ],
    );
    let a = pool.acquire("fp-lease", "25s", "1m");
    let acquired = Instant::now();
    let leased = a.get("BERTH_HOST_ID").to_owned();
    let idle = pool
        .ready_hosts()
        .into_iter()
        .map(|h| h.host_id)
        .find(|h| *h != leased)
        .expect("the other host");
    ok(
        run(a.docker().args(["volume", "create", "build-data"])),
        "volume create",
    );
    // The link really goes through the host's network.
    assert!(
        pool.agent_logs()
            .contains("coordinator link goes through the host's network"),
        "{}",
        pool.agent_logs()
    );

    for host in [&leased, &idle] {
        ok(
            pool.ip_in_host(host, &["link", "set", "eth0", "down"]),
            "ip link set eth0 down",
        );
    }

    // A while later the leased host still holds on: dockerd and the build's
    // volume are there (seen from behind the front, the front itself is cut
    // off), and the agent's state file still names the lease.
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        acquired.elapsed() < Duration::from_secs(20),
        "the test itself was too slow to check before the deadline"
    );
    assert!(
        pool.host_exists(&leased),
        "leased host gone before its deadline"
    );
    let vols = stdout(&ok(
        run(pool
            .docker_behind_front(&leased)
            .args(["volume", "ls", "-q"])),
        "volume ls behind the front",
    ));
    assert!(vols.contains("build-data"), "{vols}");
    let state = pool.agent_state(&leased).expect("state file");
    assert_eq!(state["state"], "Leased", "{state}");
    assert_eq!(state["lease"]["id"], a.lease_id());

    // The idle host, cut off past the limit, destroys itself.
    wait_for(
        "the idle host to end itself",
        Duration::from_secs(60),
        || (!pool.host_exists(&idle)).then_some(()),
    );
    // ... and after it, wipes and destroys itself without the coordinator.
    wait_for(
        "the leased host to wipe and end itself after its deadline",
        Duration::from_secs(90),
        || (!pool.host_exists(&leased)).then_some(()),
    );
    assert!(
        acquired.elapsed() >= Duration::from_secs(24),
        "the leased host ended before its deadline ({:?})",
        acquired.elapsed()
    );
    let logs = pool.agent_logs();
    assert!(logs.contains("lease deadline armed"), "{logs}");
    assert!(logs.contains("from=Leased to=Wiping"), "{logs}");
    assert!(logs.contains("coordinator unreachable for"), "{logs}");

    // The coordinator lost both streams and, past the grace, forgot both
    // hosts: they are never offered again.
    wait_for(
        "the coordinator to forget the cut-off hosts",
        Duration::from_secs(90),
        || {
            pool.hosts()
                .iter()
                .all(|h| h.host_id != leased && h.host_id != idle)
                .then_some(())
        },
    );

    // The lease is over on the coordinator too (its own deadline or the
    // lost host, whichever it saw first), and no host holds it.
    match pool.try_lease(a.lease_id()) {
        Ok(l) => assert_eq!(l.state, pb::LeaseState::Expired as i32, "{l:?}"),
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s}");
            assert!(s.message().contains("host-lost"), "{s}");
        }
    }
    // Fresh hosts replace both; neither cut-off host is ever offered again.
    let fresh = pool.wait_ready_hosts(2, Duration::from_secs(90));
    for h in &fresh {
        assert!(h.host_id != leased && h.host_id != idle, "{h:?}");
    }
    let b = pool.acquire("fp-after", "5m", "30s");
    let got = b.get("BERTH_HOST_ID");
    assert!(got != leased && got != idle);
    ok(pool.berth(&["release", "--lease", b.lease_id()]), "release");
}
