//! The coordinator's gRPC API over a real socket on 127.0.0.1: input
//! validation and status codes, and one lease carried by a fake agent that
//! speaks the real agent stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use berth_coordinator::CoordinatorConfig;
use berth_proto::from_duration;
use berth_proto::v1 as pb;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::lease_service_client::LeaseServiceClient;
use clap::Parser;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    c: CoordinatorConfig,
}

struct Server {
    dir: String,
    channel: Channel,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("berth-grpc-{}-{n}", std::process::id()));
        let dir = dir.to_string_lossy().into_owned();
        let cfg = Args::parse_from([
            "t",
            "--listen",
            "127.0.0.1:0",
            "--max-ttl",
            "2h",
            "--state-dir",
            &dir,
        ])
        .c;
        let listener = berth_coordinator::bind(&cfg).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                berth_coordinator::serve(cfg, listener, shutdown)
                    .await
                    .unwrap();
            }
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            dir,
            channel,
            shutdown,
            task,
        }
    }

    fn leases(&self) -> LeaseServiceClient<Channel> {
        LeaseServiceClient::new(self.channel.clone())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn acquire_req(build: &str, ttl_s: i64, wait_s: i64) -> pb::AcquireRequest {
    pb::AcquireRequest {
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
    let s = Server::start().await;
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
async fn a_fake_agent_carries_a_lease_from_acquire_to_release() {
    let s = Server::start().await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(register("fake-1")).await.unwrap();
    let mut inbound = AgentServiceClient::new(s.channel.clone())
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = inbound.message().await.unwrap().unwrap().msg;
    assert!(
        matches!(first, Some(pb::coordinator_message::Msg::Registered(r)) if r.heartbeat_interval_ms > 0)
    );

    let mut leases = s.leases();
    let acquire = tokio::spawn(async move { leases.acquire(acquire_req("ci-1", 600, 5)).await });
    let assign = match inbound.message().await.unwrap().unwrap().msg {
        Some(pb::coordinator_message::Msg::AssignLease(a)) => a,
        other => panic!("expected AssignLease, got {other:?}"),
    };
    assert_eq!(assign.build_id, "ci-1");
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::LeaseAccepted(pb::LeaseAccepted {
            lease_id: assign.lease_id.clone(),
        })),
    })
    .await
    .unwrap();
    let lease = acquire.await.unwrap().unwrap().into_inner().lease.unwrap();
    assert_eq!(lease.lease_id, assign.lease_id);
    assert_eq!(lease.docker_host, "tcp://198.18.0.2:2376");
    assert_eq!(lease.host_addr, "198.18.0.2");
    assert_eq!(lease.state, pb::LeaseState::Active as i32);

    // A retry of the same build gets the same lease at once.
    let again = s
        .leases()
        .acquire(acquire_req("ci-1", 600, 5))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(again.lease_id, lease.lease_id);

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
    let s = Server::start().await;
    let mut client = AgentServiceClient::new(s.channel.clone());

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
