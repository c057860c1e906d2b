//! Fair shares on a real pool: tenants listed in the tenants file with
//! limits, builds through the stock `berth acquire`. A tenant that queued a
//! burst does not make another tenant's later builds wait for the whole
//! burst (tenants take turns), and a tenant beyond its `max-queued` is
//! refused with the limit named while the other tenant still queues.
//! A waiting build sees its place in its own tenant's queue go down, in
//! `berth acquire`'s progress line and in `berth get --build`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_testkit::*;

const A_BUILDS: usize = 4;
const B_BUILDS: usize = 2;

fn queued_of(pool: &Pool, tenant: &str) -> usize {
    pool.all_leases()
        .iter()
        .filter(|l| l.tenant == tenant && l.state == pb::LeaseState::Queued as i32)
        .count()
}

#[test]
fn a_later_tenant_is_served_in_turn_and_a_tenant_beyond_max_queued_is_refused() {
    if !preflight() {
        return;
    }
    let (pool, a_file, b_file) = two_tenants("btfa-", &format!(" max-queued={A_BUILDS}"));
    let as_tenant = |file: &PathBuf, args: &[&str]| pool.berth_as(file, args);

    // The one host is held, so every build below queues.
    let hold = pool.acquire("hold", "10m", "1m");

    // In the order the host went to them: (tenant, build).
    let served: Mutex<Vec<(String, String)>> = Mutex::new(vec![]);
    std::thread::scope(|s| {
        let build = |tenant: &'static str, file: &PathBuf, name: String| {
            let file = file.clone();
            let served = &served;
            let as_tenant = &as_tenant;
            s.spawn(move || {
                let o = ok(
                    as_tenant(
                        &file,
                        &["acquire", "--build", &name, "--ttl", "5m", "--wait", "5m"],
                    ),
                    "acquire",
                );
                let lease = LeaseEnv::parse(&stdout(&o));
                // Recorded before the release: the next host is not even
                // booting yet.
                served
                    .lock()
                    .unwrap()
                    .push((tenant.to_owned(), name.clone()));
                ok(run(lease.docker().arg("version")), "docker version");
                ok(
                    as_tenant(&file, &["release", "--lease", lease.lease_id()]),
                    "release",
                );
            });
        };
        // One at a time, so each tenant's order is known.
        for i in 0..A_BUILDS {
            build("team-a", &a_file, format!("a-{i}"));
            wait_for("team-a's build to queue", Duration::from_secs(30), || {
                (queued_of(&pool, "team-a") == i + 1).then_some(())
            });
        }

        // One more of team-a's is beyond its max-queued: refused at once,
        // RESOURCE_EXHAUSTED (exit 3), the limit named.
        let o = as_tenant(&a_file, &["acquire", "--build", "a-extra", "--wait", "5m"]);
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("tenant team-a may have at most 4 builds waiting")
                && stderr(&o).contains("max-queued"),
            "{}",
            stderr(&o)
        );

        // team-b, queued after all of them, is not held to team-a's limit.
        for i in 0..B_BUILDS {
            build("team-b", &b_file, format!("b-{i}"));
            wait_for("team-b's build to queue", Duration::from_secs(30), || {
                (queued_of(&pool, "team-b") == i + 1).then_some(())
            });
        }

        ok(
            pool.berth(&["release", "--lease", hold.lease_id()]),
            "release the held host",
        );
    });

    let served = served.into_inner().unwrap();
    assert_eq!(served.len(), A_BUILDS + B_BUILDS, "{served:?}");
    // Tenants took turns: team-b's builds went within the first
    // 2 * B_BUILDS hosts, not after team-a's whole queue.
    let b_in_first = served[..2 * B_BUILDS]
        .iter()
        .filter(|(t, _)| t == "team-b")
        .count();
    assert_eq!(b_in_first, B_BUILDS, "served in order: {served:?}");
    // Within each tenant, first come first served.
    for (tenant, n) in [("team-a", A_BUILDS), ("team-b", B_BUILDS)] {
        let order: Vec<&str> = served
            .iter()
            .filter(|(t, _)| t == tenant)
            .map(|(_, b)| b.as_str())
            .collect();
        assert_eq!(order.len(), n);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "{tenant} out of order: {served:?}");
    }
    // Now that nothing waits, team-a may queue again.
    let o = as_tenant(&a_file, &["acquire", "--build", "a-extra", "--wait", "1m"]);
    let lease = LeaseEnv::parse(&stdout(&ok(o, "team-a acquires again")));
    ok(
        as_tenant(&a_file, &["release", "--lease", lease.lease_id()]),
        "release",
    );
}

/// A `berth acquire` running in the background, printing its place in
/// the queue every 200 ms.
struct Waiting(Background);

impl Waiting {
    fn start(pool: &Pool, token_file: &PathBuf, build: &str) -> Self {
        let mut cmd = pool.berth_cmd();
        cmd.env("BERTH_TOKEN_FILE", token_file).args([
            "acquire",
            "--build",
            build,
            "--ttl",
            "5m",
            "--wait",
            "5m",
            "--progress-every",
            "200ms",
        ]);
        Self(Background::spawn(&format!("berth acquire {build}"), cmd))
    }

    fn stderr(&self) -> String {
        self.0.stderr()
    }

    /// Waits for a progress line naming `position`.
    fn wait_for_position(&self, position: &str) {
        self.0.wait_for_stderr(position, Duration::from_secs(30));
    }

    /// Waits for the acquire to end; its lease.
    fn lease(self) -> LeaseEnv {
        LeaseEnv::parse(&stdout(&ok(self.0.output(), "acquire")))
    }
}

#[test]
fn a_waiting_build_sees_its_place_in_its_tenants_queue_go_down() {
    if !preflight() {
        return;
    }
    let (pool, a_file, b_file) = two_tenants("btqp-", "");
    let get_build = |file: &PathBuf, build: &str| {
        stdout(&ok(
            pool.berth_as(file, &["get", "--build", build]),
            "berth get --build",
        ))
    };
    let release = |file: &PathBuf, lease: &LeaseEnv| {
        ok(
            pool.berth_as(file, &["release", "--lease", lease.lease_id()]),
            "release",
        );
    };

    // The one host is held, so every build below queues: team-a's a-1,
    // a-2, a-3, then team-b's b-1, each queued before the next asks.
    let hold = pool.acquire("hold", "10m", "1m");
    let queued = |tenant: &str, n: usize| {
        wait_for("the build to queue", Duration::from_secs(30), || {
            (queued_of(&pool, tenant) == n).then_some(())
        })
    };
    let a1 = Waiting::start(&pool, &a_file, "a-1");
    queued("team-a", 1);
    let a2 = Waiting::start(&pool, &a_file, "a-2");
    queued("team-a", 2);
    let a3 = Waiting::start(&pool, &a_file, "a-3");
    queued("team-a", 3);
    let b1 = Waiting::start(&pool, &b_file, "b-1");
    queued("team-b", 1);

    // Places count within the tenant: team-b's build does not count in
    // team-a's queue, and is first of its own.
    a3.wait_for_position("position 3 of 3 in tenant team-a's queue");
    assert!(get_build(&a_file, "a-3").contains("queue     position 3 of 3"));
    b1.wait_for_position("position 1 of 1 in tenant team-b's queue");
    // A tenant sees only its own builds.
    let o = pool.berth_as(&b_file, &["get", "--build", "a-3"]);
    assert!(
        !o.status.success() && stderr(&o).contains("no lease of build a-3"),
        "{}",
        stderr(&o)
    );

    // The held host is released: a-1 gets the next host; a-3 moves up.
    release(&pool.token_path(), &hold);
    let a1 = a1.lease();
    a3.wait_for_position("position 2 of 2 in tenant team-a's queue");
    assert!(get_build(&a_file, "a-3").contains("queue     position 2 of 2"));
    // team-b's turn: b-1 is served, a-3's place does not move.
    release(&a_file, &a1);
    let b1 = b1.lease();
    assert!(get_build(&a_file, "a-3").contains("queue     position 2 of 2"));
    // team-a's turn again: a-2, then a-3 is next.
    release(&b_file, &b1);
    let a2 = a2.lease();
    a3.wait_for_position("position 1 of 1 in tenant team-a's queue");
    assert!(get_build(&a_file, "a-3").contains("queue     position 1 of 1"));
    release(&a_file, &a2);
    let progress = a3.stderr();
    let a3 = a3.lease();
    // The places the progress lines showed, in order: only ever down.
    let mut places: Vec<u32> = progress
        .lines()
        .filter_map(|l| {
            l.split("; position ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    places.dedup();
    assert_eq!(places, [3, 2, 1], "{progress}");
    // Once it has a host, the lease shows no place.
    let shown = get_build(&a_file, "a-3");
    assert!(
        shown.contains("state     active") && !shown.contains("position"),
        "{shown}"
    );
    release(&a_file, &a3);
}

/// A pool of one host whose tenants file lists `team-a` (its line ending
/// in `a_limits`) and `team-b`, with the two tenants' token files.
fn two_tenants(base: &str, a_limits: &str) -> (Pool, PathBuf, PathBuf) {
    let (a_token, b_token) = (berth_tls::token::generate(), berth_tls::token::generate());
    let pool = Pool::start_with(base, 1, &[], |state| {
        let mut tenants = berth_tls::Tenants::line("team-a", &a_token, false);
        tenants = tenants.replace('\n', &format!("{a_limits}\n"));
        tenants.push_str(&berth_tls::Tenants::line("team-b", &b_token, false));
        std::fs::write(state.join("tenants"), tenants).unwrap();
    });
    let token_file = |name: &str, token: &str| -> PathBuf {
        let p = pool.state_dir.join(format!("{name}-token"));
        std::fs::write(&p, token).unwrap();
        p
    };
    let (a_file, b_file) = (token_file("a", &a_token), token_file("b", &b_token));
    (pool, a_file, b_file)
}
