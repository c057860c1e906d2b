//! The AWS path end to end against moto's server and a fake IMDSv2: the
//! real `berth-coordinator --provider ec2` and `berth-agent --provider ec2`
//! (inside a test namespace that stands for the instance, its real dockerd
//! in there), the stock docker CLI, and moto as the EC2 API.
//!
//! - an in-service instance registers, serves a lease, and ends itself;
//!   meanwhile the orphan sweeper tags, then terminates, a pool instance
//!   that never registers, and leaves the leased one alone;
//! - a warm-pool instance bootstraps but never registers nor terminates,
//!   survives being stopped, and registers once in service;
//! - the coordinator refuses agents that are unknown, untagged, not running
//!   or at the wrong address;
//! - with EC2 unreachable, ending the instance falls back to power-off;
//! - an instance that served a lease and whose agent was killed is refused
//!   by the coordinator and terminated by its sweeper after a grace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use berth_aws::POOL_TAG;
/// The tag the coordinator's sweeper puts on an orphan: part of the documented
/// contract with operators (docs/aws.md), so the test spells it out.
const ORPHAN_TAG: &str = "berth:orphan";
use berth_proto::v1 as pb;
use berth_testkit::*;
use berth_tests::ec2::{Coordinator, Ec2World};

const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(90);

/// The JSON log lines of `c` with `message` about `instance`, as pass numbers.
fn passes(c: &Coordinator, message: &str, instance: &str) -> Vec<u64> {
    c.log_lines(message)
        .iter()
        .filter(|v| v["fields"]["instance_id"].as_str() == Some(instance))
        .filter_map(|v| v["fields"]["pass"].as_u64())
        .collect()
}

#[test]
fn in_service_instance_serves_a_lease_and_ends_itself_while_the_sweeper_ends_an_orphan() {
    if !preflight() {
        return;
    }
    let mut w = Ec2World::start("bec1-");
    let host = w.launch_host(Some("InService"));
    let orphan = w.launch(&[(POOL_TAG, &w.pool_name.clone())], false);
    let outsider = w.launch(&[(POOL_TAG, "some-other-pool")], false);
    let c = w.start_coordinator(&[
        "--sweep-interval",
        "1s",
        "--orphan-unregistered-after",
        "12s",
        "--orphan-gone-after",
        "12s",
    ]);
    let agent = w.start_agent(&c, &["--lifecycle-poll", "500ms"]);
    let addr = w.host_addr.to_string();
    assert_eq!(
        agent.ready,
        format!(
            "READY host_id={host} host_addr={addr} docker_host=tcp://{addr}:2376 status=http://{addr}:9102"
        )
    );
    w.wait_registered(&c, &host, REGISTER_TIMEOUT);
    assert_eq!(c.log_lines("agent verified with EC2").len(), 1);
    let listed = w.hosts(&c);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].provider, "ec2");
    assert_eq!(listed[0].host_addr, addr);

    // A lease on the instance's real dockerd, through the stock docker CLI.
    let lease = w.acquire(&c, "ci-ec2");
    assert_eq!(lease.get("BERTH_HOST_ID"), host);
    assert_eq!(lease.host_addr(), addr);
    let ctx = w.state_dir.join("ctx");
    busybox_context(&ctx, "hello from an ec2 host\n");
    ok(
        run(lease.docker().args(["build", "-q", "-t", "app"]).arg(&ctx)),
        "docker build",
    );
    ok(
        run(lease.docker().args(["run", "-d", "-p", "8080:80", "app"])),
        "docker run -p",
    );
    let page = wait_for("the published port", Duration::from_secs(20), || {
        http_get(SocketAddr::new(w.host_addr.into(), 8080)).ok()
    });
    assert!(page.contains("hello from an ec2 host"), "{page}");

    // Meanwhile the sweeper: the instance that never registers is tagged on
    // one pass and terminated on a later one.
    wait_for(
        "the orphan to be terminated",
        Duration::from_secs(60),
        || (w.state_of(&orphan) == "terminated").then_some(()),
    );
    let (_, orphan_tags, _) = w.instance(&orphan);
    assert!(orphan_tags.contains_key(ORPHAN_TAG), "{orphan_tags:?}");
    // The coordinator logs the termination once TerminateInstances has
    // answered, which can be just after moto shows the instance terminated.
    wait_for(
        "the sweeper to log the termination",
        Duration::from_secs(10),
        || (!passes(&c, "orphan sweep: terminated", &orphan).is_empty()).then_some(()),
    );
    let tagged = passes(&c, "orphan sweep: tagged", &orphan);
    let terminated = passes(&c, "orphan sweep: terminated", &orphan);
    assert_eq!(tagged.len(), 1, "tagged once: {tagged:?}");
    assert_eq!(terminated.len(), 1, "terminated once: {terminated:?}");
    assert!(
        terminated[0] > tagged[0],
        "tagged on pass {} but terminated on pass {}",
        tagged[0],
        terminated[0]
    );
    // The leased instance, older than the limit too, was never touched; nor
    // was another pool's instance.
    let (state, tags, private) = w.instance(&host);
    assert_eq!(
        (state.as_str(), private.as_str()),
        ("running", addr.as_str())
    );
    assert!(!tags.contains_key(ORPHAN_TAG), "{tags:?}");
    assert!(passes(&c, "orphan sweep", &host).is_empty());
    assert_eq!(w.state_of(&outsider), "running");
    assert!(!w.instance(&outsider).1.contains_key(ORPHAN_TAG));
    // A few more passes with the lease still on: still untouched.
    let seen = c.log_lines("orphan sweep: pass done").len();
    wait_for("three more sweeps", Duration::from_secs(30), || {
        (c.log_lines("orphan sweep: pass done").len() >= seen + 3).then_some(())
    });
    assert_eq!(w.state_of(&host), "running");

    // Release: wiped, and the agent ends its own instance through the API.
    ok(
        w.berth(&c, &["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    assert!(
        w.wait_child(&agent, EXIT_TIMEOUT),
        "the agent failed; log:\n{}",
        agent.log_text()
    );
    let released = stdout(&ok(
        w.berth(&c, &["get", "--lease", lease.lease_id()]),
        "berth get",
    ));
    assert!(released.contains("verified"), "{released}");
    wait_for(
        "the instance to be terminated",
        Duration::from_secs(30),
        || (w.state_of(&host) == "terminated").then_some(()),
    );
    assert!(
        agent.log_text().contains("TerminateInstances accepted"),
        "{}",
        agent.log_text()
    );
    assert!(
        !w.poweroff_marker().exists(),
        "powered off although TerminateInstances worked"
    );
    // The world of a test that passed takes its files with it.
    let dirs = [w.state_dir.clone(), w.run_dir.clone()];
    drop(agent);
    drop(w);
    for dir in &dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn warm_pool_instance_bootstraps_without_registering_survives_a_stop_and_registers_in_service() {
    if !preflight() {
        return;
    }
    let mut w = Ec2World::start("bec2-");
    let host = w.launch_host(Some("Warmed:Pending"));
    let c = w.start_coordinator(&["--sweep-interval", "0s"]);

    // Boot into the warm pool: dockerd up and self-checked (READY), but no
    // registration, while the lifecycle keeps being read.
    let agent = w.start_agent(&c, &["--lifecycle-poll", "200ms"]);
    assert!(agent.ready.starts_with(&format!("READY host_id={host} ")));
    let socket = w
        .run_dir
        .join(format!("{}{host}", w.prefix))
        .join("docker.sock");
    let version = ok(
        run(std::process::Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args(["version", "--format", "{{.Server.Version}}"])),
        "docker version on the warm instance's dockerd",
    );
    assert!(!stdout(&version).trim().is_empty());
    let polled = w.imds.hits("lifecycle");
    wait_for("more lifecycle reads", Duration::from_secs(20), || {
        (w.imds.hits("lifecycle") >= polled + 5).then_some(())
    });
    w.imds.set_lifecycle(Some("Warmed:Stopped"));
    let polled = w.imds.hits("lifecycle");
    wait_for(
        "lifecycle reads of Warmed:Stopped",
        Duration::from_secs(20),
        || (w.imds.hits("lifecycle") >= polled + 3).then_some(()),
    );
    assert!(w.hosts(&c).is_empty(), "a warming instance registered");
    assert!(c.log_lines("agent verified").is_empty());

    // Auto Scaling stops the instance into the pool: SIGTERM. Not a lease
    // end: the agent stops its dockerd and leaves the instance alone.
    assert!(
        w.stop_child(&agent, EXIT_TIMEOUT),
        "the agent failed; log:\n{}",
        agent.log_text()
    );
    assert!(!socket.exists(), "dockerd's socket left after the stop");
    assert_eq!(
        w.state_of(&host),
        "running",
        "the warm instance was terminated"
    );
    assert!(
        !w.poweroff_marker().exists(),
        "the warm instance was powered off"
    );
    assert!(w.hosts(&c).is_empty());
    assert!(!agent.log_text().contains("TerminateInstances"));

    // Started again, still warm at first; then Auto Scaling puts it in
    // service and the same agent registers.
    w.imds.set_lifecycle(Some("Warmed:Pending"));
    let agent = w.start_agent(&c, &["--lifecycle-poll", "200ms"]);
    let polled = w.imds.hits("lifecycle");
    wait_for("lifecycle reads", Duration::from_secs(20), || {
        (w.imds.hits("lifecycle") >= polled + 3).then_some(())
    });
    assert!(w.hosts(&c).is_empty(), "a warming instance registered");
    w.imds.set_lifecycle(Some("InService"));
    w.wait_registered(&c, &host, REGISTER_TIMEOUT);

    // An in-service host that never had a lease also survives a stop.
    assert!(w.stop_child(&agent, EXIT_TIMEOUT), "{}", agent.log_text());
    assert_eq!(w.state_of(&host), "running");
    assert!(!w.poweroff_marker().exists());
}

#[test]
fn coordinator_refuses_unknown_untagged_stopped_and_misaddressed_instances() {
    if !preflight() {
        return;
    }
    let mut w = Ec2World::start("bec3-");
    let pool = w.pool_name.clone();
    let untagged = w.launch(&[("Name", "not-berth")], true);
    let other_pool = w.launch(&[(POOL_TAG, "another-pool")], false);
    let stopped = w.launch(&[(POOL_TAG, &pool)], false);
    w.stop_instance(&stopped);
    // An address in the subnet that is neither the namespace's nor the
    // gateway's (the fake agent connects from the gateway address).
    let spare = w.spare_addr();
    let elsewhere = w.launch_at(&[(POOL_TAG, &pool)], Some(spare));
    let (_, _, elsewhere_ip) = w.instance(&elsewhere);
    assert_eq!(elsewhere_ip, spare.to_string());
    let (_, _, untagged_ip) = w.instance(&untagged);
    let (_, _, stopped_ip) = w.instance(&stopped);
    let (_, _, other_ip) = w.instance(&other_pool);
    let c = w.start_coordinator(&["--sweep-interval", "0s"]);
    // A fake agent speaking the real protocol from the test (the gateway
    // address, which no instance owns).
    let cases = [
        (
            "i-0123456789abcdef0",
            "10.9.9.9".to_owned(),
            "is unknown to EC2",
        ),
        (
            untagged.as_str(),
            untagged_ip,
            "does not carry the pool tag",
        ),
        (other_pool.as_str(), other_ip, "does not carry the pool tag"),
        (stopped.as_str(), stopped_ip, "is stopped, not running"),
        (
            elsewhere.as_str(),
            elsewhere_ip.clone(),
            "but the agent connects from",
        ),
        (
            "local-host-1",
            "10.9.9.9".to_owned(),
            "not an EC2 instance id",
        ),
    ];
    for (id, addr, why) in &cases {
        let status =
            w.rt.block_on(register(&c, &w.state_dir.join("join-token"), id, addr))
                .expect_err("the coordinator admitted an agent it should refuse");
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{id}: {status:?}"
        );
        assert!(status.message().contains(why), "{id}: {}", status.message());
        assert!(
            c.log_lines("agent refused")
                .iter()
                .any(|v| v["fields"]["host_id"].as_str() == Some(id)),
            "no log line for refusing {id}"
        );
    }
    // Refused agents are never offered to builds.
    assert!(w.hosts(&c).is_empty());
    let o = w.berth(&c, &["acquire", "--build", "b", "--wait", "0s"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    // With EC2 unreachable there is no verdict: UNAVAILABLE, to retry.
    w.moto.stop();
    let status =
        w.rt.block_on(register(
            &c,
            &w.state_dir.join("join-token"),
            &elsewhere,
            &elsewhere_ip,
        ))
        .expect_err("admitted without EC2");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

/// Connects to `c` as an agent (with the pool join token in the file
/// `join_token`) and registers as `host_id` at `host_addr`.
async fn register(
    c: &Coordinator,
    join_token: &std::path::Path,
    host_id: &str,
    host_addr: &str,
) -> Result<(), tonic::Status> {
    use berth_proto::v1::agent_service_client::AgentServiceClient;
    let mut client = AgentServiceClient::new(berth_tests::ec2::channel(c).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            host_id: host_id.into(),
            host_addr: host_addr.into(),
            docker_host: format!("tcp://{host_addr}:2376"),
            provider: "ec2".into(),
            state: pb::HostState::Ready as i32,
            csr_pem: berth_tls::KeyAndCsr::generate(host_id).unwrap().csr_pem,
            ..pb::Register::default()
        })),
    })
    .await
    .unwrap();
    let response = client
        .connect(berth_testkit::with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            std::fs::read_to_string(join_token).unwrap().trim(),
        ))
        .await?;
    let mut inbound = response.into_inner();
    // Admitted: the first answer is Registered.
    let first = inbound.message().await?;
    drop(tx);
    match first.and_then(|m| m.msg) {
        Some(pb::coordinator_message::Msg::Registered(_)) => Ok(()),
        other => panic!("unexpected first message {other:?}"),
    }
}

/// [`register`] from inside the world's namespace: the stream comes from
/// the instance's own address, as its agent's would.
fn register_from_instance(
    w: &Ec2World,
    c: &Coordinator,
    host_id: &str,
) -> Result<(), tonic::Status> {
    let netns = std::fs::File::open(&w.netns_path).unwrap();
    let (join_token, host_id, host_addr) = (
        w.state_dir.join("join-token"),
        host_id.to_owned(),
        w.host_addr.to_string(),
    );
    let c = Coordinator {
        addr: c.addr,
        log: c.log.clone(),
        ca_pem: c.ca_pem.clone(),
    };
    std::thread::spawn(move || {
        // Only this thread moves; its sockets are made in the namespace.
        nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(register(&c, &join_token, &host_id, &host_addr))
    })
    .join()
    .unwrap()
}

#[test]
fn a_used_instance_is_refused_by_the_coordinator_and_terminated_by_its_sweeper() {
    if !preflight() {
        return;
    }
    let mut w = Ec2World::start("bec6-");
    let host = w.launch_host(Some("InService"));
    let c = w.start_coordinator(&["--sweep-interval", "1s", "--burned-grace", "10s"]);
    let agent = w.start_agent(&c, &["--lifecycle-poll", "500ms"]);
    w.wait_registered(&c, &host, REGISTER_TIMEOUT);
    let lease = w.acquire(&c, "ci-burned");
    ok(
        run(lease.docker().args(["volume", "create", "left-behind"])),
        "volume create",
    );
    // The build kills its agent: nothing on the instance will end it now.
    w.kill_child(&agent);
    ok(
        w.berth(&c, &["release", "--lease", lease.lease_id()]),
        "release",
    );

    // The instance is running, in the pool, at its own address, and the
    // join token is on it: all EC2 checks pass, and still its id does not
    // come back as a fresh host.
    assert_eq!(w.state_of(&host), "running");
    let refused = register_from_instance(&w, &c, &host)
        .expect_err("the coordinator admitted a used instance");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("has held a lease"),
        "{}",
        refused.message()
    );
    assert!(
        w.hosts(&c)
            .iter()
            .all(|h| h.host_id != host || h.state != pb::HostState::Ready as i32)
    );

    // The coordinator is the backstop: its sweeper terminates the instance
    // once the grace after the lease's end has passed.
    wait_for(
        "the coordinator to terminate the used instance",
        Duration::from_secs(60),
        || (w.state_of(&host) == "terminated").then_some(()),
    );
    // Logged once TerminateInstances has answered, which can be just after
    // moto shows the instance terminated; later passes leave it alone.
    wait_for(
        "the sweeper to log the termination",
        Duration::from_secs(10),
        || (!passes(&c, "terminated a burned instance", &host).is_empty()).then_some(()),
    );
    let seen = c.log_lines("orphan sweep: pass done").len();
    wait_for("two more sweeps", Duration::from_secs(30), || {
        (c.log_lines("orphan sweep: pass done").len() >= seen + 2).then_some(())
    });
    assert_eq!(
        passes(&c, "terminated a burned instance", &host).len(),
        1,
        "one termination, logged"
    );
}

#[test]
fn terminate_falls_back_to_power_off_when_ec2_is_unreachable() {
    if !preflight() {
        return;
    }
    let mut w = Ec2World::start("bec4-");
    let host = w.launch_host(None);
    let c = w.start_coordinator(&["--sweep-interval", "0s"]);
    let agent = w.start_agent(&c, &[]);
    // Not in an Auto Scaling group (no lifecycle in IMDS): in service.
    w.wait_registered(&c, &host, REGISTER_TIMEOUT);
    let lease = w.acquire(&c, "ci-fallback");
    ok(
        run(lease.docker().args(["volume", "create", "vol1"])),
        "docker volume create",
    );
    // EC2 goes away; the lease ends; TerminateInstances keeps failing.
    w.moto.stop();
    ok(
        w.berth(&c, &["release", "--lease", lease.lease_id()]),
        "berth release",
    );
    assert!(
        w.wait_child(&agent, EXIT_TIMEOUT),
        "the agent failed; log:\n{}",
        agent.log_text()
    );
    let marker = std::fs::read_to_string(w.poweroff_marker()).unwrap_or_else(|_| {
        panic!(
            "the power-off fallback did not run; log:\n{}",
            agent.log_text()
        )
    });
    assert_eq!(marker.trim(), "now");
    let log = agent.log_text();
    assert!(
        log.contains("TerminateInstances failed; powering off instead"),
        "{log}"
    );
    assert!(log.contains("power-off requested"), "{log}");
}

/// A build killed the agent of its EC2 host mid-lease (or the agent died:
/// a panic, the watchdog, OOM); systemd restarts it. The restarted agent
/// finds that its host held a lease and terminates the instance before its
/// dockerd even starts: the previous build's images (a poisoned base image
/// under a well-known name) and `--restart=always` containers are never
/// offered to anyone.
#[test]
fn an_agent_killed_mid_lease_and_restarted_terminates_its_instance_and_is_never_ready() {
    if !preflight() {
        return;
    }
    let mut w = Ec2World::start("bec5-");
    let host = w.launch_host(Some("InService"));
    let c = w.start_coordinator(&[]);
    let agent = w.start_agent(&c, &["--lifecycle-poll", "500ms"]);
    w.wait_registered(&c, &host, REGISTER_TIMEOUT);
    let lease = w.acquire(&c, "ci-hostile");
    // What a hostile build leaves for the next one: an image under a name
    // the next build would use, and a container that restarts forever.
    let ctx = w.state_dir.join("poison");
    busybox_context(&ctx, "poisoned\n");
    ok(
        run(lease
            .docker()
            .args(["build", "-q", "-t", "alpine:latest"])
            .arg(&ctx)),
        "docker build",
    );
    ok(
        run(lease.docker().args([
            "run",
            "-d",
            "--restart=always",
            "alpine:latest",
            "sleep",
            "3600",
        ])),
        "docker run --restart=always",
    );
    w.kill_child(&agent);
    assert_eq!(w.state_of(&host), "running");

    // The supervisor starts the agent again, as systemd's Restart=always does.
    let again = w.spawn_agent(&c, &["--lifecycle-poll", "500ms"]);
    assert!(
        again.ready.is_empty(),
        "the restarted agent offered a used host: {}",
        again.ready
    );
    assert!(
        !w.wait_child(&again, EXIT_TIMEOUT),
        "the restarted agent should fail: its host is not fresh"
    );
    let log = again.log_text();
    assert!(log.contains("has held a lease"), "{log}");
    assert!(!log.contains("host ready"), "{log}");
    wait_for(
        "the used instance to be terminated",
        Duration::from_secs(30),
        || (w.state_of(&host) == "terminated").then_some(()),
    );
    // It never came back as Ready: the coordinator heard of it once.
    assert_eq!(
        c.log_lines("agent registered")
            .iter()
            .filter(|v| v["fields"]["host_id"].as_str() == Some(host.as_str()))
            .count(),
        1
    );
}
