//! Single-use churn: short builds back to back on a small pool. Every host
//! that served its build ends within seconds of its start, and `berth up`
//! must replace it at once: a single-use host that served one short build
//! is the normal case, not a crash loop. So no acquire waits for a backoff,
//! only (at worst) for a host to boot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use berth_testkit::*;

const HOSTS: u16 = 3;
const BUILDS: usize = 30;
/// How long each build holds its host.
const HOLD: Duration = Duration::from_secs(1);
/// Allowance over a host's boot time for an acquire's own work (the CLI's
/// start, its key pair, the TLS handshakes, the agent's acceptance) and a
/// busy machine. The smallest backoff that ever builds up under churn is
/// larger than this plus a boot; the log check below catches any backoff.
const MARGIN: Duration = Duration::from_secs(6);
/// `berth up`'s crash window (`berth_cli::up::CRASH_WINDOW`): hosts that
/// end sooner than this are the ones a crash-loop rule would hold back.
const CRASH_WINDOW: Duration = berth_cli::up::CRASH_WINDOW;

/// `berth up`'s lines about hosts that ended: (lived, the whole line).
fn ended_lines(log: &str) -> Vec<(Duration, String)> {
    log.lines()
        .filter(|l| l.contains(": host ended ("))
        .map(|l| {
            let lived = l
                .split(" after ")
                .nth(1)
                .and_then(|r| r.split_once("s,").or_else(|| r.split_once("s ")))
                .and_then(|(secs, _)| secs.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no lifetime in {l:?}"));
            (Duration::from_secs_f64(lived), l.to_owned())
        })
        .collect()
}

#[test]
fn short_builds_back_to_back_never_wait_for_a_backoff() {
    if !preflight() {
        return;
    }
    // The bound: a host's boot in this run. The pool's own start (berth up
    // to every host Ready, three boots at once and the coordinator) is an
    // upper bound on one replacement's boot.
    let started = Instant::now();
    let pool = Pool::start("btch-", HOSTS, &[]);
    let boot = started.elapsed();
    let bound = boot + MARGIN;

    let mut waits = Vec::with_capacity(BUILDS);
    for i in 0..BUILDS {
        let asked = Instant::now();
        let lease = pool.acquire(&format!("churn-{i}"), "5m", "2m");
        let waited = asked.elapsed();
        waits.push(waited);
        let held = Instant::now();
        ok(run(lease.docker().arg("version")), "docker version");
        std::thread::sleep(HOLD.saturating_sub(held.elapsed()));
        ok(
            pool.berth(&["release", "--lease", lease.lease_id()]),
            "release",
        );
    }

    let mut sorted = waits.clone();
    sorted.sort_unstable();
    eprintln!(
        "churn: {BUILDS} builds on {HOSTS} hosts; pool start {boot:?}; acquire wait median {:?}, max {:?}",
        sorted[BUILDS / 2],
        sorted[BUILDS - 1]
    );

    let log = pool.log();
    let ended = ended_lines(&log);
    // Not vacuous: hosts did end quickly after serving their lease, which
    // is what a crash-loop rule holds back.
    let quick = ended
        .iter()
        .filter(|(lived, l)| *lived < CRASH_WINDOW && l.contains(", 1 leases served;"))
        .count();
    assert!(
        quick >= BUILDS / 2,
        "expected most of {BUILDS} hosts to end within {CRASH_WINDOW:?} after serving their lease; {quick} did. log:\n{log}"
    );
    // No host that served its build is ever held back.
    let backoffs: Vec<&String> = ended
        .iter()
        .map(|(_, l)| l)
        .filter(|l| l.contains("backing off"))
        .collect();
    assert!(
        backoffs.is_empty(),
        "berth up backed off although hosts only ended their leases: {backoffs:#?}\nlog:\n{log}"
    );
    for (i, w) in waits.iter().enumerate() {
        assert!(
            *w <= bound,
            "acquire {i} waited {w:?}, more than a boot ({boot:?}) plus {MARGIN:?}; waits: {waits:?}\nlog:\n{log}"
        );
    }
    // Every build got its own host, and each slot's host served one lease.
    let leases = pool.all_leases();
    let mut hosts: Vec<&str> = leases
        .iter()
        .filter(|l| l.build_id.starts_with("churn-"))
        .map(|l| l.host_id.as_str())
        .collect();
    assert_eq!(hosts.len(), BUILDS);
    hosts.sort_unstable();
    hosts.dedup();
    assert_eq!(hosts.len(), BUILDS, "a host served two builds");
}

/// The other side of the rule: a host that cannot boot still makes its
/// slot back off (and keeps doing so), so a broken machine does not spin.
#[test]
fn a_host_that_cannot_boot_backs_off() {
    if !preflight() {
        return;
    }
    // A dockerd that exits at once: every host fails to boot.
    let prefix = "btcf-";
    let fake = dirs(&test_prefix(prefix)).0.join("dockerd-fails");
    let fake_arg = format!("--dockerd={}", fake.display());
    let pool = Pool::start_unready(prefix, 1, &["--agent-arg", &fake_arg], |state| {
        let fake = state.join("dockerd-fails");
        std::fs::write(&fake, "#!/bin/sh\necho 'cannot start' >&2\nexit 1\n").unwrap();
        let mut perms = std::fs::metadata(&fake).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&fake, perms).unwrap();
    });
    let log = wait_for("two failed boots", Duration::from_secs(60), || {
        let log = pool.log();
        (ended_lines(&log).len() >= 2).then_some(log)
    });
    let ended = ended_lines(&log);
    for (_, l) in &ended {
        assert!(
            l.contains("without serving a lease; backing off: starting a fresh host in "),
            "a failed boot restarted without a backoff: {l}\nlog:\n{log}"
        );
    }
    assert!(ended[0].1.ends_with(" in 1s"), "{}", ended[0].1);
    assert!(ended[1].1.ends_with(" in 2s"), "{}", ended[1].1);
    // It was the broken dockerd that failed the boots.
    let agent_log = std::fs::read_to_string(pool.state_dir.join("logs/agent-0.log")).unwrap();
    assert!(
        agent_log.contains("dockerd exited during boot"),
        "{agent_log}"
    );
}
