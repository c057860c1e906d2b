//! What operators see, against a real `berth up` pool: each agent's status
//! endpoint (/healthz, /readyz, /status, /metrics on HOST_ADDR:9102) and the
//! coordinator's ops endpoint (/metrics, /healthz), read while a host is
//! Ready, while it is Leased and after the lease is released (recycle mode,
//! so the same host is there to ask afterwards); every /metrics output
//! passes `promtool check metrics`. A gRPC client that is not berth's own
//! (Python grpcio) gets SERVING from the health service over TLS and the
//! berth services from reflection. And a finished lease's timeline has
//! every step, in order, also as `berth leases --show` prints it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_testkit::*;
use serde_json::Value;

/// GET `path` on `addr` (HTTP/1.0); (status code, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: berth\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line from {addr}{path}: {out:?}"));
    (code, body.to_owned())
}

fn status_json(addr: SocketAddr) -> Value {
    let (code, body) = get(addr, "/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

/// The value of the sample `name` (with its labels, exactly as exposed).
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no sample {name} in\n{metrics}"))
}

fn promtool_check(metrics: &str, what: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) is missing; run scripts/test.sh");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics failed for {what}:\n{}{}\n{metrics}",
        stdout(&o),
        stderr(&o)
    );
}

fn metrics(addr: SocketAddr, what: &str) -> String {
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{what}: {body}");
    promtool_check(&body, what);
    body
}

fn ops_addr(pool: &Pool) -> SocketAddr {
    let f = pool.state_dir.join("coordinator.ops.addr");
    wait_for("the ops address", Duration::from_secs(20), || {
        std::fs::read_to_string(&f).ok()?.trim().parse().ok()
    })
}

fn ops_preflight() {
    assert!(
        which_on_path("promtool"),
        "the ops tests need promtool (Debian's prometheus package); run scripts/test.sh"
    );
    let o = run(Command::new("python3").args(["-c", "import grpc, grpc_health.v1"]));
    assert!(
        o.status.success(),
        "the ops tests need Python's grpcio and grpcio-health-checking; run scripts/test.sh\n{}",
        stderr(&o)
    );
}

fn which_on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

#[test]
fn status_metrics_and_health_while_ready_leased_and_after_release() {
    if !preflight() {
        return;
    }
    ops_preflight();
    let pool = Pool::start("bop-", 1, &["--recycle"]);
    let ops = ops_addr(&pool);
    let host = pool.hosts().remove(0);
    let status: SocketAddr = format!("{}:9102", host.host_addr).parse().unwrap();
    assert!(
        pool.log().contains(&format!("status=http://{status}")),
        "berth up does not show the status endpoint:\n{}",
        pool.log()
    );
    assert!(
        pool.log()
            .contains(&format!("metrics at http://{ops}/metrics")),
        "berth up does not show the metrics endpoint:\n{}",
        pool.log()
    );

    // ---- Ready
    assert_eq!(get(status, "/healthz").0, 200);
    assert_eq!(get(status, "/readyz"), (200, "ready\n".into()));
    let s = status_json(status);
    assert_eq!(s["state"], "ready", "{s}");
    assert_eq!(s["host"]["host_id"], host.host_id.as_str());
    assert_eq!(s["host"]["host_addr"], host.host_addr.as_str());
    assert_eq!(s["host"]["provider"], "local");
    assert_eq!(s["host"]["agent_version"], host.agent_version.as_str());
    assert_eq!(s["host"]["docker_version"], host.docker_version.as_str());
    assert!(s["lease"].is_null(), "{s}");
    assert!(s["state_since"].is_string(), "{s}");
    assert!(s["resources"]["cpus"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["resources"]["memory_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["resources"]["disk_bytes"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["coordinator"]["connected"], true, "{s}");
    assert!(s["last_wipe"].is_null(), "{s}");
    let m = metrics(status, "agent, ready");
    assert_eq!(sample(&m, "berth_agent_state{state=\"ready\"}"), 1.0);
    assert_eq!(sample(&m, "berth_agent_state{state=\"leased\"}"), 0.0);
    assert_eq!(sample(&m, "berth_agent_leases_served_total"), 0.0);
    assert_eq!(sample(&m, "berth_agent_coordinator_connected"), 1.0);
    assert_eq!(sample(&m, "berth_agent_dockerd_up"), 1.0);
    assert_eq!(get(ops, "/healthz").0, 200);
    let c = metrics(ops, "coordinator, ready");
    assert_eq!(sample(&c, "berth_hosts{state=\"ready\"}"), 1.0);
    assert_eq!(sample(&c, "berth_hosts_connected"), 1.0);
    assert_eq!(sample(&c, "berth_leases_active"), 0.0);
    assert_eq!(sample(&c, "berth_queue_length"), 0.0);
    assert_eq!(sample(&c, "berth_agent_connects_total"), 1.0);
    assert_eq!(sample(&c, "berth_ec2_agents_verified_total"), 0.0);

    // A client that is not ours: health over TLS and reflection.
    let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/grpc_probe.py");
    let o = ok(
        run(Command::new("python3")
            .arg(&probe)
            .arg(format!("localhost:{}", pool.addr.port()))
            .arg(pool.ca_pem_path())),
        "python grpc probe",
    );
    let out = stdout(&o);
    for line in [
        "health (server) SERVING",
        "health berth.v1.LeaseService SERVING",
        "health berth.v1.AgentService SERVING",
        "health berth.v1.AdminService SERVING",
        "reflection berth.v1.LeaseService",
        "reflection berth.v1.AgentService",
        "reflection berth.v1.AdminService",
        "reflection grpc.health.v1.Health",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} missing:\n{out}");
    }

    // ---- Leased, with something to wipe afterwards.
    let lease = pool.acquire("ops-1", "30m", "1m");
    let ctx = pool.state_dir.join("ctx");
    busybox_context(&ctx, "ops\n");
    ok(
        run(lease.docker().args(["build", "-q", "-t", "app"]).arg(&ctx)),
        "docker build",
    );
    ok(run(lease.docker().args(["run", "-d", "app"])), "docker run");
    assert_eq!(get(status, "/readyz").0, 200);
    let s = status_json(status);
    assert_eq!(s["state"], "leased", "{s}");
    assert_eq!(s["lease"]["id"], lease.lease_id(), "{s}");
    assert!(s["lease"]["deadline"].is_string(), "{s}");
    assert_eq!(s["leases_served"], 1, "{s}");
    // Nothing on the endpoint opens the lease.
    let cert = std::fs::read_to_string(lease.cert_dir().join("cert.pem")).unwrap();
    let key = std::fs::read_to_string(lease.cert_dir().join("key.pem")).unwrap();
    for path in ["/status", "/metrics", "/healthz", "/readyz"] {
        let body = get(status, path).1;
        assert!(!body.contains("BEGIN"), "{path} shows PEM material");
        for pem in [&cert, &key] {
            let line = pem.lines().nth(1).unwrap();
            assert!(!body.contains(line), "{path} shows the lease's credentials");
        }
    }
    let m = metrics(status, "agent, leased");
    assert_eq!(sample(&m, "berth_agent_state{state=\"leased\"}"), 1.0);
    assert_eq!(sample(&m, "berth_agent_state{state=\"ready\"}"), 0.0);
    assert_eq!(sample(&m, "berth_agent_leases_served_total"), 1.0);
    let c = metrics(ops, "coordinator, leased");
    assert_eq!(sample(&c, "berth_leases_active"), 1.0);
    assert_eq!(sample(&c, "berth_hosts{state=\"leased\"}"), 1.0);
    assert_eq!(sample(&c, "berth_acquires_total{outcome=\"ok\"}"), 1.0);
    assert_eq!(sample(&c, "berth_queue_wait_seconds_count"), 1.0);
    assert_eq!(sample(&c, "berth_acquire_duration_seconds_count"), 1.0);

    // ---- Released: wiped, verified, Ready again (recycle).
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    let s = wait_for(
        "the host to be ready again",
        Duration::from_secs(60),
        || {
            let s = status_json(status);
            (s["state"] == "ready" && !s["last_wipe"].is_null()).then_some(s)
        },
    );
    assert!(s["lease"].is_null(), "{s}");
    assert_eq!(s["leases_served"], 1, "{s}");
    let w = &s["last_wipe"];
    assert_eq!(w["lease_id"], lease.lease_id(), "{s}");
    assert_eq!(w["verified"], true, "{s}");
    assert_eq!(w["left"], 0, "{s}");
    assert!(w["containers_removed"].as_u64().unwrap() >= 1, "{s}");
    assert!(w["images_removed"].as_u64().unwrap() >= 1, "{s}");
    assert!(w["duration_ms"].as_u64().is_some(), "{s}");
    assert_eq!(get(status, "/readyz").0, 200);
    let m = metrics(status, "agent, after release");
    assert_eq!(sample(&m, "berth_agent_state{state=\"ready\"}"), 1.0);
    assert_eq!(
        sample(&m, "berth_agent_wipes_total{outcome=\"verified\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "berth_agent_wipes_total{outcome=\"failed\"}"),
        0.0
    );
    assert_eq!(sample(&m, "berth_agent_wipe_duration_seconds_count"), 1.0);
    assert_eq!(sample(&m, "berth_agent_leases_served_total"), 1.0);
    let c = wait_for(
        "the coordinator to count the wipe",
        Duration::from_secs(20),
        || {
            let c = metrics(ops, "coordinator, after release");
            (sample(&c, "berth_wipes_total{outcome=\"verified\"}") == 1.0
                && sample(&c, "berth_hosts{state=\"ready\"}") == 1.0)
                .then_some(c)
        },
    );
    assert_eq!(sample(&c, "berth_leases_active"), 0.0);
    assert_eq!(sample(&c, "berth_leases{state=\"released\"}"), 1.0);
    assert_eq!(
        sample(&c, "berth_leases_ended_total{state=\"released\"}"),
        1.0
    );
    assert_eq!(sample(&c, "berth_lease_duration_seconds_count"), 1.0);

    // The admin API's summary agrees.
    let stats = pool.pool_stats();
    assert_eq!(stats.hosts_by_state.get("ready"), Some(&1), "{stats:?}");
    assert_eq!(stats.leases_by_state.get("released"), Some(&1), "{stats:?}");
    assert_eq!(stats.queue_length, 0);
}

#[test]
fn a_finished_lease_has_every_step_of_its_timeline_in_order() {
    if !preflight() {
        return;
    }
    let pool = Pool::start("btl-", 1, &[]);
    let lease = pool.acquire("timeline-1", "30m", "1m");
    ok(
        pool.berth(&["renew", "--lease", lease.lease_id(), "--ttl", "40m"]),
        "berth renew",
    );
    ok(
        pool.berth(&["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    let want = [
        pb::TimelineStep::Requested,
        pb::TimelineStep::Queued,
        pb::TimelineStep::Assigned,
        pb::TimelineStep::Ready,
        pb::TimelineStep::Renewed,
        pb::TimelineStep::Released,
        pb::TimelineStep::Wiped,
        pb::TimelineStep::HostTerminated,
    ];
    let l = wait_for("the host-terminated step", Duration::from_secs(60), || {
        let l = pool
            .all_leases()
            .into_iter()
            .find(|l| l.lease_id == lease.lease_id())?;
        (l.timeline.len() >= want.len()).then_some(l)
    });
    let steps: Vec<pb::TimelineStep> = l
        .timeline
        .iter()
        .map(|e| pb::TimelineStep::try_from(e.step).unwrap())
        .collect();
    assert_eq!(steps, want, "{:?}", l.timeline);
    let times: Vec<_> = l
        .timeline
        .iter()
        .map(|e| berth_proto::to_system_time(e.at.as_ref().unwrap()).unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "timestamps out of order: {:?}",
        l.timeline
    );
    assert_eq!(l.timeline[2].detail, l.host_id, "assigned names the host");
    assert!(
        l.timeline[6].detail.starts_with("verified"),
        "{:?}",
        l.timeline[6]
    );

    // The operator's view.
    let o = ok(
        pool.berth(&["leases", "--show", lease.lease_id()]),
        "berth leases --show",
    );
    let out = stdout(&o);
    let order: Vec<usize> = [
        "requested",
        "queued",
        "assigned",
        "ready",
        "renewed",
        "released",
        "wiped",
        "host-terminated",
    ]
    .iter()
    .map(|step| {
        out.lines()
            .position(|line| line.trim_start().starts_with(&format!("{step} ")))
            .unwrap_or_else(|| panic!("{step} missing from\n{out}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    // One structured log line per step.
    let log = pool.coordinator_log();
    let lines = log
        .lines()
        .filter(|l| l.contains("lease step") && l.contains(lease.lease_id()))
        .count();
    assert_eq!(lines, want.len(), "{log}");
}
