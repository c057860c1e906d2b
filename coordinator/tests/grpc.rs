//! The coordinator's gRPC API over a real TLS socket on 127.0.0.1: input
//! validation and status codes, authentication (tenant tokens, the join
//! token, tenants owning their leases), the certificates it signs, and one
//! lease carried by a fake agent that speaks the real agent stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use berth_proto::from_duration;
use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_client::AdminServiceClient;
use berth_proto::v1::lease_service_client::LeaseServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

mod support;
use support::{Bearer, Server, csr, host_csr};

fn acquire_req(build: &str, ttl_s: i64, wait_s: i64) -> pb::AcquireRequest {
    pb::AcquireRequest {
        csr_pem: csr(),
        build_id: build.into(),
        ttl: Some(prost_types::Duration {
            seconds: ttl_s,
            nanos: 0,
        }),
        wait: Some(prost_types::Duration {
            seconds: wait_s,
            nanos: 0,
        }),
    }
}

#[tokio::test]
async fn bad_requests_get_clear_status_codes() {
    let s = Server::start("grpc").await;
    let mut c = s.leases();
    let cases = [
        (acquire_req("", 60, 0), Code::InvalidArgument, "build_id"),
        (
            acquire_req(&"x".repeat(200), 60, 0),
            Code::InvalidArgument,
            "build_id",
        ),
        (
            acquire_req("has space", 60, 0),
            Code::InvalidArgument,
            "build_id",
        ),
        (acquire_req("b", 0, 0), Code::InvalidArgument, "ttl"),
        (acquire_req("b", -5, 0), Code::InvalidArgument, "ttl"),
        (
            acquire_req("b", 3 * 3600, 0),
            Code::InvalidArgument,
            "maximum",
        ),
        (acquire_req("b", 60, -1), Code::InvalidArgument, "wait"),
        (
            pb::AcquireRequest {
                csr_pem: String::new(),
                ..acquire_req("b", 60, 0)
            },
            Code::InvalidArgument,
            "csr_pem",
        ),
        (
            pb::AcquireRequest {
                csr_pem:
                    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
                ..acquire_req("b", 60, 0)
            },
            Code::InvalidArgument,
            "csr_pem",
        ),
        (acquire_req("b", 60, 0), Code::ResourceExhausted, "no host"),
    ];
    for (req, code, needle) in cases {
        let err = c.acquire(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err}");
        assert!(err.message().contains(needle), "{req:?}: {}", err.message());
    }
    let unknown = uuid_like();
    let err = c
        .get(pb::GetRequest {
            lease_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .release(pb::ReleaseRequest {
            lease_id: "not-a-lease".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .renew(pb::RenewRequest {
            lease_id: unknown,
            ttl: Some(from_duration(Duration::from_secs(60))),
            csr_pem: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Still serving after all that.
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "berth.v1.LeaseService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    s.stop().await;
}

fn uuid_like() -> String {
    "4f1c2a3b-0000-4000-8000-000000000001".into()
}

fn register(host: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            csr_pem: host_csr(),
            host_id: host.into(),
            host_addr: "198.18.0.2".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            provider: "fake".into(),
            state: pb::HostState::Ready as i32,
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn a_connected_agent_gets_a_fresh_certificate_before_its_own_runs_out() {
    let dir = support::fresh_dir("grpc-renew");
    let s = Server::start_in(&dir, &["--host-cert-validity", "15s"]).await;
    let (tx, mut inbound) = s.join(register("fake-renew")).await;
    let registered = |m: Option<pb::CoordinatorMessage>| match m.and_then(|m| m.msg) {
        Some(pb::coordinator_message::Msg::Registered(r)) => r,
        other => panic!("expected Registered, got {other:?}"),
    };
    let first = registered(inbound.message().await.unwrap());
    let first_end = berth_tls::ca::not_after(&first.server_cert_pem).unwrap();
    let left = first_end
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(left <= Duration::from_secs(16), "{left:?}");
    // On the same stream, while the first one is still valid.
    let second = tokio::time::timeout(left, inbound.message())
        .await
        .expect("a fresh certificate before the first one ran out")
        .unwrap();
    let second = registered(second);
    let second_end = berth_tls::ca::not_after(&second.server_cert_pem).unwrap();
    assert!(second_end > first_end, "{second_end:?} after {first_end:?}");
    assert_eq!(second.ca_pem, s.ca_pem);
    assert_eq!(second.heartbeat_interval_ms, first.heartbeat_interval_ms);
    // For the key the host registered with, and nothing else changed: the
    // host is still the same connected host.
    assert_eq!(
        berth_tls::KeyId::of_cert_pem(&second.server_cert_pem).unwrap(),
        berth_tls::KeyId::of_cert_pem(&first.server_cert_pem).unwrap()
    );
    let hosts = s.hosts().await;
    assert!(
        hosts
            .iter()
            .any(|h| h.host_id == "fake-renew" && h.connected)
    );
    drop(tx);
    s.stop().await;
}

#[tokio::test]
async fn a_fake_agent_carries_a_lease_from_acquire_to_release() {
    let s = Server::start("grpc").await;
    let (tx, mut inbound) = s.join(register("fake-1")).await;
    let first = inbound.message().await.unwrap().unwrap().msg;
    let Some(pb::coordinator_message::Msg::Registered(registered)) = first else {
        panic!("expected Registered, got {first:?}")
    };
    assert!(registered.heartbeat_interval_ms > 0);
    assert_eq!(registered.ca_pem, s.ca_pem);
    assert!(registered.server_cert_pem.contains("BEGIN CERTIFICATE"));

    let mut leases = s.leases();
    let ci_key = berth_tls::KeyAndCsr::generate("ci").unwrap();
    let req = pb::AcquireRequest {
        csr_pem: ci_key.csr_pem.clone(),
        ..acquire_req("ci-1", 600, 5)
    };
    let acquire = tokio::spawn(async move { leases.acquire(req).await });
    let assign = match inbound.message().await.unwrap().unwrap().msg {
        Some(pb::coordinator_message::Msg::AssignLease(a)) => a,
        other => panic!("expected AssignLease, got {other:?}"),
    };
    assert_eq!(assign.build_id, "ci-1");
    // The answer does not wait for the agent: the assignment is recorded,
    // and the agent's front holds the build's connection until it has the
    // lease.
    let resp = acquire.await.unwrap().unwrap().into_inner();
    let lease = resp.lease.unwrap();
    assert_eq!(lease.lease_id, assign.lease_id);
    assert_eq!(lease.state, pb::LeaseState::Assigned as i32);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::LeaseAccepted(pb::LeaseAccepted {
            lease_id: assign.lease_id.clone(),
        })),
    })
    .await
    .unwrap();
    assert_eq!(lease.tenant, "ci");
    assert_eq!(resp.ca_pem, s.ca_pem);

    // The client certificate opens this lease's front (agent identity from
    // the registration) and no other lease's.
    let host_key = berth_tls::KeyAndCsr::generate("host").unwrap();
    let ca =
        berth_tls::Ca::load(&s.dir.join("state/ca.pem"), &s.dir.join("state/ca-key.pem")).unwrap();
    let identity = berth_tls::ServerIdentity {
        cert_pem: ca
            .sign_host(
                &host_key.csr_pem,
                "fake-1",
                "198.18.0.2".parse().unwrap(),
                std::time::SystemTime::now(),
            )
            .unwrap(),
        key_pem: host_key.key_pem,
        ca_pem: s.ca_pem.clone(),
    };
    let client =
        berth_tls::lease_client_config(&resp.ca_pem, &resp.client_cert_pem, &ci_key.key_pem)
            .unwrap();
    let pinned = berth_tls::PinnedKey::new(berth_tls::KeyId::of_csr_pem(&ci_key.csr_pem).unwrap());
    let front = berth_tls::lease_server_config(&identity, &lease.lease_id, pinned.clone()).unwrap();
    berth_tls::lease::handshake_in_memory(front, client.clone(), "198.18.0.2").unwrap();
    let elsewhere =
        berth_tls::lease_server_config(&identity, &uuid_like(), pinned.clone()).unwrap();
    assert!(berth_tls::lease::handshake_in_memory(elsewhere, client, "198.18.0.2").is_err());

    // Renew with a CSR re-issues a certificate for the same lease.
    let renewed = s
        .leases()
        .renew(pb::RenewRequest {
            lease_id: lease.lease_id.clone(),
            ttl: Some(from_duration(Duration::from_secs(1200))),
            csr_pem: ci_key.csr_pem.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(renewed.client_cert_pem.contains("BEGIN CERTIFICATE"));
    assert_ne!(renewed.client_cert_pem, resp.client_cert_pem);
    let client =
        berth_tls::lease_client_config(&renewed.ca_pem, &renewed.client_cert_pem, &ci_key.key_pem)
            .unwrap();
    let front = berth_tls::lease_server_config(&identity, &lease.lease_id, pinned).unwrap();
    berth_tls::lease::handshake_in_memory(front, client, "198.18.0.2").unwrap();
    match inbound.message().await.unwrap().unwrap().msg {
        Some(pb::coordinator_message::Msg::RenewLease(r)) => {
            assert_eq!(r.lease_id, lease.lease_id);
            assert_eq!(r.deadline, renewed.lease.as_ref().unwrap().deadline);
        }
        other => panic!("expected RenewLease, got {other:?}"),
    }
    assert_eq!(lease.docker_host, "tcp://198.18.0.2:2376");
    assert_eq!(lease.host_addr, "198.18.0.2");
    // The agent's acceptance made it active.
    s.active_soon(&lease.lease_id).await;

    // A retry of the same build (same key) gets the same lease at once.
    let again = s
        .leases()
        .acquire(pb::AcquireRequest {
            csr_pem: ci_key.csr_pem.clone(),
            ..acquire_req("ci-1", 600, 5)
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(again.lease_id, lease.lease_id);
    // A retry with a new key, before the certificate was used, moves the
    // lease's key, and the host's agent is told.
    let other = s
        .leases()
        .acquire(acquire_req("ci-1", 600, 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.lease.unwrap().lease_id, lease.lease_id);
    match inbound.message().await.unwrap().unwrap().msg {
        Some(pb::coordinator_message::Msg::LeaseKey(k)) => {
            assert_eq!(k.lease_id, lease.lease_id);
            assert_eq!(
                k.client_key_sha256,
                berth_tls::KeyId::of_cert_pem(&other.client_cert_pem)
                    .unwrap()
                    .0
                    .to_vec()
            );
        }
        other => panic!("expected LeaseKey, got {other:?}"),
    }
    // That move crossed the front's first connection, with `ci_key`: the
    // front fixed `ci_key`, refused the move, and says so. The pin follows
    // the front: the key in use renews, the retry's key no longer does.
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::LeaseInUse(pb::LeaseInUse {
            lease_id: lease.lease_id.clone(),
            client_key_sha256: berth_tls::KeyId::of_csr_pem(&ci_key.csr_pem)
                .unwrap()
                .0
                .to_vec(),
        })),
    })
    .await
    .unwrap();
    let renew = |csr_pem: String| {
        let mut leases = s.leases();
        let lease_id = lease.lease_id.clone();
        async move {
            leases
                .renew(pb::RenewRequest {
                    lease_id,
                    ttl: Some(from_duration(Duration::from_secs(1200))),
                    csr_pem,
                })
                .await
        }
    };
    // The report travels on the agent's stream: poll until it is applied.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = renew(ci_key.csr_pem.clone()).await {
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pin did not follow the key in use: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = renew(csr()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = s
        .leases()
        .acquire(acquire_req("ci-1", 600, 5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("in use"), "{e}");
    // The one renewal that succeeded, and no LeaseKey: nothing moved.
    match inbound.message().await.unwrap().unwrap().msg {
        Some(pb::coordinator_message::Msg::RenewLease(r)) => assert_eq!(r.lease_id, lease.lease_id),
        other => panic!("expected RenewLease, got {other:?}"),
    }

    s.leases()
        .release(pb::ReleaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap();
    match inbound.message().await.unwrap().unwrap().msg {
        Some(pb::coordinator_message::Msg::EndLease(e)) => {
            assert_eq!(e.lease_id, lease.lease_id);
            assert_eq!(e.reason, pb::EndReason::Released as i32);
        }
        other => panic!("expected EndLease, got {other:?}"),
    }
    let got = s
        .leases()
        .get(pb::GetRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(got.state, pb::LeaseState::Released as i32);
    drop(tx);
    s.stop().await;
}

#[tokio::test]
async fn an_agent_stream_must_start_with_a_valid_register() {
    let s = Server::start("grpc").await;
    let mut client = s.agents_as(Some(&s.tokens.join));

    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default())),
    })
    .await
    .unwrap();
    let err = client.connect(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("register"), "{}", err.message());

    let (tx, rx) = mpsc::channel(8);
    let mut bad = register("bad host id");
    if let Some(pb::agent_message::Msg::Register(r)) = bad.msg.as_mut() {
        r.host_id = "has space".into();
    }
    tx.send(bad).await.unwrap();
    let err = client.connect(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("host_id"), "{}", err.message());

    let (tx, rx) = mpsc::channel(8);
    let mut bad = register("h");
    if let Some(pb::agent_message::Msg::Register(r)) = bad.msg.as_mut() {
        r.docker_host = "unix:///var/run/docker.sock".into();
    }
    tx.send(bad).await.unwrap();
    let err = client.connect(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    s.stop().await;
}

#[tokio::test]
async fn every_call_needs_the_right_credential_and_leases_belong_to_their_tenant() {
    let s = Server::start("grpc").await;
    let get = |lease_id: &str| pb::GetRequest {
        lease_id: lease_id.to_owned(),
    };

    // No token, a wrong token, the join token: UNAUTHENTICATED, and the
    // token never appears in the answer.
    let wrong = berth_tls::token::generate();
    for token in [None, Some(wrong.as_str()), Some(s.tokens.join.as_str())] {
        let err = s
            .leases_as(token)
            .acquire(acquire_req("b", 60, 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err}");
        if let Some(t) = token {
            assert!(!err.message().contains(t));
        }
        let err = s.leases_as(token).get(get(&uuid_like())).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    // The admin API needs an admin tenant.
    let mut as_ci = AdminServiceClient::new(s.authed(Some(&s.tokens.ci)));
    let err = as_ci.list_hosts(pb::ListHostsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut as_ops = AdminServiceClient::new(s.authed(Some(&s.tokens.ops)));
    as_ops.list_hosts(pb::ListHostsRequest {}).await.unwrap();
    let err = AdminServiceClient::new(s.authed(None))
        .list_hosts(pb::ListHostsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Agents need the join token; a tenant token is not one.
    for token in [None, Some(s.tokens.ci.as_str()), Some(wrong.as_str())] {
        let (tx, rx) = mpsc::channel(8);
        tx.send(register("intruder")).await.unwrap();
        let err = s
            .agents_as(token)
            .connect(ReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
    }
    let hosts = as_ops
        .list_hosts(pb::ListHostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert!(
        hosts.is_empty(),
        "a refused agent joined the pool: {hosts:?}"
    );

    // A lease of tenant ci is invisible to tenant other.
    let (tx, mut inbound) = s.join(register("h1")).await;
    inbound.message().await.unwrap().unwrap();
    let mut leases = s.leases();
    let acquire =
        tokio::spawn(async move { leases.acquire(acquire_req("shared-id", 600, 5)).await });
    let Some(pb::coordinator_message::Msg::AssignLease(assign)) =
        inbound.message().await.unwrap().unwrap().msg
    else {
        panic!("expected AssignLease")
    };
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::LeaseAccepted(pb::LeaseAccepted {
            lease_id: assign.lease_id.clone(),
        })),
    })
    .await
    .unwrap();
    let lease = acquire.await.unwrap().unwrap().into_inner().lease.unwrap();
    let mut other = s.leases_as(Some(&s.tokens.other));
    let err = other.get(get(&lease.lease_id)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = other
        .release(pb::ReleaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = other
        .renew(pb::RenewRequest {
            lease_id: lease.lease_id.clone(),
            ttl: Some(from_duration(Duration::from_secs(60))),
            csr_pem: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The same build id under another tenant is another build: it queues
    // for its own host instead of joining ci's lease.
    let err = other
        .acquire(acquire_req("shared-id", 600, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    s.active_soon(&lease.lease_id).await;
    drop(tx);
    s.stop().await;
}

#[tokio::test]
async fn plaintext_grpc_is_refused() {
    let s = Server::start("grpc").await;
    let plain = Channel::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let r = match plain.connect().await {
        Err(e) => Err(e.to_string()),
        Ok(ch) => {
            let mut c = LeaseServiceClient::new(InterceptedService::new(
                ch,
                Bearer(Some(s.tokens.ci.clone())),
            ));
            c.get(pb::GetRequest {
                lease_id: uuid_like(),
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        }
    };
    assert!(r.is_err(), "a plaintext call was answered");
    // A client that does not trust the pool CA refuses the server.
    let (other_ca, _) = berth_tls::Ca::generate("other").unwrap();
    let r = Channel::from_shared(format!("https://{}", s.addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(other_ca.cert_pem())),
        )
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    assert!(r.is_err(), "connected while trusting another CA");
    s.stop().await;
}

/// Find as tenant `ci`.
async fn find(s: &Server, build: &str) -> Result<pb::Lease, tonic::Status> {
    s.leases()
        .find(pb::FindRequest {
            build_id: build.into(),
        })
        .await
        .map(|r| r.into_inner().lease.unwrap())
}

#[tokio::test]
async fn a_call_beyond_max_requests_is_refused_naming_it_and_agents_still_join() {
    let s = Server::start_in(&support::fresh_dir("grpc-limit"), &["--max-requests", "2"]).await;
    // Under the limit a call is served: Find of a build with no lease.
    assert_eq!(find(&s, "w1").await.unwrap_err().code(), Code::NotFound);
    let mut waits = vec![];
    for build in ["w1", "w2"] {
        let mut c = s.leases();
        let req = acquire_req(build, 600, 60);
        waits.push(tokio::spawn(async move { c.acquire(req).await }));
        // w1 is queued before w2 asks; then both calls are in flight and a
        // third call is refused.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match find(&s, build).await {
                Ok(l) if build == "w1" => {
                    assert_eq!((l.queue_position, l.tenant_queued), (1, 1));
                    break;
                }
                Err(e) if build == "w2" && e.code() == Code::ResourceExhausted => break,
                _ => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{build} never queued"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Two builds wait: two calls in flight. A third call, of any tenant,
    // is refused at once with the limit named.
    let refused = find(&s, "w1").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-requests") && refused.message().contains(" 2 "),
        "{refused:?}"
    );
    let other = s
        .leases_as(Some(&s.tokens.other))
        .get(pb::GetRequest {
            lease_id: uuid_like(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::ResourceExhausted, "{other:?}");

    // An agent is not counted: it joins and takes the first waiting build.
    let (tx, mut inbound) = s.join(register("fake-limit")).await;
    assert!(matches!(
        inbound.message().await.unwrap().unwrap().msg,
        Some(pb::coordinator_message::Msg::Registered(_))
    ));
    let assign = match inbound.message().await.unwrap().unwrap().msg {
        Some(pb::coordinator_message::Msg::AssignLease(a)) => a,
        other => panic!("expected AssignLease, got {other:?}"),
    };
    assert_eq!(assign.build_id, "w1");
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::LeaseAccepted(pb::LeaseAccepted {
            lease_id: assign.lease_id.clone(),
        })),
    })
    .await
    .unwrap();
    let w1 = waits.remove(0).await.unwrap().unwrap().into_inner();
    assert_eq!(w1.lease.unwrap().lease_id, assign.lease_id);

    // One call in flight again: the same client is served, and sees where
    // its waiting build stands (first and only one of tenant ci).
    let w2 = find(&s, "w2").await.unwrap();
    assert_eq!(w2.state, pb::LeaseState::Queued as i32);
    assert_eq!((w2.queue_position, w2.tenant_queued), (1, 1));
    // Another tenant does not find ci's build.
    let hidden = s
        .leases_as(Some(&s.tokens.other))
        .find(pb::FindRequest {
            build_id: "w2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound, "{hidden:?}");
    // Find validates its input.
    let bad = s
        .leases()
        .find(pb::FindRequest {
            build_id: "has space".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    for w in waits {
        w.abort();
    }
    drop(tx);
    s.stop().await;
}
