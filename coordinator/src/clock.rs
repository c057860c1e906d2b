//! The coordinator's clocks as one value. The pool and the state machines
//! never read a clock: whoever calls them (the gRPC handlers, the ticker,
//! start-up) reads both clocks once with [`Now::system`] and passes the
//! moment in, so tests choose the time and a call sees one consistent now.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// One moment on both clocks: the monotonic one runs the pool's timers, the
/// wall clock dates what it reports and stores (deadlines, the timeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

impl Now {
    /// The clocks as they read now (tokio's clock: paused in tests).
    pub fn system() -> Self {
        Self {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

impl std::ops::Add<Duration> for Now {
    type Output = Now;
    fn add(self, d: Duration) -> Now {
        Now {
            mono: self.mono + d,
            wall: self.wall + d,
        }
    }
}
