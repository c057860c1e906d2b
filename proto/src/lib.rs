//! berth's wire contract. The `.proto` files under `proto/berth/v1` are the
//! only definition of what crosses the network between CI, the coordinator and
//! the agents; this crate compiles them and adds small conversions that every
//! side needs (durations and timestamps).

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("berth.v1");

    /// Encoded `FileDescriptorSet` for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("berth_v1_descriptor");
}

pub use prost_types;

pub mod names {
    //! The one way berth names a value of the contract's enums to people:
    //! `LEASE_STATE_HOST_LOST` is `host-lost` in CLI tables, metric labels
    //! and error messages alike; `*_UNSPECIFIED` is `unknown`, and a number
    //! no enum value has is `unknown(N)`.

    use super::v1;

    fn kebab(proto_name: &str, prefix: &str) -> String {
        match proto_name.trim_start_matches(prefix) {
            "UNSPECIFIED" => "unknown".to_owned(),
            rest => rest.to_lowercase().replace('_', "-"),
        }
    }

    pub fn lease_state(v: i32) -> String {
        v1::LeaseState::try_from(v)
            .map(|s| kebab(s.as_str_name(), "LEASE_STATE_"))
            .unwrap_or_else(|_| format!("unknown({v})"))
    }

    pub fn host_state(v: i32) -> String {
        v1::HostState::try_from(v)
            .map(|s| kebab(s.as_str_name(), "HOST_STATE_"))
            .unwrap_or_else(|_| format!("unknown({v})"))
    }

    pub fn timeline_step(v: i32) -> String {
        v1::TimelineStep::try_from(v)
            .map(|s| kebab(s.as_str_name(), "TIMELINE_STEP_"))
            .unwrap_or_else(|_| format!("unknown({v})"))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn names_are_kebab_case_without_the_prefix() {
            assert_eq!(lease_state(v1::LeaseState::HostLost as i32), "host-lost");
            assert_eq!(host_state(v1::HostState::Ready as i32), "ready");
            assert_eq!(host_state(v1::HostState::Unspecified as i32), "unknown");
            assert_eq!(
                timeline_step(v1::TimelineStep::HostTerminated as i32),
                "host-terminated"
            );
            assert_eq!(lease_state(999), "unknown(999)");
        }
    }
}

pub mod host_dir {
    //! What an agent leaves in its host's directory (`STATE_DIR/HOST_ID/`)
    //! that its supervisor reads: `berth up` restarts a slot with
    //! `--resume-host` when the state file outlived the agent, and the
    //! tests read it to see what the agent was doing.

    /// The agent's state file: present while the host exists and its agent
    /// may have died; removed when the host ends cleanly.
    pub const AGENT_STATE_FILE: &str = "agent-state.json";
}

pub mod supervisor {
    //! The lines an agent prints on stdout for whatever supervises it
    //! (`berth up`, the tests): `READY ...` once its host is ready, and
    //! `ENDED ...` once the host it ran is destroyed. A supervisor replaces
    //! a host that ended after serving a lease at once (the normal life of
    //! a single-use host, however short the build), and backs off only for
    //! a host that ended without serving one (a failed boot, a crash loop).

    /// What the line printed once the host is ready starts with.
    pub const READY_PREFIX: &str = "READY ";
    /// What the line printed once the host is destroyed starts with.
    pub const ENDED_PREFIX: &str = "ENDED ";

    /// The `ENDED` line: the host, how many leases it served, and why it
    /// ended (free text, last on the line).
    pub fn ended_line(host_id: &str, leases_served: u64, reason: &str) -> String {
        let reason = reason.replace(['\n', '\r'], " ");
        format!("{ENDED_PREFIX}host_id={host_id} leases_served={leases_served} reason={reason}")
    }

    /// An `ENDED` line, parsed.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Ended {
        pub host_id: String,
        pub leases_served: u64,
        pub reason: String,
    }

    /// Parses an `ENDED` line; `None` for any other line.
    pub fn parse_ended(line: &str) -> Option<Ended> {
        let rest = line.strip_prefix(ENDED_PREFIX)?;
        let (fields, reason) = rest.split_once(" reason=").unwrap_or((rest, ""));
        let mut host_id = None;
        let mut leases_served = None;
        for w in fields.split_whitespace() {
            if let Some(h) = w.strip_prefix("host_id=") {
                host_id = Some(h.to_owned());
            } else if let Some(n) = w.strip_prefix("leases_served=") {
                leases_served = n.parse().ok();
            }
        }
        Some(Ended {
            host_id: host_id?,
            leases_served: leases_served?,
            reason: reason.to_owned(),
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn an_ended_line_round_trips() {
            let line = ended_line("berth-3", 1, "lease over; single-use host\nx");
            assert_eq!(
                line,
                "ENDED host_id=berth-3 leases_served=1 reason=lease over; single-use host x"
            );
            assert_eq!(
                parse_ended(&line),
                Some(Ended {
                    host_id: "berth-3".into(),
                    leases_served: 1,
                    reason: "lease over; single-use host x".into(),
                })
            );
            assert_eq!(parse_ended("READY host_id=berth-3"), None);
            assert_eq!(parse_ended("ENDED host_id=berth-3 leases_served=x"), None);
            assert_eq!(parse_ended("ENDED leases_served=0 reason=y"), None);
        }
    }
}

pub mod ports {
    //! Where berth's endpoints listen unless told otherwise. Part of the
    //! contract: the CLI, the agents, the packaged units and the deployment
    //! templates all assume them.

    /// The coordinator's gRPC API (CI, agents, operators).
    pub const COORDINATOR: u16 = 7070;
    /// The coordinator's gRPC address on one machine (`berth up`), and the
    /// CLI's default.
    pub const COORDINATOR_LOCAL: &str = "127.0.0.1:7070";
    /// The coordinator's ops endpoint (`/metrics`, `/healthz`).
    pub const COORDINATOR_OPS: u16 = 9101;
    /// The ops endpoint's default address.
    pub const COORDINATOR_OPS_LOCAL: &str = "127.0.0.1:9101";
    /// A host's Docker API: the agent's mutual-TLS front.
    pub const DOCKER_FRONT: u16 = 2376;
    /// A host agent's status endpoint (`/healthz`, `/readyz`, `/status`, `/metrics`).
    pub const AGENT_STATUS: u16 = 9102;
}

pub mod local {
    //! The local provider's address range: every host of a pool on one
    //! machine has an address of its own in it (a network namespace per
    //! host, `agent/src/provider/netns.rs`), and the coordinator's local
    //! admission admits no other address by default.

    use std::net::Ipv4Addr;

    /// 198.18.0.0/15, the benchmarking range (RFC 2544): never routed
    /// anywhere real.
    pub const HOST_RANGE_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
    /// The prefix length of [`HOST_RANGE_BASE`].
    pub const HOST_RANGE_PREFIX: u8 = 15;
    /// The range as a flag value.
    pub const HOST_RANGE: &str = "198.18.0.0/15";
}

pub mod codec {
    //! The codec every berth.v1 service uses: prost, with 1 KiB per-call
    //! encode and decode buffers instead of tonic's default 8 KiB. Every
    //! agent holds one `Connect` stream for its whole life, so the
    //! coordinator keeps two such buffers per connected agent; berth's
    //! messages are a few hundred bytes, and a larger one (a `ListHosts`
    //! answer) still fits, because the buffers grow on demand.

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Initial size of each call's encode and decode buffer.
    pub const BUFFER_SIZE: usize = 1024;
    /// Bytes encoded before a streaming call yields to other tasks
    /// (tonic's default).
    pub const YIELD_THRESHOLD: usize = 32 * 1024;

    /// [`ProstCodec`] with [`BUFFER_SIZE`] buffers.
    #[derive(Debug, Clone)]
    pub struct SmallBufferCodec<T, U>(std::marker::PhantomData<(T, U)>);

    impl<T, U> Default for SmallBufferCodec<T, U> {
        fn default() -> Self {
            Self(std::marker::PhantomData)
        }
    }

    fn settings() -> BufferSettings {
        BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
    }

    impl<T, U> Codec for SmallBufferCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(settings())
        }
    }
}

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A protobuf `Duration` as a std `Duration`; `None` if negative or out of range.
pub fn to_duration(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(d.seconds).ok()?,
        u32::try_from(d.nanos).ok()?,
    ))
}

/// A std `Duration` as a protobuf `Duration` (saturating at i64::MAX seconds).
pub fn from_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf `Timestamp` as a `SystemTime`; `None` if before the epoch or invalid.
pub fn to_system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let d = to_duration(&prost_types::Duration {
        seconds: t.seconds,
        nanos: t.nanos,
    })?;
    UNIX_EPOCH.checked_add(d)
}

/// A `SystemTime` as a protobuf `Timestamp` (times before the epoch become the epoch).
pub fn from_system_time(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let d = from_duration(d);
    prost_types::Timestamp {
        seconds: d.seconds,
        nanos: d.nanos,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_and_reject_negatives() {
        let d = Duration::from_millis(1500);
        assert_eq!(to_duration(&from_duration(d)), Some(d));
        assert_eq!(
            to_duration(&prost_types::Duration {
                seconds: -1,
                nanos: 0
            }),
            None
        );
        assert_eq!(
            to_duration(&prost_types::Duration {
                seconds: 0,
                nanos: 1_000_000_000
            }),
            None
        );
    }

    #[test]
    fn timestamps_round_trip() {
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(to_system_time(&from_system_time(t)), Some(t));
        assert_eq!(
            to_system_time(&prost_types::Timestamp {
                seconds: -5,
                nanos: 0
            }),
            None
        );
    }
}
