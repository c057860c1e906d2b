//! The fuzz harness of the agent stream and the pool around it, shared by
//! the cargo-fuzz target (`coordinator/fuzz`, see `scripts/fuzz.sh`) and by
//! a regular test that replays its corpus and random inputs
//! (`tests/fuzz_corpus.rs`).
//!
//! The input is read as a script of records `[op][arg][len u16 LE][payload]`:
//! raw protobuf payloads become agent stream messages (decoded exactly as the
//! server decodes them, then validated and handled by the pool), mixed with
//! registrations, lease messages naming real leases (accepted, rejected,
//! ended, wiped with or without verification), acquires, renewals, releases
//! and gets by several tenants, callers that stop waiting, drains, the
//! orphan sweeper condemning and letting go of hosts, disconnects and time
//! passing. Nothing may panic. After every record the pool's invariants must
//! hold (a host in at most one lease, host and lease agreeing, ...), and a
//! tenant must never reach another tenant's lease; a broken rule panics,
//! which is what the fuzzer looks for.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use berth_proto::v1 as pb;
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::clock::Now;
use crate::error::Error;
use crate::pool::{Pending, Pool, PoolConfig, Registration};

/// The tenants the fuzzed builds belong to.
const TENANTS: [&str; 3] = ["fuzz-a", "fuzz-b", "fuzz-c"];
const HOSTS: u8 = 4;
/// How many kinds of record there are (`op % OPS`).
pub const OPS: u8 = 14;

struct Agent {
    conn: u64,
    // Kept so the pool's sends succeed; drained to keep them bounded.
    rx: mpsc::Receiver<Box<pb::CoordinatorMessage>>,
}

/// A lease the script acquired, with the tenant it belongs to.
struct Held {
    tenant: usize,
    id: String,
}

/// Runs one fuzz input. Panics only if an invariant breaks.
pub fn agent_stream(data: &[u8]) {
    let pool = Pool::new(PoolConfig::default());
    // A fixed wall clock: a run depends on its input alone.
    let mut now = Now {
        mono: Instant::now(),
        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    };
    let mut agents: HashMap<u8, Agent> = HashMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    let mut leases: Vec<Held> = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 {
        let (op, arg) = (rest[0], rest[1]);
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
        let payload = &rest[4..4 + len];
        rest = &rest[4 + len..];
        let b = |i: usize| payload.get(i).copied().unwrap_or(0);
        let host = arg % HOSTS;
        let host_id = format!("fz-{host}");
        // The lease a record is about, and a tenant other than its own.
        let held = (!leases.is_empty()).then(|| &leases[usize::from(arg) % leases.len()]);
        let other = |h: &Held| TENANTS[(h.tenant + 1 + usize::from(b(1) % 2)) % TENANTS.len()];
        match op % OPS {
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
                let tenant = usize::from(arg >> 5) % TENANTS.len();
                let wait = Duration::from_secs(u64::from((arg >> 3) % 3) * 5);
                // Three keys: a retry may bring another one.
                let key = berth_tls::KeyId([b(0) % 3; 32]);
                if let Ok(p) = pool.acquire(
                    TENANTS[tenant],
                    &format!("fz-build-{}", arg % 8),
                    key,
                    Duration::from_secs(60),
                    wait,
                    now,
                ) {
                    if !leases.iter().any(|h| h.id == p.lease_id) {
                        leases.push(Held {
                            tenant,
                            id: p.lease_id.clone(),
                        });
                    }
                    pending.push(p);
                }
            }
            2 => {
                if let Some(h) = held {
                    if b(0) % 2 == 1 {
                        isolated(pool.release(other(h), &h.id, now), "release");
                    } else {
                        let _ = pool.release(TENANTS[h.tenant], &h.id, now);
                    }
                }
            }
            3 => {
                now = now + Duration::from_secs(u64::from(arg));
                pool.tick(now);
            }
            4 => {
                if let Some(a) = agents.remove(&host) {
                    pool.disconnect(&host_id, a.conn, now);
                }
            }
            5 => {
                let r = pb::Register::decode(payload).unwrap_or_else(|_| pb::Register {
                    host_id: host_id.clone(),
                    host_addr: "198.18.0.2".into(),
                    docker_host: "tcp://198.18.0.2:2376".into(),
                    state: pb::HostState::Ready as i32,
                    ..Default::default()
                });
                register(&pool, &mut agents, host, r, now);
            }
            6 | 7 if !leases.is_empty() => {
                // A lease-related message naming a real lease id (random
                // bytes would never hit one), on the host's stream.
                let lease_id = leases[usize::from(arg / HOSTS) % leases.len()].id.clone();
                let msg = match (op % OPS, b(0) % 4) {
                    (6, 0) => pb::agent_message::Msg::LeaseInUse(pb::LeaseInUse {
                        lease_id,
                        // Empty, a key, or a wrong length.
                        client_key_sha256: vec![b(1); usize::from(b(2) % 3) * 16],
                    }),
                    (6, _) => pb::agent_message::Msg::LeaseAccepted(pb::LeaseAccepted { lease_id }),
                    (_, 0) => pb::agent_message::Msg::LeaseRejected(pb::LeaseRejected {
                        lease_id,
                        reason: "fuzz".into(),
                    }),
                    (_, 1) => pb::agent_message::Msg::LeaseEnded(pb::LeaseEnded {
                        lease_id,
                        reason: i32::from(b(1)),
                    }),
                    (_, 2) => pb::agent_message::Msg::StateChanged(pb::StateChanged {
                        state: i32::from(b(1) % 9),
                        lease_id,
                        reason: String::new(),
                    }),
                    _ => {
                        let verified = b(1) % 2 == 0;
                        pb::agent_message::Msg::WipeReport(pb::WipeReport {
                            lease_id,
                            verified,
                            error: if verified {
                                String::new()
                            } else {
                                "a volume is still there".into()
                            },
                            containers_removed: u32::from(b(2)),
                            duration_ms: u64::from(b(3)),
                            ..Default::default()
                        })
                    }
                };
                if let Some(a) = agents.get(&host) {
                    let _ = pool.agent_message(&host_id, a.conn, msg, now);
                }
            }
            6 | 7 => {}
            8 => {
                if let Some(h) = held {
                    let ttl = Duration::from_secs(1 + u64::from(b(2)) * 10);
                    let key = (b(3) % 4 != 3).then(|| berth_tls::KeyId([b(3) % 4; 32]));
                    if b(0) % 2 == 1 {
                        isolated(pool.renew(other(h), &h.id, key, ttl, now), "renew");
                    } else {
                        let _ = pool.renew(TENANTS[h.tenant], &h.id, key, ttl, now);
                    }
                }
            }
            9 => {
                let _ = pool.drain(&host_id, "fuzz", now);
            }
            10 => {
                // A caller gives up waiting for its lease.
                if !pending.is_empty() {
                    let i = usize::from(arg) % pending.len();
                    pending.swap_remove(i);
                }
            }
            11 => {
                // The orphan sweeper: condemn the host, or let go of every
                // condemned instance (EC2 no longer lists them).
                if b(0) % 2 == 0 {
                    let marked = pool.condemn(&host_id, now);
                    if marked && agents.get(&host).is_some_and(|a| !a.rx.is_closed()) {
                        panic!("{host_id} was condemned while its stream is up");
                    }
                } else {
                    pool.retain_condemned(|_| false, now);
                }
            }
            12 => {
                if let Some(h) = held {
                    if b(0) % 2 == 1 {
                        isolated(pool.get(other(h), &h.id), "get");
                    } else {
                        let _ = pool.get(TENANTS[h.tenant], &h.id);
                    }
                }
            }
            _ => views(&pool, now),
        }
        for a in agents.values_mut() {
            while a.rx.try_recv().is_ok() {}
        }
        if let Err(e) = pool.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }
}

/// Another tenant's call must find nothing.
fn isolated<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) {
    if !matches!(r, Err(Error::LeaseNotFound(_))) {
        panic!("a tenant's {what} reached another tenant's lease: {r:?}");
    }
}

/// The read-only views agree with each other.
fn views(pool: &Pool, now: Now) {
    let stats = pool.stats(now);
    let hosts = pool.list_hosts();
    let presences = pool.presences();
    let by_state: u32 = stats.hosts_by_state.iter().map(|(_, n)| n).sum();
    if usize::try_from(by_state).ok() != Some(hosts.len()) || presences.len() != hosts.len() {
        panic!(
            "views disagree: {by_state} hosts by state, {} listed, {} presences",
            hosts.len(),
            presences.len()
        );
    }
    if stats.hosts_offerable > stats.hosts_connected {
        panic!("more offerable hosts than connected ones: {stats:?}");
    }
    let _ = pool.list_leases(true);
}

/// Validates a registration the way the server does; the host id is forced
/// to one of the script's hosts so later records can address it.
fn register(pool: &Pool, agents: &mut HashMap<u8, Agent>, host: u8, mut r: pb::Register, now: Now) {
    r.host_id = format!("fz-{host}");
    // Random bytes never make a CSR: the host's own key (one per host id),
    // or, for an odd host, sometimes another host's (a key that does not
    // match the one the id is bound to).
    if r.csr_pem.is_empty() || r.csr_pem.len() < 8 {
        let i = if r.csr_pem.len() % 2 == 1 {
            host + 1
        } else {
            host
        };
        r.csr_pem = host_csr(i).to_owned();
    }
    let Ok(reg) = Registration::from_proto(r) else {
        return;
    };
    let (tx, rx) = mpsc::channel(crate::api::agent::AGENT_CHANNEL_DEPTH);
    if let Ok(conn) = pool.register(reg, Default::default(), tx, now) {
        agents.insert(host, Agent { conn, rx });
    }
}

/// A CSR for host number `i`'s key, made once per process (key generation
/// costs more than a whole fuzz run of records).
fn host_csr(i: u8) -> &'static str {
    static CSRS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let csrs = CSRS.get_or_init(|| {
        (0..=HOSTS)
            .map(|i| {
                berth_tls::KeyAndCsr::generate(&format!("fz-{i}"))
                    .map(|k| k.csr_pem)
                    .unwrap_or_default()
            })
            .collect()
    });
    &csrs[usize::from(i) % csrs.len()]
}

/// Encodes one record of the script (for seeds and tests).
pub fn record(op: u8, arg: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    let mut v = vec![op, arg];
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&payload[..usize::from(len)]);
    v
}
