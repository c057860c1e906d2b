//! The shared store against a real PostgreSQL (a private cluster started
//! by the test, `berth_testkit::postgres`): the store's and the restore's
//! tests of the embedded store, run on this one; fencing; migrations; the
//! CA, tenants and join token hash shared through the database.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use berth_testkit::postgres::Postgres;

use super::PgStore;
use super::leader::Election;
use crate::store::LeaseStore;
use crate::store::tests::{host, rec};

/// A store that leads with a fresh term (as a coordinator would after
/// winning the election).
fn leading_store(url: &str) -> PgStore {
    let s = PgStore::open(url).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let term = rt.block_on(async {
        let mut e = Election::new(url, "127.0.0.1:1".into(), Duration::from_secs(3600));
        match e.try_lead().await.unwrap() {
            Some(t) => t,
            // Someone (an earlier open in this test) leads: take its row.
            None => e.leader().await.unwrap().unwrap().term,
        }
    });
    s.set_term(term);
    s
}

#[test]
fn records_survive_reopening_postgres() {
    let pg = Postgres::start();
    let url = pg.create_db("store");
    crate::store::tests::records_survive_reopening(&|| Box::new(leading_store(&url)));
    // The records are in the database itself, not in the process.
    assert_eq!(pg.sql("store", "SELECT count(*) FROM berth_leases"), "1");
    assert_eq!(pg.sql("store", "SELECT count(*) FROM berth_hosts"), "1");
}

#[test]
fn unreadable_rows_are_quarantined_postgres() {
    let pg = Postgres::start();
    let url = pg.create_db("quarantine");
    let store = Arc::new(leading_store(&url));
    crate::store::tests::unreadable_records_are_quarantined(store, &|| {
        // Valid JSON (the column is jsonb) that is no record.
        pg.sql(
            "quarantine",
            "INSERT INTO berth_leases (id, record) VALUES ('bad-lease', '[1, 2, 3]'::jsonb)",
        );
        pg.sql(
            "quarantine",
            "INSERT INTO berth_hosts (id, record) VALUES ('h-bad', '{\"id\": 7}'::jsonb)",
        );
    });
    // Still in the tables.
    assert_eq!(
        pg.sql(
            "quarantine",
            "SELECT count(*) FROM berth_leases WHERE id = 'bad-lease'"
        ),
        "1"
    );
}

#[test]
fn restoring_keeps_live_leases_postgres() {
    let pg = Postgres::start();
    let url = pg.create_db("restore");
    let store = Arc::new(leading_store(&url));
    // The restore rules run on a paused clock; the store's own thread keeps
    // real time for PostgreSQL.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(async { crate::pool::persist_tests::restoring_keeps_live_leases(store) });
}

#[test]
fn migrations_apply_once_even_when_coordinators_start_together() {
    let pg = Postgres::start();
    let url = pg.create_db("migrate");
    let opened: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PgStore::open(&url).map(|_| ()))
        })
        .collect();
    for t in opened {
        t.join().unwrap().unwrap();
    }
    let n = super::migrate::MIGRATIONS.len().to_string();
    assert_eq!(
        pg.sql("migrate", "SELECT count(*) FROM berth_migrations"),
        n
    );
    assert_eq!(pg.sql("migrate", "SELECT count(*) FROM berth_leader"), "1");
}

#[test]
fn a_store_that_does_not_lead_cannot_write() {
    let pg = Postgres::start();
    let url = pg.create_db("unelected");
    let s = PgStore::open(&url).unwrap();
    let err = s.commit(&[rec("a", "active")], &[], &[]).unwrap_err();
    assert!(
        matches!(err, crate::store::StoreError::Fenced { mine: 0, .. }),
        "{err}"
    );
    // The same store, once it leads, writes.
    let s = leading_store(&url);
    s.commit(&[rec("a", "active")], &[], &[host("h1")]).unwrap();
    assert_eq!(s.load().unwrap().records.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_write_with_the_old_term_fails() {
    let pg = Postgres::start();
    let url = pg.create_db("fence");
    // Opening a store applies the schema.
    let (store_a, store_b) = tokio::task::block_in_place(|| {
        (PgStore::open(&url).unwrap(), PgStore::open(&url).unwrap())
    });
    let ttl = Duration::from_secs(1);
    let mut a = Election::new(&url, "127.0.0.1:1001".into(), ttl);
    let mut b = Election::new(&url, "127.0.0.1:1002".into(), ttl);
    let t1 = a.try_lead().await.unwrap().expect("a leads an empty row");
    // While a's claim holds, b cannot take it and sees a as the leader.
    assert_eq!(b.try_lead().await.unwrap(), None);
    let seen = b.leader().await.unwrap().unwrap();
    assert_eq!((seen.term, seen.addr.as_str()), (t1, "127.0.0.1:1001"));
    assert!(a.renew(t1).await.unwrap());

    store_a.set_term(t1);
    tokio::task::block_in_place(|| store_a.commit(&[rec("a", "active")], &[], &[])).unwrap();

    // a stops renewing (partitioned, or paused); its claim runs out and b
    // takes over with a higher term.
    let t2 = loop {
        if let Some(t) = b.try_lead().await.unwrap() {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(t2 > t1);
    store_b.set_term(t2);

    // a still believes it leads: its writes carry term t1 and fail.
    let err = tokio::task::block_in_place(|| {
        store_a.commit(&[rec("a", "released")], &["x".into()], &[host("h9")])
    })
    .unwrap_err();
    assert!(
        matches!(&err, crate::store::StoreError::Fenced { mine, .. } if *mine == t1),
        "{err}"
    );
    assert!(!a.renew(t1).await.unwrap(), "a renewed a lead it lost");
    // b's writes go through, and nothing of a's refused write is there.
    tokio::task::block_in_place(|| store_b.commit(&[rec("b", "active")], &[], &[])).unwrap();
    let mut states: Vec<(String, String)> = tokio::task::block_in_place(|| store_b.load())
        .unwrap()
        .records
        .into_iter()
        .map(|r| (r.id, r.state))
        .collect();
    states.sort();
    assert_eq!(
        states,
        vec![("a".into(), "active".into()), ("b".into(), "active".into())]
    );
    assert!(
        tokio::task::block_in_place(|| store_b.load_hosts())
            .unwrap()
            .records
            .is_empty()
    );
    // A clean resign lets a standby take over at once.
    b.resign(t2).await.unwrap();
    let t3 = a
        .try_lead()
        .await
        .unwrap()
        .expect("the resigned lead is free");
    assert!(t3 > t2);
}

fn config(args: &[&str]) -> crate::config::CoordinatorConfig {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        c: crate::config::CoordinatorConfig,
    }
    let mut all = vec!["berth-coordinator"];
    all.extend_from_slice(args);
    Cli::try_parse_from(all).unwrap().c
}

#[test]
fn the_pool_ca_and_credentials_are_shared_through_the_database() {
    let pg = Postgres::start();
    let url = pg.create_db("boot");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("store.key");
    std::fs::write(&key, "ab".repeat(32)).unwrap();
    let tenants = dir.path().join("tenants");
    std::fs::write(&tenants, format!("ci {} admin\n", "00".repeat(32))).unwrap();
    let join = dir.path().join("join.sha256");
    std::fs::write(&join, "11".repeat(32)).unwrap();
    let key_s = key.to_str().unwrap();
    let first = config(&[
        "--store",
        &url,
        "--store-key-file",
        key_s,
        "--tenants",
        tenants.to_str().unwrap(),
        "--join-token-hash-file",
        join.to_str().unwrap(),
    ]);
    // A second coordinator with neither the tenants nor the join token file.
    let second = config(&["--store", &url, "--store-key-file", key_s]);
    let s1 = PgStore::open(&url).unwrap();
    let s2 = PgStore::open(&url).unwrap();
    // Before any coordinator stored them, the second has no credentials.
    assert!(matches!(
        super::boot::auth(&second, &s2),
        Err(super::boot::BootError::Missing { .. })
    ));
    let ca1 = super::boot::ca(&first, &s1).unwrap();
    super::boot::auth(&first, &s1).unwrap();
    let ca2 = super::boot::ca(&second, &s2).unwrap();
    super::boot::auth(&second, &s2).unwrap();
    assert_eq!(ca1.cert_pem(), ca2.cert_pem(), "one pool, one CA");
    // The key is sealed: no PEM key in the database.
    let stored = pg.sql(
        "boot",
        "SELECT encode(value, 'escape') FROM berth_meta WHERE key = 'ca'",
    );
    assert!(stored.contains("BEGIN CERTIFICATE"));
    assert!(!stored.contains("PRIVATE KEY"), "{stored}");
    // Another key file does not open it.
    std::fs::write(&key, "cd".repeat(32)).unwrap();
    let err = super::boot::ca(&second, &s2).unwrap_err();
    assert!(matches!(err, super::boot::BootError::Seal(_)), "{err}");
}

#[test]
fn a_coordinator_restarted_with_the_pools_own_files_writes_no_configuration() {
    let pg = Postgres::start();
    let url = pg.create_db("again");
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let key = file("store.key", &"ab".repeat(32));
    let tenants = file("tenants", &format!("ci {} admin\n", "00".repeat(32)));
    let join = file("join.sha256", &"11".repeat(32));
    let (ca, ca_key) = berth_tls::Ca::generate("operator CA").unwrap();
    let ca_cert = file("ca.pem", ca.cert_pem());
    let ca_key = file("ca.key", &ca_key);
    let cfg = config(&[
        "--store",
        &url,
        "--store-key-file",
        &key,
        "--tenants",
        &tenants,
        "--join-token-hash-file",
        &join,
        "--ca-cert",
        &ca_cert,
        "--ca-key",
        &ca_key,
    ]);
    let boot = || {
        let s = PgStore::open(&url).unwrap();
        super::boot::ca(&cfg, &s).unwrap();
        super::boot::auth(&cfg, &s).unwrap();
    };
    // The row versions: a write, even of the same value, makes a new one.
    let versions = || pg.sql("again", "SELECT key, xmin FROM berth_meta ORDER BY key");
    boot();
    let first = versions();
    assert_eq!(first.lines().count(), 3, "{first}");
    boot();
    assert_eq!(versions(), first, "the same files were written again");
    // A changed file is stored, and only that one.
    std::fs::write(&tenants, format!("ci {} admin\n", "22".repeat(32))).unwrap();
    boot();
    let changed = versions();
    let differ: Vec<_> = first
        .lines()
        .zip(changed.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.split('|').next().unwrap().to_owned())
        .collect();
    assert_eq!(differ, ["tenants"], "{first}\n{changed}");
}
