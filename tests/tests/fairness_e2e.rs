//! Fair shares on a real pool: tenants listed in the tenants file with
//! limits, builds through the stock `berth acquire`. A tenant that queued a
//! burst does not make another tenant's later builds wait for the whole
//! burst (tenants take turns), and a tenant beyond its `max-queued` is
//! refused with the limit named while the other tenant still queues.

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
    let (a_token, b_token) = (berth_tls::token::generate(), berth_tls::token::generate());
    let pool = Pool::start_with("btfa-", 1, &[], |state| {
        let mut tenants = berth_tls::Tenants::line("team-a", &a_token, false);
        tenants = tenants.replace('\n', &format!(" max-queued={A_BUILDS}\n"));
        tenants.push_str(&berth_tls::Tenants::line("team-b", &b_token, false));
        std::fs::write(state.join("tenants"), tenants).unwrap();
    });
    let token_file = |name: &str, token: &str| -> PathBuf {
        let p = pool.state_dir.join(format!("{name}-token"));
        std::fs::write(&p, token).unwrap();
        p
    };
    let (a_file, b_file) = (token_file("a", &a_token), token_file("b", &b_token));
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
