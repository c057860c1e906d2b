//! Real Docker clients, unchanged, against a lease on real dockerds:
//!
//! - BuildKit: Debian's 20.10 CLI (`DOCKER_BUILDKIT=1 /usr/bin/docker
//!   build`, BuildKit built in, its session over the hijacked connection
//!   through the mutual-TLS front): a multi-stage build with `COPY --from`,
//!   a cache mount that persists between builds and a `RUN` step fetching
//!   from beyond the host; the wipe then counts and removes that build
//!   cache;
//! - the Python Docker SDK (`docker.from_env()`): build, run, logs, exec,
//!   put_archive (`tests/python/docker_sdk_probe.py`);
//! - Testcontainers for Python with Ryuk on: a container with an exposed
//!   port reached through `get_container_host_ip()`, and Ryuk (a stand-in
//!   image speaking Ryuk's protocol with the static docker CLI on the
//!   host's own `/var/run/docker.sock`, since Ryuk's image cannot be pulled
//!   here) removing the session's container once the Python process is gone
//!   (`tests/python/testcontainers_probe.py`);
//! - docker-compose 1.29 (Debian's) with build, ports, depends_on and a
//!   named volume.
//!
//! The Python clients and docker-compose are python-requests based: they
//! run with the lease's environment and without REQUESTS_CA_BUNDLE and
//! CURL_CA_BUNDLE (psf/requests#3829).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_testkit::*;
use berth_tests::stock::{HttpServer, docker_cli_context, host_gateway, lease_client_env, token};

/// Debian's docker CLI (20.10), which has BuildKit built in.
const DEBIAN_DOCKER: &str = berth_testkit::DEBIAN_DOCKER_CLI;

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

fn released_wipe(pool: &Pool, lease: &LeaseEnv) -> pb::WipeReport {
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    let l = wait_for("the wipe report", Duration::from_secs(90), || {
        let l = pool.lease(lease.lease_id());
        l.wipe.is_some().then_some(l)
    });
    l.wipe.unwrap()
}

const BUILDKIT_DOCKERFILE: &str = r#"FROM scratch AS tools
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]

FROM tools AS build
ARG UPSTREAM
ARG NONCE
RUN --mount=type=cache,target=/cache,id=berth-counter \
    n=$(cat /cache/count 2>/dev/null || echo 0); n=$((n + 1)); echo $n > /cache/count; \
    echo "build $n $NONCE" > /out.txt; \
    wget -q -O /fetched.txt "$UPSTREAM/buildkit-step"

FROM scratch
COPY --from=tools /bin/busybox /bin/busybox
COPY --from=build /out.txt /fetched.txt /
CMD ["/bin/busybox", "cat", "/out.txt", "/fetched.txt"]
"#;

#[test]
fn buildkit_multi_stage_cache_mount_and_the_wipe_removes_its_cache() {
    if !preflight() {
        return;
    }
    let version =
        run(Command::new(DEBIAN_DOCKER).args(["version", "--format", "{{.Client.Version}}"]));
    assert!(
        stdout(&version).starts_with("20.10"),
        "this test needs Debian's docker CLI 20.10 at {DEBIAN_DOCKER} (package docker.io; run scripts/test.sh): {}{}",
        stdout(&version),
        stderr(&version)
    );
    let pool = Pool::start("bcl1-", 1, &[]);
    let lease = pool.acquire("ci-buildkit", "30m", "1m");
    let gateway = host_gateway(lease.get("BERTH_HOST_ID"));
    let body = token("buildkit-upstream");
    let upstream = HttpServer::start(None, SocketAddr::new(gateway, 0), &body);

    let ctx = pool.state_dir.join("ctx-buildkit");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(busybox(), ctx.join("busybox")).unwrap();
    std::fs::write(ctx.join("Dockerfile"), BUILDKIT_DOCKERFILE).unwrap();
    let build = |nonce: &str| {
        let o = ok(
            run(lease
                .docker_at(std::path::Path::new(DEBIAN_DOCKER))
                .env("DOCKER_BUILDKIT", "1")
                .args(["build", "--progress=plain", "-t", "bk", "--build-arg"])
                .arg(format!("UPSTREAM={}", upstream.url()))
                .arg("--build-arg")
                .arg(format!("NONCE={nonce}"))
                .arg(&ctx)),
            "DOCKER_BUILDKIT=1 docker build",
        );
        let out = format!("{}{}", stdout(&o), stderr(&o));
        // BuildKit's plain progress, not the legacy builder's "Step 1/N".
        assert!(
            out.contains("[internal] load build definition from Dockerfile"),
            "not a BuildKit build:\n{out}"
        );
        assert!(!out.contains("Step 1/"), "the legacy builder ran:\n{out}");
        stdout(&ok(
            run(lease.docker().args(["run", "--rm", "bk"])),
            "docker run bk",
        ))
    };
    let first = build("one");
    assert_eq!(first, format!("build 1 one\n{body}"));
    // The cache mount outlives the build that wrote it.
    let second = build("two");
    assert_eq!(second, format!("build 2 two\n{body}"));
    let hits: Vec<String> = upstream.hits().into_iter().map(|h| h.path).collect();
    assert_eq!(hits, ["/buildkit-step", "/buildkit-step"]);

    let w = released_wipe(&pool, &lease);
    assert!(w.verified, "{w:?}");
    assert!(
        w.build_cache_reclaimed_bytes > 0,
        "the wipe reclaimed no build cache: {w:?}"
    );
    assert_eq!((w.build_cache_left, w.images_left), (0, 0), "{w:?}");
    assert!(w.images_removed >= 1, "{w:?}");
    eprintln!(
        "BuildKit cache reclaimed by the wipe: {} bytes",
        w.build_cache_reclaimed_bytes
    );
}

/// The Ryuk stand-in's entry point: announces itself like Ryuk (the
/// client waits for ".* Started!") and serves sessions on 8080.
const RYUK_ENTRY: &str = r#"#!/bin/sh
# A stand-in for testcontainers/ryuk, which cannot be pulled here: one
# session per connection (busybox nc runs /ryuk-session for each).
echo "berth ryuk stand-in: Started!"
exec nc -ll -p 8080 -e /ryuk-session
"#;

/// One Ryuk session: `label=KEY=VALUE` lines are filters (each answered
/// with ACK); when the connection closes, every container, network and
/// volume matching them is removed through the host's own socket.
const RYUK_SESSION: &str = r#"#!/bin/sh
exec 2>/proc/1/fd/1
filters=""
while IFS= read -r line; do
  line=$(printf '%s' "$line" | tr -d '\r')
  case "$line" in
    label=*) filters="$filters --filter $line"; echo "ryuk: filter $line" >&2; echo ACK ;;
    "") ;;
    *) echo "ryuk: ignored $line" >&2 ;;
  esac
done
# Without filters, `docker ps -a` would match everything.
[ -n "$filters" ] || exit 0
for id in $(docker ps -aq --no-trunc $filters); do
  docker rm -f -v "$id" >/dev/null && echo "ryuk: removed container $id" >&2
done
for id in $(docker network ls -q $filters); do
  docker network rm "$id" >/dev/null && echo "ryuk: removed network $id" >&2
done
for v in $(docker volume ls -q $filters); do
  docker volume rm -f "$v" >/dev/null && echo "ryuk: removed volume $v" >&2
done
"#;

const RYUK_IMAGE: &str = "berth-test/ryuk-stand-in:1";

fn python_ok(module: &str) {
    let o = run(Command::new("python3").args(["-c", &format!("import {module}")]));
    assert!(
        o.status.success(),
        "this test needs Python's {module} (PyPI); run scripts/test.sh, which installs it\n{}",
        stderr(&o)
    );
}

#[test]
fn python_docker_sdk_and_testcontainers_with_ryuk() {
    if !preflight() {
        return;
    }
    python_ok("docker");
    python_ok("testcontainers.core.container");
    let pool = Pool::start("bcl2-", 1, &[]);
    let lease = pool.acquire("ci-python", "30m", "1m");

    // The Python Docker SDK: build, run, logs, exec, put_archive.
    let ctx = pool.state_dir.join("ctx-sdk");
    busybox_context(&ctx, "served to the SDK\n");
    let o = ok(
        run(lease_client_env(
            Command::new("python3")
                .arg(python_dir().join("docker_sdk_probe.py"))
                .arg(&ctx),
            &lease,
        )),
        "the Python Docker SDK probe",
    );
    let out = stdout(&o);
    for line in [
        "run hello from run",
        "logs started",
        "exec served to the SDK",
        "put_archive put through the SDK",
        "ok",
    ] {
        assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
    }

    // Testcontainers, with Ryuk on: the app image and the Ryuk stand-in.
    let app = pool.state_dir.join("ctx-app");
    busybox_context(&app, "served to testcontainers\n");
    ok(
        run(lease
            .docker()
            .args(["build", "-q", "-t", "tc-app:1"])
            .arg(&app)),
        "docker build tc-app",
    );
    let ryuk = pool.state_dir.join("ctx-ryuk");
    docker_cli_context(
        &ryuk,
        &[("ryuk-entry", RYUK_ENTRY), ("ryuk-session", RYUK_SESSION)],
        "[\"/ryuk-entry\"]",
    );
    ok(
        run(lease
            .docker()
            .args(["build", "-q", "-t", RYUK_IMAGE])
            .arg(&ryuk)),
        "docker build of the Ryuk stand-in",
    );
    // A container of another session, which Ryuk must leave alone.
    ok(
        run(lease.docker().args([
            "run",
            "-d",
            "--name",
            "other-session",
            "--label",
            "org.testcontainers.session-id=someone-else",
            "tc-app:1",
        ])),
        "a container of another session",
    );

    let o = ok(
        run(lease_client_env(
            Command::new("python3")
                .arg(python_dir().join("testcontainers_probe.py"))
                .arg("tc-app:1")
                // testcontainers-python 4 reads RYUK_CONTAINER_IMAGE; the
                // TESTCONTAINERS_ name is the one other languages (and the
                // properties file) use.
                .env("RYUK_CONTAINER_IMAGE", RYUK_IMAGE)
                .env("TESTCONTAINERS_RYUK_CONTAINER_IMAGE", RYUK_IMAGE)
                .env_remove("TESTCONTAINERS_RYUK_DISABLED")
                .env("HOME", pool.state_dir.join("home")),
            &lease,
        )),
        "the Testcontainers probe",
    );
    let report: serde_json::Value = serde_json::from_str(
        stdout(&o)
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no output: {}", stderr(&o))),
    )
    .unwrap();
    assert_eq!(report["host"], lease.host_addr(), "{report}");
    assert_eq!(report["body"], "served to testcontainers\n", "{report}");
    let cid = report["container_id"].as_str().unwrap().to_owned();
    let session = report["session"].as_str().unwrap().to_owned();

    // The Python process is gone; Ryuk removes its session's container.
    let exists = |filter: &str| {
        let o = ok(
            run(lease
                .docker()
                .args(["ps", "-aq", "--no-trunc", "--filter", filter])),
            "docker ps",
        );
        !stdout(&o).trim().is_empty()
    };
    wait_for(
        "Ryuk to remove the session's container",
        Duration::from_secs(60),
        || (!exists(&format!("id={cid}"))).then_some(()),
    );
    assert!(
        exists("name=other-session"),
        "Ryuk removed another session's container"
    );
    let ryuk_logs = {
        let ids = stdout(&ok(
            run(lease
                .docker()
                .args(["ps", "-q", "--filter", "name=testcontainers-ryuk-"])),
            "finding Ryuk",
        ));
        let id = ids.lines().next().expect("the Ryuk container").to_owned();
        stdout(&ok(run(lease.docker().args(["logs", &id])), "Ryuk's logs"))
    };
    assert!(
        ryuk_logs.contains(&format!(
            "ryuk: filter label=org.testcontainers.session-id={session}"
        )) && ryuk_logs.contains(&format!("ryuk: removed container {}", &cid)),
        "Ryuk's logs:\n{ryuk_logs}"
    );

    let w = released_wipe(&pool, &lease);
    assert!(w.verified, "{w:?}");
}

#[test]
fn docker_compose_builds_publishes_orders_and_keeps_a_named_volume() {
    if !preflight() {
        return;
    }
    assert!(
        run(Command::new("docker-compose").arg("version"))
            .status
            .success(),
        "this test needs docker-compose (Debian's docker-compose); run scripts/test.sh, which installs it"
    );
    let pool = Pool::start("bcl3-", 1, &[]);
    let lease = pool.acquire("ci-compose", "30m", "1m");
    let stored = token("stored");

    let project = pool.state_dir.join("compose-project");
    let _ = std::fs::remove_dir_all(&project);
    busybox_context(&project.join("app"), "replaced at start\n");
    std::fs::write(
        project.join("docker-compose.yml"),
        format!(
            r#"version: "3.7"
services:
  db:
    build: ./app
    command: ["sh", "-c", "echo {stored} > /data/value && exec httpd -f -p 80 -h /data"]
    volumes:
      - data:/data
  web:
    build: ./app
    depends_on:
      - db
    ports:
      - "8092:80"
    command: ["sh", "-c", "until wget -q -O /www/index.html http://db/value; do sleep 0.5; done; exec httpd -f -p 80 -h /www"]
volumes:
  data: {{}}
"#
        ),
    )
    .unwrap();
    let compose = |args: &[&str]| {
        let mut c = Command::new("docker-compose");
        c.current_dir(&project).args(["-p", "berthnet"]).args(args);
        run(lease_client_env(&mut c, &lease))
    };
    ok(
        compose(&["up", "-d", "--build"]),
        "docker-compose up -d --build",
    );

    // web (started after db) fetched db's value over the project network,
    // and serves it on its published port at the host address.
    let page = wait_for(
        "the compose service at the host address",
        Duration::from_secs(60),
        || {
            http_get(format!("{}:8092", lease.host_addr()).parse().unwrap())
                .ok()
                .filter(|p| p.contains(&stored))
        },
    );
    assert!(page.contains(&stored), "{page}");
    let volumes = stdout(&ok(
        run(lease.docker().args([
            "volume",
            "ls",
            "-q",
            "--filter",
            "label=com.docker.compose.project=berthnet",
        ])),
        "docker volume ls",
    ));
    assert_eq!(volumes.trim(), "berthnet_data");
    let ps = stdout(&ok(compose(&["ps", "--services"]), "docker-compose ps"));
    let mut services: Vec<&str> = ps.lines().collect();
    services.sort();
    assert_eq!(services, ["db", "web"]);

    ok(compose(&["down", "-v"]), "docker-compose down -v");
    let volumes = stdout(&ok(
        run(lease.docker().args(["volume", "ls", "-q"])),
        "docker volume ls",
    ));
    assert!(!volumes.contains("berthnet_data"), "{volumes}");
    let w = released_wipe(&pool, &lease);
    assert!(w.verified, "{w:?}");
}
