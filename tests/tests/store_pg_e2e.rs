//! The shared store end to end: two coordinators (one run by `berth up`,
//! one started by the test) on one PostgreSQL cluster the test starts
//! (`berth_testkit::postgres`), real agents and dockerds. (One coordinator
//! on PostgreSQL killed and restarted, and the other faults of
//! docs/guarantees.md, run in the `faults_*` tests as `postgres::NAME`.)
//!
//! - Two coordinators on one database, agents and the CLI given both
//!   addresses: the leader killed with `kill -9` (its supervisor frozen so
//!   it does not come back at once), the standby takes over, the lease
//!   carries on, new acquires are served. The old leader, started again
//!   with the same arguments, stands by (log, gRPC health NOT_SERVING, CI
//!   and agent calls UNAVAILABLE naming the new leader), the lead stays
//!   the new leader's term, and it writes nothing: triggers record every
//!   row written to the pool's tables with the writer's
//!   `application_name`, and none is the old leader's after its restart,
//!   while the new leader's releases and acquires are there. The failover
//!   time (leader killed -> first acquire served by the new leader) is
//!   printed.
//! - A build waiting for a host when the leader is killed: its `berth
//!   acquire` repeats the cut-off call once with the next leader and is
//!   served there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_proto::v1 as pb;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_testkit::postgres::{self as pgkit, Postgres};
use berth_testkit::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A second coordinator of the pool, started by the test; stopped on drop.
struct Standby {
    child: Child,
    dir: PathBuf,
}

impl Standby {
    /// `berth-coordinator` on `listen`, sharing `url`'s pool: no CA, no
    /// tenants file, no join token of its own (all from the database).
    fn start(dir: &Path, listen: SocketAddr, url: &str, key: &Path) -> Self {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::File::create(dir.join("coordinator.log")).unwrap();
        let child = Command::new(bin("berth-coordinator"))
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--addr-file")
            .arg(dir.join("coordinator.addr"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--ops-listen", "127.0.0.1:0"])
            .arg(format!("--store={url}"))
            .arg("--store-key-file")
            .arg(key)
            .arg(format!("--leader-ttl={}", pgkit::LEADER_TTL))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start berth-coordinator");
        Self {
            child,
            dir: dir.to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The `berth` CLI of `pool` given the coordinator addresses `list`.
fn berth_cmd_at(pool: &Pool, list: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin("berth"));
    c.arg("--coordinator")
        .arg(list)
        .args(args)
        .env("BERTH_CA", pool.ca_pem_path())
        .env("BERTH_TOKEN_FILE", pool.token_path())
        .env("HOME", pool.state_dir.join("home"))
        .env_remove("BERTH_TOKEN")
        .env_remove("BERTH_LEASE_ID")
        .env_remove("DOCKER_CERT_PATH");
    c
}

/// [`berth_cmd_at`], run to its end.
fn berth_at(pool: &Pool, list: &str, args: &[&str]) -> Output {
    run(&mut berth_cmd_at(pool, list, args))
}

/// A pool of `hosts` on PostgreSQL (`url`) whose coordinator A is `berth
/// up`'s, its agents given A's address and a second one B for a standby;
/// returns the pool, A and B.
fn two_coordinators(base: &str, hosts: u16, url: &str) -> (Pool, SocketAddr, SocketAddr) {
    let (state_dir, _) = dirs(&test_prefix(base));
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let mut args = pgkit::up_args(url, &state_dir.join("store.key"));
    args.extend([
        format!("--listen={a_addr}"),
        // A fixed --listen port would give the ops endpoint its default
        // port, which another test's pool may hold.
        "--ops-listen=127.0.0.1:0".to_owned(),
        "--agent-arg".to_owned(),
        format!("--coordinator=https://{a_addr},https://{b_addr}"),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pool = Pool::start_with(base, hosts, &args, |dir| {
        pgkit::write_key(&dir.join("store.key"));
    });
    (pool, a_addr, b_addr)
}

/// Starts coordinator B on `b_addr` (store `url`, the pool's key) and waits
/// until it stands by naming A as the leader; returns it and its refusal.
fn stand_by(pool: &Pool, url: &str, a_addr: SocketAddr, b_addr: SocketAddr) -> (Standby, String) {
    let key = pool.state_dir.join("store.key");
    let b = Standby::start(&pool.state_dir.join("standby"), b_addr, url, &key);
    let refused = wait_for("B to stand by", Duration::from_secs(30), || {
        let o = berth_at(pool, &b_addr.to_string(), &["leases"]);
        let e = stderr(&o);
        (!o.status.success() && e.contains(&format!("the leader is at {a_addr}"))).then_some(e)
    });
    (b, refused)
}

/// Records every row written to the pool's tables, with the writer's
/// `application_name` (each coordinator's store URL names it), in
/// `berth_audit`: what a coordinator wrote, and when (`seq`).
fn audit_writes(pg: &Postgres, db: &str) {
    let mut sql = "CREATE TABLE berth_audit (
            seq bigserial PRIMARY KEY,
            app text NOT NULL,
            tbl text NOT NULL,
            op  text NOT NULL);
        CREATE FUNCTION berth_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO berth_audit (app, tbl, op)
            VALUES (current_setting('application_name'), TG_TABLE_NAME, TG_OP);
            RETURN NULL;
        END $$;"
        .to_owned();
    for t in ["berth_leases", "berth_hosts", "berth_meta", "berth_leader"] {
        sql.push_str(&format!(
            "CREATE TRIGGER {t}_audit AFTER INSERT OR UPDATE OR DELETE ON {t}
                 FOR EACH ROW EXECUTE FUNCTION berth_audit();
             CREATE TRIGGER {t}_audit_truncate AFTER TRUNCATE ON {t}
                 FOR EACH STATEMENT EXECUTE FUNCTION berth_audit();"
        ));
    }
    pg.sql(db, &sql);
}

/// The rows `app` wrote after audit entry `after`, per table.
fn writes_by(pg: &Postgres, db: &str, app: &str, after: u64) -> String {
    pg.sql(
        db,
        &format!(
            "SELECT tbl || ':' || op || ':' || count(*) FROM berth_audit
             WHERE app = '{app}' AND seq > {after} GROUP BY tbl, op ORDER BY 1"
        ),
    )
}

/// Every audited write, per writer, table and operation.
fn all_writes(pg: &Postgres, db: &str) -> String {
    pg.sql(
        db,
        "SELECT app || ':' || tbl || ':' || op || ':' || count(*) FROM berth_audit
         GROUP BY app, tbl, op ORDER BY 1",
    )
}

/// What a coordinator at `addr` answers on gRPC health for the lease
/// service, and to an agent's Connect.
fn health_and_agent_answer(
    pool: &Pool,
    addr: SocketAddr,
) -> (ServingStatus, Result<(), tonic::Status>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let endpoint = pool.endpoint_at(addr);
    rt.block_on(async {
        let ch = endpoint.connect().await.expect("connect");
        let status = HealthClient::new(ch.clone())
            .check(HealthCheckRequest {
                service: pb::lease_service_server::SERVICE_NAME.to_owned(),
            })
            .await
            .expect("health")
            .into_inner()
            .status();
        let agent = AgentServiceClient::new(ch)
            .connect(tokio_stream::iter(Vec::<pb::AgentMessage>::new()))
            .await
            .map(|_| ());
        (status, agent)
    })
}

#[test]
fn the_standby_takes_over_when_the_leader_is_killed_and_leases_carry_on() {
    if !preflight() {
        return;
    }
    let pg = Postgres::start();
    let db = "ha";
    let url = pg.create_db(db);
    // Each coordinator names itself to the database, so the audit tells
    // their writes apart.
    let (url_a, url_b) = (
        format!("{url}?application_name=berth-a"),
        format!("{url}?application_name=berth-b"),
    );
    let (mut pool, a_addr, b_addr) = two_coordinators("bpg2-", 2, &url_a);
    assert_eq!(pool.addr, a_addr);
    audit_writes(&pg, db);
    let (b, refused) = stand_by(&pool, &url_b, a_addr, b_addr);
    assert!(refused.contains("standby"), "{refused}");
    let both = format!("{a_addr},{b_addr}");
    // The same CLI given both addresses is served (by A).
    let a_lease = LeaseEnv::parse(&stdout(&ok(
        berth_at(
            &pool,
            &both,
            &["acquire", "--build", "ha-a", "--ttl", "10m", "--wait", "1m"],
        ),
        "acquire through the list",
    )));
    let before = pool.lease(a_lease.lease_id());
    ok(
        run(a_lease.docker().args(["volume", "create", "kept"])),
        "volume create",
    );
    let term_a: u64 = pg.sql(db, "SELECT term FROM berth_leader").parse().unwrap();
    // The audit sees the leader's writes under its name, and none of B's.
    let by_a = writes_by(&pg, db, "berth-a", 0);
    assert!(by_a.contains("berth_leases:INSERT:"), "{by_a}");
    wait_for("A to renew its lead", Duration::from_secs(30), || {
        writes_by(&pg, db, "berth-a", 0)
            .contains("berth_leader:UPDATE:")
            .then_some(())
    });
    assert_eq!(
        writes_by(&pg, db, "berth-b", 0),
        "",
        "{}",
        all_writes(&pg, db)
    );

    // Kill the leader; its supervisor is frozen so it does not restart it.
    let up = pool.up_pid().expect("berth up pid");
    let old = pool.coordinator_pid().expect("coordinator pid");
    let frozen = Frozen::stop(up);
    let killed = Instant::now();
    kill(old, Signal::SIGKILL).unwrap();
    // The first acquire after the kill, through the list: served once B
    // leads and an idle host re-registered with it.
    let second = LeaseEnv::parse(&stdout(&ok(
        berth_at(
            &pool,
            &both,
            &["acquire", "--build", "ha-b", "--ttl", "10m", "--wait", "1m"],
        ),
        "acquire after the leader was killed",
    )));
    let failover = killed.elapsed();
    println!(
        "failover: leader killed -> first acquire served by the new leader: {} ms",
        failover.as_millis()
    );
    let log = b.log();
    assert!(log.contains("serving as leader"), "{log}");
    let row = pg.sql(db, "SELECT term, addr FROM berth_leader");
    let (term_b, addr) = row.split_once('|').unwrap();
    let term_b: u64 = term_b.parse().unwrap();
    assert!(term_b > term_a, "{row}");
    assert_eq!(addr, b_addr.to_string());

    // The pool's clients now talk to B: the lease survived.
    pool.addr = b_addr;
    let after = pool.lease(a_lease.lease_id());
    assert_eq!(after.state, pb::LeaseState::Active as i32, "{after:?}");
    assert_eq!(after.host_id, before.host_id);
    assert_eq!(after.deadline, before.deadline);
    assert_ne!(second.get("BERTH_HOST_ID"), a_lease.get("BERTH_HOST_ID"));
    wait_for(
        "the leased host to re-register with B",
        Duration::from_secs(60),
        || {
            pool.hosts()
                .into_iter()
                .find(|h| h.host_id == before.host_id && h.connected)
                .filter(|h| h.lease_id == a_lease.lease_id())
        },
    );
    let vols = stdout(&ok(
        run(a_lease.docker().args(["volume", "ls", "-q"])),
        "volume ls",
    ));
    assert!(vols.contains("kept"), "{vols}");
    ok(
        berth_at(
            &pool,
            &both,
            &["renew", "--lease", a_lease.lease_id(), "--ttl", "20m"],
        ),
        "renew through the list",
    );
    pool.assert_no_host_in_two_leases();

    // The old leader comes back: its supervisor restarts it with the same
    // arguments. It stands by: its log says so, its health says it does
    // not serve leases, CI and agents are answered UNAVAILABLE naming B.
    let mark: u64 = pg
        .sql(db, "SELECT coalesce(max(seq), 0) FROM berth_audit")
        .parse()
        .unwrap();
    drop(frozen);
    let refused = wait_for(
        "the old leader to stand by",
        Duration::from_secs(30),
        || {
            let o = berth_at(&pool, &a_addr.to_string(), &["leases"]);
            let e = stderr(&o);
            (!o.status.success() && e.contains(&format!("the leader is at {b_addr}"))).then_some(e)
        },
    );
    assert!(refused.contains("standby"), "{refused}");
    let restarted = pool.coordinator_pid().expect("the restarted old leader");
    assert_ne!(restarted, old);
    let log = pool.coordinator_log();
    assert!(log.contains("standing by"), "{log}");
    let (health, agent) = health_and_agent_answer(&pool, a_addr);
    assert_eq!(health, ServingStatus::NotServing);
    let agent = agent.expect_err("a standby took an agent's stream");
    assert_eq!(agent.code(), tonic::Code::Unavailable, "{agent:?}");
    assert!(
        agent
            .message()
            .contains(&format!("the leader is at {b_addr}")),
        "{agent:?}"
    );
    assert_eq!(
        agent
            .metadata()
            .get("berth-leader")
            .and_then(|v| v.to_str().ok()),
        Some(b_addr.to_string().as_str()),
        "{agent:?}"
    );
    // The same calls to B: it leads and serves.
    let (health, _) = health_and_agent_answer(&pool, b_addr);
    assert_eq!(health, ServingStatus::Serving);
    assert_eq!(
        pg.sql(db, "SELECT term, addr FROM berth_leader"),
        format!("{term_b}|{b_addr}")
    );

    // Leases go on through B: release both, a new acquire is served.
    ok(
        berth_at(&pool, &both, &["release", "--lease", a_lease.lease_id()]),
        "release a",
    );
    let w = wait_for("the wipe report", Duration::from_secs(60), || {
        pool.lease(a_lease.lease_id()).wipe
    });
    assert!(w.verified && w.volumes_removed >= 1, "{w:?}");
    ok(
        berth_at(&pool, &both, &["release", "--lease", second.lease_id()]),
        "release b",
    );
    let third = LeaseEnv::parse(&stdout(&ok(
        berth_at(
            &pool,
            &both,
            &["acquire", "--build", "ha-c", "--ttl", "5m", "--wait", "1m"],
        ),
        "acquire with the old leader back",
    )));
    // Answered once its assignment was committed; the agent's acceptance
    // may not have reached the coordinator yet.
    assert!(berth_testkit::holds_host(
        pool.lease(third.lease_id()).state
    ));
    ok(
        berth_at(&pool, &both, &["release", "--lease", third.lease_id()]),
        "release c",
    );
    pool.assert_no_host_in_two_leases();

    // The restarted old leader wrote nothing at all since it came back
    // (not even the tenants and join token hash it was started with, which
    // the database already held), while B's writes are all there; the lead
    // is still B's term; and it never led again.
    let all = all_writes(&pg, db);
    assert_eq!(writes_by(&pg, db, "berth-a", mark), "", "{all}");
    let by_b = writes_by(&pg, db, "berth-b", mark);
    assert!(by_b.contains("berth_leases:INSERT:"), "{all}");
    assert!(by_b.contains("berth_leases:UPDATE:"), "{all}");
    assert_eq!(
        pg.sql(db, "SELECT term, addr FROM berth_leader"),
        format!("{term_b}|{b_addr}")
    );
    assert_eq!(
        pool.coordinator_pid(),
        Some(restarted),
        "it restarted again"
    );
    let log = pool.coordinator_log();
    assert_eq!(
        log.matches("serving as leader").count(),
        1,
        "the restarted old leader led: {log}"
    );
    drop(b);
}

/// A build waiting for a host when the leader is killed: its `berth
/// acquire`, given both addresses, repeats the cut-off call once with the
/// coordinator that leads by then and gets its host there, without the
/// build doing anything.
#[test]
fn a_build_waiting_when_the_leader_dies_gets_its_host_from_the_next_leader() {
    if !preflight() {
        return;
    }
    let pg = Postgres::start();
    let db = "wait";
    let url = pg.create_db(db);
    let (mut pool, a_addr, b_addr) = two_coordinators("bpg3-", 1, &url);
    let (b, _) = stand_by(&pool, &url, a_addr, b_addr);
    let both = format!("{a_addr},{b_addr}");

    // The only host is held; a second build waits for it.
    let held = LeaseEnv::parse(&stdout(&ok(
        berth_at(
            &pool,
            &both,
            &["acquire", "--build", "held", "--ttl", "10m"],
        ),
        "acquire the only host",
    )));
    let waiting = Background::spawn(
        "berth acquire --build waiting",
        berth_cmd_at(
            &pool,
            &both,
            &[
                "acquire", "--build", "waiting", "--ttl", "10m", "--wait", "2m",
            ],
        ),
    );
    wait_for("the second build to queue", Duration::from_secs(30), || {
        let o = berth_at(&pool, &both, &["get", "--build", "waiting"]);
        stdout(&o).contains("position 1 of 1").then_some(())
    });

    // The leader dies mid-call (its supervisor restarts it; whichever
    // coordinator claims the lead first serves on).
    let old = pool.coordinator_pid().expect("coordinator pid");
    kill(old, Signal::SIGKILL).unwrap();
    // The held host is released through the new leader; its replacement
    // serves the waiting build.
    ok(
        berth_at(&pool, &both, &["release", "--lease", held.lease_id()]),
        "release the held host through the new leader",
    );
    let out = waiting.output();
    let (out_s, err_s) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "the waiting build failed:\n{err_s}");
    assert_eq!(
        err_s.matches("repeating the call").count(),
        1,
        "one repeated call:\n{err_s}"
    );
    let served = LeaseEnv::parse(&out_s);
    // Whichever coordinator leads now (B, or A restarted by `berth up`)
    // is the one that serves `berth leases`.
    pool.addr = wait_for("a coordinator to lead", Duration::from_secs(30), || {
        [a_addr, b_addr].into_iter().find(|addr| {
            berth_at(&pool, &addr.to_string(), &["leases"])
                .status
                .success()
        })
    });
    let lease = pool.lease(served.lease_id());
    assert!(berth_testkit::holds_host(lease.state), "{lease:?}");
    assert_ne!(served.get("BERTH_HOST_ID"), held.get("BERTH_HOST_ID"));
    ok(
        run(served.docker().arg("version")),
        "docker on the served host",
    );
    pool.assert_no_host_in_two_leases();
    ok(
        berth_at(&pool, &both, &["release", "--lease", served.lease_id()]),
        "release the served build",
    );
    drop(b);
}
