//! The remote host made to feel local, end to end on real dockerds with the
//! stock docker CLI: `berth sync` of a workspace (1,000 files, nested dirs,
//! a symlink, an executable, excludes) into a named volume, checked from a
//! busybox container (sha256, modes, mtimes, link targets), a file the
//! container wrote synced back; `berth forward` putting a published port on
//! 127.0.0.1 and stopping with the lease; and the docker-compose pattern
//! (sync, then an `external: true` volume instead of a bind mount).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_proto::v1 as pb;
use berth_testkit::*;
use sha2::{Digest, Sha256};

/// `berth` against the pool with the lease's environment, as after
/// `eval "$(berth acquire ...)"`.
fn berth_in_lease(pool: &Pool, lease: &LeaseEnv) -> Command {
    let mut c = pool.berth_cmd();
    for k in [
        "DOCKER_HOST",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
        "BERTH_LEASE_ID",
        "BERTH_HOST_ADDR",
    ] {
        c.env(k, lease.get(k));
    }
    c
}

/// A workspace of `files` regular files spread over nested directories, a
/// symlink, an executable, a private file, and things `.berthignore` drops.
fn make_workspace(root: &Path, files: usize) {
    let _ = std::fs::remove_dir_all(root);
    for i in 0..files {
        let dir = root.join(format!("d{}/s{}", i % 10, (i / 10) % 10));
        std::fs::create_dir_all(&dir).unwrap();
        // Distinct, non-empty content of varying size.
        let body = format!("file {i}\n").repeat(1 + i % 37);
        std::fs::write(dir.join(format!("f{i}.txt")), body).unwrap();
    }
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("bin/run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(root.join("bin/run.sh"), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(root.join("private.key"), "secret-ish\n").unwrap();
    std::fs::set_permissions(root.join("private.key"), PermissionsExt::from_mode(0o640)).unwrap();
    symlink("d0/s0/f0.txt", root.join("link-to-f0")).unwrap();
    symlink("d1", root.join("link-to-dir")).unwrap();
    std::fs::create_dir_all(root.join("target/debug")).unwrap();
    std::fs::write(root.join("target/debug/huge.bin"), vec![0u8; 4096]).unwrap();
    std::fs::write(root.join("d0/scratch.tmp"), "temp").unwrap();
    std::fs::write(
        root.join(".berthignore"),
        "# build output\ntarget\n**/*.tmp\n",
    )
    .unwrap();
}

/// What a container should see: one line per entry, sorted by path:
/// `PATH TYPE MODE MTIME SHA256|->TARGET` (mtime for regular files only:
/// dockerd sets directory times as it extracts).
fn describe_local(root: &Path, excluded: &[&str]) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, excluded: &[&str], out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if excluded
                .iter()
                .any(|x| rel == *x || rel.starts_with(&format!("{x}/")))
            {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.mode() & 0o7777;
            let line = if m.file_type().is_symlink() {
                format!(
                    "symlink -> {}",
                    std::fs::read_link(&p).unwrap().to_string_lossy()
                )
            } else if m.is_dir() {
                format!("dir {mode:o}")
            } else {
                let sum = hex(&Sha256::digest(std::fs::read(&p).unwrap()));
                format!("file {mode:o} {} {sum}", m.mtime())
            };
            out.insert(rel, line);
            if m.is_dir() {
                walk(root, &p, excluded, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, excluded, &mut out);
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// The same description, computed by busybox inside a container that
/// mounts the volume at /w.
const DESCRIBE_IN_CONTAINER: &str = r#"cd /w && find . -mindepth 1 | while read -r f; do
  p="${f#./}"
  if [ -L "$f" ]; then echo "$p|symlink -> $(readlink "$f")";
  elif [ -d "$f" ]; then echo "$p|dir $(stat -c %a "$f")";
  else echo "$p|file $(stat -c '%a %Y' "$f") $(sha256sum "$f" | cut -d' ' -f1)"; fi
done"#;

fn describe_volume(lease: &LeaseEnv, volume: &str) -> BTreeMap<String, String> {
    let out = stdout(&ok(
        run(lease.docker().args([
            "run",
            "--rm",
            "-v",
            &format!("{volume}:/w"),
            "app",
            "sh",
            "-c",
            DESCRIBE_IN_CONTAINER,
        ])),
        "describing the volume in a container",
    ));
    out.lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(p, d)| (p.to_owned(), d.to_owned()))
        .collect()
}

fn assert_same(expected: &BTreeMap<String, String>, got: &BTreeMap<String, String>) {
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    let differ: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .map(|(k, v)| format!("{k}: local {v:?}, remote {:?}", got[k]))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "missing {missing:?}\nextra {extra:?}\ndiffering {differ:#?}"
    );
}

fn build_app(pool: &Pool, lease: &LeaseEnv, html: &str) {
    let ctx = pool.state_dir.join("ctx");
    busybox_context(&ctx, html);
    ok(
        run(lease.docker().args(["build", "-q", "-t", "app"]).arg(&ctx)),
        "docker build",
    );
}

#[test]
fn a_workspace_syncs_into_a_volume_and_back_identically() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bws1-", 1, &[]);
    let lease = pool.acquire("ci-sync", "30m", "1m");
    build_app(&pool, &lease, "sync\n");

    let work = pool.state_dir.join("workspace");
    make_workspace(&work, 1000);
    let expected = describe_local(&work, &["target", "d0/scratch.tmp"]);
    let files = expected.values().filter(|v| v.starts_with("file ")).count();
    assert_eq!(
        files,
        1000 + 3,
        "1000 files, run.sh, private.key, .berthignore"
    );

    let o = ok(
        run(berth_in_lease(&pool, &lease)
            .args(["sync", "--volume", "workspace"])
            .arg(&work)),
        "berth sync",
    );
    let summary = stderr(&o);
    assert!(
        summary.contains("1003 files") && summary.contains("bytes) on the wire in"),
        "{summary}"
    );

    // A container sees exactly the local tree: content, modes, mtimes, links.
    let seen = describe_volume(&lease, "workspace");
    assert_same(&expected, &seen);
    let ran = stdout(&ok(
        run(lease
            .docker()
            .args(["run", "--rm", "-v", "workspace:/w", "app", "/w/bin/run.sh"])),
        "running the synced executable",
    ));
    assert_eq!(ran, "ran\n");

    // A second sync of a changed tree overwrites in place.
    std::fs::write(work.join("d0/s0/f0.txt"), "changed\n").unwrap();
    ok(
        run(berth_in_lease(&pool, &lease)
            .args(["sync", "--volume", "workspace"])
            .arg(&work)),
        "berth sync again",
    );
    let changed = stdout(&ok(
        run(lease.docker().args([
            "run",
            "--rm",
            "-v",
            "workspace:/w",
            "app",
            "cat",
            "/w/link-to-f0",
        ])),
        "reading through the synced symlink",
    ));
    assert_eq!(changed, "changed\n");

    // The container writes a report; it comes back.
    ok(
        run(lease.docker().args([
            "run",
            "--rm",
            "-v",
            "workspace:/w",
            "app",
            "sh",
            "-c",
            "mkdir -p /w/out/sub && echo 'report from the container' > /w/out/sub/report.txt && chmod 600 /w/out/sub/report.txt",
        ])),
        "writing a report in the container",
    );
    let back = pool.state_dir.join("back");
    let o = ok(
        run(berth_in_lease(&pool, &lease)
            .args(["sync", "--from", "workspace:out"])
            .arg(&back)),
        "berth sync --from",
    );
    assert!(stderr(&o).contains("1 files"), "{}", stderr(&o));
    let report = back.join("sub/report.txt");
    assert_eq!(
        std::fs::read_to_string(&report).unwrap(),
        "report from the container\n"
    );
    assert_eq!(std::fs::metadata(&report).unwrap().mode() & 0o777, 0o600);

    // The whole volume back: identical to what was sent (plus the report).
    let whole = pool.state_dir.join("whole");
    ok(
        run(berth_in_lease(&pool, &lease)
            .args(["sync", "--from", "workspace"])
            .arg(&whole)),
        "berth sync --from the whole volume",
    );
    let mut round_trip = describe_local(&whole, &["out"]);
    let mut sent = describe_local(&work, &["target", "d0/scratch.tmp"]);
    // Directory times are not compared (see describe_local); file lines are.
    round_trip.retain(|_, v| !v.starts_with("dir "));
    sent.retain(|_, v| !v.starts_with("dir "));
    assert_same(&sent, &round_trip);

    // Helper containers are gone; the helper image is there for the next sync.
    let helpers = stdout(&ok(
        run(lease
            .docker()
            .args(["ps", "-aq", "--filter", "label=berth.sync"])),
        "docker ps",
    ));
    assert!(helpers.trim().is_empty(), "helpers left: {helpers}");
    ok(
        run(lease
            .docker()
            .args(["image", "inspect", "berth-sync-helper:1"])),
        "the helper image",
    );

    // Bad input: a clear error, the documented exit code.
    let o = run(berth_in_lease(&pool, &lease)
        .args(["sync", "--volume", "no/slashes"])
        .arg(&work));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("invalid volume name"), "{}", stderr(&o));
    let o = run(berth_in_lease(&pool, &lease)
        .args(["sync", "--volume", "workspace"])
        .arg(pool.state_dir.join("does-not-exist")));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o =
        run(berth_in_lease(&pool, &lease).args(["sync", "--from", "no-such-volume-x", "/tmp/x"]));
    assert!(!o.status.success());

    // Release: the wipe removes the helper image and the volume like
    // everything else, and verifies the host is empty.
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    let l = wait_for("the wipe report", Duration::from_secs(60), || {
        let l = pool.lease(lease.lease_id());
        l.wipe.is_some().then_some(l)
    });
    assert_eq!(l.state, pb::LeaseState::Released as i32);
    let w = l.wipe.unwrap();
    assert!(w.verified, "{w:?}");
    assert!(w.images_removed >= 2, "app and the helper image: {w:?}");
    assert!(w.volumes_removed >= 1, "{w:?}");
    // A sync after the lease ended is refused at the front.
    let o = run(berth_in_lease(&pool, &lease)
        .args(["sync", "--volume", "workspace"])
        .arg(&work));
    assert!(!o.status.success(), "sync after release succeeded");
}

/// Kills a forwarder that a failed test left running.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether `pid` still runs (a zombie does not count: it has exited).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

fn free_local_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn spawn_foreground_forward(pool: &Pool, lease: &LeaseEnv, args: &[&str], log: &Path) -> Child {
    berth_in_lease(pool, lease)
        .arg("forward")
        .args(["--poll", "500ms"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn forward_reaches_a_published_port_on_localhost_until_the_lease_ends() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bwf1-", 1, &[]);
    let lease = pool.acquire("ci-forward", "30m", "1m");
    build_app(&pool, &lease, "hello through berth forward\n");
    ok(
        run(lease
            .docker()
            .args(["run", "-d", "-p", "8080:80", "--name", "web", "app"])),
        "docker run -p 8080:80",
    );

    // `berth forward 8080`, in the foreground, as the issue asks.
    let log = pool.state_dir.join("forward.log");
    let mut fg = spawn_foreground_forward(&pool, &lease, &["8080"], &log);
    let mut fg_guard = KillOnDrop(Some(fg.id()));
    let page = wait_for(
        "GET http://127.0.0.1:8080/",
        Duration::from_secs(20),
        || {
            assert!(
                fg.try_wait().unwrap().is_none(),
                "berth forward exited: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            http_get(local(8080)).ok()
        },
    );
    assert!(page.contains("hello through berth forward"), "{page}");
    // curl, the way CI would use it.
    let (curl_ok, body) = curl(&["http://127.0.0.1:8080/"]);
    assert!(
        curl_ok && body.contains("hello through berth forward"),
        "{body}"
    );

    // The same in the background with a pid file, LOCAL:REMOTE form.
    let port = free_local_port();
    let pid_file = pool.state_dir.join("forward.pid");
    let bg_log = pool.state_dir.join("forward-bg.log");
    let o = ok(
        run(berth_in_lease(&pool, &lease)
            .args(["forward", "--background", "--poll", "500ms", "--pid-file"])
            .arg(&pid_file)
            .arg("--log-file")
            .arg(&bg_log)
            .arg(format!("{port}:8080"))),
        "berth forward --background",
    );
    let pid: u32 = stdout(&o).trim().parse().unwrap();
    let _bg_guard = KillOnDrop(Some(pid));
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string()
    );
    // Listening as soon as the command returned: no wait needed.
    let page = http_get(local(port)).unwrap();
    assert!(page.contains("hello through berth forward"), "{page}");

    // A forward for an ended or unknown lease is refused up front.
    let o = run(berth_in_lease(&pool, &lease).args([
        "forward",
        "--lease",
        "00000000-0000-4000-8000-000000000000",
        "0:8080",
    ]));
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));

    // Release: both forwarders stop by themselves and close their ports.
    let released = Instant::now();
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    let status = wait_for(
        "the foreground forward to exit",
        Duration::from_secs(20),
        || fg.try_wait().unwrap(),
    );
    fg_guard.0 = None;
    assert!(status.success(), "berth forward exited with {status}");
    eprintln!(
        "foreground forward stopped {:?} after release",
        released.elapsed()
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("the lease has ended"),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    wait_for(
        "the background forward to exit",
        Duration::from_secs(20),
        || (!alive(pid)).then_some(()),
    );
    assert!(!pid_file.exists(), "the pid file outlived the forwarder");
    assert!(http_get(local(8080)).is_err(), "127.0.0.1:8080 still open");
    assert!(
        http_get(local(port)).is_err(),
        "127.0.0.1:{port} still open"
    );
}

#[test]
fn docker_compose_uses_a_synced_volume_instead_of_a_bind_mount() {
    if !preflight() {
        return;
    }
    assert!(
        Command::new("docker-compose")
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "this test needs docker-compose (Debian's docker-compose); run scripts/test.sh, which installs it"
    );
    let pool = Pool::start("bwc1-", 1, &[]);
    let lease = pool.acquire("ci-compose", "30m", "1m");
    build_app(&pool, &lease, "unused\n");

    // The project: a web root in the workspace, and a compose file that
    // would bind-mount it locally (`./site:/site`) but here names the
    // synced volume instead.
    let project = pool.state_dir.join("project");
    let _ = std::fs::remove_dir_all(&project);
    std::fs::create_dir_all(project.join("site")).unwrap();
    std::fs::write(
        project.join("site/index.html"),
        "served from the synced workspace\n",
    )
    .unwrap();
    std::fs::write(
        project.join("docker-compose.yml"),
        r#"version: "3.7"
services:
  web:
    image: app
    command: ["httpd", "-f", "-p", "80", "-h", "/src/site"]
    ports: ["8090:80"]
    volumes:
      - workspace:/src:ro
  test:
    image: app
    command: ["sh", "-c", "mkdir -p /src/out && cat /src/site/index.html > /src/out/page.html && echo ok > /src/out/status"]
    volumes:
      - workspace:/src
volumes:
  workspace:
    external: true
    name: ci-workspace
"#,
    )
    .unwrap();

    ok(
        run(berth_in_lease(&pool, &lease)
            .args([
                "sync",
                "--volume",
                "ci-workspace",
                "--exclude",
                "docker-compose.yml",
            ])
            .arg(&project)),
        "berth sync of the project",
    );
    let compose = |args: &[&str]| {
        let mut c = Command::new("docker-compose");
        c.current_dir(&project)
            .args(["-p", "berthci"])
            .args(args)
            .env("DOCKER_HOST", lease.docker_host())
            .env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", lease.cert_dir())
            .env_remove("DOCKER_CONTEXT")
            // python-requests lets these override the CA docker-py passes
            // (psf/requests#3829): with them set, docker-compose v1 checks
            // the host against the system bundle instead of the pool CA.
            .env_remove("REQUESTS_CA_BUNDLE")
            .env_remove("CURL_CA_BUNDLE");
        run(&mut c)
    };
    ok(compose(&["up", "-d", "web"]), "docker-compose up -d web");

    // The published port of the compose service, on localhost.
    let port = free_local_port();
    let log = pool.state_dir.join("forward.log");
    let mut fwd = spawn_foreground_forward(&pool, &lease, &[&format!("{port}:8090")], &log);
    let _guard = KillOnDrop(Some(fwd.id()));
    let page = wait_for(
        "the compose service on localhost",
        Duration::from_secs(30),
        || {
            assert!(fwd.try_wait().unwrap().is_none(), "berth forward exited");
            http_get(local(port))
                .ok()
                .filter(|p| p.contains("served from"))
        },
    );
    assert!(page.contains("served from the synced workspace"), "{page}");

    // A one-off service writes into the workspace; its output comes back.
    ok(compose(&["run", "--rm", "test"]), "docker-compose run test");
    let back = pool.state_dir.join("compose-out");
    ok(
        run(berth_in_lease(&pool, &lease)
            .args(["sync", "--from", "ci-workspace:out"])
            .arg(&back)),
        "berth sync --from",
    );
    assert_eq!(
        std::fs::read_to_string(back.join("status")).unwrap(),
        "ok\n"
    );
    assert!(
        std::fs::read_to_string(back.join("page.html"))
            .unwrap()
            .contains("served from the synced workspace")
    );

    ok(compose(&["down"]), "docker-compose down");
    // `down` leaves an external volume alone.
    ok(
        run(lease.docker().args(["volume", "inspect", "ci-workspace"])),
        "the volume after docker-compose down",
    );
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    wait_for("the forward to stop", Duration::from_secs(20), || {
        fwd.try_wait().unwrap()
    });
}
