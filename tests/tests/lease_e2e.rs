//! One lease end to end on real dockerds: `berth up` with real agents in
//! network namespaces, `berth acquire`, the stock docker CLI against the
//! lease's DOCKER_HOST over mutual TLS (DOCKER_TLS_VERIFY, DOCKER_CERT_PATH),
//! hijacked streams through TLS, a BuildKit build (Debian's 20.10 CLI) that
//! leaves build cache, `berth release` cutting a `docker logs -f` within a
//! second, the wipe (build cache included) and the replacement host.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use berth_proto::v1 as pb;
use berth_testkit::*;

/// How soon after `berth release` starts an open `docker logs -f` must
/// end (the README's promise for a cut connection).
const LOGS_CUT_WITHIN: Duration = Duration::from_secs(1);

fn addr(host: &str, port: u16) -> SocketAddr {
    format!("{host}:{port}").parse().unwrap()
}

#[test]
fn two_builds_get_two_hosts_docker_works_and_release_wipes_and_replaces() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bte1-", 2, &[]);

    // Two builds at once get two different hosts.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| pool.acquire("ci-a", "30m", "1m"));
        let b = s.spawn(|| pool.acquire("ci-b", "30m", "1m"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.get("BERTH_HOST_ID"), b.get("BERTH_HOST_ID"));
    assert_ne!(a.host_addr(), b.host_addr());
    let ip: std::net::Ipv4Addr = a.host_addr().parse().unwrap();
    assert!(
        ip.octets()[0] == 198 && ip.octets()[1] & 0xfe == 18,
        "host address {ip} is outside 198.18.0.0/15"
    );
    assert_eq!(a.docker_host(), format!("tcp://{}:2376", a.host_addr()));

    // The lease's credentials: a private directory the CLI wrote, its key
    // made on this machine.
    let dir = a.cert_dir().to_owned();
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        let m = std::fs::metadata(dir.join(f)).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600, "{f}");
    }

    // A retry of the same build gets the same lease.
    let retry = pool.acquire("ci-a", "30m", "1m");
    assert_eq!(retry.lease_id(), a.lease_id());

    // The stock docker CLI builds FROM scratch with COPY from a local dir.
    let ctx = pool.state_dir.join("ctx");
    busybox_context(&ctx, "hello from berth\n");
    ok(
        run(a.docker().args(["build", "-q", "-t", "app"]).arg(&ctx)),
        "docker build",
    );
    let id = stdout(&ok(
        run(a
            .docker()
            .args(["run", "-d", "-p", "8080:80", "--name", "web", "app"])),
        "docker run -p",
    ));
    assert!(!id.trim().is_empty());

    // A BuildKit build, so that the host has build cache for the wipe to
    // remove (the legacy builder above leaves none): Debian's 20.10 CLI has
    // BuildKit built in, and its session runs through the front.
    let bk_ctx = pool.state_dir.join("ctx-buildkit");
    busybox_context(&bk_ctx, "built with BuildKit\n");
    let buildkit = |args: &[&str]| {
        let mut c = a.docker_at(buildkit_docker_cli());
        c.env("DOCKER_BUILDKIT", "1").args(args);
        c
    };
    ok(
        run(buildkit(&["build", "-q", "-t", "app-buildkit"]).arg(&bk_ctx)),
        "DOCKER_BUILDKIT=1 docker build",
    );
    let df = stdout(&ok(
        run(&mut buildkit(&[
            "system",
            "df",
            "--format",
            "{{.Type}}\t{{.TotalCount}}",
        ])),
        "docker system df",
    ));
    let build_cache_records: u32 = df
        .lines()
        .find_map(|l| l.strip_prefix("Build Cache\t"))
        .unwrap_or_else(|| panic!("no build cache line in `docker system df`: {df}"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        build_cache_records > 0,
        "the BuildKit build left no build cache: {df}"
    );
    eprintln!("build cache records before the release: {build_cache_records}");

    // The published port answers at the host's address.
    let page = wait_for("the published port", Duration::from_secs(20), || {
        http_get(addr(a.host_addr(), 8080)).ok()
    });
    assert!(page.contains("hello from berth"), "{page}");
    // ... and only at that host's address.
    assert!(http_get(addr(b.host_addr(), 8080)).is_err());

    // exec, logs, volumes, networks.
    let hostname = stdout(&ok(
        run(a.docker().args(["exec", "web", "cat", "/www/index.html"])),
        "docker exec",
    ));
    assert_eq!(hostname, "hello from berth\n");

    // Hijacked connections through TLS, with stdin closed half-way: attach
    // (`run -i`) and `exec -i` get what was sent and end cleanly.
    for args in [
        &["run", "-i", "--rm", "app", "cat"][..],
        &["exec", "-i", "web", "cat"],
    ] {
        let mut child = a
            .docker()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"through the front\n")
            .unwrap();
        let out = ok(child.wait_with_output().unwrap(), "docker -i");
        assert_eq!(stdout(&out), "through the front\n", "{args:?}");
    }
    ok(
        run(a
            .docker()
            .args(["run", "--name", "talker", "app", "echo", "said-something"])),
        "docker run echo",
    );
    let logs = stdout(&ok(run(a.docker().args(["logs", "talker"])), "docker logs"));
    assert_eq!(logs.trim(), "said-something");
    ok(
        run(a.docker().args(["volume", "create", "data"])),
        "docker volume create",
    );
    ok(
        run(a.docker().args(["network", "create", "appnet"])),
        "docker network create",
    );
    ok(
        run(a.docker().args([
            "run",
            "-d",
            "--network",
            "appnet",
            "-v",
            "data:/data",
            "app",
        ])),
        "docker run with volume and network",
    );

    // The other build's host is untouched.
    let other = stdout(&ok(run(b.docker().args(["ps", "-aq"])), "docker ps on b"));
    assert!(other.trim().is_empty(), "build b sees containers: {other}");

    // A `docker logs -f` that is open when the lease ends gets cut; a
    // thread notes the moment it exits.
    let mut follow = a
        .docker()
        .args(["logs", "-f", "web"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        follow.try_wait().unwrap().is_none(),
        "docker logs -f ended early"
    );
    let (exited_tx, exited_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let status = follow.wait();
        let _ = exited_tx.send((Instant::now(), status));
    });

    let old_host = a.get("BERTH_HOST_ID").to_owned();
    let socket = pool.docker_socket(&old_host);
    let released = Instant::now();
    ok(
        pool.berth(&["release", "--lease", a.lease_id()]),
        "berth release",
    );
    let release_returned = Instant::now();

    let (cut_at, status) = exited_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("docker logs -f still runs 20 s after the release");
    let status = status.unwrap();
    let cut_after = cut_at.duration_since(released);
    eprintln!(
        "docker logs -f cut {cut_after:?} after `berth release` started ({status}); the release \
         command took {:?}",
        release_returned.duration_since(released)
    );
    // Cut, not ended: a container that stops ends `logs -f` with status 0.
    assert!(
        !status.success(),
        "docker logs -f ended cleanly ({status}), as if web had stopped, not as if cut"
    );
    assert!(
        cut_after < LOGS_CUT_WITHIN,
        "docker logs -f was cut {cut_after:?} after `berth release` started; the README \
         promises less than {LOGS_CUT_WITHIN:?}"
    );
    // Release deletes the lease's certificate directory.
    assert!(!dir.exists(), "{} left after release", dir.display());
    // The old DOCKER_HOST refuses connections.
    let refused = run(a
        .docker()
        .args(["version", "--format", "{{.Server.Version}}"]));
    assert!(!refused.status.success(), "old DOCKER_HOST still answers");
    assert!(
        std::net::TcpStream::connect_timeout(&addr(a.host_addr(), 2376), Duration::from_secs(2))
            .is_err(),
        "the front still accepts connections after release"
    );

    // The wipe report says nothing is left, and it says so after removing things.
    let lease = wait_for("the wipe report", Duration::from_secs(60), || {
        let l = pool.lease(a.lease_id());
        l.wipe.is_some().then_some(l)
    });
    assert_eq!(lease.state, pb::LeaseState::Released as i32);
    let w = lease.wipe.unwrap();
    eprintln!("wipe report: {w:?}");
    assert!(w.verified, "wipe not verified: {w:?}");
    assert_eq!(
        (
            w.containers_left,
            w.images_left,
            w.volumes_left,
            w.networks_left,
            w.build_cache_left
        ),
        (0, 0, 0, 0, 0),
        "{w:?}"
    );
    assert!(w.containers_removed >= 3, "{w:?}");
    // app and app-buildkit at least.
    assert!(w.images_removed >= 2, "{w:?}");
    // The build cache the BuildKit build made was there, was pruned, and
    // the verification found none left (build_cache_left above).
    assert!(
        w.build_cache_reclaimed_bytes > 0,
        "the wipe reclaimed no build cache ({build_cache_records} records were there): {w:?}"
    );
    assert!(w.volumes_removed >= 1, "{w:?}");
    assert!(w.networks_removed >= 1, "{w:?}");

    // The host is destroyed (its socket is gone) and a fresh one replaces it.
    wait_for(
        "the old host's dockerd to go",
        Duration::from_secs(60),
        || (!socket.exists()).then_some(()),
    );
    wait_for(
        "a replacement host, and the old one gone",
        Duration::from_secs(90),
        || {
            let hosts = pool.hosts();
            let old_connected = hosts.iter().any(|h| h.host_id == old_host && h.connected);
            let fresh_ready = hosts.iter().any(|h| {
                h.host_id != old_host
                    && h.host_id != b.get("BERTH_HOST_ID")
                    && h.state == pb::HostState::Ready as i32
            });
            (!old_connected && fresh_ready).then_some(())
        },
    );

    // The next build gets a clean host, never the old one.
    let c = pool.acquire("ci-c", "30m", "1m");
    assert_ne!(c.get("BERTH_HOST_ID"), old_host);
    for what in [["ps", "-aq"], ["images", "-q"], ["volume", "ls"]] {
        let out = stdout(&ok(run(c.docker().args(what).arg("-q")), "docker ls"));
        assert!(out.trim().is_empty(), "{what:?} on a fresh host: {out}");
    }
    ok(
        pool.berth(&["release", "--lease", c.lease_id()]),
        "release c",
    );
    ok(
        pool.berth(&["release", "--lease", b.lease_id()]),
        "release b",
    );
}
