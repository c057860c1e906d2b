//! One shutdown path: SIGTERM or SIGINT cancels one token, which every
//! long-running task holds (or a child of it). What a binary does when the
//! signal comes (tell systemd it is stopping, log) goes in `on_signal`.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Resolves when SIGINT or SIGTERM arrives; returns its name.
pub async fn signalled() -> &'static str {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // No signal handling (should not happen on Unix): Ctrl-C only.
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// A token cancelled by the first SIGTERM or SIGINT, after `on_signal` ran
/// with the signal's name. Must be called inside a tokio runtime.
pub fn on_signal(on_signal: impl FnOnce(&'static str) + Send + 'static) -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn({
        let token = token.clone();
        async move {
            let name = signalled().await;
            on_signal(name);
            token.cancel();
        }
    });
    token
}

/// A periodic pass's clock: the first tick at once, a late pass delays
/// the next rather than bunching them.
pub struct Every(tokio::time::Interval);

impl Every {
    pub fn new(period: std::time::Duration) -> Self {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self(ticks)
    }

    /// Waits for the next tick: `false` once `shutdown` fires instead.
    pub async fn tick(&mut self, shutdown: &CancellationToken) -> bool {
        shutdown.run_until_cancelled(self.0.tick()).await.is_some()
    }
}
