//! The `berth` CLI as CI authors use it, against a `berth up` pool:
//! `berth status`; `acquire --format docker-context` (then `docker
//! --context NAME ps`), `--format json`, progress on stderr while waiting
//! with stdout left clean; `release` removes the context; exit codes for
//! the common mistakes (wrong token, no coordinator).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use berth_testkit::*;

#[test]
fn status_formats_progress_and_exit_codes() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bcl-", 1, &[]);
    let docker_config = pool.state_dir.join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let berth = |args: &[&str]| {
        let mut c = pool.berth_cmd();
        c.env("DOCKER_CONFIG", &docker_config).args(args);
        c
    };

    let o = ok(run(&mut berth(&["status"])), "berth status");
    let out = stdout(&o);
    assert!(out.contains(": reachable"), "{out}");
    assert!(
        out.contains("hosts        1 (1 connected, 1 ready for a lease, 0 draining)"),
        "{out}"
    );
    assert!(out.contains("queue        0 builds waiting"), "{out}");

    // docker-context: the stock CLI uses the context by name.
    let o = ok(
        run(&mut berth(&[
            "acquire",
            "--build",
            "cli-1",
            "--format",
            "docker-context",
        ])),
        "acquire --format docker-context",
    );
    let name = stdout(&o).trim().to_owned();
    assert!(
        name.starts_with("berth-") && !name.contains('\n'),
        "{name:?}"
    );
    let lease_id = name.trim_start_matches("berth-").to_owned();
    let ps = run(Command::new("docker")
        .env("DOCKER_CONFIG", &docker_config)
        .env_remove("DOCKER_HOST")
        .env_remove("DOCKER_CONTEXT")
        .args(["--context", &name, "ps"]));
    let ps = ok(ps, "docker --context NAME ps");
    assert!(stdout(&ps).starts_with("CONTAINER ID"), "{}", stdout(&ps));

    // A second build waits (one host, leased): progress on stderr only.
    let second = std::thread::spawn({
        let mut c = berth(&[
            "acquire", "--build", "cli-2", "--format", "json", "--wait", "2m",
        ]);
        move || run(&mut c)
    });
    std::thread::sleep(Duration::from_secs(7));
    ok(
        run(&mut berth(&["release", "--lease", &lease_id])),
        "release",
    );
    let inspect = run(Command::new("docker")
        .env("DOCKER_CONFIG", &docker_config)
        .args(["context", "inspect", &name]));
    assert!(
        !inspect.status.success(),
        "release left the docker context behind"
    );
    let o = ok(second.join().unwrap(), "the waiting acquire");
    let err = stderr(&o);
    assert!(
        err.contains(
            "berth: waiting for a host for build cli-2: 5s; position 1 of 1 in tenant local's queue (queue: 1 builds waiting; 0 hosts ready)"
        ),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&o))
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", stdout(&o)));
    assert!(
        v["docker_host"].as_str().unwrap().starts_with("tcp://"),
        "{v}"
    );
    ok(
        run(&mut berth(&[
            "release",
            "--lease",
            v["lease_id"].as_str().unwrap(),
        ])),
        "release",
    );

    // Common mistakes get their exit codes.
    let mut c = berth(&["status"]);
    c.env_remove("BERTH_TOKEN_FILE")
        .env("BERTH_TOKEN", "berth_wrong");
    let o = run(&mut c);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let mut c = Command::new(bin("berth"));
    c.args(["--coordinator", "127.0.0.1:1", "status"])
        .env("BERTH_CA", pool.ca_pem_path())
        .env("BERTH_TOKEN_FILE", pool.token_path());
    let o = run(&mut c);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot reach the coordinator"),
        "{}",
        stderr(&o)
    );
}
