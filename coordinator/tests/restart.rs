//! Coordinator restarts in-process, over real sockets and the real store: a
//! graceful stop (the shutdown token, as SIGTERM triggers it) ends the agent
//! streams and returns; a new coordinator on the same store still knows the
//! lease, takes the agent's re-registration as the truth, and serves
//! Get/Renew/Release and an Acquire retry. A restored lease whose host never
//! comes back ends as host-lost after the grace period.
//!
//! Each runs twice ([`berth_testkit::on_each_store`]): on the embedded store
//! (the new coordinator on the same state dir) and, as `postgres::NAME`, on
//! a PostgreSQL cluster of the test's own (the new coordinator on the same
//! database, with an empty state dir of its own).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use berth_proto::from_duration;
use berth_proto::v1 as pb;
use berth_testkit::{Store, on_each_store};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

mod support;
use support::{Server, Site, csr, host_csr};

on_each_store! { async
    a_graceful_stop_and_a_new_coordinator_keep_the_lease => graceful_stop,
    a_restored_lease_whose_host_never_returns_ends_as_host_lost => host_never_returns,
}

/// On PostgreSQL: coordinator `s` leads the pool from the database with
/// `term`, and keeps no embedded store in its state dir. Nothing to check
/// on the embedded store.
fn assert_led_from_the_database(site: &Site, s: &Server, term: u64) {
    if site.store == Store::Embedded {
        return;
    }
    assert_eq!(
        site.sql("SELECT term FROM berth_leader WHERE expires_at > now()"),
        Some(term.to_string()),
        "the coordinator does not lead with term {term}"
    );
    assert!(
        !s.state_dir.join("coordinator.redb").exists(),
        "the coordinator on PostgreSQL made an embedded store"
    );
}

/// On PostgreSQL: a clean stop gave the lead up at once.
fn assert_lead_given_up(site: &Site) {
    if let Some(up) = site.sql("SELECT expires_at <= now() FROM berth_leader") {
        assert_eq!(up, "t", "a clean stop kept the lead");
    }
}

fn register(
    state: pb::HostState,
    lease: &str,
    deadline: Option<prost_types::Timestamp>,
) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            csr_pem: host_csr(),
            host_id: "agent-1".into(),
            host_addr: "198.18.0.2".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            provider: "fake".into(),
            state: state as i32,
            lease_id: lease.into(),
            lease_deadline: deadline,
            ..Default::default()
        })),
    }
}

type Inbound = tonic::Streaming<pb::CoordinatorMessage>;

async fn connect(s: &Server, first: pb::AgentMessage) -> (mpsc::Sender<pb::AgentMessage>, Inbound) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let mut inbound = s
        .agents()
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let m = inbound.message().await.unwrap().unwrap().msg;
    assert!(
        matches!(m, Some(pb::coordinator_message::Msg::Registered(_))),
        "{m:?}"
    );
    (tx, inbound)
}

async fn next(inbound: &mut Inbound) -> Option<pb::coordinator_message::Msg> {
    tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("a message in time")
        .unwrap()
        .and_then(|m| m.msg)
}

/// Waits until the coordinator has taken the agent's acceptance of
/// `lease_id`; an Active lease is stored (on PostgreSQL: committed).
async fn accepted(s: &Server, site: &Site, lease_id: &str) {
    s.active_soon(lease_id).await;
    if let Some(state) = site.stored_state(lease_id) {
        assert_eq!(state, "active");
    }
}

fn acquire(build: &str) -> pb::AcquireRequest {
    pb::AcquireRequest {
        csr_pem: csr(),
        build_id: build.into(),
        ttl: Some(from_duration(Duration::from_secs(600))),
        wait: Some(from_duration(Duration::from_secs(10))),
    }
}

async fn graceful_stop(store: Store) {
    let site = Site::new("restart-graceful", store);
    let s = Server::start_at(&site, &[]).await;
    assert_led_from_the_database(&site, &s, 1);
    let ca_pem = s.ca_pem.clone();
    let (tx, mut inbound) = connect(&s, register(pb::HostState::Ready, "", None)).await;
    let mut leases = s.leases();
    let pending = tokio::spawn(async move { leases.acquire(acquire("r-1")).await });
    let Some(pb::coordinator_message::Msg::AssignLease(assign)) = next(&mut inbound).await else {
        panic!("no assignment")
    };
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::LeaseAccepted(pb::LeaseAccepted {
            lease_id: assign.lease_id.clone(),
        })),
    })
    .await
    .unwrap();
    let lease = pending.await.unwrap().unwrap().into_inner().lease.unwrap();
    accepted(&s, &site, &lease.lease_id).await;

    // Graceful stop: the agent's stream ends and serve returns.
    tokio::time::timeout(Duration::from_secs(15), s.stop_keep())
        .await
        .expect("the coordinator did not stop");
    let end = tokio::time::timeout(Duration::from_secs(5), inbound.message()).await;
    assert!(matches!(end, Ok(Ok(None)) | Ok(Err(_))), "{end:?}");
    drop(tx);
    assert_lead_given_up(&site);

    // A new coordinator on the same store: the same state dir, or the same
    // database (and nothing else: its own state dir starts empty).
    let s = Server::start_at(&site, &[]).await;
    assert_led_from_the_database(&site, &s, 2);
    assert_eq!(s.ca_pem, ca_pem, "the pool CA changed");
    let mut c = s.leases();
    let got = c
        .get(pb::GetRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(got.state, pb::LeaseState::Active as i32);
    assert_eq!(
        (got.host_id.as_str(), got.deadline),
        ("agent-1", lease.deadline)
    );
    // The host is known from the lease, as not connected, until its agent returns.
    let hosts = s.hosts().await;
    assert_eq!(hosts.len(), 1);
    assert!(!hosts[0].connected && hosts[0].lease_id == lease.lease_id);
    // An Acquire retry joins the lease instead of taking a host.
    let retry = c
        .acquire(acquire("r-1"))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(retry.lease_id, lease.lease_id);

    // The agent re-registers with the lease: it carries on.
    let (_tx, mut inbound) = connect(
        &s,
        register(pb::HostState::Leased, &lease.lease_id, lease.deadline),
    )
    .await;
    let renewed = c
        .renew(pb::RenewRequest {
            lease_id: lease.lease_id.clone(),
            ttl: Some(from_duration(Duration::from_secs(900))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert!(
        matches!(next(&mut inbound).await, Some(pb::coordinator_message::Msg::RenewLease(r)) if r.deadline == renewed.deadline)
    );
    let released = c
        .release(pb::ReleaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(released.state, pb::LeaseState::Released as i32);
    if let Some(state) = site.stored_state(&lease.lease_id) {
        assert_eq!(state, "released");
    }
    assert!(
        matches!(next(&mut inbound).await, Some(pb::coordinator_message::Msg::EndLease(e)) if e.lease_id == lease.lease_id)
    );
    s.stop().await;
}

async fn host_never_returns(store: Store) {
    let site = Site::new("restart-lost", store);
    let s = Server::start_at(&site, &["--lost-grace", "1s"]).await;
    assert_led_from_the_database(&site, &s, 1);
    let (tx, mut inbound) = connect(&s, register(pb::HostState::Ready, "", None)).await;
    let mut leases = s.leases();
    let pending = tokio::spawn(async move { leases.acquire(acquire("r-2")).await });
    let Some(pb::coordinator_message::Msg::AssignLease(assign)) = next(&mut inbound).await else {
        panic!("no assignment")
    };
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::LeaseAccepted(pb::LeaseAccepted {
            lease_id: assign.lease_id.clone(),
        })),
    })
    .await
    .unwrap();
    let lease = pending.await.unwrap().unwrap().into_inner().lease.unwrap();
    accepted(&s, &site, &lease.lease_id).await;
    s.stop_keep().await;
    drop(tx);
    assert_lead_given_up(&site);

    let s = Server::start_at(&site, &["--lost-grace", "1s"]).await;
    assert_led_from_the_database(&site, &s, 2);
    let mut c = s.leases();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match c
                .get(pb::GetRequest {
                    lease_id: lease.lease_id.clone(),
                })
                .await
            {
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(s) => return s,
            }
        }
    })
    .await
    .expect("the lease outlived its lost host");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    assert!(status.message().contains("host-lost"), "{status}");
    // The end is stored too (its commit may follow the answer by a moment).
    if site.store == Store::Postgres {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while site.stored_state(&lease.lease_id).as_deref() != Some("host-lost") {
            assert!(
                std::time::Instant::now() < deadline,
                "the database still says {:?}",
                site.stored_state(&lease.lease_id)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The build id is free again: a retry gets a new lease (and waits).
    let err = c
        .acquire(pb::AcquireRequest {
            build_id: "r-2".into(),
            csr_pem: csr(),
            ttl: None,
            wait: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    s.stop().await;
}
