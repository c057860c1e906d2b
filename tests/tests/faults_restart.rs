//! Faults: processes killed for real (`kill -9`) in the middle of a lease.
//!
//! - The coordinator dies and `berth up` restarts it: the lease is restored
//!   from the store, the agents reconnect and re-report, Get/Renew/Release
//!   and an Acquire retry keep working, and no host ends up in two leases.
//! - An agent dies mid-lease and `berth up` restarts it on the same host: the
//!   lease resumes (front back, containers still there, same deadline).
//! - An agent dies mid-lease and comes back only after the deadline: the host
//!   is wiped and destroyed, never offered again.
//! - An idle agent dies and something is left on its dockerd: the restarted
//!   agent wipes and verifies before the host is Ready again.
//!
//! Each runs twice: on the embedded store and, as `postgres::NAME`, with
//! the pool's state on PostgreSQL ([`berth_testkit::on_each_store`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use berth_proto::v1 as pb;
use berth_testkit::*;
use nix::sys::signal::{Signal, kill};

on_each_store! {
    coordinator_killed_mid_lease_restarts_and_the_lease_carries_on => coordinator_killed_mid_lease,
    agent_killed_mid_lease_is_restarted_on_the_same_host_and_the_lease_resumes => agent_killed_mid_lease,
    agent_killed_and_back_after_the_deadline_wipes_and_destroys_the_host => agent_back_after_the_deadline,
    idle_agent_killed_leaves_an_unknown_host_that_is_wiped_before_it_is_ready => idle_agent_killed,
}

fn coordinator_killed_mid_lease(store: Store) {
    if !preflight() {
        return;
    }
    let mut pool = Pool::start_on(store, "bfc1-", 2, &[]);
    let a = pool.acquire("fc-a", "10m", "1m");
    let before = pool.lease(a.lease_id());
    ok(
        run(a.docker().args(["volume", "create", "kept"])),
        "volume create",
    );
    // On the shared store the answer came after PostgreSQL's commit of the
    // assignment (the agent's acceptance may be committed by now too).
    if let Some(state) = pool.stored_state(a.lease_id()) {
        assert!(berth_testkit::stored_state_holds_host(&state), "{state}");
    }

    let old = pool.coordinator_pid().expect("coordinator pid");
    kill(old, Signal::SIGKILL).unwrap();
    wait_for(
        "berth up to restart the coordinator",
        Duration::from_secs(30),
        || {
            pool.coordinator_pid()
                .filter(|p| *p != old)
                .filter(|_| pool.coordinator_answers())
        },
    );
    assert!(
        pool.coordinator_log()
            .contains("restored leases from the store"),
        "{}",
        pool.coordinator_log()
    );

    // The lease survived: same host, same deadline, still active.
    let after = pool.lease(a.lease_id());
    assert_eq!(after.state, pb::LeaseState::Active as i32, "{after:?}");
    assert_eq!(after.host_id, before.host_id);
    assert_eq!(after.deadline, before.deadline);
    assert_eq!(after.build_id, "fc-a");
    // Both agents came back and re-reported; the leased one says Leased.
    let hosts = pool.wait_ready_hosts(1, Duration::from_secs(60));
    assert!(hosts.iter().all(|h| h.host_id != before.host_id));
    wait_for(
        "the leased host to reconnect",
        Duration::from_secs(30),
        || {
            pool.hosts()
                .into_iter()
                .find(|h| h.host_id == before.host_id && h.connected)
                .filter(|h| h.lease_id == a.lease_id() && h.state == pb::HostState::Leased as i32)
        },
    );
    // The front never went away: Docker still works, the volume is there.
    let vols = stdout(&ok(
        run(a.docker().args(["volume", "ls", "-q"])),
        "volume ls",
    ));
    assert!(vols.contains("kept"), "{vols}");

    // An Acquire retry of the same build gets the same lease, not a host.
    // (Its certificate directory keeps the lease's key: the lease is pinned
    // to it once used.)
    let retry = LeaseEnv::parse(&stdout(&ok(
        pool.berth(&[
            "acquire",
            "--build",
            "fc-a",
            "--cert-dir",
            a.cert_dir().to_str().unwrap(),
        ]),
        "berth acquire retry",
    )));
    assert_eq!(retry.lease_id(), a.lease_id());
    // Renew by lease id works and reaches the agent.
    ok(
        pool.berth(&["renew", "--lease", a.lease_id(), "--ttl", "20m"]),
        "renew after restart",
    );
    // A second build gets the other host.
    let b = pool.acquire("fc-b", "10m", "1m");
    assert_ne!(b.get("BERTH_HOST_ID"), a.get("BERTH_HOST_ID"));
    pool.assert_no_host_in_two_leases();

    // Release works and the host is wiped as usual.
    ok(
        pool.berth(&["release", "--lease", a.lease_id()]),
        "release after restart",
    );
    let w = wait_for("the wipe report", Duration::from_secs(60), || {
        pool.lease(a.lease_id()).wipe
    });
    assert!(w.verified && w.volumes_removed >= 1, "{w:?}");
    assert_eq!(
        pool.lease(a.lease_id()).state,
        pb::LeaseState::Released as i32
    );
    pool.assert_no_host_in_two_leases();

    // A second kill: the released lease and b's lease are both still known.
    let old = pool.coordinator_pid().expect("coordinator pid");
    kill(old, Signal::SIGKILL).unwrap();
    wait_for("the second restart", Duration::from_secs(30), || {
        pool.coordinator_pid()
            .filter(|p| *p != old)
            .filter(|_| pool.coordinator_answers())
    });
    assert_eq!(
        pool.lease(a.lease_id()).state,
        pb::LeaseState::Released as i32
    );
    assert_eq!(
        pool.lease(b.lease_id()).state,
        pb::LeaseState::Active as i32
    );
    ok(
        pool.berth(&["release", "--lease", b.lease_id()]),
        "release b",
    );
    if pool.postgres().is_some() {
        assert_eq!(pool.stored_state(a.lease_id()).unwrap(), "released");
        assert_eq!(pool.stored_state(b.lease_id()).unwrap(), "released");
        // A clean stop gives the lead up at once.
        pool.stop();
        let pg = pool.postgres().unwrap();
        assert_eq!(
            pg.sql(
                berth_testkit::postgres::POOL_DB,
                "SELECT expires_at <= now() FROM berth_leader"
            ),
            "t"
        );
    }
}

fn agent_killed_mid_lease(store: Store) {
    if !preflight() {
        return;
    }
    let pool = Pool::start_on(store, "bfa1-", 1, &[]);
    let a = pool.acquire("fa-a", "10m", "1m");
    let host = a.get("BERTH_HOST_ID").to_owned();
    let deadline = pool.lease(a.lease_id()).deadline;
    let ctx = pool.state_dir.join("ctx");
    busybox_context(&ctx, "survives\n");
    ok(
        run(a.docker().args(["build", "-q", "-t", "app"]).arg(&ctx)),
        "build",
    );
    ok(
        run(a
            .docker()
            .args(["run", "-d", "--name", "web", "-p", "8080:80", "app"])),
        "run",
    );
    let state = pool.agent_state(&host).expect("agent state file");
    assert_eq!(state["state"], "Leased", "{state}");
    assert_eq!(state["lease"]["id"], a.lease_id(), "{state}");

    let agent = pool.agent_pid(&host).expect("agent pid");
    kill(agent, Signal::SIGKILL).unwrap();
    // The front dies with the agent...
    wait_for("the front to go down", Duration::from_secs(10), || {
        std::net::TcpStream::connect_timeout(&a.front_addr(), Duration::from_millis(500))
            .is_err()
            .then_some(())
    });
    // ... and comes back with the restarted agent, on the same host.
    let resumed = wait_for("a new agent on the host", Duration::from_secs(60), || {
        pool.agent_pid(&host).filter(|p| *p != agent)
    });
    assert_ne!(resumed, agent);
    wait_for("the front to come back", Duration::from_secs(30), || {
        run(a.docker().args(["ps", "-q", "--filter", "name=web"]))
            .status
            .success()
            .then_some(())
    });
    let running = stdout(&ok(
        run(a
            .docker()
            .args(["ps", "--filter", "name=web", "--format", "{{.Names}}"])),
        "ps",
    ));
    assert_eq!(running.trim(), "web", "the lease's container is gone");
    let page = wait_for("the published port", Duration::from_secs(20), || {
        http_get(format!("{}:8080", a.host_addr()).parse().unwrap()).ok()
    });
    assert!(page.contains("survives"), "{page}");

    // The coordinator still has the lease, with the deadline unchanged.
    let l = pool.lease(a.lease_id());
    assert_eq!(l.state, pb::LeaseState::Active as i32, "{l:?}");
    assert_eq!(l.host_id, host);
    assert_eq!(l.deadline, deadline);
    assert!(
        pool.agent_logs()
            .contains("taking over a host that outlived its agent"),
        "{}",
        pool.agent_logs()
    );

    ok(pool.berth(&["release", "--lease", a.lease_id()]), "release");
    let w = wait_for("the wipe report", Duration::from_secs(60), || {
        pool.lease(a.lease_id()).wipe
    });
    assert!(w.verified && w.containers_removed >= 1, "{w:?}");
    wait_for("the host to be destroyed", Duration::from_secs(60), || {
        (!pool.host_exists(&host)).then_some(())
    });
}

fn agent_back_after_the_deadline(store: Store) {
    if !preflight() {
        return;
    }
    let pool = Pool::start_on(store, "bfa2-", 1, &[]);
    let a = pool.acquire("fa-late", "8s", "1m");
    let host = a.get("BERTH_HOST_ID").to_owned();
    ok(
        run(a.docker().args(["volume", "create", "dirty"])),
        "volume create",
    );
    // Freeze berth up so the agent stays dead past the lease's deadline.
    let up = pool.up_pid().expect("berth up pid");
    let frozen = Frozen::stop(up);
    let agent = pool.agent_pid(&host).expect("agent pid");
    kill(agent, Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_secs(10));
    // The dockerd and everything on it is still there, untouched.
    assert!(
        pool.dockerd_pid(&host).is_some(),
        "dockerd died with the agent"
    );
    drop(frozen);

    // The restarted agent finds the deadline passed: wipe, then destroy.
    wait_for("the host to be destroyed", Duration::from_secs(90), || {
        (!pool.host_exists(&host)).then_some(())
    });
    // The restarted agent says why it wiped. (It tells the coordinator too,
    // but only if its link is up by then; its registration carries the
    // Wiping state either way.)
    let logs = pool.agent_logs();
    assert!(
        logs.contains("restarted after the lease deadline"),
        "{logs}"
    );
    let l = wait_for("the wipe report", Duration::from_secs(30), || {
        let l = pool.lease(a.lease_id());
        l.wipe.is_some().then_some(l)
    });
    assert_eq!(l.state, pb::LeaseState::Expired as i32, "{l:?}");
    let w = l.wipe.unwrap();
    assert!(w.verified && w.volumes_removed >= 1, "{w:?}");
    // It is never offered again.
    let mut pool = pool;
    let fresh = pool.wait_ready_hosts(1, Duration::from_secs(60));
    assert!(fresh.iter().all(|h| h.host_id != host));
}

fn idle_agent_killed(store: Store) {
    if !preflight() {
        return;
    }
    let mut pool = Pool::start_on(store, "bfa3-", 1, &[]);
    let host = pool.ready_hosts()[0].host_id.clone();
    let agent = pool.agent_pid(&host).expect("agent pid");
    // Freeze berth up, kill the agent, and leave something behind on its
    // dockerd: the host's state is no longer what the file says.
    let up = pool.up_pid().expect("berth up pid");
    let frozen = Frozen::stop(up);
    kill(agent, Signal::SIGKILL).unwrap();
    wait_for("the agent to die", Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{agent}/cmdline")).exists()
            || pool.agent_pids().iter().all(|p| *p != agent))
        .then_some(())
    });
    ok(
        run(pool
            .docker_behind_front(&host)
            .args(["volume", "create", "planted"])),
        "plant a volume",
    );
    drop(frozen);

    // Ready again only after a verified wipe; the planted volume is gone.
    let ready = pool.wait_ready_hosts(1, Duration::from_secs(90));
    assert_eq!(ready[0].host_id, host, "the host was replaced, not resumed");
    let vols = stdout(&ok(
        run(pool.docker_behind_front(&host).args(["volume", "ls", "-q"])),
        "volume ls",
    ));
    assert!(vols.trim().is_empty(), "left on a Ready host: {vols}");
    let logs = pool.agent_logs();
    assert!(
        logs.contains("restarted; checking the host is clean"),
        "{logs}"
    );
    // And it serves a build as usual.
    let b = pool.acquire("fa-after", "5m", "1m");
    assert_eq!(b.get("BERTH_HOST_ID"), host);
    ok(pool.berth(&["release", "--lease", b.lease_id()]), "release");
}
