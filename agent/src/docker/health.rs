//! dockerd's health, watched from outside: its process must exist (per its
//! pidfile) and it must answer `/_ping`. Waiting on the child process alone
//! is not enough: a daemon that hangs still runs, and a daemon adopted by a
//! restarted agent is not its child. A dead or silent dockerd becomes
//! `Event::DaemonExited` for the driver, which makes the host Unhealthy and
//! terminates it (and the coordinator ends any lease on it as host-lost).
//!
//! [`Probe`] is the seam; [`DaemonProbe`] checks the real dockerd. Both
//! watchers ([`watch()`] on the probe, [`watch_exit`] on the child process)
//! report through one [`FailureReporter`]: the event goes straight to the
//! driver, and the count is published in a [`DaemonHealth`] `watch` for
//! whoever reads it (the status board), which is never in that path.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::docker::client::BollardDocker;
use crate::host::state::Event;

/// How often dockerd is checked.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on one health ping (bollard's own ping timeout is shorter).
pub const HEALTH_PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Consecutive failed pings before dockerd counts as dead: one slow answer
/// under load must not destroy a host.
pub const MAX_PING_FAILURES: u32 = 3;

/// What the monitor asks of a daemon.
pub trait Probe: Send + Sync + 'static {
    /// Whether its process still exists.
    fn alive(&self) -> bool;
    /// One `/_ping`.
    fn ping(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// The host's real dockerd.
#[derive(Debug, Clone)]
pub struct DaemonProbe {
    pub docker: BollardDocker,
    pub pidfile: PathBuf,
    /// Set while a wipe replaces dockerd (`docker::reset`): its absence
    /// then is planned, not a failure.
    pub replacing: Option<Arc<AtomicBool>>,
}

impl DaemonProbe {
    fn replacing(&self) -> bool {
        self.replacing
            .as_ref()
            .is_some_and(|r| r.load(Ordering::SeqCst))
    }
}

impl Probe for DaemonProbe {
    fn alive(&self) -> bool {
        self.replacing()
            || crate::docker::dockerd::read_pid(&self.pidfile)
                .is_some_and(crate::provider::cleanup::alive)
    }

    async fn ping(&self) -> Result<(), String> {
        match self.docker.ping().await {
            Err(_) if self.replacing() => Ok(()),
            r => r.map_err(|e| e.to_string()),
        }
    }
}

/// What has been seen of dockerd failing, published by [`FailureReporter`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonHealth {
    /// Times dockerd was seen to exit or stop answering.
    pub failures: u64,
    /// What was seen the last time.
    pub last_failure: Option<String>,
}

/// Where dockerd's failures go: straight to the driver (which makes the
/// host Unhealthy), and counted in the [`DaemonHealth`] `watch`.
#[derive(Debug, Clone)]
pub struct FailureReporter {
    to_driver: mpsc::Sender<Event>,
    health: watch::Sender<DaemonHealth>,
}

impl FailureReporter {
    /// A reporter to `to_driver`, and the `watch` its failures are counted in.
    pub fn new(to_driver: mpsc::Sender<Event>) -> (Self, watch::Receiver<DaemonHealth>) {
        let (health, rx) = watch::channel(DaemonHealth::default());
        (FailureReporter { to_driver, health }, rx)
    }

    /// Counts the failure, then hands `DaemonExited` to the driver; false
    /// when the driver is gone.
    pub async fn report(&self, detail: String) -> bool {
        self.health.send_modify(|h| {
            h.failures += 1;
            h.last_failure = Some(detail.clone());
        });
        self.to_driver
            .send(Event::DaemonExited { detail })
            .await
            .is_ok()
    }
}

/// Waits for dockerd's process (`exited` resolves with how it ended) and
/// reports its exit, unless `stop` fires first. Stopping drops `exited`:
/// for a child started with `kill_on_drop`, that ends dockerd too, so a
/// daemon never outlives the agent's tasks.
pub async fn watch_exit(
    exited: impl Future<Output = String>,
    reporter: FailureReporter,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = stop.cancelled() => {}
        detail = exited => {
            tracing::info!(%detail, "dockerd exited");
            reporter.report(detail).await;
        }
    }
}

/// Checks `probe` every [`HEALTH_INTERVAL`] until it fails or `stop` fires;
/// on failure reports `DaemonExited` with what was seen, once.
pub async fn watch<P: Probe>(probe: P, reporter: FailureReporter, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
        let detail = if !probe.alive() {
            Some("dockerd's process is gone".to_owned())
        } else {
            match tokio::time::timeout(HEALTH_PING_TIMEOUT, probe.ping()).await {
                Ok(Ok(())) => {
                    failures = 0;
                    None
                }
                Ok(Err(e)) => {
                    failures += 1;
                    (failures >= MAX_PING_FAILURES)
                        .then(|| format!("dockerd failed {failures} pings in a row: {e}"))
                }
                Err(_) => {
                    failures += 1;
                    (failures >= MAX_PING_FAILURES).then(|| {
                        format!("dockerd did not answer {failures} pings in a row within {HEALTH_PING_TIMEOUT:?}")
                    })
                }
            }
        };
        if let Some(detail) = detail {
            tracing::error!(%detail, "dockerd is unhealthy");
            reporter.report(detail).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    #[derive(Clone, Default)]
    struct Fake {
        dead: Arc<AtomicBool>,
        failing: Arc<AtomicBool>,
        pings: Arc<AtomicU32>,
    }

    impl Probe for Fake {
        fn alive(&self) -> bool {
            !self.dead.load(Ordering::SeqCst)
        }
        async fn ping(&self) -> Result<(), String> {
            self.pings.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                Err("connection refused".into())
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_daemon_is_left_alone_and_a_dead_one_reported_at_once() {
        let fake = Fake::default();
        let (tx, mut rx) = mpsc::channel(4);
        let (reporter, health) = FailureReporter::new(tx);
        let task = tokio::spawn(watch(fake.clone(), reporter, CancellationToken::new()));
        tokio::time::sleep(HEALTH_INTERVAL * 10).await;
        assert!(rx.try_recv().is_err());
        assert!(fake.pings.load(Ordering::SeqCst) >= 9);
        fake.dead.store(true, Ordering::SeqCst);
        let ev = rx.recv().await.unwrap();
        assert_eq!(
            ev,
            Event::DaemonExited {
                detail: "dockerd's process is gone".into()
            }
        );
        task.await.unwrap();
        // Counted where the status board reads it.
        assert_eq!(
            *health.borrow(),
            DaemonHealth {
                failures: 1,
                last_failure: Some("dockerd's process is gone".into()),
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_exit_is_reported_and_a_stop_drops_the_process_unreported() {
        let (tx, mut rx) = mpsc::channel(4);
        let (reporter, health) = FailureReporter::new(tx);
        let (exit_tx, exit_rx) = tokio::sync::oneshot::channel::<String>();
        let exited = async move { exit_rx.await.unwrap_or_default() };
        let task = tokio::spawn(watch_exit(
            exited,
            reporter.clone(),
            CancellationToken::new(),
        ));
        exit_tx.send("signal: 9".into()).unwrap();
        task.await.unwrap();
        assert_eq!(
            rx.recv().await,
            Some(Event::DaemonExited {
                detail: "signal: 9".into()
            })
        );
        assert_eq!(health.borrow().failures, 1);

        let (exit_tx, exit_rx) = tokio::sync::oneshot::channel::<String>();
        let exited = async move { exit_rx.await.unwrap_or_default() };
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch_exit(exited, reporter, stop.clone()));
        stop.cancel();
        task.await.unwrap();
        assert!(
            exit_tx.is_closed(),
            "the process handle outlived its watcher"
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(health.borrow().failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_daemon_is_reported_after_consecutive_failures_only() {
        let fake = Fake::default();
        let (tx, mut rx) = mpsc::channel(4);
        let (reporter, _health) = FailureReporter::new(tx);
        let _task = tokio::spawn(watch(fake.clone(), reporter, CancellationToken::new()));
        fake.failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(HEALTH_INTERVAL * 2 + Duration::from_millis(10)).await;
        // Two failures, then an answer: the count starts over.
        fake.failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(HEALTH_INTERVAL * 2).await;
        assert!(rx.try_recv().is_err(), "reported after a recovered ping");
        fake.failing.store(true, Ordering::SeqCst);
        let start = tokio::time::Instant::now();
        let Some(Event::DaemonExited { detail }) = rx.recv().await else {
            panic!("no report")
        };
        assert!(detail.contains("3 pings in a row"), "{detail}");
        assert!(start.elapsed() >= HEALTH_INTERVAL * 2);
    }
}
