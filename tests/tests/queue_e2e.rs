//! The queue and deadlines on real hosts: an empty pool makes acquire wait
//! and then fail; a release during the wait hands the waiter the replacement
//! host; a lease whose deadline passes is ended by the agent on its own, even
//! with the coordinator frozen; a recycled host comes back verified clean.
//!
//! Each runs twice: on the embedded store and, as `postgres::NAME`, with
//! the pool's state on PostgreSQL ([`berth_testkit::on_each_store`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime};

use berth_proto::v1 as pb;
use berth_testkit::*;
use nix::unistd::Pid;

on_each_store! {
    an_empty_pool_waits_then_fails_and_a_release_serves_the_waiter => waiters,
    an_expired_lease_is_ended_and_wiped_by_the_agent_on_its_own => expired_lease,
    recycle_mode_returns_a_verified_clean_host => recycled_host,
}

fn waiters(store: Store) {
    if !preflight() {
        return;
    }
    let pool = Pool::start_on(store, "bte2-", 1, &[]);
    let first = pool.acquire("q-first", "30m", "1m");
    // On the shared store each answer came after PostgreSQL's commit of
    // the assignment (the agent's acceptance may be committed by now too).
    let stored = |id: &str, want: fn(&str) -> bool| {
        if let Some(state) = pool.stored_state(id) {
            assert!(want(&state), "lease {id} in the database: {state}");
        }
    };
    let holds = berth_testkit::stored_state_holds_host;
    let released = |s: &str| s == "released";
    stored(first.lease_id(), holds);

    let started = Instant::now();
    let o = pool.berth(&["acquire", "--build", "q-late", "--wait", "2s"]);
    let waited = started.elapsed();
    assert_eq!(o.status.code(), Some(3), "stderr: {}", stderr(&o));
    assert!(
        stderr(&o).contains("no host became ready within 2s"),
        "{}",
        stderr(&o)
    );
    assert!(
        waited >= Duration::from_secs(2),
        "failed before the wait ran out: {waited:?}"
    );

    std::thread::scope(|s| {
        let waiter = s.spawn(|| pool.acquire("q-waiter", "30m", "2m"));
        wait_for("the waiter to be queued", Duration::from_secs(20), || {
            let o = pool.berth(&["leases"]);
            let out = stdout(&o);
            out.lines()
                .any(|l| l.contains("q-waiter") && l.contains("queued"))
                .then_some(())
        });
        ok(
            pool.berth(&["release", "--lease", first.lease_id()]),
            "release",
        );
        let got = waiter.join().unwrap();
        assert_ne!(
            got.get("BERTH_HOST_ID"),
            first.get("BERTH_HOST_ID"),
            "the waiter got the released host instead of its replacement"
        );
        let l = pool.lease(got.lease_id());
        assert!(berth_testkit::holds_host(l.state), "{l:?}");
        stored(first.lease_id(), released);
        stored(got.lease_id(), holds);
        ok(
            pool.berth(&["release", "--lease", got.lease_id()]),
            "release waiter",
        );
        stored(got.lease_id(), released);
    });
}

/// The state letter of a process (`/proc/PID/stat`, after the command name):
/// `T` is stopped by a signal.
fn process_state(pid: Pid) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Pids of this pool's coordinator processes (there must be exactly one:
/// `berth up` would start a second one if it thought the first had died).
fn coordinator_pids(pool: &Pool) -> Vec<i32> {
    let state = pool.state_dir.to_string_lossy().into_owned();
    processes_mentioning(&state)
        .into_iter()
        .filter(|p| {
            p.split_once(": ")
                .is_some_and(|(_, cmd)| cmd.contains("berth-coordinator "))
        })
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect()
}

fn expired_lease(store: Store) {
    if !preflight() {
        return;
    }
    // Long enough that the freeze below lands well before the deadline on
    // a loaded machine, short enough to keep the test quick.
    const TTL: Duration = Duration::from_secs(10);
    // The freeze must be confirmed at least this long before the deadline.
    const MARGIN: Duration = Duration::from_secs(2);
    let pool = Pool::start_on(store, "bte3-", 1, &[]);
    let lease = pool.acquire("ttl-short", &format!("{}s", TTL.as_secs()), "1m");
    let deadline = pool
        .lease(lease.lease_id())
        .deadline
        .expect("an active lease has a deadline");
    let deadline = SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(deadline.seconds).unwrap(),
            u32::try_from(deadline.nanos).unwrap(),
        );

    // Freeze the coordinator first: from here on only the agent can end the
    // lease. The freeze counts once the kernel reports the process stopped,
    // and that must be before the deadline (with a margin): a coordinator
    // frozen after it could already have ended the lease itself.
    let pids = coordinator_pids(&pool);
    assert_eq!(pids.len(), 1, "one coordinator expected: {pids:?}");
    let pid = Pid::from_raw(pids[0]);
    let frozen = Frozen::stop(pid);
    wait_for("the coordinator to stop", Duration::from_secs(5), || {
        (process_state(pid) == Some('T')).then_some(())
    });
    let frozen_at = SystemTime::now();
    let to_spare = deadline.duration_since(frozen_at).unwrap_or_default();
    eprintln!("coordinator frozen {to_spare:?} before the lease deadline");
    assert!(
        to_spare >= MARGIN,
        "the coordinator was frozen only {to_spare:?} before the lease deadline \
         (at least {MARGIN:?} needed): it may have ended the lease itself, so this \
         run proves nothing about the agent"
    );
    // Not ended yet when frozen: the front still admits the lease.
    assert!(
        front_admits(&lease),
        "the lease was over before the coordinator was frozen"
    );

    let front = lease.front_addr();
    ok(
        run(lease.docker().args(["volume", "create", "left-behind"])),
        "volume create",
    );
    let host = lease.get("BERTH_HOST_ID").to_owned();
    let socket = pool.docker_socket(&host);
    assert!(socket.exists(), "no dockerd socket at {}", socket.display());

    wait_for(
        "the front to close at the deadline",
        Duration::from_secs(30),
        || {
            TcpStream::connect_timeout(&front, Duration::from_secs(1))
                .is_err()
                .then_some(())
        },
    );
    let closed_at = SystemTime::now();
    assert!(
        closed_at >= deadline,
        "the front closed {:?} before the deadline",
        deadline.duration_since(closed_at).unwrap_or_default()
    );
    wait_for(
        "the host to be wiped and destroyed",
        Duration::from_secs(60),
        || (!socket.exists() && !pool.host_exists(&host)).then_some(()),
    );
    // The coordinator was stopped the whole time, and no other coordinator
    // stood in for it (berth up restarts one it believes dead).
    assert_eq!(
        process_state(pid),
        Some('T'),
        "the coordinator ran again before the host was gone"
    );
    assert_eq!(coordinator_pids(&pool), [pid.as_raw()]);
    // The agent says why it ended the lease: its own deadline.
    let logs = pool.agent_logs();
    assert!(
        logs.lines().any(|l| l.contains(lease.lease_id())
            && l.contains("to=Wiping")
            && l.contains("lease deadline passed")),
        "no agent log line ends lease {} at its deadline:\n{logs}",
        lease.lease_id()
    );
    drop(frozen);
    // On PostgreSQL the thawed coordinator finds it has not renewed its lead
    // for longer than half the claim and stops (it may no longer lead);
    // `berth up` starts it again and it leads anew, loading the pool from
    // the database. Exiting took 30 s when measured: 20 s until its server
    // had closed its connections, then 10 s waiting for changes its fenced
    // store refuses (docs/guarantees.md, Known limits).
    if pool.postgres().is_some() {
        wait_for(
            "berth up to restart the deposed coordinator",
            Duration::from_secs(90),
            || {
                pool.coordinator_pid()
                    .filter(|p| *p != pid)
                    .filter(|_| pool.coordinator_answers())
            },
        );
        let log = pool.coordinator_log();
        assert!(log.contains("lost the lead"), "{log}");
    }

    // Once the coordinator runs again it agrees that the lease is over:
    // expired, or (if it saw the host go first) host-lost, which Get
    // reports as FAILED_PRECONDITION.
    let outcome = wait_for(
        "the coordinator to see the lease end",
        Duration::from_secs(30),
        || match pool.try_lease(lease.lease_id()) {
            Ok(l) if l.state == pb::LeaseState::Active as i32 => None,
            other => Some(other),
        },
    );
    let end = match outcome {
        Ok(l) => {
            assert_eq!(l.state, pb::LeaseState::Expired as i32, "{l:?}");
            "expired"
        }
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s}");
            assert!(s.message().contains("host-lost"), "{s}");
            "host-lost"
        }
    };
    // On the shared store the end is committed too (a moment after the
    // coordinator knows it).
    if pool.postgres().is_some() {
        std::thread::sleep(Duration::from_secs(20));
        let log = pool.coordinator_log();
        let tail: Vec<&str> = log.lines().filter(|l| !l.contains("will retry")).collect();
        eprintln!(
            "DEBUG pid {pid} now {:?} answers {}\n{}",
            pool.coordinator_pid(),
            pool.coordinator_answers(),
            tail.join("\n")
        );
        eprintln!(
            "SS\n{}",
            stdout(&run(std::process::Command::new("ss").args(["-tanp"])))
                .lines()
                .filter(|l| l.contains(&format!("pid={pid},")))
                .collect::<Vec<_>>()
                .join("\n")
        );
        eprintln!(
            "THREADS\n{}",
            stdout(&run(std::process::Command::new("sh").args([
                "-c",
                &format!(
                    "for t in /proc/{pid}/task/*; do echo $(cat $t/comm) $(cat $t/wchan); done"
                )
            ])))
        );
        wait_for(
            "the end of the lease in the database",
            Duration::from_secs(10),
            || pool.stored_state(lease.lease_id()).filter(|s| s == end),
        );
    }
}

/// Whether the lease's own certificate still opens its host's Docker API.
fn front_admits(lease: &LeaseEnv) -> bool {
    run(lease
        .docker()
        .args(["version", "--format", "{{.Server.Version}}"]))
    .status
    .success()
}

fn recycled_host(store: Store) {
    if !preflight() {
        return;
    }
    let pool = Pool::start_on(store, "bte4-", 1, &["--recycle"]);
    let a = pool.acquire("r-1", "30m", "1m");
    let host = a.get("BERTH_HOST_ID").to_owned();
    let ctx = pool.state_dir.join("ctx");
    busybox_context(&ctx, "recycled\n");
    ok(
        run(a.docker().args(["build", "-q", "-t", "app"]).arg(&ctx)),
        "build",
    );
    ok(run(a.docker().args(["run", "-d", "app"])), "run");
    ok(run(a.docker().args(["volume", "create", "v1"])), "volume");
    ok(run(a.docker().args(["network", "create", "n1"])), "network");
    ok(pool.berth(&["release", "--lease", a.lease_id()]), "release");
    if let Some(state) = pool.stored_state(a.lease_id()) {
        assert_eq!(state, "released");
    }

    let w = wait_for("the wipe report", Duration::from_secs(60), || {
        pool.lease(a.lease_id()).wipe
    });
    assert!(w.verified, "{w:?}");

    // The same host comes back Ready, and a direct look at its dockerd
    // socket (behind the front) agrees with the report.
    let mut pool = pool;
    let ready = pool.wait_ready_hosts(1, Duration::from_secs(60));
    assert_eq!(ready[0].host_id, host);
    let sock = format!("unix://{}", pool.docker_socket(&host).display());
    for what in [
        &["ps", "-aq"][..],
        &["images", "-aq"],
        &["volume", "ls", "-q"],
        &["network", "ls", "-q", "--filter", "type=custom"],
    ] {
        let out = stdout(&ok(
            run(docker_cli(&sock).args(what)),
            "docker on the socket",
        ));
        assert!(out.trim().is_empty(), "{what:?} after wipe: {out}");
    }

    let b = pool.acquire("r-2", "30m", "1m");
    assert_eq!(b.get("BERTH_HOST_ID"), host);
    if let Some(state) = pool.stored_state(b.lease_id()) {
        assert!(berth_testkit::stored_state_holds_host(&state), "{state}");
    }
    let out = stdout(&ok(run(b.docker().args(["ps", "-aq"])), "ps"));
    assert!(out.trim().is_empty());
    ok(
        pool.berth(&["release", "--lease", b.lease_id()]),
        "release b",
    );
}
