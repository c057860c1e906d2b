//! `berth up`'s elastic pool: the actuator side only. The coordinator
//! decides how many hosts the pool should have (`--max-hosts` and friends,
//! passed on to it; see the coordinator's `capacity` module) and retires
//! idle hosts itself; `berth up` follows its `desired_hosts`: it starts
//! slots while it has fewer, and does not replace a host that ended
//! cleanly while it has more. It never stops a host on its own.

use std::path::PathBuf;
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_client::AdminServiceClient;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often the coordinator's desired capacity is read.
pub const POLL: Duration = Duration::from_millis(500);
/// Bound on one read.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The elastic settings of `berth up` (all given with `--max-hosts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elastic {
    pub min: u16,
    pub max: u16,
    pub idle: u16,
    pub scale_in_after: Duration,
}

impl Elastic {
    /// Hosts to start with: what the coordinator will want with no build.
    pub fn initial(&self) -> usize {
        usize::from(self.idle.clamp(self.min, self.max.max(self.min)))
    }

    /// The coordinator's flags for these settings.
    pub fn coordinator_args(&self) -> Vec<String> {
        vec![
            format!("--min-hosts={}", self.min),
            format!("--max-hosts={}", self.max),
            format!("--idle-hosts={}", self.idle),
            format!(
                "--scale-in-after={}",
                humantime::format_duration(self.scale_in_after)
            ),
        ]
    }
}

/// Where the coordinator is and how to call its admin API.
pub struct Admin {
    pub addr: String,
    pub ca: PathBuf,
    pub token: String,
}

/// Publishes the coordinator's `desired_hosts` into the returned watch
/// every [`POLL`] until `stop`; a failed read keeps the last value (a
/// restarting coordinator changes nothing).
pub fn watch_desired(admin: Admin, stop: CancellationToken) -> watch::Receiver<Option<usize>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut client: Option<AdminServiceClient<tonic::transport::Channel>> = None;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if client.is_none() {
                match crate::channel(&admin.addr, &admin.ca).await {
                    Ok(ch) => client = Some(AdminServiceClient::new(ch)),
                    Err(e) => {
                        debug!(error = %e, "desired capacity: coordinator not reachable");
                        continue;
                    }
                }
            }
            let Some(c) = client.as_mut() else { continue };
            let Ok(req) = crate::request(pb::PoolStatsRequest {}, CALL_TIMEOUT, &admin.token)
            else {
                break;
            };
            match c.pool_stats(req).await {
                Ok(s) => {
                    let s = s.into_inner();
                    let desired = s
                        .elastic
                        .then(|| usize::try_from(s.desired_hosts).unwrap_or(usize::MAX));
                    tx.send_if_modified(|d| {
                        let changed = *d != desired;
                        *d = desired;
                        changed
                    });
                }
                Err(e) => {
                    debug!(error = %e, "desired capacity: PoolStats failed");
                    client = None;
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_with_the_idle_target_within_min_and_max() {
        let e = |min, max, idle| Elastic {
            min,
            max,
            idle,
            scale_in_after: Duration::from_secs(90),
        };
        assert_eq!(e(1, 4, 1).initial(), 1);
        assert_eq!(e(0, 4, 0).initial(), 0);
        assert_eq!(e(2, 4, 1).initial(), 2);
        assert_eq!(e(0, 2, 5).initial(), 2);
        assert_eq!(
            e(1, 4, 1).coordinator_args(),
            [
                "--min-hosts=1",
                "--max-hosts=4",
                "--idle-hosts=1",
                "--scale-in-after=1m 30s"
            ]
        );
    }
}
