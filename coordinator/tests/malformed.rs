//! Bad input from the network, against a real coordinator on 127.0.0.1:
//! oversized messages (a 10 MB build id), unknown enum values on the agent
//! stream, and garbage sent raw over HTTP/2 with the `h2` crate (bad
//! protobuf, lying length prefixes, unknown compression, unknown methods,
//! random bytes). Each gets a clean gRPC status; nothing panics (a panic
//! hook counts); the coordinator keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use berth_proto::v1 as pb;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

static PANICS: AtomicUsize = AtomicUsize::new(0);

mod support;
use support::{Server, csr, host_csr};

/// A coordinator for test `name`, with a panic hook that counts panics.
async fn start(name: &str) -> Server {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        prev(info);
    }));
    Server::start(&format!("malformed-{name}")).await
}

/// A normal request still gets its normal answer.
async fn assert_serving(s: &Server) {
    let err = s
        .leases()
        .acquire(pb::AcquireRequest {
            build_id: "still-serving".into(),
            csr_pem: csr(),
            ttl: None,
            wait: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("no host became ready"), "{err}");
}

async fn stop(s: Server) {
    s.stop().await;
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}

#[tokio::test]
async fn oversized_messages_get_a_clean_status() {
    let s = start("big").await;
    let mut c = s.leases();
    // 10 MB: over the server's message limit, refused before decoding.
    let err = c
        .acquire(pb::AcquireRequest {
            build_id: "x".repeat(10 << 20),
            csr_pem: csr(),
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
            csr_pem: csr(),
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
    for build_id in ["f".repeat(2 << 20), String::new(), "\u{0}\u{ff}".into()] {
        let err = c.find(pb::FindRequest { build_id }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains("build_id") && err.message().len() < 200);
    }
    assert_serving(&s).await;
    stop(s).await;
}

fn register(host: &str, state: i32) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            csr_pem: host_csr(),
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
    let s = start("enum").await;
    // Register with a host state no version of berth has.
    let (tx, rx) = mpsc::channel(4);
    tx.send(register("bad-enum", 99)).await.unwrap();
    let err = s
        .agents()
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
    let mut inbound = s
        .agents()
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
    assert_serving(&s).await;
    stop(s).await;
}

/// Sends one raw gRPC call over HTTP/2 (TLS, with the credential the
/// method needs, so the body is really decoded) and returns its grpc-status
/// (from the headers of a trailers-only answer, or from the trailers).
async fn raw_call(s: &Server, path: &str, content_type: &str, body: Vec<u8>) -> Option<u32> {
    let addr = s.addr;
    let token = if path.starts_with("/berth.v1.AgentService/") {
        &s.tokens.join
    } else {
        &s.tokens.ci
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = s.raw_tls().connect(name, tcp).await.unwrap();
    let (h2, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://{addr}{path}"))
        .header("content-type", content_type)
        .header("authorization", format!("Bearer {token}"))
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
    let s = start("raw").await;
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
        let got = raw_call(&s, path, ct, body.clone()).await;
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
        let code = raw_call(&s, path, GRPC, body.clone()).await;
        assert!(code.is_some_and(|c| c != 0), "{path} {body:?}: {code:?}");
    }
    assert_serving(&s).await;
    stop(s).await;
}
