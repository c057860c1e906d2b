//! The README's CI examples are tested: the GitHub Actions and GitLab CI
//! jobs run `docs/ci/job.sh acquire`, `test` and `release`, and so does
//! this test, with the stock `berth`, `docker` and `curl` on PATH, against a
//! `berth up` pool. The README must show those exact steps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use berth_proto::v1 as pb;
use berth_testkit::*;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn the_readme_ci_jobs_run_against_a_pool() {
    if !preflight() {
        return;
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for step in [
        "docs/ci/job.sh acquire",
        "docs/ci/job.sh test",
        "docs/ci/job.sh release",
    ] {
        assert!(
            readme.matches(step).count() >= 2,
            "README.md must show `{step}` in both CI examples"
        );
    }
    assert!(readme.contains("if: always()") && readme.contains("after_script:"));

    let pool = Pool::start("bci-", 1, &[]);
    let work = pool.state_dir.join("ci-work");
    let app = work.join("app");
    busybox_context(&app, "hello from the ci example\n");
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let job = |step: &str| {
        let mut c = Command::new("sh");
        c.arg(repo().join("docs/ci/job.sh"))
            .arg(step)
            .current_dir(&work)
            .env("PATH", &path)
            .env("BERTH_BUILD_ID", "ci-example-1")
            .env("APP_DIR", &app)
            .env("BERTH_COORDINATOR", pool.addr.to_string())
            .env("BERTH_CA", pool.ca_pem_path())
            .env("BERTH_TOKEN_FILE", pool.token_path())
            .env("HOME", pool.state_dir.join("home"))
            .env("DOCKER_BUILDKIT", "0")
            .env("DOCKER_CONFIG", pool.state_dir.join("docker-config"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CERT_PATH")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("BERTH_LEASE_ID");
        run(&mut c)
    };
    let o = ok(job("acquire"), "job.sh acquire");
    let env = std::fs::read_to_string(work.join("berth.env")).unwrap();
    let lease = LeaseEnv::parse(&env);
    assert!(stderr(&o).contains(&format!("lease {}", lease.lease_id())));
    let o = ok(job("test"), "job.sh test");
    assert!(
        stdout(&o).contains("hello from the ci example"),
        "{}",
        stdout(&o)
    );
    ok(job("release"), "job.sh release");
    assert!(!work.join("berth.env").exists());
    let l = pool
        .all_leases()
        .into_iter()
        .find(|l| l.lease_id == lease.lease_id())
        .unwrap();
    assert_eq!(l.state, pb::LeaseState::Released as i32, "{l:?}");
    // Releasing again (an always() step after a failed acquire) is harmless.
    ok(job("release"), "job.sh release without a lease");
}
