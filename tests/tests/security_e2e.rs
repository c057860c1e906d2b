//! The security matrix on a real pool: the Docker API is reachable only with
//! the current lease's certificate, the coordinator only with the right
//! token, dockerd listens on no TCP port, a build cannot publish a container
//! on the ports berth serves (2376, 9102), and a lease certificate says what
//! the CA decides, whatever the CSR asked for. Every refusal is checked next
//! to a success of the same client with the right credential, so a refusal
//! for some unrelated reason cannot pass for the real thing.
//!
//! Clients: the stock docker CLI, `curl` and `openssl s_client` against the
//! front; the `berth` CLI and the gRPC API against the coordinator; a
//! `berth-agent` with the wrong join token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use berth_proto::v1 as pb;
use berth_testkit::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// `docker version` with this certificate directory against `docker_host`;
/// Ok(server version) or Err(what docker said).
fn docker_version(docker_host: &str, cert_dir: &Path) -> Result<String, String> {
    let o = run(docker_cli(docker_host)
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", cert_dir)
        .args(["version", "--format", "{{.Server.Version}}"]));
    if o.status.success() {
        Ok(stdout(&o).trim().to_owned())
    } else {
        Err(stderr(&o))
    }
}

/// A certificate directory with the pool CA and the given client pair.
fn cert_dir(root: &Path, name: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(d.join("cert.pem"), cert_pem).unwrap();
    std::fs::write(d.join("key.pem"), key_pem).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// `curl` presenting the certificate in `dir`: the docker CLI (Go) does not
/// even send a certificate whose issuer the server did not name, so this is
/// what makes the front itself judge a forged certificate.
fn curl_with(dir: &Path, url: &str) -> (bool, String) {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    curl(&[
        "--cacert",
        &p("ca.pem"),
        "--cert",
        &p("cert.pem"),
        "--key",
        &p("key.pem"),
        url,
    ])
}

fn assert_refused(what: &str, r: Result<String, String>) {
    match r {
        Ok(v) => panic!("{what}: the Docker API answered (server {v})"),
        Err(e) => eprintln!("{what}: refused as expected: {}", e.trim()),
    }
}

/// What `openssl s_client` got for one `GET /_ping` through the front.
struct SClient {
    success: bool,
    stdout: String,
    stderr: String,
}

impl SClient {
    fn all(&self) -> String {
        format!("stdout: {}\nstderr: {}", self.stdout, self.stderr)
    }
}

/// `openssl s_client` to `front`, verifying the server against `ca` and
/// presenting the client certificate in `client` (a directory with
/// cert.pem and key.pem) if given, sending `GET /_ping` over HTTP/1.0.
/// Every call has the same shape, so a refusal and an acceptance differ
/// only in the certificate.
fn s_client(front: &str, ca: &Path, client: Option<&Path>) -> SClient {
    use std::io::Write;
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", front, "-CAfile"])
        .arg(ca)
        // -quiet implies -ign_eof: the end of stdin does not close the
        // connection; the server's answer (or refusal) does.
        .args(["-quiet", "-verify_return_error"]);
    if let Some(dir) = client {
        cmd.arg("-cert")
            .arg(dir.join("cert.pem"))
            .arg("-key")
            .arg(dir.join("key.pem"));
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    {
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"GET /_ping HTTP/1.0\r\nHost: berth\r\n\r\n");
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    SClient {
        success: o.status.success(),
        stdout: stdout(&o),
        stderr: stderr(&o),
    }
}

/// The certificate was accepted: the handshake completed and dockerd
/// answered `/_ping` through the front.
fn assert_s_client_accepted(what: &str, r: &SClient) {
    assert!(
        r.success && r.stdout.starts_with("HTTP/1.") && r.stdout.contains(" 200 OK"),
        "{what}: openssl s_client got no answer:\n{}",
        r.all()
    );
    assert_eq!(
        r.stdout.rsplit("\r\n\r\n").next(),
        Some("OK"),
        "{what}: {}",
        r.all()
    );
}

/// The front refused the client in the TLS handshake: no HTTP answer, and
/// openssl reports the server's `alert` (e.g. "alert access denied"), which
/// says why.
fn assert_s_client_refused(what: &str, alert: &str, r: &SClient) {
    assert!(
        !r.stdout.contains("HTTP/1") && !r.stdout.contains("OK"),
        "{what}: openssl s_client got an answer:\n{}",
        r.all()
    );
    assert!(
        r.stderr.contains(&format!("alert {alert}")),
        "{what}: no TLS alert \"{alert}\" from the front (refused for another reason?):\n{}",
        r.all()
    );
    eprintln!(
        "{what}: openssl s_client refused as expected: {}",
        r.stderr.trim()
    );
}

#[test]
fn only_the_current_lease_certificate_opens_a_host() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bte6-", 2, &["--recycle"]);
    let scratch = pool.state_dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let ca_path = pool.ca_pem_path();
    let ca_pem = std::fs::read_to_string(&ca_path).unwrap();

    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| pool.acquire("sec-a", "30m", "1m"));
        let b = s.spawn(|| pool.acquire("sec-b", "30m", "1m"));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (host_a, host_b) = (a.docker_host(), b.docker_host());
    assert_ne!(host_a, host_b);
    let front_a = format!("{}:2376", a.host_addr());

    // The lease's own certificate works, with the stock CLI and with curl.
    let version = docker_version(host_a, a.cert_dir()).expect("the lease's own certificate");
    assert!(!version.is_empty());
    let (cacert, cert, key) = (
        a.cert_dir().join("ca.pem"),
        a.cert_dir().join("cert.pem"),
        a.cert_dir().join("key.pem"),
    );
    let url = format!("https://{front_a}/_ping");
    let (good, out) = curl(&[
        "--cacert",
        cacert.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        &url,
    ]);
    assert!(
        good && out.trim() == "OK",
        "curl with the lease cert: {out}"
    );

    // No client certificate.
    let (good, out) = curl(&["--cacert", cacert.to_str().unwrap(), &url]);
    assert!(!good && !out.contains("OK"), "curl without a cert: {out}");
    // openssl s_client: the lease's own certificate gets an answer; the
    // same command without a certificate is refused in the handshake.
    assert_s_client_accepted(
        "s_client with the lease's certificate",
        &s_client(&front_a, &ca_path, Some(a.cert_dir())),
    );
    assert_s_client_refused(
        "s_client without a client certificate",
        "certificate required",
        &s_client(&front_a, &ca_path, None),
    );

    // Plaintext: curl over http and the docker CLI without TLS.
    let (good, out) = curl(&[&format!("http://{front_a}/_ping")]);
    assert!(!good && !out.contains("OK"), "plaintext curl: {out}");
    let o = run(docker_cli(host_a).args(["version", "--format", "{{.Server.Version}}"]));
    assert!(
        !o.status.success(),
        "docker without TLS answered: {}",
        stdout(&o)
    );

    // The certificate of a concurrent lease on another host.
    assert_refused(
        "b's certificate at a's host",
        docker_version(host_a, b.cert_dir()),
    );
    assert_refused(
        "a's certificate at b's host",
        docker_version(host_b, a.cert_dir()),
    );
    docker_version(host_b, b.cert_dir()).expect("b's own certificate");
    let front_b = format!("{}:2376", b.host_addr());
    assert_s_client_refused(
        "s_client with b's certificate at a's host",
        "access denied",
        &s_client(&front_a, &ca_path, Some(b.cert_dir())),
    );
    assert_s_client_accepted(
        "s_client with b's certificate at b's host",
        &s_client(&front_b, &ca_path, Some(b.cert_dir())),
    );

    // A self-signed certificate with the right lease id.
    let (cert_pem, key_pem) = berth_tls::ca::self_signed_lease(a.lease_id()).unwrap();
    let forged = cert_dir(&scratch, "self-signed", &ca_pem, &cert_pem, &key_pem);
    assert_refused("self-signed cert naming a", docker_version(host_a, &forged));
    let (good, out) = curl_with(&forged, &url);
    assert!(
        !good && !out.contains("OK"),
        "curl, self-signed cert: {out}"
    );
    assert_s_client_refused(
        "s_client with a self-signed cert naming a",
        "unknown ca",
        &s_client(&front_a, &ca_path, Some(&forged)),
    );

    // A certificate of another CA with the right lease id.
    let (other_ca, _) = berth_tls::Ca::generate("another CA").unwrap();
    let k = berth_tls::KeyAndCsr::generate("x").unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cert_pem = other_ca
        .sign_lease(&k.csr_pem, a.lease_id(), now, now + hour)
        .unwrap();
    let foreign = cert_dir(&scratch, "other-ca", &ca_pem, &cert_pem, &k.key_pem);
    assert_refused(
        "another CA's cert naming a",
        docker_version(host_a, &foreign),
    );
    assert_s_client_refused(
        "s_client with another CA's cert naming a",
        "unknown ca",
        &s_client(&front_a, &ca_path, Some(&foreign)),
    );

    // A pool certificate for the right lease and its key, but past its
    // validity.
    let pool_ca = pool.ca();
    let a_key = std::fs::read_to_string(a.cert_dir().join("key.pem")).unwrap();
    let k = berth_tls::KeyAndCsr::for_key(&a_key, "x").unwrap();
    let cert_pem = pool_ca
        .sign_lease_between(&k.csr_pem, a.lease_id(), now - 2 * hour, now - hour)
        .unwrap();
    let expired = cert_dir(&scratch, "expired", &ca_pem, &cert_pem, &k.key_pem);
    assert_refused("expired cert for a", docker_version(host_a, &expired));
    let (good, out) = curl_with(&expired, &url);
    assert!(!good && !out.contains("OK"), "curl, expired cert: {out}");
    assert_s_client_refused(
        "s_client with an expired cert for a",
        "certificate expired",
        &s_client(&front_a, &ca_path, Some(&expired)),
    );
    // ... while the same key with a current certificate gets in: the
    // refusal above was the validity, nothing else. (A certificate for the
    // lease with another key is refused: tests/tests/hostile_e2e.rs.)
    let cert_pem = pool_ca
        .sign_lease(&k.csr_pem, a.lease_id(), now, now + hour)
        .unwrap();
    let current = cert_dir(&scratch, "current", &ca_pem, &cert_pem, &k.key_pem);
    docker_version(host_a, &current).expect("a current pool certificate for a");
    let (good, out) = curl_with(&current, &url);
    assert!(good && out.trim() == "OK", "curl, current cert: {out}");
    assert_s_client_accepted(
        "s_client with a current pool cert for a, same key as the expired one",
        &s_client(&front_a, &ca_path, Some(&current)),
    );

    // Renew re-issues the certificate for the same key; the host takes it.
    let before = std::fs::read_to_string(a.cert_dir().join("cert.pem")).unwrap();
    ok(
        run(pool
            .berth_cmd()
            .args(["renew", "--lease", a.lease_id(), "--ttl", "40m"])
            .env("DOCKER_CERT_PATH", a.cert_dir())),
        "berth renew",
    );
    let after = std::fs::read_to_string(a.cert_dir().join("cert.pem")).unwrap();
    assert_ne!(before, after, "renew did not re-issue the certificate");
    docker_version(host_a, a.cert_dir()).expect("the renewed certificate");

    // The certificate of a released lease, at the same host serving the
    // next lease (recycle mode brings it back).
    let released_copy = scratch.join("released-a");
    copy_dir(a.cert_dir(), &released_copy);
    let host_a_id = a.get("BERTH_HOST_ID").to_owned();
    ok(
        pool.berth(&["release", "--lease", a.lease_id()]),
        "release a",
    );
    assert!(!a.cert_dir().exists(), "release left the cert dir");
    // Waits (up to 2 minutes) for a's host to be wiped and Ready again.
    let c = pool.acquire("sec-c", "30m", "2m");
    assert_eq!(
        c.get("BERTH_HOST_ID"),
        host_a_id,
        "c should get the recycled host"
    );
    assert_eq!(c.docker_host(), host_a);
    docker_version(host_a, c.cert_dir()).expect("c's own certificate");
    assert_refused(
        "the released lease's certificate at its old host",
        docker_version(host_a, &released_copy),
    );
    assert_s_client_accepted(
        "s_client with c's certificate at the recycled host",
        &s_client(&front_a, &ca_path, Some(c.cert_dir())),
    );
    assert_s_client_refused(
        "s_client with the released lease's certificate at its old host",
        "access denied",
        &s_client(&front_a, &ca_path, Some(&released_copy)),
    );

    ok(
        pool.berth(&["release", "--lease", c.lease_id()]),
        "release c",
    );
    ok(
        pool.berth(&["release", "--lease", b.lease_id()]),
        "release b",
    );
}

#[test]
fn dockerd_listens_on_no_tcp_port_in_any_host() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bte7-", 2, &[]);
    let lease = pool.acquire("ss-1", "30m", "1m");
    let namespaces = netns_with_prefix(&pool.prefix);
    assert_eq!(namespaces.len(), 2, "{namespaces:?}");
    let leased_ns = lease.get("BERTH_HOST_ID");
    for ns in &namespaces {
        let listeners = tcp_listeners_in_netns(ns);
        eprintln!("{ns}: {listeners:#?}");
        assert!(
            !listeners.iter().any(|l| l.contains("dockerd")),
            "dockerd listens on TCP in {ns}: {listeners:?}"
        );
        // ss does see listeners here: the front is one, in the leased host
        // and in the idle one (it listens while its host is offered, and
        // admits only a current lease's certificate).
        let front = listeners
            .iter()
            .any(|l| l.contains(":2376") && l.contains("berth-agent"));
        assert!(front, "{ns} (leased: {}): {listeners:?}", ns == leased_ns);
    }
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "release",
    );
}

#[test]
fn the_coordinator_needs_the_right_token_and_keeps_tenants_apart() {
    if !preflight() {
        return;
    }
    let other_token = berth_tls::token::generate();
    let pool = Pool::start_with("bte8-", 1, &[], |state| {
        // A second tenant, added the way an operator would.
        std::fs::write(
            state.join("tenants"),
            berth_tls::Tenants::line("team-b", &other_token, false),
        )
        .unwrap();
    });
    let mine = pool.acquire("t-1", "30m", "1m");

    // No token and a wrong token: UNAUTHENTICATED (exit code 7).
    let no_token = run(pool
        .berth_cmd()
        .env("BERTH_TOKEN_FILE", pool.state_dir.join("no-such-token"))
        .args(["get", "--lease", mine.lease_id()]));
    assert_eq!(no_token.status.code(), Some(7), "{}", stderr(&no_token));
    let wrong = pool.state_dir.join("wrong-token");
    std::fs::write(&wrong, berth_tls::token::generate()).unwrap();
    let o = run(pool.berth_cmd().env("BERTH_TOKEN_FILE", &wrong).args([
        "get",
        "--lease",
        mine.lease_id(),
    ]));
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("invalid tenant token"),
        "{}",
        stderr(&o)
    );

    // The other tenant: its own calls work, this lease is not found, and
    // the admin API is closed to it.
    let theirs = pool.state_dir.join("team-b-token");
    std::fs::write(&theirs, &other_token).unwrap();
    let as_b = |args: &[&str]| pool.berth_as(&theirs, args);
    for cmd in ["get", "renew", "release"] {
        let o = as_b(&[cmd, "--lease", mine.lease_id()]);
        assert_eq!(o.status.code(), Some(4), "{cmd}: {}", stderr(&o));
        assert!(stderr(&o).contains("not found"), "{cmd}: {}", stderr(&o));
    }
    let o = as_b(&["hosts"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    // Its own acquire is authenticated (and finds no free host).
    let o = as_b(&["acquire", "--build", "t-1", "--wait", "1s"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    // The lease is untouched.
    assert_eq!(
        pool.lease(mine.lease_id()).state,
        pb::LeaseState::Active as i32
    );
    ok(
        pool.berth(&["release", "--lease", mine.lease_id()]),
        "release by its tenant",
    );
}

/// Stops the rogue agent when dropped.
struct Rogue(std::process::Child);

impl Drop for Rogue {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_agent_with_the_wrong_join_token_is_never_offered() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bte9-", 1, &[]);
    let first = pool.acquire("j-1", "30m", "1m");
    let wrong = pool.state_dir.join("wrong-join-token");
    std::fs::write(&wrong, berth_tls::token::generate()).unwrap();
    let rogue_agent = || {
        let mut c = Command::new(bin("berth-agent"));
        c.arg("--coordinator")
            .arg(format!("https://{}", pool.addr))
            .arg("--ca")
            .arg(pool.state_dir.join("coordinator").join("ca.pem"))
            .arg("--join-token-file")
            .arg(&wrong)
            .arg("--state-dir")
            .arg(pool.state_dir.join("hosts"))
            .arg("--run-dir")
            .arg(&pool.run_dir)
            .arg("--prefix")
            .arg(&pool.prefix)
            .stdin(Stdio::null());
        c
    };
    // A join token file others may read is refused before anything starts.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(rogue_agent().stdout(Stdio::null()));
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("readable by others"), "{}", stderr(&o));
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let log = pool.state_dir.join("rogue.log");
    let rogue = rogue_agent()
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let rogue = Rogue(rogue);
    // The rogue boots its host and tries to register, again and again.
    wait_for("the rogue's refusals", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.matches("invalid pool join token").count() >= 2).then_some(())
    });
    let hosts = pool.hosts();
    assert_eq!(hosts.len(), 1, "the rogue joined the pool: {hosts:?}");
    // No build gets it: with the one real host leased, acquire finds nothing.
    let o = pool.berth(&["acquire", "--build", "j-2", "--wait", "3s"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    drop(rogue);
    ok(
        pool.berth(&["release", "--lease", first.lease_id()]),
        "release",
    );
}

/// The ports berth serves on a host's address.
const FRONT_PORT: u16 = berth_proto::ports::DOCKER_FRONT;
const STATUS_PORT: u16 = berth_proto::ports::AGENT_STATUS;

/// The agent's status endpoint answers `/healthz` on the host's address.
fn status_answers(host_addr: &str) -> Result<(), String> {
    let (good, out) = curl(&[&format!("http://{host_addr}:{STATUS_PORT}/healthz")]);
    if good && out.trim() == "ok" {
        Ok(())
    } else {
        Err(out)
    }
}

#[test]
fn a_build_cannot_publish_on_the_front_or_status_port() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("btp1-", 1, &[]);
    let lease = pool.acquire("ports-1", "30m", "1m");
    let addr = lease.host_addr().to_owned();
    let ctx = pool.state_dir.join("ctx");
    busybox_context(&ctx, "published\n");
    ok(
        run(lease.docker().args(["build", "-q", "-t", "app"]).arg(&ctx)),
        "docker build",
    );
    docker_version(lease.docker_host(), lease.cert_dir()).expect("the front before");
    status_answers(&addr).expect("the status endpoint before");

    // Publishing works in general: a free port answers at the host address.
    ok(
        run(lease
            .docker()
            .args(["run", "-d", "--name", "free", "-p", "8081:80", "app"])),
        "docker run -p 8081:80",
    );
    let page = wait_for("the published port 8081", Duration::from_secs(20), || {
        http_get(format!("{addr}:8081").parse().unwrap()).ok()
    });
    assert!(page.contains("published"), "{page}");

    // berth's own ports cannot be published, on all addresses or on the
    // host's own address: the container does not start and the port stays
    // berth's.
    for port in [FRONT_PORT, STATUS_PORT] {
        for (i, spec) in [format!("{port}:80"), format!("{addr}:{port}:80")]
            .iter()
            .enumerate()
        {
            let name = format!("take-{port}-{i}");
            let o = run(lease
                .docker()
                .args(["run", "-d", "--name", &name, "-p", spec, "app"]));
            eprintln!("docker run -p {spec}: {} {}", o.status, stderr(&o).trim());
            assert!(
                !o.status.success(),
                "docker run -p {spec} succeeded: a build published berth's port {port}"
            );
            assert!(
                stderr(&o).contains("address already in use"),
                "docker run -p {spec} failed, but not because berth holds the port: {}",
                stderr(&o)
            );
            let running = stdout(&ok(
                run(lease
                    .docker()
                    .args(["inspect", "-f", "{{.State.Running}}", &name])),
                "docker inspect",
            ));
            assert_eq!(running.trim(), "false", "{name} runs");
        }
    }

    // Both endpoints still answer, and only the agent listens on them.
    docker_version(lease.docker_host(), lease.cert_dir()).expect("the front after");
    status_answers(&addr).expect("the status endpoint after");
    let host_id = lease.get("BERTH_HOST_ID");
    let listeners = tcp_listeners_in_netns(host_id);
    for port in [FRONT_PORT, STATUS_PORT] {
        let on_port: Vec<_> = listeners
            .iter()
            .filter(|l| l.contains(&format!(":{port} ")))
            .collect();
        assert!(
            !on_port.is_empty() && on_port.iter().all(|l| l.contains("berth-agent")),
            "port {port} in {host_id}: {on_port:?} (all: {listeners:?})"
        );
    }
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "release",
    );
}

/// Seconds since the epoch of `berth acquire`'s `BERTH_LEASE_DEADLINE`
/// (RFC 3339, UTC, whole seconds: `2026-11-30T05:12:33Z`).
fn rfc3339_secs(s: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| -> i64 {
        s.get(r)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("not RFC 3339: {s:?}"))
    };
    assert!(s.len() == 20 && s.ends_with('Z'), "not RFC 3339 UTC: {s:?}");
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

fn pem_der(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .expect("a PEM certificate")
        .1
        .contents
}

/// What the README promises about a lease certificate: issued by the pool
/// CA for the requester's key, SAN = `LEASE_ID.lease.berth.invalid` and
/// nothing else, client authentication only, not a CA, valid until the
/// lease deadline plus one minute.
fn check_lease_cert(
    what: &str,
    cert_pem: &str,
    ca_pem: &str,
    key_pem: &str,
    lease_id: &str,
    deadline_secs: i64,
) {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::{FromDer, X509Certificate};
    let cert_der = pem_der(cert_pem);
    let (_, cert) = X509Certificate::from_der(&cert_der).unwrap();
    let ca_der = pem_der(ca_pem);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    cert.verify_signature(Some(ca.public_key()))
        .unwrap_or_else(|e| panic!("{what}: not signed by the pool CA: {e}"));
    let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "{what}: the certificate is not for the lease's key"
    );
    let cns: Vec<_> = cert
        .subject()
        .iter_common_name()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(cns, [format!("berth lease {lease_id}")], "{what}: subject");
    let lease_name = berth_tls::lease_dns_name(lease_id);
    let mut seen = Vec::new();
    for ext in cert.extensions() {
        seen.push(ext.oid.to_id_string());
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => assert_eq!(
                san.general_names,
                [GeneralName::DNSName(&lease_name)],
                "{what}: SANs"
            ),
            ParsedExtension::ExtendedKeyUsage(eku) => assert!(
                eku.client_auth
                    && !eku.any
                    && !eku.server_auth
                    && !eku.code_signing
                    && !eku.email_protection
                    && !eku.time_stamping
                    && !eku.ocsp_signing
                    && eku.other.is_empty(),
                "{what}: not client authentication only: {eku:?}"
            ),
            ParsedExtension::KeyUsage(ku) => assert!(
                !ku.key_cert_sign() && !ku.crl_sign(),
                "{what}: can sign certificates: {ku}"
            ),
            ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca, "{what}: a CA"),
            ParsedExtension::SubjectKeyIdentifier(_)
            | ParsedExtension::AuthorityKeyIdentifier(_) => {}
            other => panic!("{what}: unexpected extension {other:?}"),
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "2.5.29.14",
            "2.5.29.15",
            "2.5.29.17",
            "2.5.29.19",
            "2.5.29.35",
            "2.5.29.37"
        ],
        "{what}: extensions"
    );
    let not_after = cert.validity().not_after.timestamp();
    assert_eq!(
        not_after - deadline_secs,
        60,
        "{what}: valid until {}, the deadline is {deadline_secs} s after the epoch",
        cert.validity().not_after
    );
}

/// A CSR asking for what a lease certificate must not carry: another
/// lease's name, `localhost` and 127.0.0.1, server authentication and code
/// signing, a CA's key usages, the pool CA's subject. (A CSR has no
/// validity field: a lifetime cannot be asked for as such.)
fn greedy_csr(other_lease: &str) -> (String, String) {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![
        berth_tls::lease_dns_name(other_lease),
        "localhost".to_owned(),
    ])
    .unwrap();
    p.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "berth pool CA");
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::CodeSigning,
    ];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    (key.serialize_pem(), csr)
}

#[test]
fn the_lease_certificate_is_what_the_ca_decides_not_what_the_csr_asks() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("btc1-", 2, &[]);
    let ca_pem = std::fs::read_to_string(pool.ca_pem_path()).unwrap();
    let deadline_secs = |lease_id: &str| pool.lease(lease_id).deadline.unwrap().seconds;

    // What `berth acquire` wrote: its own key, and the certificate for it.
    let a = pool.acquire("cert-cli", "30m", "1m");
    let read = |f: &str| std::fs::read_to_string(a.cert_dir().join(f)).unwrap();
    assert_eq!(read("ca.pem"), ca_pem);
    let deadline = deadline_secs(a.lease_id());
    assert_eq!(
        rfc3339_secs(a.get("BERTH_LEASE_DEADLINE")),
        deadline,
        "BERTH_LEASE_DEADLINE"
    );
    check_lease_cert(
        "berth acquire's cert.pem",
        &read("cert.pem"),
        &ca_pem,
        &read("key.pem"),
        a.lease_id(),
        deadline,
    );

    // Acquire and Renew through the API with a CSR that asks for more.
    let (key_pem, csr_pem) = greedy_csr(a.lease_id());
    let got = pool
        .acquire_csr("cert-greedy", &csr_pem)
        .expect("Acquire with a greedy CSR");
    let lease = got.lease.unwrap();
    assert_eq!(got.ca_pem, ca_pem);
    check_lease_cert(
        "Acquire with a greedy CSR",
        &got.client_cert_pem,
        &ca_pem,
        &key_pem,
        &lease.lease_id,
        lease.deadline.unwrap().seconds,
    );
    // The certificate it got is the one that opens its host.
    let dir = cert_dir(
        &pool.state_dir,
        "greedy",
        &ca_pem,
        &got.client_cert_pem,
        &key_pem,
    );
    docker_version(&lease.docker_host, &dir).expect("the greedy lease's certificate");

    let renewed = pool
        .renew_csr(&lease.lease_id, &csr_pem, Duration::from_secs(45 * 60))
        .expect("Renew with a greedy CSR");
    let new_deadline = renewed.lease.unwrap().deadline.unwrap().seconds;
    assert!(new_deadline > lease.deadline.unwrap().seconds);
    check_lease_cert(
        "Renew with a greedy CSR",
        &renewed.client_cert_pem,
        &ca_pem,
        &key_pem,
        &lease.lease_id,
        new_deadline,
    );

    // A CSR asking for an extension beyond names and usages (here: to be a
    // CA) is refused before it can cost a host.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["ca.example".to_owned()]).unwrap();
    p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        &[2, 5, 29, 19],
        vec![0x30, 0x03, 0x01, 0x01, 0xff],
    )];
    let ca_csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let refused = pool
        .acquire_csr("cert-ca", &ca_csr)
        .expect_err("Acquire with a CSR asking to be a CA");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert!(refused.message().contains("csr_pem"), "{refused}");

    for id in [a.lease_id(), &lease.lease_id] {
        ok(pool.berth(&["release", "--lease", id]), "release");
    }
}
