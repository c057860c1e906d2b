//! P1: how long `Acquire` takes when a Ready host is waiting, measured at
//! the CI client over loopback. The answer goes out once the host's
//! assignment is durable in the coordinator's store; the real agent gets the
//! lease at the same time and its front holds a connection that arrives
//! first. A second figure is what the build sees: the Acquire answer plus a
//! new mutual-TLS connection to the host's front and dockerd's `/_ping`
//! answered through it (the lease's certificate admitted).
//!
//! Baseline: `grpc.health.v1.Health/Check` to the same coordinator over the
//! same HTTP/2 connection, one right before each acquire, so both see the
//! same machine at the same moment. A second figure compares the acquire
//! with its floor when every answer is durable: that round trip plus one
//! commit of the coordinator's own store (`RedbStore`, a lease-sized
//! record, fsync'd) in a file beside the coordinator's, timed in the same
//! cycle.
//!
//! With `--p1-hosts-in-memory` the hosts' directories (data roots, agent
//! state files) are on tmpfs: the store's disk then carries only the
//! coordinator's and the probe's writes, as when the hosts are other
//! machines; the figures say so in their names.

use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use berth_coordinator::store::{LeaseRecord, LeaseStore, RedbStore, TimelineRecord};

use super::procs::{Agent, Clients, Coordinator, Env, shared_key};
use super::tls_front::Target;
use super::{BenchError, Figure, Result, Sizes, ms};

/// How often to look for a Ready host again between cycles (the released
/// host wipes and comes back in recycle mode).
const READY_POLL: Duration = Duration::from_millis(2);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Cycles run first and thrown away (connections, allocator, caches).
const WARMUP: usize = 5;

pub async fn run(sizes: &Sizes) -> Result<Vec<Figure>> {
    let env = Env::new(&format!("{}1-", sizes.prefix.trim_end_matches('-')))?;
    let env = if sizes.p1_hosts_in_memory {
        env.hosts_in_memory()?
    } else {
        env
    };
    let named = |n: &str| {
        if sizes.p1_hosts_in_memory {
            format!("{n} (hosts in memory)")
        } else {
            n.to_owned()
        }
    };
    // The agents recycle their hosts: one pool serves every round.
    let coordinator = Coordinator::start(&env, "coordinator", &["--recycle".into()])?;
    let mut agents = vec![];
    for i in 0..sizes.p1_agents {
        agents.push(Agent::spawn(
            &env,
            &coordinator,
            true,
            &format!("agent-{i}"),
        )?);
    }
    for a in &mut agents {
        a.wait_ready().await?;
    }
    let ch = coordinator.channel().await?;
    let mut clients = Clients::new(ch.clone(), &coordinator.token);
    let mut health = HealthClient::new(ch);
    clients
        .wait_ready_hosts(sizes.p1_agents, Duration::from_millis(20), READY_TIMEOUT)
        .await?;

    // A store of its own on the coordinator's disk: one commit per cycle.
    let probe_dir = env.state_dir.join("commit-probe");
    std::fs::create_dir_all(&probe_dir)
        .map_err(BenchError::io(format!("creating {}", probe_dir.display())))?;
    let probe = RedbStore::open(&probe_dir)
        .map_err(|e| BenchError::step("opening the commit probe's store", e))?;

    let mut acquire = vec![];
    let mut usable = vec![];
    let mut release = vec![];
    let mut bare = vec![];
    let mut floor = vec![];
    for i in 0..WARMUP + sizes.p1_cycles {
        clients
            .wait_ready_hosts(1, READY_POLL, READY_TIMEOUT)
            .await?;
        let t = Instant::now();
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(BenchError::grpc("Health/Check"))?;
        let b = t.elapsed();
        let t = Instant::now();
        let answer = clients
            .acquire_answer(&format!("p1-{i}"), Duration::from_secs(10))
            .await?;
        let a = t.elapsed();
        let lease = answer.lease.clone().unwrap_or_default();
        if !berth_testkit::holds_host(lease.state) {
            return Err(BenchError::step(
                "P1 acquire",
                format!("lease does not hold its host: {lease:?}"),
            ));
        }
        first_ping(&answer).await?;
        let u = t.elapsed();
        // A new record per cycle, as an acquire adds one: the probe's tree
        // grows like the coordinator's.
        let record = probe_record(&lease);
        let committing = Instant::now();
        probe
            .commit(std::slice::from_ref(&record), &[], &[])
            .map_err(|e| BenchError::step("the commit probe's commit", e))?;
        let c = committing.elapsed();
        let t = Instant::now();
        clients.release(&lease.lease_id).await?;
        let r = t.elapsed();
        if i >= WARMUP {
            acquire.push(ms(a));
            usable.push(ms(u));
            bare.push(ms(b));
            floor.push(ms(b + c));
            release.push(ms(r));
        }
    }
    drop(probe);
    drop(agents);
    drop(coordinator);
    drop(env);

    let p1 = Figure::new(
        named("P1"),
        "Acquire latency, Ready host waiting, answered once the assignment is durable (loopback)",
        "ms",
    )
    .samples(acquire.clone())
    .baseline("unary gRPC round trip (Health/Check)", bare.clone())
    .note(format!(
        "{} agents with real dockerds in --recycle mode; one HTTP/2 connection; {WARMUP} warm-up cycles dropped",
        sizes.p1_agents
    ))
    .note(if sizes.p1_hosts_in_memory {
        "hosts' directories (data roots, agent state files) on tmpfs: no host writes to the store's disk (the agents' and the coordinator's logs still do), as when the hosts are other machines"
    } else {
        "hosts' directories on the same disk as the coordinator's store"
    });
    let s = p1.summary();
    let ratio = p1.ratio();
    let p1 = p1
        .check(
            "median <= 2x the bare round trip",
            ratio.is_some_and(|r| r <= 2.0),
        )
        .check("p99 <= 3 ms", s.is_some_and(|s| s.p99 <= 3.0));
    let first = Figure::new(
        named("P1 usable"),
        "Acquire, then the lease's first docker call: a new mutual-TLS connection to the host's front and /_ping answered by dockerd",
        "ms",
    )
    .samples(usable)
    .baseline("unary gRPC round trip (Health/Check)", bare)
    .note("what a build waits for before its first docker command; includes a TLS handshake with client certificate to the front");
    let rel = Figure::new(
        named("P1 release"),
        "Release latency (returns before the wipe)",
        "ms",
    )
    .samples(release);
    let durable = Figure::new(
        named("P1 vs one commit"),
        "Acquire latency (as P1) against its floor when every answer is durable",
        "ms",
    )
    .samples(acquire)
    .baseline(
        "unary round trip + one fsync'd commit of the coordinator's store, same cycle",
        floor,
    )
    .note("the commit: a lease record into a RedbStore of its own beside the coordinator's, on the same disk");
    Ok(vec![p1, durable, first, rel])
}

/// A record shaped like the one the coordinator writes for `lease`.
fn probe_record(lease: &berth_proto::v1::Lease) -> LeaseRecord {
    LeaseRecord {
        id: format!("probe-{}", lease.lease_id),
        build_id: lease.build_id.clone(),
        tenant: "bench".into(),
        state: "active".into(),
        host_id: lease.host_id.clone(),
        host_addr: lease.host_addr.clone(),
        docker_host: lease.docker_host.clone(),
        ttl_ns: 600_000_000_000,
        deadline_ns: Some(1),
        created_ns: 1,
        message: String::new(),
        wipe: None,
        timeline: ["queued", "assigned"]
            .map(|step| TimelineRecord {
                step: step.into(),
                at_ns: 1,
                detail: String::new(),
            })
            .into(),
        key: "0".repeat(64),
        key_locked: false,
    }
}

/// One `/_ping` through the lease's front, on a new mutual-TLS connection
/// with the certificate from `answer`; fails unless dockerd answers OK.
async fn first_ping(answer: &berth_proto::v1::AcquireResponse) -> Result<()> {
    let lease = answer.lease.clone().unwrap_or_default();
    let addr = berth_testkit::front_addr(&lease.docker_host).ok_or_else(|| {
        BenchError::step("P1 front address", format!("bad {}", lease.docker_host))
    })?;
    let config = berth_tls::lease_client_config(
        &answer.ca_pem,
        &answer.client_cert_pem,
        &shared_key().key_pem,
    )
    .map_err(|e| BenchError::step("P1 client TLS", e))?;
    let target = Target::Tls { addr, config };
    let reply = async { target.connect().await?.get("GET", "/_ping").await }
        .await
        .map_err(BenchError::io("P1 first /_ping through the front"))?;
    if reply.status != 200 || reply.head != b"OK" {
        return Err(BenchError::step(
            "P1 first /_ping",
            format!("unexpected answer: {reply:?}"),
        ));
    }
    Ok(())
}
