//! Bad input from the network, against a real coordinator on 127.0.0.1:
//! oversized messages (a 10 MB build id), unknown enum values on the agent
//! stream, and garbage sent raw over HTTP/2 with the `h2` crate (bad
//! protobuf, lying length prefixes, unknown compression, unknown methods,
//! random bytes). Each gets a clean gRPC status; nothing panics (a panic
//! hook counts); the coordinator keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use berth_coordinator::CoordinatorConfig;
use berth_proto::v1 as pb;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::lease_service_client::LeaseServiceClient;
use bytes::Bytes;
use clap::Parser;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    c: CoordinatorConfig,
}

struct Server {
    dir: std::path::PathBuf,
    addr: std::net::SocketAddr,
    channel: Channel,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(name: &str) -> Self {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info);
        }));
        let dir =
            std::env::temp_dir().join(format!("berth-malformed-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = Args::parse_from([
            "t",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            &dir.to_string_lossy(),
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
            addr,
            channel,
            shutdown,
            task,
        }
    }

    /// A normal request still gets its normal answer.
    async fn assert_serving(&self) {
        let err = LeaseServiceClient::new(self.channel.clone())
            .acquire(pb::AcquireRequest {
                build_id: "still-serving".into(),
                ttl: None,
                wait: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
        assert!(err.message().contains("no host became ready"), "{err}");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
    }
}

#[tokio::test]
async fn oversized_messages_get_a_clean_status() {
    let s = Server::start("big").await;
    let mut c = LeaseServiceClient::new(s.channel.clone());
    // 10 MB: over the server's message limit, refused before decoding.
    let err = c
        .acquire(pb::AcquireRequest {
            build_id: "x".repeat(10 << 20),
            ttl: None,
            wait: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err}"
    );
    assert!(err.message().len() < 300, "{}", err.message().len());
    // 1 MB: decoded, then refused by validation with a short message.
    let err = c
        .acquire(pb::AcquireRequest {
            build_id: "y".repeat(1 << 20),
            ttl: None,
            wait: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("build_id") && err.message().len() < 200);
    let err = c
        .get(pb::GetRequest {
            lease_id: "z".repeat(3 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    s.assert_serving().await;
    s.stop().await;
}

fn register(host: &str, state: i32) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            host_id: host.into(),
            host_addr: "198.18.0.2".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            provider: "fake".into(),
            state,
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn unknown_enum_values_on_the_agent_stream_are_refused_cleanly() {
    let s = Server::start("enum").await;
    // Register with a host state no version of berth has.
    let (tx, rx) = mpsc::channel(4);
    tx.send(register("bad-enum", 99)).await.unwrap();
    let err = AgentServiceClient::new(s.channel.clone())
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("unknown host state 99"), "{err}");

    // A registered agent that then sends an unknown state is cut off.
    let (tx, rx) = mpsc::channel(4);
    tx.send(register("later-bad", pb::HostState::Ready as i32))
        .await
        .unwrap();
    let mut inbound = AgentServiceClient::new(s.channel.clone())
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(inbound.message().await.unwrap().is_some(), "no Registered");
    // An unknown end reason is tolerated (treated as unspecified) ...
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::LeaseEnded(pb::LeaseEnded {
            lease_id: "4f1c2a3b-0000-4000-8000-000000000001".into(),
            reason: 77,
        })),
    })
    .await
    .unwrap();
    // ... an unknown host state is not.
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::StateChanged(pb::StateChanged {
            state: 42,
            lease_id: String::new(),
            reason: String::new(),
        })),
    })
    .await
    .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the coordinator kept a stream that sent garbage");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    s.assert_serving().await;
    s.stop().await;
}

/// Sends one raw gRPC call over HTTP/2 and returns its grpc-status (from
/// the headers of a trailers-only answer, or from the trailers).
async fn raw_call(
    addr: std::net::SocketAddr,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Option<u32> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    send.send_data(Bytes::from(body), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no answer within 10s")
        .ok()?;
    let grpc_status = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
    };
    if let Some(code) = grpc_status(resp.headers()) {
        return Some(code);
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        if chunk.is_err() {
            break;
        }
    }
    let trailers = body.trailers().await.ok()??;
    grpc_status(&trailers)
}

fn frame(compressed: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![compressed];
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[tokio::test]
async fn garbage_sent_raw_over_http2_gets_a_status_and_the_coordinator_keeps_serving() {
    let s = Server::start("raw").await;
    const ACQUIRE: &str = "/berth.v1.LeaseService/Acquire";
    const CONNECT: &str = "/berth.v1.AgentService/Connect";
    const GRPC: &str = "application/grpc";
    let garbage = vec![0xff; 32];
    let cases: Vec<(&str, &str, Vec<u8>, &[u32])> = vec![
        // Not protobuf at all.
        (ACQUIRE, GRPC, frame(0, 32, &garbage), &[13, 3]),
        // Field 1 (build_id) as a varint instead of a string.
        (ACQUIRE, GRPC, frame(0, 2, &[0x08, 0x01]), &[13, 3]),
        // A length prefix that promises far more than is sent.
        (ACQUIRE, GRPC, frame(0, 1 << 30, b"abc"), &[13, 11, 8]),
        // A prefix cut short.
        (ACQUIRE, GRPC, vec![0, 0], &[13]),
        // "Compressed" without any grpc-encoding.
        (ACQUIRE, GRPC, frame(1, 3, b"abc"), &[13, 12]),
        // A method that does not exist.
        (
            "/berth.v1.LeaseService/Steal",
            GRPC,
            frame(0, 0, &[]),
            &[12],
        ),
        // Garbage as the first message of an agent stream.
        (CONNECT, GRPC, frame(0, 32, &garbage), &[13, 3]),
        // An agent stream whose first message is empty (no register).
        (CONNECT, GRPC, frame(0, 0, &[]), &[3]),
    ];
    for (path, ct, body, codes) in cases {
        let got = raw_call(s.addr, path, ct, body.clone()).await;
        let code = got.unwrap_or_else(|| panic!("{path} {body:?}: no grpc-status"));
        assert!(
            codes.contains(&code),
            "{path} {body:?}: grpc-status {code}, wanted one of {codes:?}"
        );
    }
    // Random bytes, reproducibly (xorshift), against both kinds of method.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..64 {
        let len = (i * 7) % 200;
        let body: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let path = if i % 2 == 0 { ACQUIRE } else { CONNECT };
        let code = raw_call(s.addr, path, GRPC, body.clone()).await;
        assert!(code.is_some_and(|c| c != 0), "{path} {body:?}: {code:?}");
    }
    s.assert_serving().await;
    s.stop().await;
}
