//! Two coordinators in-process on one PostgreSQL (a private cluster the
//! test starts), the leader's database connections running through a TCP
//! relay the test can cut: a partitioned leader stops leading (its store
//! refuses writes and it stops serving) before the standby takes the lead
//! over, and the standby then leads with a higher term.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_coordinator::CoordinatorConfig;
use berth_testkit::postgres::Postgres;
use clap::Parser;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    c: CoordinatorConfig,
}

/// A TCP relay to `127.0.0.1:upstream`; [`Relay::cut`] closes every
/// connection and stops listening (new connections are refused).
struct Relay {
    port: u16,
    cut: CancellationToken,
}

impl Relay {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = CancellationToken::new();
        let stop = cut.clone();
        tokio::spawn(async move {
            loop {
                let (mut down, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                    }
                });
            }
        });
        Self { port, cut }
    }

    fn cut(&self) {
        self.cut.cancel();
    }
}

/// Starts a coordinator on `store`; returns its task (the result of
/// `serve`, and when it returned).
async fn start(
    dir: &Path,
    name: &str,
    store: &str,
) -> tokio::task::JoinHandle<(Result<(), String>, Instant)> {
    let s = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let (state, tenants, join, key) = (
        s(dir.join(name)),
        s(dir.join("tenants")),
        s(dir.join("join.sha256")),
        s(dir.join("store.key")),
    );
    let cfg = Args::parse_from([
        "t",
        "--listen",
        "127.0.0.1:0",
        "--ops-listen",
        "127.0.0.1:0",
        "--state-dir",
        &state,
        "--tenants",
        &tenants,
        "--join-token-hash-file",
        &join,
        "--store",
        store,
        "--store-key-file",
        &key,
        "--leader-ttl",
        "4s",
    ])
    .c;
    let listener = berth_coordinator::bind(&cfg).await.unwrap();
    tokio::spawn(async move {
        let r = berth_coordinator::serve(cfg, listener, CancellationToken::new()).await;
        (r.map_err(|e| e.to_string()), Instant::now())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_database_stops_before_the_standby_takes_over() {
    let pg = tokio::task::block_in_place(Postgres::start);
    let url = tokio::task::block_in_place(|| pg.create_db("cut"));
    let relay = Relay::start(pg.port).await;
    let via_relay = format!("postgres://postgres@127.0.0.1:{}/cut", relay.port);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("store.key"), "7e".repeat(32)).unwrap();
    std::fs::write(
        dir.path().join("tenants"),
        berth_tls::Tenants::line("ci", &berth_tls::token::generate(), false),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("join.sha256"),
        berth_tls::TokenHash::of(&berth_tls::token::generate()).to_hex(),
    )
    .unwrap();
    let term = || tokio::task::block_in_place(|| pg.sql("cut", "SELECT term FROM berth_leader"));

    // A leads (the lead was free), through the relay.
    let a = start(dir.path(), "a", &via_relay).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while term() != "1" {
        assert!(Instant::now() < deadline, "A never led");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B stands by on a direct connection.
    let b = start(dir.path(), "b", &url).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(term(), "1", "B took the lead from a live leader");
    assert!(!a.is_finished() && !b.is_finished());

    // Watch for the takeover from now on.
    let took_over = Arc::new(Mutex::new(None::<Instant>));
    let watcher = tokio::spawn({
        let took_over = took_over.clone();
        let url = url.clone();
        async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            loop {
                let t: i64 = c
                    .query_one("SELECT term FROM berth_leader", &[])
                    .await
                    .unwrap()
                    .get(0);
                if t > 1 {
                    *took_over.lock().unwrap() = Some(Instant::now());
                    return t;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    let cut = Instant::now();
    relay.cut();
    let (result, a_stopped) = tokio::time::timeout(Duration::from_secs(30), a)
        .await
        .expect("the partitioned leader kept serving")
        .unwrap();
    let err = result.expect_err("a partitioned leader must stop with an error");
    assert!(err.contains("lost the lead of term 1"), "{err}");
    let new_term = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .expect("the standby never took over")
        .unwrap();
    assert_eq!(new_term, 2);
    let took = took_over.lock().unwrap().unwrap();
    println!(
        "cut -> old leader stopped: {:?}; cut -> standby leads: {:?}",
        a_stopped - cut,
        took - cut
    );
    assert!(
        a_stopped < took,
        "the standby led ({:?} after the cut) before the old leader stopped ({:?})",
        took - cut,
        a_stopped - cut
    );
    assert!(!b.is_finished(), "the new leader stopped");
    b.abort();
}
