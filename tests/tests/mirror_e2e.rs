//! The pool's pull-through mirror end to end: an "upstream" registry (CNCF
//! distribution, TLS with a CA of its own) in a network namespace the test
//! makes holds a multi-layer image built `FROM scratch`; `berth up` runs its
//! mirror of that upstream (`--mirror-upstream`, `--mirror-upstream-ca`);
//! the upstream is down when the pool starts, and the mirror answers once
//! it is up; a lease pulls the image by its Docker Hub style name (`berthtest/app`,
//! i.e. `docker.io/berthtest/app`), which its host's dockerd sends to the
//! mirror (`registry-mirrors`, trusted through the pool CA in the host's own
//! `certs.d`); the upstream is then stopped, and a lease on another, fresh
//! host still pulls the image, from the mirror's cache. The wipe still
//! leaves nothing, and nothing of the mirror's trust is put on the machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_testkit::*;
use berth_tests::registry::{Upstream, layered_context};

const IMAGE: &str = "berthtest/app:1";
const LAYERS: usize = 3;

#[test]
fn a_lease_pulls_through_the_mirror_and_a_fresh_host_still_pulls_once_the_upstream_is_gone() {
    if !preflight() {
        return;
    }
    berth_tests::registry::registry_bin();
    let mut upstream = Upstream::start(&test_prefix("mu-"));
    let ctx = upstream.helper_socket().parent().unwrap().join("ctx");
    layered_context(&ctx, LAYERS, 256);
    let pushed = upstream.push(&ctx, IMAGE);
    assert!(pushed.starts_with("sha256:"), "push printed no digest");
    upstream.stop_helper();
    upstream.stop_registry();

    let upstream_url = format!("https://{}", upstream.addr);
    let ca = upstream.ca_file.to_string_lossy().into_owned();
    let pool = Pool::start(
        "mir-",
        2,
        &[
            "--mirror-upstream",
            &upstream_url,
            "--mirror-upstream-ca",
            &ca,
        ],
    );
    let mirror = mirror_addr(&pool);
    // The upstream was down when the pool started: the mirror could not
    // start (distribution asks the upstream at start), the pool started
    // anyway, and the mirror is restarted until it answers.
    assert!(
        pool.log()
            .contains("hosts pull from the upstream until it answers"),
        "{}",
        pool.log()
    );
    upstream.start_registry();
    wait_for("the mirror to answer", Duration::from_secs(90), || {
        std::net::TcpStream::connect_timeout(&mirror, Duration::from_millis(200))
            .ok()
            .map(|_| ())
    });

    // The first lease: its dockerd knows the mirror.
    let a = pool.acquire("mir-a", "10m", "1m");
    let info = stdout(&ok(
        run(a
            .docker()
            .args(["info", "--format", "{{json .RegistryConfig.Mirrors}}"])),
        "docker info",
    ));
    assert!(
        info.contains(&format!("https://{mirror}")),
        "the host's dockerd does not name the mirror: {info}"
    );
    // Pulled by its Docker Hub name: docker.io/berthtest/app.
    let pull = ok(
        run(a.docker().args(["pull", IMAGE])),
        "docker pull on lease a",
    );
    let pulled = stdout(&pull);
    assert!(pulled.contains(&pushed), "pulled {pulled}, pushed {pushed}");
    let out = stdout(&ok(
        run(a.docker().args(["run", "--rm", IMAGE])),
        "docker run of the pulled image",
    ));
    assert_eq!(out, "mirrored\n");
    // It came through the mirror: the mirror's cache holds the repository,
    // the mirror served the host, and the upstream served the machine (the
    // mirror's side of the upstream's link), never the host.
    let repo = pool
        .state_dir
        .join("registries/mirror/data/docker/registry/v2/repositories/berthtest/app");
    assert!(
        repo.is_dir(),
        "{} missing: not pulled through the mirror",
        repo.display()
    );
    let mirror_log = std::fs::read_to_string(pool.state_dir.join("logs/mirror.log")).unwrap();
    assert!(
        served(&mirror_log, a.host_addr(), "/v2/berthtest/app/manifests/"),
        "the mirror served no manifest to host a ({}):\n{mirror_log}",
        a.host_addr()
    );
    let upstream_log = upstream.registry_log();
    let machine = upstream.block.gateway.to_string();
    assert!(
        served(&upstream_log, &machine, "/v2/berthtest/app/manifests/"),
        "the upstream served no manifest to the mirror (from {machine}):\n{upstream_log}"
    );
    assert!(
        !upstream_log.contains(&format!("remoteaddr=\"{}:", a.host_addr())),
        "the host reached the upstream directly:\n{upstream_log}"
    );
    // The pool CA is trusted by the host's dockerd alone: nothing of it on
    // the machine's /etc/docker.
    assert!(
        !Path::new("/etc/docker/certs.d")
            .join(mirror.to_string())
            .exists(),
        "the mirror's CA was put into the machine's /etc/docker"
    );
    let host_a = a.get("BERTH_HOST_ID").to_owned();
    ok(
        pool.berth(&["release", "--lease", a.lease_id()]),
        "release a",
    );
    let wiped = wait_for("lease a's wipe report", Duration::from_secs(60), || {
        pool.lease(a.lease_id()).wipe
    });
    assert!(wiped.verified, "{wiped:?}");
    assert_eq!(wiped.images_left, 0, "{wiped:?}");
    assert!(wiped.images_removed >= 1, "{wiped:?}");

    // The upstream goes away; a lease on another, fresh host still pulls.
    upstream.stop_registry();
    let b = pool.acquire("mir-b", "10m", "1m");
    assert_ne!(b.get("BERTH_HOST_ID"), host_a);
    let images = stdout(&ok(run(b.docker().args(["images", "-q"])), "docker images"));
    assert!(
        images.trim().is_empty(),
        "a fresh host holds images: {images}"
    );
    let pull = ok(
        run(b.docker().args(["pull", IMAGE])),
        "docker pull on lease b",
    );
    assert!(stdout(&pull).contains(&pushed), "{}", stdout(&pull));
    let out = stdout(&ok(
        run(b.docker().args(["run", "--rm", IMAGE])),
        "docker run on lease b",
    ));
    assert_eq!(out, "mirrored\n");
    // The mirror's own counters (distribution's expvar on its debug
    // address, on the machine's loopback): lease b's blobs were hits.
    let debug =
        std::fs::read_to_string(pool.state_dir.join("registries/mirror.debug.addr")).unwrap();
    let vars = stdout(&ok(
        run(std::process::Command::new("curl")
            .args(["-s", "--noproxy", "*"])
            .arg(format!("http://{}/debug/vars", debug.trim()))),
        "the mirror's /debug/vars",
    ));
    let vars: serde_json::Value = serde_json::from_str(&vars).unwrap();
    let blobs = &vars["registry"]["proxy"]["blobs"];
    assert!(
        blobs["Hits"].as_u64().unwrap() >= LAYERS as u64,
        "the mirror counted no hits: {blobs}"
    );
    assert!(blobs["BytesPushed"].as_u64().unwrap() > 0, "{blobs}");
    let b_lease = b.lease_id().to_owned();
    ok(pool.berth(&["release", "--lease", &b_lease]), "release b");
    let wiped = wait_for("lease b's wipe report", Duration::from_secs(60), || {
        pool.lease(&b_lease).wipe
    });
    assert!(wiped.verified, "{wiped:?}");
    assert_eq!(pool.lease(&b_lease).state, pb::LeaseState::Released as i32);

    // Stopping the pool stops the mirror and removes its address.
    let link_before = mirror_link(&pool);
    assert!(
        link_before.is_some(),
        "no link carries the mirror's address"
    );
    let mut pool = pool;
    let status = pool.stop().expect("berth up did not stop");
    assert!(status.success(), "berth up: {status}\n{}", pool.log());
    assert!(
        !link_exists(&link_before.unwrap()),
        "the mirror's link is left after berth up stopped"
    );
    // (A connection attempt proves nothing: the machine's default route
    // may answer any address. What listens here is the question.)
    let listening = stdout(&ok(
        run(std::process::Command::new("ss").args(["-Hltn"])),
        "ss -Hltn",
    ));
    assert!(
        !listening.contains(&mirror.to_string()),
        "the mirror still listens after berth up stopped:\n{listening}"
    );
}

#[test]
fn no_mirror_leaves_hosts_without_one() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("mirn-", 1, &["--no-mirror"]);
    assert!(!pool.log().contains("registry mirror"), "{}", pool.log());
    let a = pool.acquire("mirn-a", "10m", "1m");
    let info = stdout(&ok(
        run(a
            .docker()
            .args(["info", "--format", "{{json .RegistryConfig.Mirrors}}"])),
        "docker info",
    ));
    assert_eq!(info.trim(), "[]", "{info}");
    assert!(!pool.state_dir.join("registries/mirror").exists());
    ok(pool.berth(&["release", "--lease", a.lease_id()]), "release");
}

/// Whether a distribution log line shows a request from `client` for a
/// URI starting with `uri`.
fn served(log: &str, client: &str, uri: &str) -> bool {
    log.lines().any(|l| {
        l.contains(&format!("http.request.remoteaddr=\"{client}:"))
            && (l.contains(&format!("http.request.uri=\"{uri}"))
                || l.contains(&format!("http.request.uri={uri}")))
    })
}

/// The mirror's address, from `berth up`'s log line.
fn mirror_addr(pool: &Pool) -> std::net::SocketAddr {
    let log = pool.log();
    log.lines()
        .find_map(|l| l.split("registry mirror of ").nth(1))
        .and_then(|rest| rest.split(" at https://").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no mirror address in berth up's log:\n{log}"))
}

/// The machine's link that carries the mirror's address, if any.
fn mirror_link(pool: &Pool) -> Option<String> {
    let ip = mirror_addr(pool).ip().to_string();
    let o = run(std::process::Command::new("ip").args(["-o", "-4", "addr", "show"]));
    stdout(&o)
        .lines()
        .find(|l| l.contains(&format!(" {ip}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_owned)
}
