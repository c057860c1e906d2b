//! The agent-stream fuzz harness (`berth_coordinator::fuzzing`) as a
//! regular test: replays the checked-in corpus of the cargo-fuzz target
//! (`coordinator/fuzz/corpus/agent_stream`), structured seeds, and random
//! inputs from proptest. Any panic (including a broken pool invariant or a
//! tenant reaching another tenant's lease) fails the test. The fuzzer
//! itself is not run here nor by `scripts/test.sh`: `scripts/fuzz.sh` runs
//! it, and what it finds worth keeping goes into the corpus replayed here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use berth_coordinator::fuzzing::{OPS, agent_stream, record};
use berth_proto::v1 as pb;
use proptest::prelude::*;
use prost::Message;

fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/agent_stream")
}

/// Scripts that reach the interesting states: hosts registered, leases
/// assigned, accepted, rejected, ended by either side, wiped with and
/// without verification, renewed, released and probed by other tenants,
/// callers giving up, hosts drained, lost and back, condemned and let go.
fn seeds() -> Vec<Vec<u8>> {
    let reg = |state: pb::HostState| {
        pb::Register {
            host_id: "x".into(),
            host_addr: "198.18.0.2".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            state: state as i32,
            ..Default::default()
        }
        .encode_to_vec()
    };
    let msg = |m: pb::agent_message::Msg| pb::AgentMessage { msg: Some(m) }.encode_to_vec();
    let ready = msg(pb::agent_message::Msg::StateChanged(pb::StateChanged {
        state: pb::HostState::Ready as i32,
        ..Default::default()
    }));
    let hb = msg(pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default()));
    let wipe = msg(pb::agent_message::Msg::WipeReport(pb::WipeReport {
        verified: true,
        ..Default::default()
    }));
    let cat = |rs: Vec<Vec<u8>>| rs.concat();
    vec![
        cat(vec![
            record(5, 0, &reg(pb::HostState::Ready)),
            record(5, 1, &reg(pb::HostState::Ready)),
            record(1, 0, &[]),
            record(1, 1, &[]),
            record(6, 0, &[]),
            record(6, 5, &[]),
            record(0, 0, &hb),
            record(2, 0, &[]),
            record(7, 0, &[2, 5]),
            record(0, 0, &wipe),
            record(0, 0, &ready),
            record(3, 200, &[]),
        ]),
        cat(vec![
            record(5, 2, &reg(pb::HostState::Ready)),
            record(1, 2, &[]),
            record(4, 2, &[]),
            record(5, 2, &reg(pb::HostState::Leased)),
            record(3, 40, &[]),
            record(6, 2, &[]),
            record(7, 2, &[1, 2]),
            record(7, 2, &[0]),
        ]),
        cat(vec![
            record(1, 3, &[]),
            record(3, 20, &[]),
            record(5, 3, &reg(pb::HostState::Ready)),
            record(7, 3, &[2, 7]),
            record(0, 3, &[0xff, 0x01, 0x02]),
            record(5, 3, &[0x50, 0x63]),
        ]),
        // Three tenants; renewals; another tenant trying release, renew and
        // get; a rejected assignment; an unverified wipe; views.
        cat(vec![
            record(5, 0, &reg(pb::HostState::Ready)),
            record(5, 1, &reg(pb::HostState::Ready)),
            record(1, 0x08, &[]),
            record(1, 0x29, &[]),
            record(1, 0x4a, &[]),
            record(7, 0, &[0]),
            record(13, 0, &[]),
            record(6, 5, &[]),
            record(8, 0, &[0, 0, 30]),
            record(8, 1, &[1, 1, 3]),
            record(2, 0, &[1, 0]),
            record(12, 1, &[1, 1]),
            record(12, 1, &[0]),
            record(2, 1, &[0]),
            record(7, 5, &[3, 1, 4, 200]),
            record(0, 1, &ready),
            record(13, 0, &[]),
            record(3, 10, &[]),
        ]),
        // A drained host, a caller that gives up, the sweeper condemning a
        // disconnected host (its agent is refused) and letting it go.
        cat(vec![
            record(5, 2, &reg(pb::HostState::Ready)),
            record(9, 2, &[]),
            record(1, 0x10, &[]),
            record(10, 0, &[]),
            record(5, 3, &reg(pb::HostState::Ready)),
            record(4, 3, &[]),
            record(11, 3, &[0]),
            record(5, 3, &reg(pb::HostState::Ready)),
            record(13, 0, &[]),
            record(3, 40, &[]),
            record(11, 3, &[1]),
            record(5, 3, &reg(pb::HostState::Ready)),
            record(1, 0x11, &[]),
            record(13, 0, &[]),
        ]),
    ]
}

#[test]
fn the_checked_in_corpus_and_seeds_replay_cleanly() {
    if std::env::var_os("BERTH_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(corpus_dir()).unwrap();
        for (i, s) in seeds().iter().enumerate() {
            std::fs::write(corpus_dir().join(format!("seed-{i}")), s).unwrap();
        }
    }
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .expect("the fuzz corpus directory")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 3, "corpus has only {} inputs", files.len());
    for f in &files {
        agent_stream(&std::fs::read(f).unwrap());
    }
    for s in seeds() {
        agent_stream(&s);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        agent_stream(&data);
    }

    #[test]
    fn random_scripts_keep_the_invariants(
        recs in proptest::collection::vec((0u8..OPS, any::<u8>(), proptest::collection::vec(any::<u8>(), 0..48)), 0..80)
    ) {
        let data: Vec<u8> = recs.iter().flat_map(|(op, arg, p)| record(*op, *arg, p)).collect();
        agent_stream(&data);
    }
}
