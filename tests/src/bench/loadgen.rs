//! P2's simulated agents: thousands of `AgentService.Connect` streams that
//! speak the real protocol (Register first, heartbeats at the interval the
//! coordinator gives, `StateChanged` + `LeaseAccepted` on an assignment,
//! `StateChanged(Wiping)` + `WipeReport` + `StateChanged(Ready)` when a lease
//! ends, as an agent in `--recycle` mode does after an empty wipe),
//! multiplexed over a configurable number of HTTP/2 connections.
//!
//! Credentials as a real agent's: each connection is TLS trusting the pool
//! CA, each stream carries the pool join token (`authorization: Bearer`),
//! and each `Register` carries a CSR, which the coordinator signs into the
//! host's server certificate. The simulated agents share one key and CSR
//! ([`super::procs::shared_csr`]): a key pair per agent would cost the load
//! generator, not the coordinator, which signs one certificate per
//! registration either way.
//!
//! A benchmark tool, not a product mode: it lives with the benchmarks and
//! answers instantly, so what is measured is the coordinator.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_proto::v1::agent_message::Msg;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::coordinator_message::Msg as In;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::procs::{Coordinator, shared_csr};
use super::{BenchError, Result};

/// Connections opened at once while ramping up.
const CONNECT_CONCURRENCY: usize = 100;
/// Buffer of each simulated agent's request stream.
const STREAM_BUFFER: usize = 8;
/// Bound on a stream getting its `Registered`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on one connection's TCP connect and TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the simulated agents have seen, shared with the benchmark.
#[derive(Debug, Default)]
pub struct Counters {
    pub registered: AtomicUsize,
    pub heartbeats: AtomicU64,
    pub assigned: AtomicU64,
    pub ended: AtomicU64,
    /// Streams that failed or were closed by the coordinator.
    pub failed: AtomicUsize,
}

/// The running agents; [`LoadGen::stop`] closes every stream.
#[derive(Debug)]
pub struct LoadGen {
    pub counters: Arc<Counters>,
    pub agents: usize,
    pub connections: usize,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

/// One simulated host's identity.
fn register(prefix: &str, i: usize) -> pb::Register {
    let addr = format!("198.18.{}.{}", (i / 250) % 256, 2 + i % 250);
    pb::Register {
        host_id: format!("{prefix}sim{i:05}"),
        host_addr: addr.clone(),
        docker_host: format!("tcp://{addr}:2376"),
        provider: "bench".into(),
        instance_type: String::new(),
        zone: String::new(),
        resources: Some(pb::Resources {
            cpus: 2,
            memory_bytes: 4 << 30,
            disk_bytes: 100 << 30,
            disk_free_bytes: 90 << 30,
        }),
        agent_version: "bench".into(),
        docker_version: "20.10.24".into(),
        state: pb::HostState::Ready as i32,
        lease_id: String::new(),
        lease_deadline: None,
        csr_pem: shared_csr().to_owned(),
        lease_key_sha256: Vec::new(),
    }
}

impl LoadGen {
    /// Opens `agents` streams, `per_conn` per HTTP/2 (TLS) connection, and
    /// waits until every one is registered.
    pub async fn start(
        coordinator: &Coordinator,
        prefix: &str,
        join_token: &str,
        agents: usize,
        per_conn: usize,
    ) -> Result<Self> {
        let per_conn = per_conn.max(1);
        let connections = agents.div_ceil(per_conn);
        let endpoint = coordinator.endpoint()?.connect_timeout(CONNECT_TIMEOUT);
        let join_token: Arc<str> = join_token.into();
        let mut channels: Vec<Channel> = Vec::with_capacity(connections);
        let mut pending = JoinSet::new();
        let mut next = 0;
        while channels.len() < connections {
            while next < connections && pending.len() < CONNECT_CONCURRENCY {
                let e = endpoint.clone();
                pending.spawn(async move { e.connect().await });
                next += 1;
            }
            match pending.join_next().await {
                Some(Ok(Ok(ch))) => channels.push(ch),
                Some(Ok(Err(e))) => return Err(e.into()),
                Some(Err(e)) => return Err(BenchError::step("connecting", e)),
                None => break,
            }
        }
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for i in 0..agents {
            let client = AgentServiceClient::new(channels[i / per_conn].clone());
            let reg = register(prefix, i);
            tasks.spawn(agent(
                client,
                reg,
                join_token.clone(),
                i,
                counters.clone(),
                stop.clone(),
            ));
        }
        let lg = LoadGen {
            counters,
            agents,
            connections,
            stop,
            tasks,
        };
        let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        loop {
            let r = lg.counters.registered.load(Ordering::Relaxed);
            let f = lg.counters.failed.load(Ordering::Relaxed);
            if r >= agents {
                return Ok(lg);
            }
            if f > 0 {
                return Err(BenchError::step(
                    "simulated agents",
                    format!("{f} streams failed while registering ({r} registered)"),
                ));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: format!("{agents} simulated agents to register ({r} did)"),
                    timeout: REGISTER_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes every stream and waits for the tasks.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn send(tx: &mpsc::Sender<pb::AgentMessage>, m: Msg) -> bool {
    tx.send(pb::AgentMessage { msg: Some(m) }).await.is_ok()
}

fn state(s: pb::HostState, lease_id: &str) -> Msg {
    Msg::StateChanged(pb::StateChanged {
        state: s as i32,
        lease_id: lease_id.to_owned(),
        reason: String::new(),
    })
}

/// One simulated agent for its whole life.
async fn agent(
    mut client: AgentServiceClient<Channel>,
    reg: pb::Register,
    join_token: Arc<str>,
    index: usize,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let _ = tx.try_send(pb::AgentMessage {
        msg: Some(Msg::Register(reg)),
    });
    let fail = || {
        counters.failed.fetch_add(1, Ordering::Relaxed);
    };
    let mut inbound = tokio::select! {
        () = stop.cancelled() => return,
        r = client.connect(berth_testkit::with_token(ReceiverStream::new(rx), &join_token)) => match r {
            Ok(r) => r.into_inner(),
            Err(_) => return fail(),
        },
    };
    let interval = match tokio::time::timeout(REGISTER_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::CoordinatorMessage {
            msg: Some(In::Registered(r)),
        }))) => Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(100))),
        _ => return fail(),
    };
    counters.registered.fetch_add(1, Ordering::Relaxed);
    // Spread the heartbeats over the interval, as independent hosts would.
    let phase = interval.mul_f64((index % 997) as f64 / 997.0);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lease = String::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {
                let s = if lease.is_empty() { pb::HostState::Ready } else { pb::HostState::Leased };
                let hb = Msg::Heartbeat(pb::Heartbeat {
                    state: s as i32,
                    lease_id: lease.clone(),
                    cpu_percent: 1.0,
                    memory_used_bytes: 1 << 30,
                    disk_free_bytes: 90 << 30,
                });
                if !send(&tx, hb).await { return fail() }
                counters.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            m = inbound.message() => match m {
                Ok(Some(pb::CoordinatorMessage { msg: Some(In::AssignLease(a)) })) => {
                    counters.assigned.fetch_add(1, Ordering::Relaxed);
                    lease = a.lease_id.clone();
                    if !send(&tx, state(pb::HostState::Leased, &lease)).await
                        || !send(&tx, Msg::LeaseAccepted(pb::LeaseAccepted { lease_id: a.lease_id })).await
                    {
                        return fail();
                    }
                }
                Ok(Some(pb::CoordinatorMessage { msg: Some(In::EndLease(e)) })) => {
                    counters.ended.fetch_add(1, Ordering::Relaxed);
                    lease.clear();
                    let report = pb::WipeReport {
                        lease_id: e.lease_id.clone(),
                        verified: true,
                        duration_ms: 1,
                        ..pb::WipeReport::default()
                    };
                    if !send(&tx, state(pb::HostState::Wiping, &e.lease_id)).await
                        || !send(&tx, Msg::WipeReport(report)).await
                        || !send(&tx, state(pb::HostState::Ready, "")).await
                    {
                        return fail();
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return fail(),
            },
        }
    }
}
