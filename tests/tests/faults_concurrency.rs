//! Faults of load: 200 builds race for 4 hosts (recycle mode, short leases,
//! some builds never release). Checked three ways that no host is ever in
//! two leases at once:
//!
//! - the coordinator's view over time (ListLeases sampled while the race runs),
//! - the builds' view (per host, the intervals during which builds held it
//!   never overlap),
//! - the agents' view (each agent's own log: every lease it took was wiped
//!   before it took the next, and every served lease was taken exactly once).
//!
//! Every request is either served or fails with RESOURCE_EXHAUSTED.
//!
//! It runs twice: on the embedded store and, as `postgres::NAME`, with the
//! pool's state on PostgreSQL, where every answer waits for a PostgreSQL
//! commit ([`berth_testkit::on_each_store`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_client::AdminServiceClient;
use berth_proto::v1::lease_service_client::LeaseServiceClient;
use berth_testkit::*;
use tonic::transport::Channel;

on_each_store! {
    two_hundred_builds_race_for_four_hosts_and_no_host_is_ever_in_two_leases => race_for_hosts,
}

const BUILDS: usize = 200;
const TTL: Duration = Duration::from_secs(3);

struct Served {
    lease_id: String,
    host_id: String,
    from: SystemTime,
    to: SystemTime,
}

fn dur(d: Duration) -> prost_types::Duration {
    berth_proto::from_duration(d)
}

/// (host, lease, to-state) for each "host state" line of the agents' logs.
fn agent_transitions(logs: &str) -> Vec<(String, String, String)> {
    let field = |line: &str, key: &str| -> Option<String> {
        let rest = &line[line.find(key)? + key.len()..];
        let end = rest.find([' ', '}', ':']).unwrap_or(rest.len());
        Some(rest[..end].trim_matches('"').to_owned())
    };
    logs.lines()
        .filter(|l| l.contains(" host state "))
        .filter_map(|l| {
            Some((
                field(l, "host_id=")?,
                field(l, "lease_id=").unwrap_or_default(),
                field(l, " to=")?,
            ))
        })
        .collect()
}

fn race_for_hosts(store: Store) {
    if !preflight() {
        return;
    }
    let pool = Pool::start_on(store, "bfk1-", 4, &["--recycle"]);
    let endpoint = pool.endpoint();
    let token = pool.token();
    // One key for every build: the race is about hosts, not certificates.
    let csr = berth_tls::KeyAndCsr::generate("race").unwrap().csr_pem;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // The coordinator's view, sampled while the race runs.
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicUsize::new(0));
    let monitor = {
        let (stop, samples, endpoint, token) = (
            stop.clone(),
            samples.clone(),
            endpoint.clone(),
            token.clone(),
        );
        rt.spawn(async move {
            let ch = endpoint.connect().await.unwrap();
            let mut admin = AdminServiceClient::new(ch);
            let mut violations = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let leases = admin
                    .list_leases(with_token(
                        pb::ListLeasesRequest {
                            include_ended: false,
                        },
                        &token,
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .leases;
                let mut holders: HashMap<&str, Vec<&str>> = HashMap::new();
                for l in &leases {
                    if !l.host_id.is_empty() {
                        holders.entry(&l.host_id).or_default().push(&l.lease_id);
                    }
                }
                for (h, ls) in holders {
                    if ls.len() > 1 {
                        violations.push(format!("host {h} in leases {ls:?}"));
                    }
                }
                samples.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            violations
        })
    };

    // The race: a few HTTP/2 connections shared by 200 concurrent builds.
    let channels: Vec<Channel> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(endpoint.connect().await.unwrap());
        }
        v
    });
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..BUILDS {
            let mut c = LeaseServiceClient::new(channels[i % channels.len()].clone());
            let (token, csr) = (token.clone(), csr.clone());
            tasks.push(tokio::spawn(async move {
                // Half the builds are impatient: they meet the queue's limit.
                let wait = if i % 2 == 0 { 40 } else { 2 };
                let r = c
                    .acquire(with_token(
                        pb::AcquireRequest {
                            build_id: format!("fk-{i}"),
                            ttl: Some(dur(TTL)),
                            wait: Some(dur(Duration::from_secs(wait))),
                            csr_pem: csr,
                        },
                        &token,
                    ))
                    .await;
                match r {
                    Ok(resp) => {
                        let l = resp.into_inner().lease.unwrap();
                        let from = SystemTime::now();
                        let deadline = l
                            .deadline
                            .as_ref()
                            .and_then(berth_proto::to_system_time)
                            .unwrap();
                        // Every tenth build forgets to release: its lease expires.
                        let to = if i % 10 == 0 {
                            deadline
                        } else {
                            tokio::time::sleep(Duration::from_millis(50 * (i % 8) as u64)).await;
                            let to = SystemTime::now();
                            c.release(with_token(
                                pb::ReleaseRequest {
                                    lease_id: l.lease_id.clone(),
                                },
                                &token,
                            ))
                            .await
                            .unwrap();
                            to.min(deadline)
                        };
                        Ok(Served {
                            lease_id: l.lease_id,
                            host_id: l.host_id,
                            from,
                            to,
                        })
                    }
                    Err(s) => Err(s),
                }
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    stop.store(true, Ordering::SeqCst);
    let violations = rt.block_on(monitor).unwrap();

    // Every request was served or timed out cleanly.
    let mut served = Vec::new();
    let mut exhausted = 0;
    for r in results {
        match r {
            Ok(s) => served.push(s),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(s.message().contains("no host became ready"), "{s}");
                exhausted += 1;
            }
            Err(s) => panic!("a build got neither a host nor RESOURCE_EXHAUSTED: {s}"),
        }
    }
    eprintln!(
        "served {} leases, {exhausted} timed out, {} coordinator samples",
        served.len(),
        samples.load(Ordering::SeqCst)
    );
    assert_eq!(served.len() + exhausted, BUILDS);
    assert!(served.len() >= 8, "only {} builds served", served.len());
    assert!(exhausted > 0, "no build met the queue limit");
    assert!(samples.load(Ordering::SeqCst) >= 20);

    // 1. The coordinator never showed a host in two leases.
    assert!(violations.is_empty(), "{violations:?}");

    // 2. The builds never held one host at overlapping times.
    let mut by_host: BTreeMap<&str, Vec<&Served>> = BTreeMap::new();
    for s in &served {
        by_host.entry(&s.host_id).or_default().push(s);
    }
    for (host, mut ls) in by_host {
        ls.sort_by_key(|s| s.from);
        for w in ls.windows(2) {
            assert!(
                w[0].to <= w[1].from,
                "host {host}: lease {} held until {:?}, lease {} from {:?}",
                w[0].lease_id,
                w[0].to,
                w[1].lease_id,
                w[1].from
            );
        }
    }

    // 3. The agents took each lease once and wiped before the next.
    let ids: HashSet<&str> = served.iter().map(|s| s.lease_id.as_str()).collect();
    let transitions = agent_transitions(&pool.agent_logs());
    let mut holding: HashMap<String, Option<String>> = HashMap::new();
    let mut taken: HashMap<String, usize> = HashMap::new();
    for (host, lease, to) in &transitions {
        let cur = holding.entry(host.clone()).or_default();
        match to.as_str() {
            "Leased" => {
                assert!(
                    cur.is_none(),
                    "agent {host} took lease {lease} while holding {cur:?}"
                );
                *cur = Some(lease.clone());
                *taken.entry(lease.clone()).or_default() += 1;
            }
            "Wiping" | "Terminating" | "Unhealthy" => *cur = None,
            _ => {}
        }
    }
    for id in &ids {
        assert_eq!(
            taken.get(*id).copied(),
            Some(1),
            "served lease {id} was taken by agents {:?} times",
            taken.get(*id)
        );
    }
    for (lease, n) in &taken {
        assert_eq!(*n, 1, "lease {lease} taken {n} times");
    }
}
