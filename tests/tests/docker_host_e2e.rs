//! A leased host behaves like any Docker host, end to end on real dockerds
//! with the stock docker CLI:
//!
//! - networking: a container and a `RUN` step of a `docker build` fetch a
//!   file from a server beyond the host (on the machine's end of the host's
//!   link), through NAT (the server sees the host's address); no forwarding
//!   warning; published ports still answer at the host address; dockerd
//!   still listens on no TCP port; the machine's own iptables and
//!   `ip_forward` are exactly as before;
//! - the IMDS rule: a DROP for 169.254.169.254 in the host's DOCKER-USER
//!   chain; with a stand-in metadata server reachable from the host's
//!   namespace (a namespace of the test's own, linked to the host), the
//!   host itself reaches it and a container does not, until the rule is
//!   removed;
//! - the socket: a container started with `-v
//!   /var/run/docker.sock:/var/run/docker.sock` and a static docker CLI
//!   inside lists its own container on its own host's dockerd; nothing
//!   appears at the machine's `/var/run/docker.sock`, no mount of the host
//!   is visible on the machine, and nothing is left after the host ends;
//! - names: the host has no resolver beyond itself; dockerd and its
//!   containers read a `resolv.conf` naming the host's own address, where a
//!   lookup is refused at once (dockerd's error says so); the machine's
//!   `/etc/resolv.conf` is untouched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth_testkit::*;
use berth_tests::stock::{
    HttpServer, MachineNet, NetnsGuard, docker_cli_context, host_gateway, in_netns, token,
};

const FORWARDING_WARNING: &str = "IPv4 forwarding is disabled";

fn addr(host: &str, port: u16) -> SocketAddr {
    format!("{host}:{port}").parse().unwrap()
}

/// The app image of the test kit, plus a `RUN` step that fetches
/// `$UPSTREAM/build-step` into /fetched.
fn build_app_fetching(pool: &Pool, lease: &LeaseEnv, upstream: &str) -> String {
    let ctx = pool.state_dir.join("ctx-egress");
    busybox_context(&ctx, "served at the host address\n");
    let dockerfile = std::fs::read_to_string(ctx.join("Dockerfile")).unwrap();
    let dockerfile = dockerfile.replace(
        "COPY index.html",
        "ARG UPSTREAM\nRUN wget -q -O /fetched \"$UPSTREAM/build-step\"\nCOPY index.html",
    );
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let o = ok(
        run(lease
            .docker()
            .args(["build", "-t", "app", "--build-arg"])
            .arg(format!("UPSTREAM={upstream}"))
            .arg(&ctx)),
        "docker build with a RUN step that fetches from upstream",
    );
    format!("{}{}", stdout(&o), stderr(&o))
}

#[test]
fn containers_and_build_steps_reach_the_network_beyond_the_host_through_nat() {
    if !preflight() {
        return;
    }
    let machine_before = MachineNet::snapshot();
    let pool = Pool::start("bdh1-", 1, &[]);
    let lease = pool.acquire("ci-egress", "30m", "1m");
    let host_id = lease.get("BERTH_HOST_ID").to_owned();
    let host_addr: IpAddr = lease.host_addr().parse().unwrap();

    // "The internet" of this host: a server on the machine's end of its
    // link, where its default route points.
    let gateway = host_gateway(&host_id);
    let block = berth_agent::provider::netns::Block::new(
        &pool.prefix,
        berth_agent::provider::netns::block_of(&pool.prefix, &host_id).unwrap(),
    );
    assert_eq!(gateway, IpAddr::V4(block.gateway));
    let body = token("upstream");
    let upstream = HttpServer::start(None, SocketAddr::new(gateway, 0), &body);

    // dockerd manages the host's own tables and forwarding.
    let host_ns = Path::new("/run/netns").join(&host_id);
    let fwd = stdout(&ok(
        in_netns(&host_ns, "cat", &["/proc/sys/net/ipv4/ip_forward"]),
        "the host's ip_forward",
    ));
    assert_eq!(fwd.trim(), "1", "forwarding is off inside the host");
    let nat = stdout(&ok(
        in_netns(&host_ns, "iptables", &["-t", "nat", "-S", "POSTROUTING"]),
        "the host's NAT rules",
    ));
    assert!(
        nat.contains("MASQUERADE"),
        "no masquerading in the host's namespace:\n{nat}"
    );

    // A RUN step of a build fetches from upstream, without a warning.
    let build_out = build_app_fetching(&pool, &lease, &upstream.url());
    assert!(
        !build_out.contains(FORWARDING_WARNING),
        "the build warned:\n{build_out}"
    );
    let fetched = stdout(&ok(
        run(lease
            .docker()
            .args(["run", "--rm", "app", "cat", "/fetched"])),
        "reading what the build step fetched",
    ));
    assert_eq!(fetched, body);

    // A container fetches from upstream, and `docker run` prints no warning.
    let o = ok(
        run(lease.docker().args([
            "run",
            "--rm",
            "app",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("{}/container", upstream.url()),
        ])),
        "a container fetching from upstream",
    );
    assert_eq!(stdout(&o), body);
    assert!(
        !stderr(&o).contains(FORWARDING_WARNING),
        "docker run warned: {}",
        stderr(&o)
    );

    // Both came through NAT: upstream saw the host's address, not a
    // container's.
    let hits = upstream.hits();
    let paths: Vec<&str> = hits.iter().map(|h| h.path.as_str()).collect();
    assert_eq!(paths, ["/build-step", "/container"], "{hits:?}");
    assert!(
        hits.iter().all(|h| h.peer == host_addr),
        "upstream saw {hits:?}, expected every request from {host_addr}"
    );

    // Published ports still answer at the host address.
    ok(
        run(lease
            .docker()
            .args(["run", "-d", "-p", "8080:80", "--name", "web", "app"])),
        "docker run -p",
    );
    let page = wait_for("the published port", Duration::from_secs(20), || {
        http_get(addr(lease.host_addr(), 8080)).ok()
    });
    assert!(page.contains("served at the host address"), "{page}");

    // dockerd still listens on no TCP port (docker-proxy holds the
    // published one).
    let listeners = tcp_listeners_in_netns(&host_id);
    assert!(
        !listeners.iter().any(|l| l.contains("\"dockerd\"")),
        "dockerd listens on TCP: {listeners:#?}"
    );
    assert!(
        listeners.iter().any(|l| l.contains(":8080 ")),
        "the published port is not listed: {listeners:#?}"
    );

    // The machine's own tables and forwarding are untouched, during the
    // lease and after the pool is gone.
    assert_eq!(
        MachineNet::snapshot(),
        machine_before,
        "the machine's iptables or forwarding changed during the lease"
    );
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    drop(upstream);
    drop(pool);
    let machine_after = MachineNet::snapshot();
    assert_eq!(
        machine_after, machine_before,
        "the machine's iptables or forwarding changed"
    );
    eprintln!(
        "machine ip_forward before and after: {} / {}; tables compared: {:?}",
        machine_before.ip_forward(),
        machine_after.ip_forward(),
        machine_before
            .tables
            .iter()
            .map(|(t, rules)| format!("{t}: {} lines", rules.lines().count()))
            .collect::<Vec<_>>()
    );
}

#[test]
fn containers_cannot_reach_the_instance_metadata_address() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("bdh2-", 1, &[]);
    let lease = pool.acquire("ci-imds", "30m", "1m");
    let host_id = lease.get("BERTH_HOST_ID").to_owned();
    let host_ns = Path::new("/run/netns").join(&host_id);

    // The rule is in the host's DOCKER-USER chain, ahead of its RETURN.
    let rules = stdout(&ok(
        in_netns(&host_ns, "iptables", &["-S", "DOCKER-USER"]),
        "iptables -S DOCKER-USER in the host",
    ));
    let lines: Vec<&str> = rules.lines().collect();
    let drop_at = lines
        .iter()
        .position(|l| *l == "-A DOCKER-USER -d 169.254.169.254/32 -j DROP")
        .unwrap_or_else(|| panic!("no IMDS rule in DOCKER-USER:\n{rules}"));
    let return_at = lines
        .iter()
        .position(|l| *l == "-A DOCKER-USER -j RETURN")
        .unwrap_or_else(|| panic!("no RETURN in DOCKER-USER:\n{rules}"));
    assert!(drop_at < return_at, "{rules}");

    // A stand-in metadata service at 169.254.169.254:80, in a namespace
    // of the test's own linked to the host's namespace only: nothing on
    // the machine (nor the real link-local address) is involved.
    let imds = NetnsGuard::create(&format!("{}imds", test_prefix("bdh2x-")));
    ok(
        run(Command::new("ip").args([
            "link", "add", "bimds0", "netns", &host_id, "type", "veth", "peer", "name", "bimds1",
            "netns", &imds.name,
        ])),
        "a veth pair between the host and the stand-in",
    );
    imds.ip(&["addr", "add", "169.254.169.254/30", "dev", "bimds1"]);
    imds.ip(&["link", "set", "bimds1", "up"]);
    imds.ip(&["link", "set", "lo", "up"]);
    ok(
        pool.ip_in_host(
            &host_id,
            &["addr", "add", "169.254.169.253/30", "dev", "bimds0"],
        ),
        "the host's end of the stand-in's link",
    );
    ok(
        pool.ip_in_host(&host_id, &["link", "set", "bimds0", "up"]),
        "the host's end up",
    );
    let body = token("fake-imds");
    let server = HttpServer::start(
        Some(&imds.path()),
        "169.254.169.254:80".parse().unwrap(),
        &body,
    );

    // The host itself reaches it (on EC2 the agent needs IMDS)...
    let o = ok(
        in_netns(
            &host_ns,
            "curl",
            &["-sS", "--max-time", "5", "http://169.254.169.254/from-host"],
        ),
        "the host reaching the metadata stand-in",
    );
    assert_eq!(stdout(&o), body);

    // ... a container does not.
    let ctx = pool.state_dir.join("ctx-imds");
    busybox_context(&ctx, "imds\n");
    ok(
        run(lease.docker().args(["build", "-q", "-t", "app"]).arg(&ctx)),
        "docker build",
    );
    let probe = |path: &str| {
        run(lease.docker().args([
            "run",
            "--rm",
            "app",
            "sh",
            "-c",
            &format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 3 169.254.169.254 80"),
        ]))
    };
    let blocked = probe("/from-container");
    assert!(
        !stdout(&blocked).contains(&body),
        "a container reached the metadata address: {}",
        stdout(&blocked)
    );
    assert!(
        !blocked.status.success(),
        "nc succeeded: {}{}",
        stdout(&blocked),
        stderr(&blocked)
    );
    let paths: Vec<String> = server.hits().into_iter().map(|h| h.path).collect();
    assert_eq!(paths, ["/from-host"], "the stand-in saw {paths:?}");

    // The rule is what stops it: without it the same container gets through.
    ok(
        in_netns(
            &host_ns,
            "iptables",
            &[
                "-D",
                "DOCKER-USER",
                "-d",
                "169.254.169.254/32",
                "-j",
                "DROP",
            ],
        ),
        "removing the rule",
    );
    let open = ok(
        probe("/without-the-rule"),
        "a container once the rule is gone",
    );
    assert!(stdout(&open).contains(&body), "{}", stdout(&open));
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    drop(server);
}

/// The machine's /var/run/docker.sock: (file type, inode) if it exists.
fn machine_socket() -> Option<(String, u64)> {
    std::fs::symlink_metadata("/var/run/docker.sock")
        .ok()
        .map(|m| (format!("{:?}", m.file_type()), m.ino()))
}

#[test]
fn a_container_mounting_var_run_docker_sock_reaches_its_own_host() {
    if !preflight() {
        return;
    }
    let socket_before = machine_socket();
    eprintln!("/var/run/docker.sock on the machine before: {socket_before:?}");
    let pool = Pool::start("bdh3-", 1, &[]);
    let lease = pool.acquire("ci-socket", "30m", "1m");
    let host_id = lease.get("BERTH_HOST_ID").to_owned();

    let ctx = pool.state_dir.join("ctx-cli");
    docker_cli_context(&ctx, &[], "[\"docker\", \"version\"]");
    ok(
        run(lease.docker().args(["build", "-q", "-t", "cli"]).arg(&ctx)),
        "docker build of an image with the docker CLI",
    );

    let sock = "/var/run/docker.sock:/var/run/docker.sock";
    let inside = |name: &str, args: &[&str]| {
        ok(
            run(lease
                .docker()
                .args(["run", "--rm", "--name", name, "-v", sock, "cli"])
                .args(args)),
            &format!("docker {args:?} inside a container"),
        )
    };
    // It lists its own container (`-a`: dockerd marks a container running
    // only after its process has started, and this one asks at once)...
    let o = inside(
        "sock-probe",
        &["docker", "ps", "-a", "--format", "{{.Names}}"],
    );
    let names = stdout(&o);
    assert!(
        names.lines().any(|n| n == "sock-probe"),
        "the container does not see itself: stdout {names:?}, stderr {:?}",
        stderr(&o)
    );
    // ... on this host's dockerd, the one behind the lease's front.
    let id_inside = stdout(&inside(
        "sock-info",
        &["docker", "info", "--format", "{{.ID}}"],
    ));
    let id_front = stdout(&ok(
        run(lease.docker().args(["info", "--format", "{{.ID}}"])),
        "docker info through the front",
    ));
    assert_eq!(id_inside.trim(), id_front.trim());
    assert!(!id_front.trim().is_empty());
    let kind = stdout(&inside(
        "sock-stat",
        &["stat", "-c", "%F", "/var/run/docker.sock"],
    ));
    assert_eq!(kind.trim(), "socket");

    // From the machine's side the socket is where the agent keeps it, and
    // nothing appeared at the standard path.
    let host_socket = pool.docker_socket(&host_id);
    assert!(
        std::fs::symlink_metadata(&host_socket).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }),
        "{} is not a socket",
        host_socket.display()
    );
    assert_eq!(machine_socket(), socket_before);

    // dockerd runs in a mount namespace of its own: with a container
    // running, none of its mounts is on the machine.
    ok(
        run(lease.docker().args([
            "run", "-d", "--name", "sleeper", "-v", sock, "cli", "sleep", "300",
        ])),
        "a running container",
    );
    let pid = pool.dockerd_pid(&host_id).expect("the host's dockerd");
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        ns(&pid.to_string()),
        ns("self"),
        "dockerd shares the machine's mount namespace"
    );
    for dir in [&pool.state_dir, &pool.run_dir] {
        let mounts = mounts_under(dir);
        assert!(
            mounts.is_empty(),
            "mounts of the host on the machine: {mounts:#?}"
        );
    }

    // The host ends; nothing of it is left, and the standard path is as before.
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    wait_for("the old host to go", Duration::from_secs(60), || {
        (!host_socket.exists() && !pool.host_exists(&host_id)).then_some(())
    });
    let state_dir = pool.state_dir.clone();
    let run_dir = pool.run_dir.clone();
    drop(pool);
    for dir in [&state_dir, &run_dir] {
        let mounts = mounts_under(dir);
        assert!(mounts.is_empty(), "mounts left: {mounts:#?}");
        // The pool of a test that passed takes its files with it.
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    let left = processes_mentioning(&run_dir.to_string_lossy());
    assert!(left.is_empty(), "processes left: {left:#?}");
    assert_eq!(machine_socket(), socket_before);
}

/// The directives of a `resolv.conf` (comments and blank lines dropped).
fn resolver_lines(conf: &str) -> Vec<String> {
    conf.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_local_hosts_lookups_go_to_its_own_address_and_are_refused_there() {
    if !preflight() {
        return;
    }
    let machine_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let pool = Pool::start("bdh4-", 1, &[]);
    let lease = pool.acquire("ci-dns", "30m", "1m");
    let host_id = lease.get("BERTH_HOST_ID").to_owned();
    let host_addr = lease.host_addr().to_owned();
    let expected = [
        format!("nameserver {host_addr}"),
        "options timeout:1 attempts:1".to_owned(),
    ];

    // dockerd's own view of /etc/resolv.conf (its mount namespace's).
    let pid = pool.dockerd_pid(&host_id).expect("the host's dockerd");
    let dockerd_conf = std::fs::read_to_string(format!("/proc/{pid}/root/etc/resolv.conf"))
        .expect("dockerd's /etc/resolv.conf");
    assert_eq!(resolver_lines(&dockerd_conf), expected, "{dockerd_conf}");

    // A bridge container gets the same resolver.
    let ctx = pool.state_dir.join("ctx-dns");
    busybox_context(&ctx, "dns\n");
    ok(
        run(lease.docker().args(["build", "-q", "-t", "app"]).arg(&ctx)),
        "docker build",
    );
    let container_conf = stdout(&ok(
        run(lease
            .docker()
            .args(["run", "--rm", "app", "cat", "/etc/resolv.conf"])),
        "a container's resolv.conf",
    ));
    assert_eq!(
        resolver_lines(&container_conf),
        expected,
        "{container_conf}"
    );

    // dockerd's lookup of a name is asked of the host's own address and
    // refused there (nothing answers on port 53), not left to time out
    // against a resolver the host cannot reach.
    let o = run(lease
        .docker()
        .args(["pull", "berth-no-such-registry.invalid/app:1"]));
    assert!(
        !o.status.success(),
        "a pull from a name that cannot resolve"
    );
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "lookup berth-no-such-registry.invalid on {host_addr}:53"
        )) && err.contains("connection refused"),
        "the lookup was not refused at the host's address: {err}"
    );

    // The machine's own file is as it was.
    assert_eq!(
        std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        machine_conf,
        "the machine's /etc/resolv.conf changed"
    );
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    drop(pool);
    assert_eq!(
        std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        machine_conf
    );
}
