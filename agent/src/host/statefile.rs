//! The agent's state on disk: what its host is doing and which lease it
//! serves, so that an agent restarted after a crash or `kill -9` can take the
//! host over (resume the lease, or wipe) instead of guessing.
//!
//! The file is `HOST_DIR/agent-state.json` (next to dockerd's data root). It
//! is written by the driver after every transition that changes it, before
//! the transition's actions run (so `LeaseAccepted` never leaves before the
//! lease is in the file), and always atomically: a temporary file, then a
//! rename. A reader sees the old or the new file, never half of one. The file
//! disappears with the host directory when the host is destroyed, so its
//! presence means "this host outlived its agent" (which is how `berth up`
//! decides to resume a slot's host).
//!
//! The file serves a successor agent on the same boot of the machine: an
//! agent that crashed, was killed or was upgraded. A rename is visible to
//! every later process at once, so the writes are not fsynced (two fsyncs
//! per write cost about 1.8 ms on the acquire path, where the agent writes
//! twice). What only fsync would protect against is a kernel crash or power
//! loss, and after one the host's containers are gone and its file may be
//! stale: the file records the kernel's boot id, and an agent that finds a
//! different one terminates the host instead of resuming it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::host::state::{Host, HostState, Lease};

/// File name inside the host directory.
pub const STATE_FILE: &str = berth_proto::host_dir::AGENT_STATE_FILE;

/// What reading or writing the state file failed at.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("writing {path:?}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path:?}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path:?} is not a berth agent state file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The state file's path for a host directory.
pub fn path(host_dir: &Path) -> PathBuf {
    host_dir.join(STATE_FILE)
}

/// The lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLease {
    pub id: String,
    pub build_id: String,
    /// Wall-clock deadline, milliseconds since the Unix epoch.
    pub deadline_ms: u64,
    /// The key the lease is pinned to (hex SHA-256 of its
    /// SubjectPublicKeyInfo); a lease without one is never resumed.
    #[serde(default)]
    pub key: String,
    /// The front admitted the lease's certificate once.
    #[serde(default)]
    pub in_use: bool,
    // Whether the lease was accepted is not stored: a successor agent opens
    // the front again and accepts again (`state::resume`), and leaving it out
    // saves the write that accepting would cost on the acquire path.
}

/// The file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub host_id: String,
    /// `HostState` as its variant name ("Ready", "Leased", ...).
    pub state: String,
    pub lease: Option<SavedLease>,
    pub draining: bool,
    /// The kernel's boot id when the file was written (empty in files from
    /// before it was recorded, which count as this boot's).
    #[serde(default)]
    pub boot_id: String,
    /// Whether the host has ever held a lease. Once true it stays true: a
    /// host that held a lease is never offered again in single-use mode
    /// (see [`history`]).
    #[serde(default)]
    pub held_lease: bool,
}

/// What a host directory says about the host's past, for an agent that
/// starts on it without taking a lease over (`--resume-host`): on EC2 a
/// restarted agent (systemd's `Restart=always`) lands here on the instance
/// it served before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum History {
    /// No state file: a new host (its data root is checked once dockerd
    /// answers: anything in it is a past nobody vouches for).
    None,
    /// A host that never held a lease: in a warm pool, bootstrapped and
    /// stopped (a file from an earlier boot, state Warming), or an agent
    /// restarted before its host's first lease.
    NeverLeased,
    /// The host held a lease, or its file cannot be trusted: it is
    /// terminated, never Ready.
    Burned(String),
}

/// Reads the host directory's state file and judges the host's past.
pub fn history(host_dir: &Path, current_boot: &str) -> History {
    let saved = match read(&path(host_dir)) {
        Ok(None) => return History::None,
        Ok(Some(s)) => s,
        Err(e) => return History::Burned(format!("its state file is unreadable ({e})")),
    };
    let state = saved.host_state();
    if saved.held_lease || saved.lease.is_some() {
        return History::Burned("it has held a lease".into());
    }
    match state {
        Some(HostState::Leased | HostState::Wiping) => {
            History::Burned("it has held a lease".into())
        }
        Some(HostState::Terminating | HostState::Unhealthy) => {
            History::Burned(format!("its last agent was ending it ({})", saved.state))
        }
        // Stopped into a warm pool before any lease: the expected reboot.
        Some(HostState::Warming | HostState::Booting) => History::NeverLeased,
        // Idle when the machine went down: a lease may have been assigned
        // just before, and only the page cache knew. Not worth the risk.
        Some(HostState::Ready) if saved.from_earlier_boot(current_boot) => {
            History::Burned("its state file is from before the machine rebooted".into())
        }
        Some(HostState::Ready) => History::NeverLeased,
        None => History::Burned(format!("its state file names no state ({:?})", saved.state)),
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), read once; empty
/// where the kernel does not offer it.
pub fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    })
}

impl Saved {
    /// What to store for `host`; `held_lease` is the host's sticky flag.
    pub fn of(host_id: &str, host: &Host, held_lease: bool) -> Self {
        Saved {
            host_id: host_id.to_owned(),
            state: format!("{:?}", host.state),
            lease: host.lease.as_ref().map(|l| SavedLease {
                id: l.id.clone(),
                build_id: l.build_id.clone(),
                deadline_ms: l
                    .deadline
                    .duration_since(UNIX_EPOCH)
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    .unwrap_or(0),
                key: l.key.map(|k| k.to_hex()).unwrap_or_default(),
                in_use: l.in_use,
            }),
            draining: host.draining,
            boot_id: boot_id().to_owned(),
            held_lease: held_lease
                || host.lease.is_some()
                || matches!(host.state, HostState::Leased | HostState::Wiping),
        }
    }

    /// Whether the file was written before the machine last booted.
    pub fn from_earlier_boot(&self, current: &str) -> bool {
        !self.boot_id.is_empty() && !current.is_empty() && self.boot_id != current
    }

    /// The stored state, if it names one.
    pub fn host_state(&self) -> Option<HostState> {
        Some(match self.state.as_str() {
            "Booting" => HostState::Booting,
            "Warming" => HostState::Warming,
            "Ready" => HostState::Ready,
            "Leased" => HostState::Leased,
            "Wiping" => HostState::Wiping,
            "Terminating" => HostState::Terminating,
            "Unhealthy" => HostState::Unhealthy,
            _ => return None,
        })
    }

    /// The stored lease, as the state machine holds it (not yet accepted).
    pub fn lease(&self) -> Option<Lease> {
        self.lease.as_ref().map(|l| Lease {
            id: l.id.clone(),
            build_id: l.build_id.clone(),
            deadline: UNIX_EPOCH + Duration::from_millis(l.deadline_ms),
            accepted: false,
            key: berth_tls::KeyId::parse_hex(&l.key),
            in_use: l.in_use,
        })
    }

    /// The state-machine event for an agent that took this host over. A
    /// file from an earlier boot describes a host whose containers died with
    /// the machine: it counts as unhealthy, and the host is terminated.
    pub fn resumed(
        saved: Option<&Saved>,
        now: SystemTime,
        boot: &str,
    ) -> crate::host::state::Event {
        let rebooted = saved.is_some_and(|s| s.from_earlier_boot(boot));
        crate::host::state::Event::Resumed {
            saved: if rebooted {
                Some(HostState::Unhealthy)
            } else {
                saved.and_then(Saved::host_state)
            },
            lease: saved.and_then(Saved::lease),
            draining: saved.is_some_and(|s| s.draining),
            now,
        }
    }
}

/// Writes `saved` to `file` atomically (see the module's notes on fsync).
pub fn write(file: &Path, saved: &Saved) -> Result<(), StateFileError> {
    let err = |source| StateFileError::Write {
        path: file.to_owned(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(saved).map_err(|e| err(std::io::Error::other(e)))?;
    // Only a successor agent on the same boot reads it: no fsync.
    berth_runtime::fs::write_atomic(file, &bytes, 0o600, berth_runtime::fs::Durability::Process)
        .map_err(err)
}

/// Reads the state file; `Ok(None)` if there is none.
pub fn read(file: &Path) -> Result<Option<Saved>, StateFileError> {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateFileError::Read {
                path: file.to_owned(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StateFileError::Parse {
            path: file.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::state::Event;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("berth-statefile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Lease `l1` of build `b1`, accepted and in use, its key pinned.
    fn lease_until(deadline: SystemTime) -> Lease {
        Lease {
            id: "l1".into(),
            build_id: "b1".into(),
            deadline,
            accepted: true,
            key: Some(berth_tls::KeyId([7; 32])),
            in_use: true,
        }
    }

    #[test]
    fn round_trip_and_atomic_replace() {
        let d = dir("rt");
        let f = path(&d);
        assert!(read(&f).unwrap().is_none());
        let deadline = UNIX_EPOCH + Duration::from_millis(1_900_000_000_123);
        let host = Host {
            state: HostState::Leased,
            lease: Some(lease_until(deadline)),
            draining: true,
            recycle: false,
            warm: false,
            keep_on_shutdown: false,
        };
        write(&f, &Saved::of("h1", &host, false)).unwrap();
        let back = read(&f).unwrap().unwrap();
        assert_eq!(back.host_state(), Some(HostState::Leased));
        let mut unaccepted = host.lease.clone().unwrap();
        unaccepted.accepted = false;
        assert_eq!(back.lease(), Some(unaccepted));
        // Accepting a lease does not change the file: no write on that step.
        let mut accepted = host.clone();
        accepted.lease.as_mut().unwrap().accepted = false;
        assert_eq!(Saved::of("h1", &accepted, false), back);
        assert!(back.draining);
        write(&f, &Saved::of("h1", &Host::booting(false), false)).unwrap();
        assert_eq!(
            read(&f).unwrap().unwrap().host_state(),
            Some(HostState::Booting)
        );
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn garbage_is_an_error_not_a_state() {
        let d = dir("bad");
        let f = path(&d);
        std::fs::write(&f, b"{\"host_id\": 3").unwrap();
        assert!(matches!(read(&f), Err(StateFileError::Parse { .. })));
        // An agent that cannot read the file treats the host as unknown.
        let now = SystemTime::now();
        assert_eq!(
            Saved::resumed(None, now, "boot-a"),
            Event::Resumed {
                saved: None,
                lease: None,
                draining: false,
                now
            }
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_from_an_earlier_boot_is_not_resumed() {
        let now = SystemTime::now();
        let host = Host {
            state: HostState::Leased,
            lease: Some(lease_until(now + Duration::from_secs(600))),
            ..Host::booting(false)
        };
        let mut saved = Saved::of("h1", &host, false);
        assert_eq!(saved.boot_id, boot_id(), "written with this boot's id");
        saved.boot_id = "boot-a".into();
        let Event::Resumed { saved: same, .. } = Saved::resumed(Some(&saved), now, "boot-a") else {
            panic!("not a Resumed event");
        };
        assert_eq!(same, Some(HostState::Leased));
        let Event::Resumed { saved: other, .. } = Saved::resumed(Some(&saved), now, "boot-b")
        else {
            panic!("not a Resumed event");
        };
        assert_eq!(other, Some(HostState::Unhealthy));
        // Files from before boot ids were recorded count as this boot's.
        saved.boot_id.clear();
        assert!(!saved.from_earlier_boot("boot-b"));
        // The state machine ends such a host instead of serving its lease.
        let (after, _) = crate::host::state::next(
            Host::booting(false),
            Saved::resumed(
                Some(&Saved {
                    boot_id: "boot-a".into(),
                    ..saved
                }),
                now,
                "boot-b",
            ),
        );
        assert_eq!(after.state, HostState::Terminating);
    }

    #[test]
    fn a_host_that_held_a_lease_is_burned_and_a_warm_pool_host_is_not() {
        let d = dir("history");
        let now = SystemTime::now();
        let write_as = |state: HostState, lease: bool, held: bool, boot: &str| {
            let host = Host {
                state,
                lease: lease.then(|| lease_until(now + Duration::from_secs(600))),
                ..Host::booting(false)
            };
            let mut saved = Saved::of("h1", &host, held);
            saved.boot_id = boot.into();
            write(&path(&d), &saved).unwrap();
        };
        let burned = |h: History| matches!(h, History::Burned(_));
        assert_eq!(history(&d, "b"), History::None);
        // Stopped into a warm pool, started again: a new boot, state Warming.
        write_as(HostState::Warming, false, false, "a");
        assert_eq!(history(&d, "b"), History::NeverLeased);
        write_as(HostState::Ready, false, false, "b");
        assert_eq!(history(&d, "b"), History::NeverLeased);
        // Idle when the machine went down: not trusted.
        assert!(burned(history(&d, "c")));
        for state in [HostState::Leased, HostState::Wiping] {
            write_as(state, true, false, "b");
            assert!(burned(history(&d, "b")), "{state:?}");
        }
        // After a recycled lease the host is Ready again; the flag stays.
        write_as(HostState::Ready, false, true, "b");
        assert!(burned(history(&d, "b")));
        let saved = read(&path(&d)).unwrap().unwrap();
        assert!(saved.held_lease);
        for state in [HostState::Terminating, HostState::Unhealthy] {
            write_as(state, false, false, "b");
            assert!(burned(history(&d, "b")), "{state:?}");
        }
        std::fs::write(path(&d), "{").unwrap();
        assert!(burned(history(&d, "b")));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
