//! `berth up` as an operator uses it: Ctrl-C (SIGTERM) stops the whole pool
//! and leaves no dockerd, network namespace, mount or cgroup behind, even
//! with a lease active and containers running. It runs on the embedded
//! store and, as `postgres::NAME`, with the pool's state on PostgreSQL
//! ([`berth_testkit::on_each_store`]), where the stopped coordinator has
//! also given its lead up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use berth_testkit::*;

fn cgroups_with(prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        if let Ok(entries) = std::fs::read_dir(controller.path()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().contains(prefix) {
                    found.push(e.path().display().to_string());
                }
            }
        }
    }
    found
}

on_each_store! {
    ctrl_c_stops_the_pool_and_leaves_nothing_behind => ctrl_c,
}

fn ctrl_c(store: Store) {
    if !preflight() {
        return;
    }
    let mut pool = Pool::start_on(store, "bte5-", 2, &[]);
    let prefix = &pool.prefix.clone();
    let lease = pool.acquire("up-1", "30m", "1m");
    let ctx = pool.state_dir.join("ctx");
    busybox_context(&ctx, "x\n");
    ok(
        run(lease.docker().args(["build", "-q", "-t", "app"]).arg(&ctx)),
        "build",
    );
    ok(
        run(lease.docker().args(["run", "-d", "-p", "8080:80", "app"])),
        "run",
    );
    assert_eq!(netns_with_prefix(prefix).len(), 2);
    assert!(
        !cgroups_with(prefix).is_empty(),
        "containers run under the host's cgroup parent"
    );

    let status = pool.stop().expect("berth up did not stop within a minute");
    assert!(
        status.success(),
        "berth up exited with {status}; log:\n{}",
        pool.log()
    );

    // Checked before the guard's own sweep: berth up cleaned up by itself.
    assert_eq!(netns_with_prefix(prefix), Vec::<String>::new());
    let state = pool.state_dir.to_string_lossy().into_owned();
    let run_dir = pool.run_dir.to_string_lossy().into_owned();
    assert_eq!(processes_mentioning(&state), Vec::<String>::new());
    assert_eq!(processes_mentioning(&run_dir), Vec::<String>::new());
    assert_eq!(mounts_under(Path::new(&state)), Vec::<String>::new());
    assert_eq!(mounts_under(Path::new(&run_dir)), Vec::<String>::new());
    assert_eq!(cgroups_with(prefix), Vec::<String>::new());
    // On the shared store the lead is free at once for the next coordinator.
    if let Some(pg) = pool.postgres() {
        assert_eq!(
            pg.sql(
                berth_testkit::postgres::POOL_DB,
                "SELECT expires_at <= now() FROM berth_leader"
            ),
            "t",
            "the stopped coordinator kept the lead"
        );
    }
}
