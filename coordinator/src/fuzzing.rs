//! The fuzz harness of the agent stream, shared by the cargo-fuzz target
//! (`coordinator/fuzz`, run with a nightly toolchain) and by a regular test
//! that replays its corpus and random inputs on stable.
//!
//! The input is read as a script of records `[op][arg][len u16 LE][payload]`:
//! raw protobuf payloads become agent stream messages (decoded exactly as the
//! server decodes them, then validated and handled by the pool), mixed with
//! registrations, acquires, releases, disconnects and time passing. Nothing
//! may panic, and after every record the pool's invariants must hold (a host
//! in at most one lease, host and lease agreeing); a broken invariant panics,
//! which is what the fuzzer looks for.

use std::collections::HashMap;
use std::time::Duration;

/// The one tenant the fuzzed builds belong to.
const FUZZ_TENANT: &str = "fuzz";

use berth_proto::v1 as pb;
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::pool::{Pending, Pool, PoolConfig, Registration};

const HOSTS: u8 = 4;

struct Agent {
    conn: u64,
    // Kept so the pool's sends succeed; drained to keep them bounded.
    rx: mpsc::Receiver<Result<pb::CoordinatorMessage, tonic::Status>>,
}

/// Runs one fuzz input. Panics only if an invariant breaks.
pub fn agent_stream(data: &[u8]) {
    let pool = Pool::new(PoolConfig::default());
    let mut now = Instant::now();
    let mut agents: HashMap<u8, Agent> = HashMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    let mut leases: Vec<String> = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 {
        let (op, arg) = (rest[0], rest[1]);
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
        let payload = &rest[4..4 + len];
        rest = &rest[4 + len..];
        let host = arg % HOSTS;
        let host_id = format!("fz-{host}");
        match op % 8 {
            0 => {
                // One message on an agent's stream, as the server handles it.
                let Ok(m) = pb::AgentMessage::decode(payload) else {
                    continue;
                };
                let Some(msg) = m.msg else { continue };
                if let pb::agent_message::Msg::Register(r) = msg {
                    register(&pool, &mut agents, host, r, now);
                } else if let Some(a) = agents.get(&host) {
                    let _ = pool.agent_message(&host_id, a.conn, msg, now);
                }
            }
            1 => {
                let wait = Duration::from_secs(u64::from(arg % 3) * 5);
                if let Ok(p) = pool.acquire(
                    FUZZ_TENANT,
                    &format!("fz-build-{}", arg % 8),
                    Duration::from_secs(60),
                    wait,
                    now,
                ) {
                    if !leases.contains(&p.lease_id) {
                        leases.push(p.lease_id.clone());
                    }
                    pending.push(p);
                }
            }
            2 => {
                if !leases.is_empty() {
                    let l = &leases[usize::from(arg) % leases.len()];
                    let _ = pool.release(FUZZ_TENANT, l, now);
                }
            }
            3 => {
                now += Duration::from_secs(u64::from(arg));
                pool.tick(now);
            }
            4 => {
                if let Some(a) = agents.remove(&host) {
                    pool.disconnect(&host_id, a.conn, now);
                }
            }
            6 | 7 if !leases.is_empty() => {
                // A lease-related message naming a real lease id (random
                // bytes would never hit one), on the host's stream.
                let lease_id = leases[usize::from(arg / HOSTS) % leases.len()].clone();
                let b = |i: usize| payload.get(i).copied().unwrap_or(0);
                let msg = match (op % 8, b(0) % 3) {
                    (6, _) => pb::agent_message::Msg::LeaseAccepted(pb::LeaseAccepted { lease_id }),
                    (_, 0) => pb::agent_message::Msg::LeaseRejected(pb::LeaseRejected {
                        lease_id,
                        reason: "fuzz".into(),
                    }),
                    (_, 1) => pb::agent_message::Msg::LeaseEnded(pb::LeaseEnded {
                        lease_id,
                        reason: i32::from(b(1)),
                    }),
                    _ => pb::agent_message::Msg::StateChanged(pb::StateChanged {
                        state: i32::from(b(1) % 9),
                        lease_id,
                        reason: String::new(),
                    }),
                };
                if let Some(a) = agents.get(&host) {
                    let _ = pool.agent_message(&host_id, a.conn, msg, now);
                }
            }
            6 | 7 => {}
            _ => {
                let r = pb::Register::decode(payload).unwrap_or_else(|_| pb::Register {
                    host_id: host_id.clone(),
                    host_addr: "198.18.0.2".into(),
                    docker_host: "tcp://198.18.0.2:2376".into(),
                    state: pb::HostState::Ready as i32,
                    ..Default::default()
                });
                register(&pool, &mut agents, host, r, now);
            }
        }
        for a in agents.values_mut() {
            while a.rx.try_recv().is_ok() {}
        }
        if let Err(e) = pool.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }
}

/// Validates a registration the way the server does; the host id is forced
/// to one of the script's hosts so later records can address it.
fn register(
    pool: &Pool,
    agents: &mut HashMap<u8, Agent>,
    host: u8,
    mut r: pb::Register,
    now: Instant,
) {
    r.host_id = format!("fz-{host}");
    let Ok(reg) = Registration::from_proto(r) else {
        return;
    };
    let (tx, rx) = mpsc::channel(crate::api::service::AGENT_CHANNEL_DEPTH);
    let conn = pool.register(reg, tx, now);
    agents.insert(host, Agent { conn, rx });
}

/// Encodes one record of the script (for seeds and tests).
pub fn record(op: u8, arg: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    let mut v = vec![op, arg];
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&payload[..usize::from(len)]);
    v
}
