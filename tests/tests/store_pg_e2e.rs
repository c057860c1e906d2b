//! The shared store end to end: a pool (`berth up`, real agents and
//! dockerds) whose coordinator keeps its state in a PostgreSQL cluster the
//! test starts (`berth_testkit::postgres`), not in its state dir.
//!
//! - Every lease change an answer reports is already in the database when
//!   the answer arrives (the group commit waits for PostgreSQL's commit).
//! - The coordinator killed with `kill -9` and restarted by `berth up`
//!   waits for its old claim of the lead to expire, takes it over and
//!   restores the pool from the database: the lease carries on (same host,
//!   same deadline), Renew/Release work, new acquires are served, no host
//!   is in two leases.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_testkit::postgres::Postgres;
use berth_testkit::*;
use nix::sys::signal::{Signal, kill};

/// The `berth up` arguments that put the coordinator on `url`, and the
/// store key file they name (written by [`write_key`]).
fn store_args(url: &str, key: &std::path::Path) -> Vec<String> {
    [
        format!("--store={url}"),
        format!("--store-key-file={}", key.display()),
        // A killed leader's claim runs out quickly.
        "--leader-ttl=2s".to_owned(),
    ]
    .into_iter()
    .flat_map(|a| ["--coordinator-arg".to_owned(), a])
    .collect()
}

fn write_key(path: &std::path::Path) {
    std::fs::write(path, "5a".repeat(32)).unwrap();
}

/// No host holds two live leases, from the coordinator's own listing.
fn assert_no_host_in_two_leases(pool: &Pool) {
    let mut by_host: HashMap<String, Vec<String>> = HashMap::new();
    for l in pool.all_leases() {
        let live =
            l.state == pb::LeaseState::Active as i32 || l.state == pb::LeaseState::Assigned as i32;
        if live && !l.host_id.is_empty() {
            by_host.entry(l.host_id).or_default().push(l.lease_id);
        }
    }
    for (host, leases) in by_host {
        assert!(leases.len() <= 1, "host {host} is in leases {leases:?}");
    }
}

/// The state of lease `id` as the database holds it.
fn stored_state(pg: &Postgres, db: &str, id: &str) -> String {
    pg.sql(
        db,
        &format!("SELECT record->>'state' FROM berth_leases WHERE id = '{id}'"),
    )
}

#[test]
fn a_pool_on_postgres_serves_leases_and_a_killed_coordinator_restores_them() {
    if !preflight() {
        return;
    }
    let pg = Postgres::start();
    let db = "pool";
    let url = pg.create_db(db);
    let base = "bpg1-";
    let (state_dir, _) = dirs(&test_prefix(base));
    let key: PathBuf = state_dir.join("store.key");
    let args = store_args(&url, &key);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut pool = Pool::start_with(base, 2, &args, |dir| write_key(&dir.join("store.key")));
    wait_for("the coordinator to lead", Duration::from_secs(30), || {
        pool.coordinator_answers().then_some(())
    });
    assert!(
        pool.coordinator_log().contains("this coordinator leads"),
        "{}",
        pool.coordinator_log()
    );
    // Nothing is kept in the state dir: the embedded store is not used.
    assert!(
        !state_dir
            .join("coordinator")
            .join("coordinator.redb")
            .exists()
    );

    let a = pool.acquire("pg-a", "10m", "1m");
    // The answer came after the commit: the lease is in the database.
    assert_eq!(stored_state(&pg, db, a.lease_id()), "active");
    let before = pool.lease(a.lease_id());
    ok(
        run(a.docker().args(["volume", "create", "kept"])),
        "volume create",
    );

    let old = pool.coordinator_pid().expect("coordinator pid");
    kill(old, Signal::SIGKILL).unwrap();
    wait_for(
        "berth up to restart the coordinator and it to lead",
        Duration::from_secs(60),
        || {
            pool.coordinator_pid()
                .filter(|p| *p != old)
                .filter(|_| pool.coordinator_answers())
        },
    );
    let log = pool.coordinator_log();
    assert!(log.contains("restored leases from the store"), "{log}");

    // The lease survived: same host, same deadline, still active.
    let after = pool.lease(a.lease_id());
    assert_eq!(after.state, pb::LeaseState::Active as i32, "{after:?}");
    assert_eq!(after.host_id, before.host_id);
    assert_eq!(after.deadline, before.deadline);
    wait_for(
        "the leased host to reconnect",
        Duration::from_secs(60),
        || {
            pool.hosts()
                .into_iter()
                .find(|h| h.host_id == before.host_id && h.connected)
                .filter(|h| h.lease_id == a.lease_id() && h.state == pb::HostState::Leased as i32)
        },
    );
    let vols = stdout(&ok(
        run(a.docker().args(["volume", "ls", "-q"])),
        "volume ls",
    ));
    assert!(vols.contains("kept"), "{vols}");

    ok(
        pool.berth(&["renew", "--lease", a.lease_id(), "--ttl", "20m"]),
        "renew after restart",
    );
    pool.wait_ready_hosts(1, Duration::from_secs(60));
    let b = pool.acquire("pg-b", "10m", "1m");
    assert_ne!(b.get("BERTH_HOST_ID"), a.get("BERTH_HOST_ID"));
    assert_eq!(stored_state(&pg, db, b.lease_id()), "active");
    assert_no_host_in_two_leases(&pool);

    ok(
        pool.berth(&["release", "--lease", a.lease_id()]),
        "release after restart",
    );
    let w = wait_for("the wipe report", Duration::from_secs(60), || {
        pool.lease(a.lease_id()).wipe
    });
    assert!(w.verified && w.volumes_removed >= 1, "{w:?}");
    assert_eq!(stored_state(&pg, db, a.lease_id()), "released");
    ok(
        pool.berth(&["release", "--lease", b.lease_id()]),
        "release b",
    );
    pool.stop();
    // A clean stop gave the lead up at once.
    assert_eq!(
        pg.sql(db, "SELECT expires_at <= now() FROM berth_leader"),
        "t"
    );
}
