//! The real coordinator (in-process, real sockets, the real redb store)
//! with its state dir on a small tmpfs that the test fills up: once the
//! store's commits fail, Acquire is refused with UNAVAILABLE, no lease is
//! left active, `/healthz` answers 503 and `/metrics` and PoolStats say
//! why; once space is freed the pool serves the same build again by itself.
//! Needs root (mount); the mount is the test's own (its `BERTH_TEST_TAG`
//! prefix), unmounted by a guard and swept at start if a killed run left it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_proto::from_duration;
use berth_proto::v1 as pb;
use tonic::Code;

mod support;
use support::{Server, csr, host_csr};

/// A tmpfs of `size` mounted at `path`; unmounted (and the directory
/// removed) on drop.
struct Tmpfs {
    root: PathBuf,
    mount: PathBuf,
}

impl Tmpfs {
    fn mount(root: &Path, size: &str) -> Self {
        let mount = root.join("state");
        std::fs::create_dir_all(&mount).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&mount)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", mount.display());
        Self {
            root: root.to_owned(),
            mount,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount_under(&self.root);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Unmounts every mount at or under `root` (a killed run's leftovers).
fn unmount_under(root: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let root = root.to_string_lossy();
    for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
        if m == root || m.starts_with(&format!("{root}/")) {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// Writes a file until the filesystem is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5a_u8; 64 << 10];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    path
}

fn register_ready() -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            csr_pem: host_csr(),
            host_id: "agent-full".into(),
            host_addr: "198.18.0.2".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            provider: "fake".into(),
            state: pb::HostState::Ready as i32,
            ..Default::default()
        })),
    }
}

fn acquire(build: &str, wait: Duration) -> pb::AcquireRequest {
    pb::AcquireRequest {
        csr_pem: csr(),
        build_id: build.into(),
        ttl: Some(from_duration(Duration::from_secs(600))),
        wait: Some(from_duration(wait)),
    }
}

async fn stats(s: &Server) -> pb::PoolStatsResponse {
    s.admin()
        .pool_stats(pb::PoolStatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// GET `path` from the ops endpoint: (status code, body).
async fn ops_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut out))
        .await
        .expect("an answer in time")
        .unwrap();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

/// Leases that hold a host (assigned or active).
fn holding(leases: &[pb::Lease]) -> Vec<&pb::Lease> {
    let held = [
        pb::LeaseState::Assigned as i32,
        pb::LeaseState::Active as i32,
    ];
    leases.iter().filter(|l| held.contains(&l.state)).collect()
}

#[tokio::test]
async fn a_full_disk_stops_the_pool_offering_hosts_and_freeing_space_resumes_it() {
    let root = std::env::temp_dir().join(berth_testkit::test_prefix("berth-store-full"));
    unmount_under(&root);
    let _ = std::fs::remove_dir_all(&root);
    let fs = Tmpfs::mount(&root, "6m");
    let ops_file = root.join("ops.addr");
    let s = Server::start_in(&root, &["--ops-addr-file", ops_file.to_str().unwrap()]).await;
    let ops = std::fs::read_to_string(&ops_file).unwrap();
    assert_eq!(ops_get(&ops, "/healthz").await, (200, "ok\n".to_owned()));

    // Fill the store's filesystem, then make the store grow: builds that
    // find no host still leave an ended lease in the history, so commits
    // need new pages until one fails for want of space.
    let filler = fill(&fs.mount);
    let mut c = s.leases();
    let started = Instant::now();
    let mut attempts = 0;
    let why = loop {
        attempts += 1;
        let st = stats(&s).await;
        if !st.store_error.is_empty() {
            break st.store_error;
        }
        assert!(
            attempts < 20_000,
            "the store never failed on a full filesystem"
        );
        match c
            .acquire(acquire(&format!("fill-{attempts}"), Duration::ZERO))
            .await
        {
            Err(e) if matches!(e.code(), Code::ResourceExhausted | Code::Unavailable) => {}
            other => panic!("unexpected answer while filling: {other:?}"),
        }
    };
    println!(
        "the store failed after {attempts} acquires ({:?}): {why}",
        started.elapsed()
    );
    assert!(why.contains("No space left on device"), "{why}");

    // A host comes: it is not offered, the acquire is refused at once with
    // a clear UNAVAILABLE, and no lease holds a host.
    let (tx, mut inbound) = s.join(register_ready()).await;
    let m = inbound.message().await.unwrap().unwrap().msg;
    assert!(
        matches!(m, Some(pb::coordinator_message::Msg::Registered(_))),
        "{m:?}"
    );
    let refused = c
        .acquire(acquire("the-build", Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("no host is offered while the lease store fails")
            && refused.message().contains("No space left on device"),
        "{}",
        refused.message()
    );
    let st = stats(&s).await;
    assert_eq!(st.hosts_offerable, 0);
    let leases = s
        .admin()
        .list_leases(pb::ListLeasesRequest {
            include_ended: true,
        })
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert!(holding(&leases).is_empty(), "{leases:?}");
    let (code, body) = ops_get(&ops, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("No space left on device"), "{body}");
    let (_, metrics) = ops_get(&ops, "/metrics").await;
    assert!(metrics.contains("berth_store_failing 1"), "{metrics}");
    assert!(
        !metrics.contains("berth_store_commit_failures_total 0\n"),
        "{metrics}"
    );

    // Space again: the store takes the pending commit by itself, the host
    // is offered, and the same build gets its lease and certificate.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stats(&s).await.store_error.is_empty() {
        assert!(Instant::now() < deadline, "the store did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ops_get(&ops, "/healthz").await.0, 200);
    let mut c2 = s.leases();
    let pending = tokio::spawn(async move {
        c2.acquire(acquire("the-build", Duration::from_secs(10)))
            .await
    });
    let assign = loop {
        match tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("an assignment in time")
            .unwrap()
            .and_then(|m| m.msg)
        {
            Some(pb::coordinator_message::Msg::AssignLease(a)) => break a,
            Some(_) => continue,
            None => panic!("the stream ended"),
        }
    };
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::LeaseAccepted(pb::LeaseAccepted {
            lease_id: assign.lease_id.clone(),
        })),
    })
    .await
    .unwrap();
    let answer = pending.await.unwrap().unwrap().into_inner();
    let lease = answer.lease.unwrap();
    assert_eq!(lease.lease_id, assign.lease_id);
    // Answered once the assignment was recorded, whether or not the
    // agent's acceptance came first.
    assert!(
        [
            pb::LeaseState::Assigned as i32,
            pb::LeaseState::Active as i32
        ]
        .contains(&lease.state),
        "{lease:?}"
    );
    assert!(answer.client_cert_pem.contains("BEGIN CERTIFICATE"));
    s.stop().await;
    drop(fs);
    assert!(!root.exists());
}
