//! Hostile builds and hostile neighbours on a real pool: what someone who
//! holds the tenant token, the join token or a lease (root on its host) tries,
//! and what they get. Each attack is paired with the legitimate use it must
//! not disturb, so a refusal for an unrelated reason cannot pass for the
//! real one.
//!
//! - a lease's key is pinned: neither `Renew` nor a retried `Acquire` can
//!   bring another key once the lease's certificate has opened its host,
//!   and a certificate for another key never opens it, however it was made;
//!   a retried `Acquire` whose new key crosses the certificate's first use
//!   (the agent stalled meanwhile) leaves one key opening the host, and the
//!   coordinator pins that key;
//! - a host id is bound to its key: a second registration with the join
//!   token but without the host's key is refused, the live host keeps
//!   serving;
//! - with `--recycle`, a lease that makes its host a swarm manager leaves
//!   nothing for the next lease: swarm inactive, no stray TCP listener;
//! - with `--recycle`, the wipe that replaces dockerd on an empty data root
//!   ends a process that left its container (host PID namespace, orphaned,
//!   out of the container's cgroups), removes a mount over the data root on
//!   the machine and deletes a volume holding an immutable file;
//! - the client side: `berth acquire --cert-dir` refuses a directory with a
//!   user's files, `berth release` deletes only what acquire wrote, and a
//!   volume whose contents turn a directory into a symlink between two
//!   `berth sync --from` runs cannot make the second one write outside its
//!   destination.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use berth_proto::v1 as pb;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_testkit::*;

/// A certificate directory as the docker CLI reads it.
fn cert_dir(root: &Path, name: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("cert.pem"), cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), key_pem).unwrap();
    dir
}

/// `docker version` against `docker_host` with the certificates in `dir`:
/// Ok(server version) or Err(what docker said).
fn docker_version(docker_host: &str, dir: &Path) -> Result<String, String> {
    let o = run(docker_cli(docker_host)
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", dir)
        .args(["version", "--format", "{{.Server.Version}}"]));
    if o.status.success() && !stdout(&o).trim().is_empty() {
        Ok(stdout(&o).trim().to_owned())
    } else {
        Err(format!("{}{}", stdout(&o), stderr(&o)))
    }
}

fn assert_refused(what: &str, r: Result<String, String>) {
    match r {
        Ok(v) => panic!("{what}: the host answered (server {v})"),
        Err(e) => assert!(
            e.contains("certificate") || e.contains("tls") || e.contains("remote error"),
            "{what}: refused, but not in the TLS handshake: {e}"
        ),
    }
}

/// The time to live the renewals of these tests ask for.
const RENEW_TTL: Duration = Duration::from_secs(40 * 60);

fn new_key() -> berth_tls::KeyAndCsr {
    berth_tls::KeyAndCsr::generate("hostile test").unwrap()
}

#[test]
fn a_lease_key_cannot_be_swapped_once_its_certificate_is_in_use() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bth1-", 2, &[]);
    let scratch = pool.state_dir.join("scratch");
    let ca_pem = std::fs::read_to_string(pool.ca_pem_path()).unwrap();

    // A retried acquire (its first answer was lost, say) may bring another
    // key while the certificate has not been used: the key moves, and the
    // first certificate stops opening the host.
    let (k1, k2, k3) = (new_key(), new_key(), new_key());
    let first = pool.acquire_csr("pin-retry", &k1.csr_pem).expect("acquire");
    let lease = first.lease.clone().unwrap();
    let c1 = cert_dir(&scratch, "k1", &ca_pem, &first.client_cert_pem, &k1.key_pem);
    let retried = pool
        .acquire_csr("pin-retry", &k2.csr_pem)
        .expect("a retried acquire with another key");
    assert_eq!(retried.lease.as_ref().unwrap().lease_id, lease.lease_id);
    let c2 = cert_dir(
        &scratch,
        "k2",
        &ca_pem,
        &retried.client_cert_pem,
        &k2.key_pem,
    );
    // The agent hears of the new key right after the answer.
    wait_for(
        "k2's certificate opens the host",
        Duration::from_secs(10),
        || docker_version(&lease.docker_host, &c2).ok(),
    );
    assert_refused(
        "k1's certificate after the key moved to k2",
        docker_version(&lease.docker_host, &c1),
    );
    // The front reports the key's first use over the agent's stream; the
    // coordinator fixes the key when the report arrives. A retry that
    // reaches the coordinator before the report is still answered, with a
    // certificate the front refuses (the stalled-agent test below), so the
    // refusal asserted here needs the report: k3 is tried once it is in.
    wait_key_fixed(&pool, &lease.lease_id);

    // In use now: neither a retried Acquire nor a Renew may bring k3.
    let refused = pool
        .acquire_csr("pin-retry", &k3.csr_pem)
        .expect_err("retried acquire with k3 after use");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("in use"), "{refused}");
    let refused = pool
        .renew_csr(&lease.lease_id, &k3.csr_pem, RENEW_TTL)
        .expect_err("renew with k3");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");

    // The attack as a user would run it: `berth renew` with a fresh key in
    // a directory of one's own, for somebody else's lease id.
    let thief = scratch.join("thief");
    std::fs::create_dir_all(&thief).unwrap();
    std::fs::write(thief.join("key.pem"), &k3.key_pem).unwrap();
    // The marker that makes the CLI take a directory for the lease's: a
    // convenience, not a boundary, and as easy to write as this.
    std::fs::write(thief.join("berth-lease"), format!("{}\n", lease.lease_id)).unwrap();
    let o = pool.berth(&[
        "renew",
        "--lease",
        &lease.lease_id,
        "--cert-dir",
        thief.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(7),
        "berth renew with k3: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("key"), "{}", stderr(&o));
    assert!(
        !thief.join("cert.pem").exists(),
        "a certificate was written"
    );

    // Whatever made it, a certificate for this lease with k3 does not open
    // the host: the front admits the lease's key, not just its name.
    let now = SystemTime::now();
    let forged = pool
        .ca()
        .sign_lease(
            &k3.csr_pem,
            &lease.lease_id,
            now,
            now + Duration::from_secs(600),
        )
        .unwrap();
    let c3 = cert_dir(&scratch, "k3", &ca_pem, &forged, &k3.key_pem);
    assert_refused(
        "a CA-signed certificate for the lease with k3",
        docker_version(&lease.docker_host, &c3),
    );

    // The holder is unaffected: its certificate works, it renews with its
    // own key, and the renewed certificate works too.
    docker_version(&lease.docker_host, &c2).expect("the holder's certificate");
    let same_key = berth_tls::KeyAndCsr::for_key(&k2.key_pem, "renew").unwrap();
    let renewed = pool
        .renew_csr(&lease.lease_id, &same_key.csr_pem, RENEW_TTL)
        .expect("renew with the lease's own key");
    let c2r = cert_dir(
        &scratch,
        "k2r",
        &ca_pem,
        &renewed.client_cert_pem,
        &k2.key_pem,
    );
    docker_version(&lease.docker_host, &c2r).expect("the renewed certificate");
    assert_eq!(
        pool.lease(&lease.lease_id).state,
        pb::LeaseState::Active as i32
    );

    ok(
        pool.berth(&["release", "--lease", &lease.lease_id]),
        "release",
    );
}

/// Waits until the coordinator has the front's report that the lease's
/// certificate is in use (its key is fixed from then on).
fn wait_key_fixed(pool: &Pool, lease_id: &str) {
    wait_for(
        "the coordinator to learn that the key is in use",
        Duration::from_secs(10),
        || {
            pool.coordinator_log()
                .lines()
                .any(|l| l.contains("its key is fixed") && l.contains(lease_id))
                .then_some(())
        },
    );
}

/// A lease acquired with `key` for `build`, once its host's agent has it:
/// the lease, its certificate's directory, and the host's id.
fn active_lease(
    pool: &Pool,
    build: &str,
    key: &berth_tls::KeyAndCsr,
) -> (pb::Lease, PathBuf, String) {
    let scratch = pool.state_dir.join("scratch");
    let ca_pem = std::fs::read_to_string(pool.ca_pem_path()).unwrap();
    let first = pool.acquire_csr(build, &key.csr_pem).expect("acquire");
    let lease = first.lease.clone().unwrap();
    let dir = cert_dir(
        &scratch,
        &format!("{build}-1"),
        &ca_pem,
        &first.client_cert_pem,
        &key.key_pem,
    );
    let host_id = wait_for("the lease to be active", Duration::from_secs(30), || {
        let l = pool.lease(&lease.lease_id);
        (l.state == pb::LeaseState::Active as i32).then_some(l.host_id)
    });
    (lease, dir, host_id)
}

/// After a race between a lease's first connection and a retried acquire
/// with another key: once the coordinator has the front's report, `used`
/// opens the host and `other` does not, and the coordinator pins `used`
/// (it renews; `other` neither renews nor moves the key again).
fn only_the_key_in_use_counts(
    pool: &Pool,
    lease: &pb::Lease,
    (used, used_dir): (&berth_tls::KeyAndCsr, &Path),
    (other, other_dir): (&berth_tls::KeyAndCsr, &Path),
) {
    wait_key_fixed(pool, &lease.lease_id);
    docker_version(&lease.docker_host, used_dir).expect("the key in use");
    assert_refused(
        "the key not in use",
        docker_version(&lease.docker_host, other_dir),
    );
    pool.renew_csr(&lease.lease_id, &used.csr_pem, RENEW_TTL)
        .expect("renew with the key in use");
    let refused = pool
        .renew_csr(&lease.lease_id, &other.csr_pem, RENEW_TTL)
        .expect_err("renew with the other key");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    let refused = pool
        .acquire_csr(&lease.build_id, &other.csr_pem)
        .expect_err("a retry with the other key");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert_refused(
        "the key not in use, after the renewals",
        docker_version(&lease.docker_host, other_dir),
    );
    docker_version(&lease.docker_host, used_dir).expect("the key in use, after the renewals");
    ok(
        pool.berth(&["release", "--lease", &lease.lease_id]),
        "release",
    );
}

/// A TLS connection to a lease's front whose handshake the test steps by
/// hand: the client's last flight (its certificate, the signature that
/// proves its key, Finished) is held back until [`HeldHandshake::finish`].
struct HeldHandshake {
    conn: rustls::ClientConnection,
    tcp: std::net::TcpStream,
}

impl HeldHandshake {
    /// Connects with the certificate in `dir` and reads the front's whole
    /// flight; the client's answer is not sent yet.
    fn start(docker_host: &str, dir: &Path) -> Self {
        let addr: std::net::SocketAddr = docker_host.trim_start_matches("tcp://").parse().unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let cfg =
            berth_tls::lease_client_config(&read("ca.pem"), &read("cert.pem"), &read("key.pem"))
                .unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
        let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while conn.wants_write() {
            conn.write_tls(&mut tcp).unwrap();
        }
        while conn.is_handshaking() {
            let n = conn.read_tls(&mut tcp).unwrap();
            assert!(n > 0, "the front closed the connection in the handshake");
            conn.process_new_packets().unwrap();
        }
        assert!(conn.wants_write(), "no last flight to hold back");
        Self { conn, tcp }
    }

    /// Sends the held flight and a `/_ping`: dockerd's answer, or why there
    /// was none.
    fn finish(mut self) -> Result<String, String> {
        use std::io::{Read, Write};
        let mut s = rustls::Stream::new(&mut self.conn, &mut self.tcp);
        s.write_all(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        let ended = s.read_to_end(&mut got);
        let got = String::from_utf8_lossy(&got).into_owned();
        match ended {
            _ if got.starts_with("HTTP/1.1 200 OK") => Ok(got),
            Ok(_) => Err(format!("no answer: {got:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[test]
fn a_key_move_that_crosses_the_first_connection_in_a_stalled_agent_leaves_one_key_in_use() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bth6-", 1, &[]);
    let scratch = pool.state_dir.join("scratch");
    let ca_pem = std::fs::read_to_string(pool.ca_pem_path()).unwrap();
    let (k1, k2) = (new_key(), new_key());
    let (lease, c1, host_id) = active_lease(&pool, "pin-stall", &k1);

    // The holder's first connection is one flight from done (the front
    // has sent its part; the client's certificate and proof are next)
    // when the agent stalls (a loaded machine, a paused VM). Meanwhile a
    // retried acquire with another key reaches the coordinator, which has
    // heard of no use: it moves the key and answers with a certificate.
    // When the agent runs again, the holder's last flight and the move are
    // both waiting for it.
    let holder = HeldHandshake::start(&lease.docker_host, &c1);
    let agent = pool.agent_pid(&host_id).expect("the host's agent");
    let frozen = Frozen::stop(agent);
    let holder = std::thread::spawn(move || holder.finish());
    let retried = pool
        .acquire_csr(&lease.build_id, &k2.csr_pem)
        .expect("a retry before any reported use");
    assert_eq!(retried.lease.as_ref().unwrap().lease_id, lease.lease_id);
    let c2 = cert_dir(
        &scratch,
        "pin-stall-2",
        &ca_pem,
        &retried.client_cert_pem,
        &k2.key_pem,
    );
    // The move on its way to the agent's socket.
    std::thread::sleep(Duration::from_millis(300));
    drop(frozen);

    // Whichever the agent took first, the key that got in is the lease's
    // for good: the front fixed it at that connection and refuses the move
    // after it, and its report puts the coordinator's pin back.
    match holder.join().unwrap() {
        Ok(_) => {
            eprintln!("the holder's connection came first; the front refused the move");
            only_the_key_in_use_counts(&pool, &lease, (&k1, &c1), (&k2, &c2));
        }
        Err(e) => {
            eprintln!("the move came first; the holder's connection was refused: {e}");
            docker_version(&lease.docker_host, &c2).expect("the moved key's certificate");
            only_the_key_in_use_counts(&pool, &lease, (&k2, &c2), (&k1, &c1));
        }
    }
}

#[test]
fn a_second_registration_without_the_hosts_key_is_refused_and_the_host_keeps_serving() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bth2-", 1, &[]);
    let host = pool.hosts().pop().expect("one host");
    let join_token = std::fs::read_to_string(pool.state_dir.join("join-token")).unwrap();
    let join_token = join_token.trim();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let agents = AgentServiceClient::new(rt.block_on(pool.endpoint().connect()).unwrap());

    // Everything a registration carries, as the live host sent it, but a
    // CSR of another key: what a join-token holder can send.
    let register = |host_id: &str, host_addr: &str| pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            host_id: host_id.to_owned(),
            host_addr: host_addr.to_owned(),
            docker_host: format!("tcp://{host_addr}:2376"),
            provider: "local".into(),
            agent_version: "0.1.0".into(),
            docker_version: "20.10".into(),
            resources: Some(pb::Resources {
                cpus: 1,
                memory_bytes: 1 << 30,
                disk_bytes: 1 << 30,
                ..Default::default()
            }),
            state: pb::HostState::Ready as i32,
            csr_pem: new_key().csr_pem,
            ..Default::default()
        })),
    };
    let attempt = |msg: pb::AgentMessage| {
        let mut agents = agents.clone();
        rt.block_on(async move {
            let stream = tokio_stream::iter(vec![msg]);
            agents.connect(with_token(stream, join_token)).await
        })
    };
    let refused = attempt(register(&host.host_id, &host.host_addr))
        .expect_err("a registration of the live host id with another key");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("key"), "{refused}");

    // No server certificate for loopback, nor for an address outside the
    // pool's range, under a fresh host id either.
    let fresh_id = format!("{}ffff", pool.prefix);
    for addr in ["127.0.0.1", "10.9.8.7"] {
        let refused =
            attempt(register(&fresh_id, addr)).expect_err("a registration for a non-pool address");
        assert_eq!(
            refused.code(),
            tonic::Code::PermissionDenied,
            "{addr}: {refused}"
        );
        assert!(refused.message().contains(addr), "{refused}");
    }

    // The live host was not displaced: still Ready, it takes a lease and
    // its Docker API answers with the lease's certificate.
    let hosts = pool.hosts();
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert_eq!(hosts[0].host_id, host.host_id);
    assert_eq!(hosts[0].state, pb::HostState::Ready as i32, "{hosts:?}");
    let lease = pool.acquire("after-impostor", "10m", "1m");
    assert_eq!(lease.get("BERTH_HOST_ID"), host.host_id);
    ok(
        run(lease
            .docker()
            .args(["version", "--format", "{{.Server.Version}}"])),
        "docker version on the live host",
    );
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "release",
    );
    assert!(
        pool.coordinator_log().contains("bound to the key"),
        "the refusal is logged"
    );
}

/// The TCP ports listening in a host's namespace (the local address column
/// of `ss -Htlnp`: `State Recv-Q Send-Q Local:Port Peer:Port Process`).
fn listening_ports(host_id: &str) -> Vec<u16> {
    tcp_listeners_in_netns(host_id)
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn a_swarm_manager_made_by_one_lease_is_gone_for_the_next_on_a_recycled_host() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bth3-", 1, &["--recycle"]);
    let a = pool.acquire("swarm-a", "10m", "1m");
    let host_id = a.get("BERTH_HOST_ID").to_owned();
    // The hostile lease: a swarm manager on TCP 2377, whose join token the
    // lease holder keeps.
    ok(
        run(a
            .docker()
            .args(["swarm", "init", "--advertise-addr", a.host_addr()])),
        "docker swarm init",
    );
    let state = ok(
        run(a
            .docker()
            .args(["info", "--format", "{{.Swarm.LocalNodeState}}"])),
        "docker info",
    );
    assert_eq!(stdout(&state).trim(), "active");
    assert!(
        listening_ports(&host_id).contains(&2377),
        "the manager listens: {:?}",
        tcp_listeners_in_netns(&host_id)
    );
    ok(pool.berth(&["release", "--lease", a.lease_id()]), "release");

    // The same host serves the next lease (recycle), and nothing is left.
    let b = pool.acquire("swarm-b", "10m", "2m");
    assert_eq!(b.get("BERTH_HOST_ID"), host_id, "recycled host expected");
    let state = ok(
        run(b
            .docker()
            .args(["info", "--format", "{{.Swarm.LocalNodeState}}"])),
        "docker info",
    );
    assert_eq!(stdout(&state).trim(), "inactive");
    let ports = listening_ports(&host_id);
    assert!(
        ports.iter().all(|p| [2376, 9102].contains(p)),
        "only berth's front and status listen: {:?}",
        tcp_listeners_in_netns(&host_id)
    );
    assert!(ports.contains(&2376), "{ports:?}");
    ok(pool.berth(&["release", "--lease", b.lease_id()]), "release");
}

#[test]
fn the_client_side_writes_only_where_it_was_told() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bth4-", 1, &[]);
    let scratch = pool.state_dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();

    // A directory with a user's file in it is not a certificate directory.
    let mine = scratch.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    let o = pool.berth(&[
        "acquire",
        "--build",
        "cd-refused",
        "--cert-dir",
        mine.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("notes.txt"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(mine.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(
        pool.all_leases().iter().all(|l| l.build_id != "cd-refused"),
        "a refused acquire took no lease"
    );

    // A directory acquire made: release deletes its own files only.
    let made = scratch.join("made");
    let o = ok(
        pool.berth(&[
            "acquire",
            "--build",
            "cd-made",
            "--cert-dir",
            made.to_str().unwrap(),
        ]),
        "acquire into a new directory",
    );
    let lease = LeaseEnv::parse(&stdout(&o));
    assert_eq!(lease.cert_dir(), made.as_path());

    // A volume that holds a symlink out of any destination it is synced to.
    let outside = scratch.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let image = busybox_image(&lease, &scratch);
    let in_volume = |script: &str| {
        ok(
            run(lease.docker().args([
                "run",
                "--rm",
                "-v",
                "hostile:/data",
                &image,
                "sh",
                "-c",
                script,
            ])),
            script,
        )
    };
    let link = format!(
        "ln -s {} /data/link && echo x > /data/suid && chmod 4755 /data/suid",
        outside.display()
    );
    in_volume(&link);
    let dest = scratch.join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    let sync_from = || {
        run(pool
            .berth_cmd()
            .env("DOCKER_HOST", lease.docker_host())
            .env("DOCKER_CERT_PATH", lease.cert_dir())
            .env("BERTH_LEASE_ID", lease.lease_id())
            .args(["sync", "--from", "hostile"])
            .arg(&dest))
    };
    ok(sync_from(), "berth sync --from (a symlink out)");
    let meta = std::fs::symlink_metadata(dest.join("link")).unwrap();
    assert!(meta.file_type().is_symlink(), "the link is kept as a link");
    let suid = std::fs::metadata(dest.join("suid")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&suid.permissions()) & 0o6000,
        0,
        "setuid stripped"
    );
    // The volume's link becomes a directory with a file in it; the
    // destination still holds the link from the first sync.
    in_volume("rm /data/link && mkdir /data/link && echo pwned > /data/link/f");
    let second = sync_from();
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "the second sync wrote through the link; sync said: {}",
        stderr(&second)
    );
    if second.status.success() {
        // It replaced the link with the directory, beneath the destination.
        assert_eq!(
            std::fs::read_to_string(dest.join("link").join("f")).unwrap(),
            "pwned\n"
        );
        assert!(
            std::fs::symlink_metadata(dest.join("link"))
                .unwrap()
                .is_dir()
        );
    }

    std::fs::write(made.join("notes.txt"), "mine too").unwrap();
    ok(
        pool.berth(&[
            "release",
            "--lease",
            lease.lease_id(),
            "--cert-dir",
            made.to_str().unwrap(),
        ]),
        "release",
    );
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        assert!(!made.join(f).exists(), "{f} left behind");
    }
    assert_eq!(
        std::fs::read_to_string(made.join("notes.txt")).unwrap(),
        "mine too",
        "release deleted a file acquire did not write"
    );
}

/// A busybox image built on the lease's host; its tag.
fn busybox_image(lease: &LeaseEnv, scratch: &Path) -> String {
    let ctx = scratch.join("busybox-ctx");
    busybox_context(&ctx, "hostile\n");
    let tag = "bth-busybox";
    ok(
        run(lease.docker().args(["build", "-q", "-t", tag]).arg(&ctx)),
        "docker build",
    );
    tag.to_owned()
}

/// Whether `pid` runs `sleep` (a pid reused by something else does not count).
fn sleeping(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("sleep"))
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
        })
}

#[test]
fn a_recycled_host_comes_back_on_a_fresh_data_root_whatever_the_lease_left() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bth5-", 1, &["--recycle"]);
    let scratch = pool.state_dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let a = pool.acquire("fresh-a", "10m", "1m");
    let host_id = a.get("BERTH_HOST_ID").to_owned();
    let host_dir = pool.state_dir.join("hosts").join(&host_id);
    let data_root = host_dir.join("docker");
    let image = busybox_image(&a, &scratch);

    // A process that leaves its container: in the machine's PID namespace
    // (`--pid=host`), orphaned (handed to the container's subreaper), and
    // moved out of the container's cgroup in every hierarchy (what a
    // privileged container can do; done here from the machine, as root).
    ok(
        run(a.docker().args([
            "run",
            "-d",
            "--pid=host",
            "-v",
            "bth-out:/out",
            &image,
            "sh",
            "-c",
            "(setsid sh -c 'echo $$ > /out/pid; exec sleep 3600' &); exec sleep 3600",
        ])),
        "docker run (the escaping process)",
    );
    // A user network: its bridge stays in the host's namespace when its
    // dockerd is killed, unless the wipe removes it.
    ok(
        run(a.docker().args(["network", "create", "bth-net"])),
        "docker network create",
    );
    let pid_file = data_root.join("volumes/bth-out/_data/pid");
    let escapee: i32 = wait_for(
        "the escaping process's pid",
        Duration::from_secs(30),
        || std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok(),
    );
    assert!(sleeping(escapee), "pid {escapee} runs sleep");
    let mut moved = 0;
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        if std::fs::write(hierarchy.path().join("cgroup.procs"), escapee.to_string()).is_ok() {
            moved += 1;
        }
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{escapee}/cgroup")).unwrap();
    assert!(
        moved > 0 && !cgroups.contains(&format!("berth-{host_id}")),
        "the process left the host's cgroups ({moved} hierarchies): {cgroups}"
    );

    // A file made immutable in a volume (`chattr +i`; busybox has no
    // chattr, so the machine's is used on the volume's directory).
    ok(
        run(a.docker().args([
            "run",
            "--rm",
            "-v",
            "bth-vol:/data",
            &image,
            "sh",
            "-c",
            "echo kept > /data/f",
        ])),
        "docker run (a volume)",
    );
    let locked = data_root.join("volumes/bth-vol/_data/f");
    ok(
        run(std::process::Command::new("chattr").arg("+i").arg(&locked)),
        "chattr +i",
    );
    assert!(
        std::fs::remove_file(&locked).is_err(),
        "the file is immutable"
    );

    // A mount over the data root itself, in the machine's mount namespace
    // (what a privileged container entering PID 1's namespaces can do;
    // done here from the machine, as root: this machine cannot run
    // privileged containers, runc is refused the capabilities).
    ok(
        run(std::process::Command::new("mount")
            .args(["-t", "tmpfs", "bth-cover"])
            .arg(&data_root)),
        "mount over the data root",
    );
    assert!(
        !mounts_under(&data_root).is_empty(),
        "the data root is covered on the machine"
    );

    // The wipe: verified, by a fresh data root.
    ok(pool.berth(&["release", "--lease", a.lease_id()]), "release");
    let report = wait_for("the wipe report", Duration::from_secs(90), || {
        pool.lease(a.lease_id()).wipe
    });
    assert!(report.verified, "{report:?}");
    assert_eq!(report.method, "fresh-data-root", "{report:?}");
    assert!(
        report.containers_removed >= 1 && report.volumes_removed >= 2,
        "{report:?}"
    );

    // The next lease gets the same host, empty, and it works.
    let b = pool.acquire("fresh-b", "10m", "2m");
    assert_eq!(b.get("BERTH_HOST_ID"), host_id, "recycled host expected");
    for what in [
        &["ps", "-aq"][..],
        &["images", "-q"],
        &["volume", "ls", "-q"],
    ] {
        let out = ok(run(b.docker().args(what)), "docker list");
        assert_eq!(stdout(&out).trim(), "", "docker {what:?} on the next lease");
    }
    assert!(!sleeping(escapee), "the escaped process {escapee} is gone");
    let bridges = stdout(&pool.ip_in_host(&host_id, &["-o", "link", "show", "type", "bridge"]));
    assert!(
        bridges.contains("docker0") && !bridges.contains("br-"),
        "only the new daemon's bridge: {bridges}"
    );
    ok(
        run(b.docker().args(["network", "create", "bth-net"])),
        "docker network create on the next lease",
    );
    assert_eq!(
        mounts_under(&data_root),
        Vec::<String>::new(),
        "no mount left on the machine"
    );
    // The old data root, immutable file and all, is deleted in the background.
    wait_for("the old data root deleted", Duration::from_secs(60), || {
        let old: Vec<String> = std::fs::read_dir(&host_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".old-"))
            .collect();
        old.is_empty().then_some(())
    });
    let image = busybox_image(&b, &scratch);
    let out = ok(
        run(b.docker().args(["run", "--rm", &image, "echo", "fresh"])),
        "docker run on the next lease",
    );
    assert_eq!(stdout(&out).trim(), "fresh");
    ok(pool.berth(&["release", "--lease", b.lease_id()]), "release");
}
