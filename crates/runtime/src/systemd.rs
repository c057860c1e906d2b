//! systemd's service notification protocol (`sd_notify(3)`), through the
//! `sd-notify` crate: `READY=1` once a daemon serves, `STOPPING=1` when it
//! starts shutting down, and `WATCHDOG=1` every half `WATCHDOG_USEC` when the
//! unit sets `WatchdogSec=`. Without `NOTIFY_SOCKET` (not under systemd, or
//! not `Type=notify`) every call does nothing.
//!
//! The environment is never changed here (that is unsound once threads
//! run): a daemon that starts children which speak the same protocol
//! (dockerd does) removes [`CHILD_ENV`] from their environment instead, so
//! a child can never report the daemon's unit ready or stopping.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Variables systemd sets for the main process only; children must not
/// inherit them.
pub const CHILD_ENV: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Shortest watchdog ping interval accepted, so a tiny `WATCHDOG_USEC` cannot
/// turn the pinger into a busy loop.
pub const MIN_WATCHDOG_INTERVAL: Duration = Duration::from_millis(50);

fn send(state: &[NotifyState<'_>], what: &str) {
    // A manager that cannot be told is no reason to stop serving; systemd
    // itself reports a unit that never became ready.
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "telling systemd {what} failed");
    }
}

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty())
}

/// `READY=1` with a status line: the daemon serves.
pub fn ready(status: &str) {
    tracing::debug!(under_systemd = under_systemd(), "notifying READY=1");
    send(
        &[NotifyState::Ready, NotifyState::Status(status)],
        "READY=1",
    );
}

/// `STOPPING=1` with a status line: the daemon is shutting down.
pub fn stopping(status: &str) {
    tracing::debug!(under_systemd = under_systemd(), "notifying STOPPING=1");
    send(
        &[NotifyState::Stopping, NotifyState::Status(status)],
        "STOPPING=1",
    );
}

/// The watchdog ping interval systemd asks for: half of `WATCHDOG_USEC`,
/// when it is set for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| (d / 2).max(MIN_WATCHDOG_INTERVAL))
}

/// Sends `WATCHDOG=1` every [`watchdog_interval`] until `stop` fires; does
/// nothing when no watchdog is configured. The pings run on the daemon's
/// own runtime, so a runtime that stops making progress stops pinging and
/// systemd restarts the daemon.
pub fn spawn_watchdog(stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    let every = watchdog_interval()?;
    tracing::info!(?every, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => send(&[NotifyState::Watchdog], "WATCHDOG=1"),
            }
        }
    }))
}
