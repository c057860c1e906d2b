//! P1: how long `Acquire` takes when a Ready host is waiting, measured at
//! the CI client over loopback. The answer comes only after the real agent
//! accepted the lease (it opens its Docker front first), so the figure
//! covers coordinator -> agent -> coordinator -> client.
//!
//! Baseline: `grpc.health.v1.Health/Check` to the same coordinator over the
//! same HTTP/2 connection, one right before each acquire, so both see the
//! same machine at the same moment.

use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::procs::{Agent, Clients, Coordinator, Env};
use super::{BenchError, Figure, Result, Sizes, ms};

/// How often to look for a Ready host again between cycles (the released
/// host wipes and comes back in recycle mode).
const READY_POLL: Duration = Duration::from_millis(2);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Cycles run first and thrown away (connections, allocator, caches).
const WARMUP: usize = 5;

pub async fn run(sizes: &Sizes) -> Result<Vec<Figure>> {
    let env = Env::new(&format!("{}1-", sizes.prefix.trim_end_matches('-')))?;
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

    let mut acquire = vec![];
    let mut release = vec![];
    let mut bare = vec![];
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
        let lease = clients
            .acquire(&format!("p1-{i}"), Duration::from_secs(10))
            .await?;
        let a = t.elapsed();
        if lease.state != berth_proto::v1::LeaseState::Active as i32 {
            return Err(BenchError::step(
                "P1 acquire",
                format!("lease not active: {lease:?}"),
            ));
        }
        let t = Instant::now();
        clients.release(&lease.lease_id).await?;
        let r = t.elapsed();
        if i >= WARMUP {
            acquire.push(ms(a));
            bare.push(ms(b));
            release.push(ms(r));
        }
    }
    drop(agents);
    drop(coordinator);
    drop(env);

    let p1 = Figure::new(
        "P1",
        "Acquire latency, Ready host waiting, through the agent's acceptance (loopback)",
        "ms",
    )
    .samples(acquire)
    .baseline("unary gRPC round trip (Health/Check)", bare)
    .note(format!(
        "{} agents with real dockerds in --recycle mode; one HTTP/2 connection; {WARMUP} warm-up cycles dropped",
        sizes.p1_agents
    ));
    let s = p1.summary();
    let p1 = p1
        .check("p50 <= 1 ms", s.is_some_and(|s| s.median <= 1.0))
        .check("p99 <= 5 ms", s.is_some_and(|s| s.p99 <= 5.0));
    let rel = Figure::new(
        "P1 release",
        "Release latency (returns before the wipe)",
        "ms",
    )
    .samples(release);
    Ok(vec![p1, rel])
}
