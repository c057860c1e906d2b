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
use berth_tests::registry::{Upstream, layered_context, served};

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

#[test]
fn status_and_metrics_show_whether_the_registries_answer_and_what_they_served() {
    if !preflight() {
        return;
    }
    berth_tests::registry::registry_bin();
    let mut upstream = Upstream::start(&test_prefix("ms-"));
    let ctx = upstream.helper_socket().parent().unwrap().join("ctx");
    layered_context(&ctx, LAYERS, 256);
    upstream.push(&ctx, IMAGE);
    upstream.stop_helper();
    let upstream_url = format!("https://{}", upstream.addr);
    let ca = upstream.ca_file.to_string_lossy().into_owned();
    let pool = Pool::start(
        "mst-",
        1,
        &[
            "--mirror-upstream",
            &upstream_url,
            "--mirror-upstream-ca",
            &ca,
        ],
    );
    let mirror = mirror_addr(&pool);
    let status = || stdout(&ok(pool.berth(&["status"]), "berth status"));
    // Both answer before anything was pulled; no request counted yet.
    let out = wait_for("both registries to answer", Duration::from_secs(60), || {
        let out = status();
        (registry_line(&out, "mirror").contains(": answers;")
            && registry_line(&out, "build cache").contains(": answers;"))
        .then_some(out)
    });
    assert!(
        registry_line(&out, "mirror")
            .starts_with(&format!("mirror       {mirror}: answers; 0 requests")),
        "{out}"
    );

    // A pull through the mirror, a push to the tenant's cache, a pull of it
    // back and a lookup of a tag that is not there.
    let a = pool.acquire("mst-a", "10m", "1m");
    ok(
        run(a.docker().args(["pull", IMAGE])),
        "pull through the mirror",
    );
    let repo = a.get("BERTH_CACHE_REPO").to_owned();
    let cached = format!("{repo}/app:cache");
    let docker = || {
        let mut c = a.docker();
        c.env("DOCKER_CONFIG", a.get("DOCKER_CONFIG"));
        c
    };
    ok(run(docker().args(["tag", IMAGE, &cached])), "docker tag");
    ok(
        run(docker().args(["push", &cached])),
        "push to the build cache",
    );
    ok(run(docker().args(["rmi", &cached, IMAGE])), "docker rmi");
    ok(
        run(docker().args(["pull", &cached])),
        "pull from the build cache",
    );
    let o = run(docker().args(["pull", &format!("{repo}/app:absent")]));
    assert!(!o.status.success(), "pulled a tag never pushed");

    let out = status();
    let m = counters(registry_line(&out, "mirror"));
    // Every blob (the layers, the image config) came from the upstream:
    // misses, no hit yet.
    assert!(m.requests > LAYERS as u64, "{out}");
    assert_eq!(m.misses, m.requests, "{out}");
    assert!(m.served_kib > 0, "{out}");
    let c = counters(registry_line(&out, "build cache"));
    assert!(c.hits >= 1, "the cache counted no tag found: {out}");
    assert!(c.misses >= 1, "the cache counted no tag missing: {out}");
    assert!(c.served_kib > 0, "{out}");
    // The same on berth's own /metrics.
    let ops = std::fs::read_to_string(pool.state_dir.join("coordinator.ops.addr")).unwrap();
    let metrics = || {
        let (done, text) = curl(&[
            "-s",
            "--noproxy",
            "*",
            &format!("http://{}/metrics", ops.trim()),
        ]);
        assert!(done, "GET /metrics: {text}");
        text
    };
    let text = metrics();
    for series in [
        "berth_registry_up{registry=\"mirror\"} 1",
        "berth_registry_up{registry=\"cache\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == series),
            "{series} missing:\n{text}"
        );
    }
    assert!(
        sample(&text, "berth_registry_hits_total{registry=\"cache\"}") >= 1.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "berth_registry_served_bytes_total{registry=\"mirror\"}"
        ) > 0.0,
        "{text}"
    );
    assert!(
        sample(&text, "berth_registry_misses_total{registry=\"mirror\"}") > LAYERS as f64,
        "{text}"
    );

    // A second pull through the mirror on a fresh host: hits move.
    ok(
        pool.berth(&["release", "--lease", a.lease_id()]),
        "release a",
    );
    let b = pool.acquire("mst-b", "10m", "1m");
    ok(
        run(b.docker().args(["pull", IMAGE])),
        "second pull through the mirror",
    );
    let out = status();
    let m2 = counters(registry_line(&out, "mirror"));
    assert!(
        m2.hits >= m.hits + LAYERS as u64,
        "before {m:?}, after: {out}"
    );
    assert_eq!(
        m2.misses, m.misses,
        "fetched again from the upstream: {out}"
    );

    // The build cache hangs (stopped): it does not answer, the mirror does.
    let cache_pid = registry_pid(&pool, "cache");
    let signal = |sig| nix::sys::signal::kill(cache_pid, sig).unwrap();
    signal(nix::sys::signal::Signal::SIGSTOP);
    let out = status();
    let text = metrics();
    signal(nix::sys::signal::Signal::SIGCONT);
    assert!(
        text.lines()
            .any(|l| l == "berth_registry_up{registry=\"cache\"} 0"),
        "{text}"
    );
    assert!(
        registry_line(&out, "build cache").contains(": does not answer (no answer within"),
        "{out}"
    );
    assert!(
        registry_line(&out, "mirror").contains(": answers;"),
        "{out}"
    );
    wait_for("the cache to answer again", Duration::from_secs(30), || {
        registry_line(&status(), "build cache")
            .contains(": answers;")
            .then_some(())
    });

    // The mirror killed while its upstream is gone: it cannot start again
    // (distribution asks the upstream at start), and status says so.
    upstream.stop_registry();
    let mirror_pid = registry_pid(&pool, "mirror");
    nix::sys::signal::kill(mirror_pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let out = wait_for(
        "the mirror to be reported down",
        Duration::from_secs(30),
        || {
            let out = status();
            registry_line(&out, "mirror")
                .contains(": does not answer (connect:")
                .then_some(out)
        },
    );
    assert!(
        registry_line(&out, "build cache").contains(": answers;"),
        "{out}"
    );
    ok(
        pool.berth(&["release", "--lease", b.lease_id()]),
        "release b",
    );
}

/// The line of `berth status` on the registry titled `title`.
fn registry_line<'a>(status: &'a str, title: &str) -> &'a str {
    status
        .lines()
        .find(|l| l.starts_with(&format!("{title:<12} ")))
        .unwrap_or_else(|| panic!("no {title} line in berth status:\n{status}"))
}

#[derive(Debug, Default)]
struct Counters {
    requests: u64,
    hits: u64,
    misses: u64,
    /// Served, in KiB (at least 1 once anything was served).
    served_kib: u64,
}

/// The counters of a registry line: `N requests, N hits (P%), N misses,
/// X UNIT served`.
fn counters(line: &str) -> Counters {
    let before = |word: &str| -> u64 {
        let (head, _) = line
            .split_once(&format!(" {word}"))
            .unwrap_or_else(|| panic!("no {word} in {line:?}"));
        head.rsplit([' ', ';', ','])
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let served = {
        let (head, _) = line.split_once(" served").unwrap();
        let mut w = head.rsplit(' ');
        let unit = w.next().unwrap();
        let n: f64 = w.next().unwrap().parse().unwrap();
        let kib = match unit {
            "B" => n / 1024.0,
            "KiB" => n,
            "MiB" => n * 1024.0,
            _ => n * 1024.0 * 1024.0,
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let k = kib.ceil() as u64;
        k
    };
    Counters {
        requests: before("requests"),
        hits: before("hits"),
        misses: before("misses"),
        served_kib: served,
    }
}

/// The value of one sample in Prometheus text.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// The pid of the pool's `kind` registry (mirror, cache).
fn registry_pid(pool: &Pool, kind: &str) -> nix::unistd::Pid {
    let config = pool.state_dir.join(format!("registries/{kind}/config.yml"));
    let found = processes_mentioning(&config.to_string_lossy());
    let pid = found
        .first()
        .and_then(|l| l.split(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no {kind} registry process: {found:?}"));
    nix::unistd::Pid::from_raw(pid)
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
